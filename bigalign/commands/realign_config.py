"""The configuration of ``bigalign realign`` (:func:`bigalign.commands.realign.realign`): the
TOML file's tables read and validated (:func:`load_config`) into :class:`RealignConfig`, and
the gated metrics (:data:`GATED`) that parsing and the verdict follow.

Every unknown key, wrong type or missing required key raises InputError naming it (exit 2),
before any work starts.
"""

from __future__ import annotations

import logging
import os
from dataclasses import asdict, dataclass, field
from typing import Optional, Union

from ..errors import InputError
from ..options import FitOptions
from ..storage.locations import canonical_url

log = logging.getLogger("bigalign")

__all__ = ["load_config", "RealignConfig", "GateConfig", "ApplyConfig", "GATED",
           "FIT_OPTIONS", "APPLY_OPTIONS"]

FIT_OPTIONS = {"center": bool, "normalize": bool, "scale": bool, "reflection": bool,
               "diagnostics": bool, "precision": str, "method": str, "ridge": float,
               "rank": int, "holdout": float, "max_holdout": int}
APPLY_OPTIONS = {"dtype": str, "renormalize": bool, "target_centred": bool,
                 "compression": str, "chunk_rows": int, "bad_rows": str}

# ---------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------

#: The gated metrics: ``[gate] KEY = threshold`` checks that the candidate's held-out
#: FIGURE (a key of ``bigalign.commands.realign._figures``) is at least ("min") or at most
#: ("max") the threshold. Adding a gated metric is one entry here and a field of the same
#: name in :class:`GateConfig` (and, for a new figure, a key in ``realign._figures``), plus
#: its test; parsing, the verdict and the summary follow from the table.
GATED = {"min_recall_at_10": ("recall@10", "min"),
         "max_relative_residual": ("relative_residual", "max")}


@dataclass(frozen=True)
class GateConfig:
    """The quality gate. ``None`` thresholds are not checked; ``tolerance`` is how much
    worse than the current version (recall@10 lower, residual higher, absolute) still
    counts as "not worse"; ``max_queries`` caps the held-out queries searched (a seeded
    sample; every held-out target is always searched)."""

    min_recall_at_10: Optional[float] = None
    max_relative_residual: Optional[float] = None
    not_worse_than_current: bool = True
    tolerance: float = 0.0
    max_queries: int = 10_000


@dataclass(frozen=True)
class ApplyConfig:
    """Map ``corpus`` with the new version into ``output`` ({version} replaced), with
    :func:`bigalign.apply`'s ``options``."""

    corpus: str
    output: str
    options: dict = field(default_factory=dict)


@dataclass(frozen=True)
class RealignConfig:
    registry: str
    source: str
    target: str
    holdout: float = 0.1
    holdout_seed: int = 0
    pair_by: str = "auto"
    duplicates: str = "error"
    fit: dict = field(default_factory=dict)
    gate: GateConfig = field(default_factory=GateConfig)
    apply: Optional[ApplyConfig] = None
    storage_options: dict = field(default_factory=dict)
    scratch: Optional[str] = None

    def identity(self) -> dict:
        """What identifies the run's work (the fingerprint's configuration part): every key
        but the execution ones (storage options, scratch)."""
        out = asdict(self)
        out.pop("storage_options")
        out.pop("scratch")
        out["registry"] = canonical_url(self.registry)
        return out


def _toml_loads(text: str) -> dict:
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the tomli backport (a dependency there)
        import tomli as tomllib
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise InputError(f"not valid TOML: {e}") from None


def _keys(table: dict, allowed, where: str) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        raise InputError(f"{where}: unknown key{'s' if len(unknown) > 1 else ''} "
                         f"{', '.join(unknown)} (allowed: {', '.join(sorted(allowed))})")


def _typed(value, kind, where: str):
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise InputError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise InputError(f"{where}: expected an integer, got {value!r}")
        return value
    if not isinstance(value, kind):
        raise InputError(f"{where}: expected {kind.__name__}, got {value!r}")
    return value


def _located(value: str, base: str) -> str:
    """A local relative path is relative to the configuration file's folder."""
    if "://" in value or "::" in value or os.path.isabs(os.path.expanduser(value)):
        return os.path.expanduser(value)
    return os.path.normpath(os.path.join(base, value))


def load_config(path_or_text: Union[str, os.PathLike, dict], *, base: Optional[str] = None
                ) -> RealignConfig:
    """Read and validate a realign configuration: a TOML file path, or an already parsed
    dict (``base``: the folder relative paths are relative to). Unknown keys, wrong types
    and missing required keys raise InputError naming them."""
    if isinstance(path_or_text, dict):
        data, base = path_or_text, base or os.getcwd()
    else:
        data, base = _read_toml(os.fspath(path_or_text), base)
    _keys(data, ("registry", "pairs", "fit", "gate", "apply", "storage_options", "scratch"),
          "configuration")
    if "registry" not in data:
        raise InputError("configuration: 'registry' is required (a path or URL)")
    pairs = data.get("pairs")
    if not isinstance(pairs, dict) or "source" not in pairs or "target" not in pairs:
        raise InputError("configuration: [pairs] with 'source' and 'target' is required")
    holdout, pair_by, duplicates = _pairs_options(pairs)
    fit = _fit_options(data.get("fit"))
    gate_cfg = _gate_config(data.get("gate"))
    apply_cfg = None if data.get("apply") is None else _apply_config(data["apply"], base)
    so = data.get("storage_options") or {}
    if not isinstance(so, dict):
        raise InputError("configuration: storage_options must be a table")
    scratch = data.get("scratch")
    return RealignConfig(
        registry=_located(_typed(data["registry"], str, "registry"), base),
        source=_located(_typed(pairs["source"], str, "[pairs] source"), base),
        target=_located(_typed(pairs["target"], str, "[pairs] target"), base),
        holdout=holdout,
        holdout_seed=_typed(pairs.get("holdout_seed", 0), int, "[pairs] holdout_seed"),
        pair_by=pair_by, duplicates=duplicates, fit=fit, gate=gate_cfg, apply=apply_cfg,
        storage_options=dict(so),
        scratch=None if scratch is None else _located(_typed(scratch, str, "scratch"), base))


def _read_toml(path: str, base: Optional[str]) -> tuple[dict, str]:
    """The parsed TOML file at ``path`` and the folder its relative paths are relative to
    (``base``, else the file's own folder)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise InputError(f"realign configuration {path!r}: {e.strerror or e}") from None
    try:
        data = _toml_loads(text)
    except InputError as e:
        raise InputError(f"realign configuration {path!r}: {e}") from None
    return data, base or os.path.dirname(os.path.abspath(path))


def _pairs_options(pairs: dict) -> tuple[float, str, str]:
    """``[pairs]``'s keys checked, and its (holdout, pair_by, duplicates)."""
    _keys(pairs, ("source", "target", "holdout", "holdout_seed", "pair_by", "duplicates"),
          "[pairs]")
    holdout = _typed(pairs.get("holdout", 0.1), float, "[pairs] holdout")
    if not 0.0 < holdout < 1.0:
        raise InputError(f"[pairs] holdout must be between 0 and 1 (exclusive), got {holdout}")
    pair_by = _typed(pairs.get("pair_by", "auto"), str, "[pairs] pair_by")
    if pair_by not in ("auto", "rows", "ids"):
        raise InputError(f"[pairs] pair_by must be auto, rows or ids, got {pair_by!r}")
    duplicates = _typed(pairs.get("duplicates", "error"), str, "[pairs] duplicates")
    if duplicates not in ("error", "first", "last"):
        raise InputError(f"[pairs] duplicates must be error, first or last, got {duplicates!r}")
    return holdout, pair_by, duplicates


def _fit_options(table: Optional[dict]) -> dict:
    """``[fit]``: options of :func:`bigalign.fit` (:data:`FIT_OPTIONS`), checked."""
    fit = dict(table or {})
    _keys(fit, FIT_OPTIONS, "[fit]")
    for k, v in fit.items():
        _typed(v, FIT_OPTIONS[k], f"[fit] {k}")
    try:
        FitOptions(**fit)  # validated where every fit's options are
    except InputError as e:
        raise InputError(f"[fit]: {e} (in the config, the key without the dashes: "
                         "max_holdout for --max-holdout)") from None
    return fit


def _gate_config(table: Optional[dict]) -> GateConfig:
    """``[gate]``: the thresholds of :data:`GATED` and the comparison with the current
    version; warns when it checks nothing."""
    g = dict(table or {})
    _keys(g, (*GATED, "not_worse_than_current", "tolerance", "max_queries"), "[gate]")
    gate_cfg = GateConfig(
        **{key: None if g.get(key) is None else _typed(g[key], float, f"[gate] {key}")
           for key in GATED},
        not_worse_than_current=_typed(g.get("not_worse_than_current", True), bool,
                                      "[gate] not_worse_than_current"),
        tolerance=_typed(g.get("tolerance", 0.0), float, "[gate] tolerance"),
        max_queries=_typed(g.get("max_queries", 10_000), int, "[gate] max_queries"))
    if gate_cfg.max_queries < 1:
        raise InputError("[gate] max_queries must be positive")
    if all(getattr(gate_cfg, key) is None for key in GATED) and \
            not gate_cfg.not_worse_than_current:
        log.warning("the [gate] checks nothing: every candidate will be published")
    return gate_cfg


def _apply_config(table, base: str) -> ApplyConfig:
    """``[apply]``: corpus, output (with ``{version}``) and options of
    :func:`bigalign.apply` (:data:`APPLY_OPTIONS`), all checked now, not after the version
    is written (apply runs after the publish)."""
    a = dict(table)
    _keys(a, ("corpus", "output", *APPLY_OPTIONS), "[apply]")
    if "corpus" not in a or "output" not in a:
        raise InputError("[apply] needs 'corpus' and 'output'")
    output = _typed(a.pop("output"), str, "[apply] output")
    if "{version}" not in output:
        raise InputError(f"[apply] output {output!r} must contain {{version}} (each "
                         "version maps the corpus into its own output)")
    try:
        output.format(version="v0001")
    except (KeyError, IndexError, ValueError) as e:
        raise InputError(f"[apply] output {output!r}: only {{version}} may be replaced "
                         f"({type(e).__name__}: {e})") from None
    corpus = _typed(a.pop("corpus"), str, "[apply] corpus")
    for k, v in a.items():
        _typed(v, APPLY_OPTIONS[k], f"[apply] {k}")
    # checked now, not after the version is written (apply runs after the publish)
    from ..options import ApplyOptions
    from ..storage.stores import COMPRESSIONS
    try:
        ApplyOptions(**{k: v for k, v in a.items() if k != "compression"})
    except InputError as e:
        raise InputError(f"[apply]: {e}") from None
    if a.get("compression", "none") not in COMPRESSIONS:
        raise InputError(f"[apply] compression must be one of {', '.join(COMPRESSIONS)}, "
                         f"got {a['compression']!r}")
    return ApplyConfig(_located(corpus, base), _located(output, base), a)
