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

__all__ = ["load_config", "RealignConfig", "GateConfig", "ApplyConfig", "GATED", "RENAMED",
           "TOLERANCE",
           "FIT_OPTIONS", "APPLY_OPTIONS"]

FIT_OPTIONS = {"center": bool, "normalize": bool, "scale": bool, "reflection": bool,
               "diagnostics": bool, "precision": str, "method": str, "ridge": float,
               "rank": int, "holdout": float, "max_holdout": int,
               "select": str, "select_search": str}
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
         "max_heldout_relative_residual": ("heldout_relative_residual", "max")}

#: Keys of earlier versions, refused with the name that replaced them: the training
#: relative residual (``info``, ``registry show``: train_relative_residual) and the gate's
#: held-out one are different numbers.
RENAMED = {"max_relative_residual": "max_heldout_relative_residual"}

#: Default ``[gate] tolerance``: how far below the current version (recall@10) or above it
#: (held-out relative residual) a candidate may be, with confidence, before it is "worse";
#: and how far below staying on the old model the bridge may be. 0.005 is one query in
#: 200, about one standard error of recall@10 over the default 10,000 held-out queries
#: (sqrt(p(1 - p) / n) <= 0.005), and half a percent of the target's held-out spread.
TOLERANCE = 0.005


@dataclass(frozen=True)
class GateConfig:
    """The quality gate. ``None`` thresholds are not checked (against the point
    estimate); ``tolerance`` is how much worse than the current version (recall@10 lower,
    held-out residual higher, absolute), or than staying on the old model, still counts as
    "not worse": a comparison fails only when the bootstrap interval of the paired
    difference lies wholly beyond it (see ``realign.gate``); ``max_queries`` caps the
    held-out queries searched (a seeded sample; every held-out target is always searched).
    ``confidence`` and ``resamples``: the bootstrap's level and resamples (seed 0).
    ``queries_old`` / ``queries_new``: the same queries embedded by the old and the new
    model, for ``not_worse_than_stay`` (:mod:`bigalign.commands.realign_stay`).
    ``allow_ungated``: publish without any absolute check (else refused)."""

    min_recall_at_10: Optional[float] = None
    max_heldout_relative_residual: Optional[float] = None
    not_worse_than_current: bool = True
    not_worse_than_stay: bool = False
    tolerance: float = TOLERANCE
    max_queries: int = 10_000
    confidence: float = 0.95
    resamples: int = 1000
    queries_old: Optional[str] = None
    queries_new: Optional[str] = None
    allow_ungated: bool = False


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
    gate_cfg = _gate_config(data.get("gate"), base)
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


_GATE_FLAGS = {"not_worse_than_current": True, "not_worse_than_stay": False,
               "allow_ungated": False}


def _gate_config(table: Optional[dict], base: str = ".") -> GateConfig:
    """``[gate]``: the thresholds of :data:`GATED`, the comparisons with the current
    version and with staying on the old model. Refuses a gate that checks no candidate on
    its own (no threshold, no ``not_worse_than_stay``: the first version would be
    published unchecked) unless ``allow_ungated = true``, and ``not_worse_than_stay``
    without ``queries_old`` and ``queries_new``."""
    g = dict(table or {})
    for old, new in RENAMED.items():
        if old in g:
            raise InputError(f"[gate] {old} was renamed {new}: it reads the held-out "
                             "relative residual ||sAQ - B||^2 / ||B - mean B||^2 over the "
                             "held-out pairs, not the training one that info and registry "
                             "show print (train_relative_residual); rename the key")
    _keys(g, (*GATED, *_GATE_FLAGS, "tolerance", "max_queries", "confidence", "resamples",
              "queries_old", "queries_new"), "[gate]")
    paths = {k: None if g.get(k) is None else _located(_typed(g[k], str, f"[gate] {k}"), base)
             for k in ("queries_old", "queries_new")}
    gate_cfg = GateConfig(
        **{key: None if g.get(key) is None else _typed(g[key], float, f"[gate] {key}")
           for key in GATED},
        **{key: _typed(g.get(key, default), bool, f"[gate] {key}")
           for key, default in _GATE_FLAGS.items()},
        tolerance=_typed(g.get("tolerance", TOLERANCE), float, "[gate] tolerance"),
        max_queries=_typed(g.get("max_queries", 10_000), int, "[gate] max_queries"),
        confidence=_typed(g.get("confidence", 0.95), float, "[gate] confidence"),
        resamples=_typed(g.get("resamples", 1000), int, "[gate] resamples"), **paths)
    if gate_cfg.max_queries < 1 or gate_cfg.resamples < 1:
        raise InputError("[gate] max_queries and resamples must be positive")
    if not 0.0 < gate_cfg.confidence < 1.0:
        raise InputError(f"[gate] confidence must be between 0 and 1, got "
                         f"{gate_cfg.confidence}")
    if gate_cfg.tolerance < 0:
        raise InputError(f"[gate] tolerance must be 0 or more, got {gate_cfg.tolerance}")
    if (paths["queries_old"] is None) != (paths["queries_new"] is None):
        raise InputError("[gate] queries_old and queries_new go together (the same queries "
                         "embedded by the old and by the new model)")
    if gate_cfg.not_worse_than_stay and paths["queries_old"] is None:
        raise InputError("[gate] not_worse_than_stay needs queries_old and queries_new (the "
                         "same held-out queries embedded by the old and the new model): "
                         "without them the gate cannot tell what staying would give")
    checks = [key for key in GATED if getattr(gate_cfg, key) is not None]
    if not checks and not gate_cfg.not_worse_than_stay and not gate_cfg.allow_ungated:
        raise InputError("[gate] sets no threshold (min_recall_at_10, "
                         "max_heldout_relative_residual) and not not_worse_than_stay: every "
                         "candidate (the first one unchecked) would be published. Set one, "
                         "or say allow_ungated = true to publish ungated on purpose")
    if gate_cfg.allow_ungated and not checks and not gate_cfg.not_worse_than_stay:
        log.warning("[gate] allow_ungated: no threshold is checked; only the comparison "
                    "with the current version, if any, can reject a candidate")
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
