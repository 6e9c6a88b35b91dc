"""``bigalign realign``: the scheduled re-alignment job, gated and published to a registry.

A scheduler (Kubernetes CronJob, Argo CronWorkflow, SLURM) runs it after each retraining::

    bigalign realign realign.toml --run-id "$JOB_NAME" --summary /tmp/summary.json

with a TOML file (:func:`load_config`; relative local paths are relative to the file)::

    registry = "s3://bucket/align/registry"
    [pairs]
    source = "s3://bucket/pairs/old.zarr"    # embedding stores (pairs by id) or bare arrays
    target = "s3://bucket/pairs/new.zarr"
    holdout = 0.1                            # held out for the gate, chosen stably by id/row
    [fit]
    center = true                            # any fit option
    [gate]
    min_recall_at_10 = 0.9                   # held-out recall@10, mapped source -> native target
    max_relative_residual = 0.6
    not_worse_than_current = true            # the current version, on the same held-out pairs
    [apply]                                  # optional: map the corpus with the new version
    corpus = "s3://bucket/corpus/old.zarr"
    output = "s3://bucket/corpus/mapped-{version}.zarr"

The steps, each resumable, with their progress under ``REG/runs/<run id>/``:

1. **split** the pairs into training and held-out pairs (:func:`holdout_mask`): pair *k*
   (its id when both inputs are stores with ids and are paired by id, else its row number)
   is held out when ``u(k) < holdout``, with ``u`` a 64-bit hash of the key mapped to
   [0, 1) (splitmix64 for integer keys, BLAKE2b for strings). The choice depends on the key
   alone: adding pairs never moves an existing pair between the sets, raising ``holdout``
   only moves pairs into the held-out set, and every run on the same pair set holds out
   the same pairs, so the current version (fitted by an earlier run) never trained on
   this run's held-out pairs.
2. **gather** both sets into Zarr arrays in the run folder (``pairs/train-source.zarr``,
   ...): each stored chunk of an input is read once, into a local memory-mapped scratch
   (:func:`bigalign.execution.pairing.gather`; ``--scratch``-like ``scratch`` key), then written out.
   The fit, the evaluation and a resume then read these row-aligned copies, on a cluster too.
3. **fit** the candidate on the training copies with :func:`bigalign.fit` (its own
   checkpointed job: a killed fit resumes unit by unit).
4. **evaluate** the candidate, the current version and no alignment (equal dimensions) on
   the held-out copies with :func:`bigalign.commands.evaluate.evaluate_maps`: recall@1/@10 (cosine,
   mapped source rows searched among every held-out native target row) and the relative
   residual. Recorded in ``evaluation.json``.
5. **gate** (:func:`gate`): thresholds, and "not worse than current" (candidate recall@10
   >= current's - tolerance and residual <= current's + tolerance). A failed gate
   publishes nothing: the verdict says why, and the command exits 4.
6. **publish**: the candidate becomes the next version (transform, then its record);
7. **apply** (optional): the corpus is mapped with that version into ``output``
   (``{version}`` replaced), resumable as any apply;
8. the registry's ``current`` pointer moves to the version (last, atomically), the run's
   scratch copies are removed and ``verdict.json`` is written.

The corpus is mapped before the pointer moves, so a reader that sees version vN current
finds ``mapped-vN`` complete. The whole run holds the registry's *realign lease*
(:meth:`~bigalign.storage.registry.Registry.realign_lock`): a second realign on the same
registry is refused (exit 2) while it runs. The registry lock itself is held only to write
the version (step 6) and to move the pointer (step 8), waiting up to :data:`LOCK_WAIT`
seconds for a rollback or gc that holds it; so a ``registry rollback`` or ``gc`` runs
during the fit, the evaluation or the corpus apply. The pointer moves only to the version
this run wrote, checked under the lock (its record names this run and the candidate's
digest, and the version is not damaged). Rerunning a run id
resumes it; once finished it does nothing and reports the recorded verdict (exit 0 when it
published, 4 when its gate failed); with other inputs or options it is refused naming what
changed (exit 2). Without ``--run-id`` the run id is derived from the configuration and the
inputs' fingerprints, so the same command on unchanged data is the same run.

Fault points (``BIGALIGN_FAULTS``, :mod:`bigalign.execution.faults`): ``realign.split`` (both sets
gathered), ``realign.fitted``, ``realign.evaluated``, ``realign.version-written``,
``realign.applied``, ``realign.published`` (pointer moved, verdict not yet written).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from typing import Optional, Union

import numpy as np

from .. import __version__

from ..execution import faults
from ..storage.job import Job, checkpointed, describe_changes
from ..errors import InputError
from ..storage.locations import canonical_url, check_disjoint, options_for
from ..planning.options import Execution
from ..execution.pairing import pair_by_ids
from ..storage.registry import Registry

log = logging.getLogger("bigalign")

__all__ = ["realign", "load_config", "RealignConfig", "GateConfig", "ApplyConfig", "GATED",
           "holdout_mask", "stable_unit", "gate", "summary"]

VERDICT_FORMAT = "bigalign.realign-verdict/1"
FIT_OPTIONS = {"center": bool, "normalize": bool, "scale": bool, "reflection": bool,
               "diagnostics": bool, "precision": str}
APPLY_OPTIONS = {"dtype": str, "renormalize": bool, "target_centred": bool,
                 "compression": str, "chunk_rows": int, "bad_rows": str}
#: bytes of input per chunk of the gathered copies
COPY_CHUNK_BYTES = 16 * 2**20
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: seconds the version write and the publish wait for the registry lock (a rollback or gc
#: holds it for seconds; a holder that died on another machine until its lease lapses, 120 s)
LOCK_WAIT = 180.0


# ---------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------

#: The gated metrics: ``[gate] KEY = threshold`` checks that the candidate's held-out
#: FIGURE (a key of :func:`_figures`) is at least ("min") or at most ("max") the threshold.
#: Adding a gated metric is one entry here and a field of the same name in
#: :class:`GateConfig` (and, for a new figure, a key in :func:`_figures`), plus its test;
#: parsing, the verdict and the summary follow from the table.
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
        path = os.fspath(path_or_text)
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except OSError as e:
            raise InputError(f"realign configuration {path!r}: {e.strerror or e}") from None
        try:
            data = _toml_loads(text)
        except InputError as e:
            raise InputError(f"realign configuration {path!r}: {e}") from None
        base = base or os.path.dirname(os.path.abspath(path))
    _keys(data, ("registry", "pairs", "fit", "gate", "apply", "storage_options", "scratch"),
          "configuration")
    if "registry" not in data:
        raise InputError("configuration: 'registry' is required (a path or URL)")
    pairs = data.get("pairs")
    if not isinstance(pairs, dict) or "source" not in pairs or "target" not in pairs:
        raise InputError("configuration: [pairs] with 'source' and 'target' is required")
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
    fit = dict(data.get("fit") or {})
    _keys(fit, FIT_OPTIONS, "[fit]")
    for k, v in fit.items():
        _typed(v, FIT_OPTIONS[k], f"[fit] {k}")
    if fit.get("precision", "auto") not in ("auto", "float32", "float64"):
        raise InputError(f"[fit] precision must be auto, float32 or float64, got "
                         f"{fit['precision']!r}")
    g = dict(data.get("gate") or {})
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
    apply_cfg = None
    if data.get("apply") is not None:
        a = dict(data["apply"])
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
        from ..planning.options import ApplyOptions
        from ..storage.stores import COMPRESSIONS
        try:
            ApplyOptions(**{k: v for k, v in a.items() if k != "compression"})
        except InputError as e:
            raise InputError(f"[apply]: {e}") from None
        if a.get("compression", "none") not in COMPRESSIONS:
            raise InputError(f"[apply] compression must be one of {', '.join(COMPRESSIONS)}, "
                             f"got {a['compression']!r}")
        apply_cfg = ApplyConfig(_located(corpus, base), _located(output, base), a)
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


# ---------------------------------------------------------------------------------------
# the held-out split: a stable function of each pair's key
# ---------------------------------------------------------------------------------------

_M1, _M2, _GOLDEN = (np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB),
                     np.uint64(0x9E3779B97F4A7C15))


def _splitmix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser (Steele et al. 2014), elementwise on uint64 (wrapping)."""
    z = x.astype(np.uint64) + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


def stable_unit(keys, seed: int = 0) -> np.ndarray:
    """A uniform number in [0, 1) per key, a pure function of (key, seed): (n,) float64.

    Integer keys (ids or row numbers, as int64) go through splitmix64; string keys (any
    numpy string dtype, or bytes) through BLAKE2b-64 of their UTF-8 bytes. The top 53 bits
    of the hash make the float."""
    keys = np.asarray(keys)
    salt = _splitmix64(np.array([seed], dtype=np.int64).view(np.uint64))[0]
    if keys.dtype.kind in "iub":
        h = _splitmix64(keys.astype(np.int64).view(np.uint64) ^ salt)
    else:
        person = int(salt).to_bytes(8, "little")
        def digest(k) -> int:
            raw = k if isinstance(k, bytes) else str(k).encode("utf-8")
            return int.from_bytes(hashlib.blake2b(raw, digest_size=8, person=person).digest(),
                                  "little")
        h = np.fromiter((digest(k) for k in keys.tolist()), dtype=np.uint64, count=len(keys))
    return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def holdout_mask(keys, fraction: float, seed: int = 0) -> np.ndarray:
    """(n,) bool: which keys are held out, ``stable_unit(key, seed) < fraction``."""
    return stable_unit(keys, seed) < fraction


@dataclass
class _Side:
    """One input of the pairs: its embeddings, ids (or None) and model stamp."""

    name: str
    url: str
    emb: object  # bigalign.storage.stores.EmbeddingArray
    ids: object = None
    model: Optional[str] = None

    def fingerprint(self) -> dict:
        from ..storage.stores import content_witness

        fp = dict(self.emb.fingerprint(), canonical_url=canonical_url(self.emb.url),
                  model=self.model)
        if self.ids is not None:
            fp["ids"] = {"shape": list(self.ids.shape), "dtype": str(self.ids.dtype),
                         "content": content_witness(self.ids)}
        return fp


def _open_side(name: str, url: str, so) -> _Side:
    from ..storage.embedding_store import store_parts
    from ..storage.stores import open_embeddings

    emb_url, ids, model = store_parts(url, so)
    return _Side(name, url, open_embeddings(emb_url, side=name, storage_options=so), ids, model)


def _ids_at(ids, rows: np.ndarray) -> np.ndarray:
    """ids[rows] for ascending ``rows``, read a few chunks at a time."""
    step = max(int(ids.chunks[0]), 1 << 16)
    parts = []
    for s in range(0, int(ids.shape[0]), step):
        lo, hi = np.searchsorted(rows, [s, s + step])
        if hi > lo:
            parts.append(np.asarray(ids[s:s + step])[rows[lo:hi] - s])
    return np.concatenate(parts) if parts else np.array([], dtype=np.int64)


def _split(cfg: RealignConfig, src: _Side, tgt: _Side, by_ids: bool) -> dict:
    """The training and held-out pairs: row arrays of both sides, counts and a digest."""
    from ..execution.pairing import join

    if by_ids:
        pairs = join(src.ids, tgt.ids, duplicates=cfg.duplicates)
        s_rows, t_rows = pairs.source_rows, pairs.target_rows
        keys = _ids_at(src.ids, s_rows)
        unmatched = {"source_only": pairs.source_only, "target_only": pairs.target_only}
    else:
        from ..storage.stores import validate_pair
        validate_pair(src.emb, tgt.emb)
        s_rows = t_rows = keys = np.arange(src.emb.rows, dtype=np.int64)
        unmatched = {}
    held = holdout_mask(keys, cfg.holdout, cfg.holdout_seed)
    out = {"train_source": s_rows[~held], "train_target": t_rows[~held],
           "holdout_source": s_rows[held], "holdout_target": t_rows[held]}
    n_train, n_hold = int((~held).sum()), int(held.sum())
    if n_train < 2 or n_hold < 2:
        raise InputError(f"holdout {cfg.holdout} of {len(keys)} pairs leaves {n_train} "
                         f"training and {n_hold} held-out pairs: too few (need at least 2 "
                         "of each)")
    if n_hold < 100:
        log.warning("only %d held-out pairs: the gate's figures are noisy", n_hold)
    h = hashlib.sha256()
    for k in ("train_source", "train_target", "holdout_source", "holdout_target"):
        h.update(np.ascontiguousarray(out[k], dtype="<i8").tobytes())
    counts = {"by": "ids" if by_ids else "rows", "pairs": len(keys), "train": n_train,
              "holdout": n_hold, "holdout_fraction": cfg.holdout, "holdout_seed": cfg.holdout_seed,
              "sha256": h.hexdigest(), **unmatched}
    return {"rows": out, "summary": counts}


# ---------------------------------------------------------------------------------------
# the run's files under REG/runs/<run id>/
# ---------------------------------------------------------------------------------------

class _RunFiles:
    """JSON files and gathered arrays of one realign run, written fenced by its job."""

    def __init__(self, reg: Registry, run_id: str, job: Job):
        self.reg, self.run_id, self.job = reg, run_id, job
        self.url = reg.run_url(run_id)

    def read(self, name: str) -> Optional[dict]:
        return self.reg._json("runs", self.run_id, name)

    def write(self, name: str, value: dict) -> None:
        from ..jsonsafe import json_safe

        self.job.fenced_put(self.reg._path("runs", self.run_id, name),
                            json.dumps(json_safe(value), indent=1).encode())

    def array(self, part: str) -> str:
        return f"{self.url}/pairs/{part}.zarr"

    @property
    def candidate(self) -> str:
        return f"{self.url}/candidate.transform"

    def remove(self, *parts: str) -> None:
        """Remove a gathered copy or the candidate (and its checkpoint), named by its parts
        under the run folder: files this run wrote. Missing is fine."""
        fs, path = self.reg.files.fs, self.reg._path("runs", self.run_id, *parts)
        self.job.check_fence()
        for p in (path, path + ".checkpoint"):
            try:
                if fs.exists(p):
                    fs.rm(p, recursive=True)
            except FileNotFoundError:
                pass


def _copy_complete(url: str, digest: str, so) -> bool:
    import zarr

    try:
        arr = zarr.open_array(url, mode="r", storage_options=options_for(url, so))
    except Exception:
        return False
    info = arr.attrs.get("bigalign_pairs") or {}
    return bool(info.get("complete")) and info.get("sha256") == digest


def _copy_chunk_rows(*sides: _Side) -> int:
    """Rows per chunk of the gathered copies, the same on both sides (so the fit's blocks
    align): the smaller input chunk, at most COPY_CHUNK_BYTES of the wider side."""
    widest = max(s.emb.row_bytes for s in sides)
    return max(1, min(min(s.emb.row_step for s in sides), COPY_CHUNK_BYTES // widest))


def _gather_side(side: _Side, parts: dict, files: _RunFiles, digest: str, so,
                 scratch: Optional[str], threads: Optional[int], chunk_rows: int) -> None:
    """Write the training and held-out rows of one side as Zarr copies (each stored chunk
    of the input read once, through a local memory-mapped scratch)."""
    import zarr

    from ..execution.pairing import GatherReport, gather

    todo = {p: rows for p, rows in parts.items()
            if not _copy_complete(files.array(p), digest, so)}
    if not todo:
        return
    names = list(parts)
    rows = np.concatenate([parts[p] for p in names])
    bounds = np.cumsum([0] + [len(parts[p]) for p in names])
    emb = side.emb
    with tempfile.TemporaryDirectory(prefix="bigalign-realign-", dir=scratch) as tmp:
        report = GatherReport()
        data = gather(emb, rows, os.path.join(tmp, f"{side.name}.npy"), threads=threads,
                      report=report)
        log.info("realign: gathered %d %s rows (%d stored chunks read)", len(rows), side.name,
                 report.chunks_read)
        for i, p in enumerate(names):
            if p not in todo:
                continue
            block = data[bounds[i]:bounds[i + 1]]
            n = len(block)
            chunk = min(n, chunk_rows)
            files.job.check_fence()
            arr = zarr.create_array(files.array(p), shape=(n, emb.dim), chunks=(chunk, emb.dim),
                                    dtype=emb.dtype, compressors=None, fill_value=0.0,
                                    overwrite=True, storage_options=options_for(files.array(p), so),
                                    config={"write_empty_chunks": True},
                                    attributes={"bigalign_pairs": {"complete": False}})

            def write(s: int, arr=arr, block=block, chunk=chunk) -> None:
                arr[s:s + chunk] = np.asarray(block[s:s + chunk])

            with ThreadPoolExecutor(max_workers=threads or os.cpu_count() or 1) as pool:
                list(pool.map(write, range(0, n, chunk)))
            files.job.check_fence()
            arr.attrs["bigalign_pairs"] = {"complete": True, "sha256": digest, "rows": n,
                                           "run_id": files.run_id}
        del data


# ---------------------------------------------------------------------------------------
# evaluation and the gate
# ---------------------------------------------------------------------------------------

def _figures(entry: dict) -> dict:
    raw, cen = entry["retrieval"]["raw"], entry["retrieval"]["centred"]
    return {"recall@1": raw["recall@1"], "recall@10": raw["recall@10"],
            "recall@10_centred": cen["recall@10"],
            "relative_residual": entry["relative_residual"],
            "cosine_mean": entry["cosine"]["mean"]}


def _evaluate(cfg: RealignConfig, reg: Registry, files: _RunFiles, so,
              threads: Optional[int]) -> dict:
    """Candidate, current version and no alignment on the held-out copies."""
    from .evaluate import evaluate_maps
    from ..maths.metrics import AffineMap, Method
    from ..transform import Transform

    cand = Transform.load(files.candidate, storage_options=so)
    methods = [Method("candidate", AffineMap.from_transform(cand), "this run's fit",
                      this=True)]
    current, why = reg.current(), None
    if current is not None:
        cur = reg.load(current)
        cand_model, cur_model = cand.metadata.get("source_model"), cur.metadata.get("source_model")
        if tuple(cur.dims) != tuple(cand.dims):
            why = f"{current} maps {cur.dims[0]} -> {cur.dims[1]} dims, the candidate " \
                  f"{cand.dims[0]} -> {cand.dims[1]}"
        elif cand_model and cur_model and cand_model != cur_model:
            why = f"{current} maps vectors of {cur_model!r}, the candidate of {cand_model!r}"
        else:
            methods.append(Method("current", AffineMap.from_transform(cur), current))
        if why:
            log.warning("realign: the current version is not comparable: %s", why)
    dim_a, dim_b = cand.dims
    if dim_a == dim_b:
        methods.append(Method("none", AffineMap.identity(dim_a, cand.normalize),
                              "source vectors as they are"))
    result = evaluate_maps(methods, files.array("holdout_source"),
                           files.array("holdout_target"), ks=(1, 10),
                           max_queries=cfg.gate.max_queries, seed=0,
                           normalize_target=cand.normalize, storage_options=so,
                           workers=threads, command="realign")
    return {"pairs": result["pairs"], "queries": result["queries"],
            "compared_with": current if why is None else None,
            "current_version": current, "not_comparable": why,
            "methods": {m["name"]: _figures(m) for m in result["methods"]},
            "train_relative_residual": cand.metadata.get("relative_residual"),
            "train_pairs": cand.metadata.get("n_pairs")}


def gate(g: GateConfig, evaluation: dict) -> dict:
    """The verdict of the gate on an evaluation (:func:`_evaluate`'s record): {"passed",
    "criteria": [{name, passed, value, threshold | current, note}]}. NaN never passes."""
    cand = evaluation["methods"]["candidate"]
    cur = evaluation["methods"].get("current")
    criteria = []
    for key, (figure, direction) in GATED.items():
        threshold = getattr(g, key)
        if threshold is not None:
            v = cand[figure]
            criteria.append({"name": key, "value": v, "threshold": threshold,
                             "passed": bool(v >= threshold if direction == "min" else
                                            v <= threshold)})
    if g.not_worse_than_current:
        c = {"name": "not_worse_than_current", "tolerance": g.tolerance}
        if cur is None:
            c.update(passed=True, note=evaluation.get("not_comparable") and
                     f"not compared: {evaluation['not_comparable']}" or "no current version")
        else:
            ok_recall = cand["recall@10"] >= cur["recall@10"] - g.tolerance
            ok_resid = cand["relative_residual"] <= cur["relative_residual"] + g.tolerance
            c.update(version=evaluation.get("compared_with"),
                     value={"recall@10": cand["recall@10"],
                            "relative_residual": cand["relative_residual"]},
                     current={"recall@10": cur["recall@10"],
                              "relative_residual": cur["relative_residual"]},
                     passed=bool(ok_recall and ok_resid))
        criteria.append(c)
    return {"passed": all(c["passed"] for c in criteria), "criteria": criteria}


# ---------------------------------------------------------------------------------------
# the job
# ---------------------------------------------------------------------------------------

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _finished(reg: Registry, run_id: str, fingerprint: dict) -> Optional[dict]:
    """The recorded verdict when run ``run_id`` finished with this fingerprint; refuses
    (InputError, exit 2) when it finished with other inputs or options; None otherwise."""
    verdict = reg.verdict(run_id)
    if verdict is None:
        return None
    changes = describe_changes(verdict.get("fingerprint") or {}, fingerprint)
    if changes:
        raise InputError(f"realign run {run_id!r} already finished ({verdict.get('status')}) "
                         "with other inputs or options:\n  " + "\n  ".join(changes) +
                         "\nUse another --run-id for a new run.")
    log.warning("realign run %s already finished (%s%s): nothing to do", run_id,
                verdict.get("status"), f", {verdict['version']}" if verdict.get("version") else "")
    return dict(verdict, already_done=True)


def _refuse_changed(reg: Registry, run_id: str, fingerprint: dict, so) -> None:
    """An unfinished run ``run_id`` started with other inputs or options is refused in
    realign's own terms (the job protocol would suggest --restart, which realign has not):
    resume it with its configuration, or start another run."""
    old = Job(f"{reg.run_url(run_id)}/job", so).manifest()
    changes = describe_changes((old or {}).get("fingerprint") or {}, fingerprint) \
        if old is not None else []
    if changes:
        raise InputError(f"realign run {run_id!r} was started with other inputs or options "
                         "and has not finished:\n  " + "\n  ".join(changes) +
                         "\nRerun it with its original configuration and inputs to finish "
                         "it, or use another --run-id for a new run.")


def _lease_held(e: BaseException) -> bool:
    """Was ``e`` a refusal because another run holds a lease (the registry's, this run's or
    its fit's)? Those are the only errors :func:`realign`'s ``wait`` retries."""
    from ..storage.lease import LeaseHeldError

    return isinstance(e, LeaseHeldError)


def realign(config, *, run_id: Optional[str] = None, execution: Optional[Execution] = None,
            storage_options: Optional[dict] = None, wait: float = 0.0) -> dict:
    """Run (or resume) one scheduled re-alignment; see the module doc.

    config : a TOML file path or a :class:`RealignConfig`.
    run_id : names the run (e.g. the Kubernetes Job or Argo workflow name): rerunning it
        resumes it, or does nothing once it finished. Default: derived from the
        configuration and the inputs' fingerprints.
    execution : where fit and apply run (:class:`bigalign.planning.options.Execution`; default
        in-process threads).
    storage_options : fsspec options, over the configuration's ``storage_options``.
    wait : seconds to keep trying while another run holds the registry (or this run's
        progress): a holder that crashed on another machine keeps its lease until it
        lapses (120 s after its last renewal), so a retried pod should wait ~180 s. 0
        (default): refuse at once (CheckpointError, exit 2).

    Returns the verdict (a JSON-ready dict): status "published" or "rejected", passed,
    version, previous / current versions, the gate's criteria and figures, exit_code (0 or
    4), already_done. A rejected candidate is not an exception here; the CLI exits 4.
    """
    cfg = config if isinstance(config, RealignConfig) else load_config(config)
    run = execution or Execution()
    so = {**cfg.storage_options, **(storage_options or {})} or None
    check_disjoint({"source": cfg.source, "target": cfg.target,
                    "corpus": cfg.apply.corpus if cfg.apply else None},
                   {"registry": cfg.registry,
                    "apply output": cfg.apply.output.format(version="v0001")
                    if cfg.apply else None}, so)
    src, tgt = _open_side("source", cfg.source, so), _open_side("target", cfg.target, so)
    by_ids = pair_by_ids(cfg.pair_by, src.ids, tgt.ids, option="[pairs] pair_by")
    fingerprint = {"config": cfg.identity(),
                   "inputs": {"source": src.fingerprint(), "target": tgt.fingerprint()}}
    if run_id is None:
        blob = json.dumps(fingerprint, sort_keys=True, default=str).encode()
        run_id = "auto-" + hashlib.sha256(blob).hexdigest()[:16]
    if not _RUN_ID.match(run_id):
        raise InputError(f"--run-id {run_id!r}: use letters, digits, '.', '_' and '-' (at "
                         "most 128, starting with a letter or digit)")
    reg = Registry(cfg.registry, so)
    deadline = time.monotonic() + max(float(wait), 0.0)
    said = -1e9
    while True:
        try:
            return _realign_locked(cfg, reg, run_id, src, tgt, by_ids, fingerprint, run, so)
        except Exception as e:
            left = deadline - time.monotonic()
            if not _lease_held(e) or left <= 0:
                raise
            if time.monotonic() - said >= 30:  # a line per 30 s, not per try
                log.warning("realign %s: %s\nwaiting for it (%.0fs left)", run_id, e, left)
                said = time.monotonic()
            time.sleep(min(2.0, left))


def _realign_locked(cfg: RealignConfig, reg: Registry, run_id: str, src: _Side, tgt: _Side,
                    by_ids: bool, fingerprint: dict, run: Execution, so) -> dict:
    """One attempt: the finished check, then the run under the realign lease (the registry
    lock only for creating the registry, writing the version and publishing)."""
    done = _finished(reg, run_id, fingerprint)
    if done is not None:
        return done
    with reg.realign_lock(run_id):
        if not reg.exists():
            with reg.lock("realign", wait=LOCK_WAIT) as lock:
                reg.create(lock)
        done = _finished(reg, run_id, fingerprint)  # finished while we waited for the lease
        if done is not None:
            return done
        _refuse_changed(reg, run_id, fingerprint, so)
        with checkpointed(f"{reg.run_url(run_id)}/job", "realign", fingerprint,
                          {"run_id": run_id}, storage_options=so) as (job, _):
            files = _RunFiles(reg, run_id, job)
            return _run(cfg, reg, files, src, tgt, by_ids, fingerprint, run, so)


def _run(cfg: RealignConfig, reg: Registry, files: _RunFiles, src: _Side,
         tgt: _Side, by_ids: bool, fingerprint: dict, run: Execution, so) -> dict:
    import bigalign

    run_id = files.run_id
    evaluation = files.read("evaluation.json")
    split = files.read("split.json")
    if evaluation is None:
        if split is None or not all(_copy_complete(files.array(p), split["sha256"], so) for p in
                                    ("train_source", "train_target", "holdout_source",
                                     "holdout_target")):
            s = _split(cfg, src, tgt, by_ids)
            split = s["summary"]
            log.info("realign %s: %d pairs (by %s): %d to fit, %d held out", run_id,
                     split["pairs"], split["by"], split["train"], split["holdout"])
            rows = s["rows"]
            for side, prefix in ((src, "source"), (tgt, "target")):
                _gather_side(side, {f"train_{prefix}": rows[f"train_{prefix}"],
                                    f"holdout_{prefix}": rows[f"holdout_{prefix}"]},
                             files, split["sha256"], so, cfg.scratch, run.threads,
                             _copy_chunk_rows(src, tgt))
            files.write("split.json", split)
        faults.point("realign.split")
        bigalign.fit(files.array("train_source"), files.array("train_target"),
                     output=files.candidate, source_model=src.model, target_model=tgt.model,
                     storage_options=so, scheduler=run.scheduler, workers=run.workers,
                     memory_limit=run.memory_limit, threads=run.threads,
                     block_bytes=run.block_bytes, progress=run.progress, device=run.device,
                     **cfg.fit)
        faults.point("realign.fitted")
        evaluation = _evaluate(cfg, reg, files, so, run.threads)
        files.write("evaluation.json", evaluation)
        faults.point("realign.evaluated")
    decision = gate(cfg.gate, evaluation)
    figures = evaluation["methods"]
    verdict = {"kind": "realign", "format": VERDICT_FORMAT, "run_id": run_id,
               "registry": reg.url, "passed": decision["passed"], "gate": decision,
               "candidate": figures["candidate"],
               "current_version": dict(figures["current"], version=evaluation["compared_with"])
               if "current" in figures else None,
               "no_alignment": figures.get("none"),
               "pairs": split, "held_out_queries": evaluation["queries"],
               "train_relative_residual": evaluation.get("train_relative_residual"),
               "fingerprint": fingerprint, "bigalign_version": __version__}
    if not decision["passed"]:
        failed = [c["name"] for c in decision["criteria"] if not c["passed"]]
        log.warning("realign %s: the gate failed (%s): nothing published; the candidate "
                    "stays at %s", run_id, ", ".join(failed), files.candidate)
        files.remove("pairs")
        verdict.update(status="rejected", version=None, candidate_transform=files.candidate,
                       previous=reg.current(), current=reg.current(), apply=None,
                       finished=_now(), exit_code=4)
        files.write("verdict.json", verdict)
        return dict(verdict, already_done=False)

    # ---- publish: the version, the corpus, then the pointer ----------------------------
    # the registry lock is held for the version write and the pointer move only
    published = files.read("publish.json") or {}
    version, digest = published.get("version"), published.get("transform_sha256")
    if version and not digest:  # a run begun before publish.json named the digest
        record = reg.record(version, missing_ok=True) or {}
        digest = record.get("transform_sha256") if record.get("run_id") == run_id else None
    if not (version and digest and _ours(reg, version, run_id, digest, missing_ok=True)):
        from ..transform import Transform

        cand = Transform.load(files.candidate, storage_options=so)
        with reg.lock(f"version write of realign run {run_id!r}", wait=LOCK_WAIT) as lock:
            if version:
                record = reg.record(version, missing_ok=True)
                if record is not None and record.get("run_id") != run_id:
                    version = None  # its number was taken meanwhile (gc'd and reused)
            if not version:
                version = reg.next_version()
            digest = cand.digest()
            files.write("publish.json", {"version": version, "transform_sha256": digest})
            if reg.record(version, missing_ok=True) is None:
                if cfg.apply is not None:  # apply runs after this write: its output must be free
                    _check_apply_output(cfg.apply.output.format(version=version), version, so)
                record = {"run_id": run_id, "created": _now(), "bigalign_version": __version__,
                          "previous": reg.current(),
                          "inputs": fingerprint["inputs"], "config": fingerprint["config"],
                          "models": {"source": cand.metadata.get("source_model"),
                                     "target": cand.metadata.get("target_model")},
                          "dims": list(cand.dims), "pairs": split,
                          "fit": {"options": cand.options,
                                  "n_pairs": cand.metadata.get("n_pairs"),
                                  "relative_residual": cand.metadata.get("relative_residual")},
                          "gate": dict(decision, figures=figures,
                                       compared_with=evaluation["compared_with"]),
                          "transform_sha256": digest}
                if cfg.apply is not None:
                    record["mapped_corpus"] = {
                        "corpus": cfg.apply.corpus,
                        "output": cfg.apply.output.format(version=version)}
                reg.write_version(lock, version, cand, record)
                log.info("realign %s: wrote version %s", run_id, version)
            _ours(reg, version, run_id, digest)
    faults.point("realign.version-written")
    applied = None
    if cfg.apply is not None:
        output = cfg.apply.output.format(version=version)
        try:
            report = bigalign.apply(reg.transform_url(version), cfg.apply.corpus, output,
                                    storage_options=so, scheduler=run.scheduler,
                                    workers=run.workers, memory_limit=run.memory_limit,
                                    threads=run.threads, block_bytes=run.block_bytes,
                                    progress=run.progress, device=run.device,
                                    **cfg.apply.options)
        except InputError as e:  # an output taken meanwhile: apply's remedies
            if "--overwrite" not in str(e) and "--restart" not in str(e):  # are not realign's
                raise
            raise InputError(f"realign {run_id}: [apply] of {version} into {output!r}: {e}\n"
                             f"(realign has no such option) {version} is written but not "
                             "current: remove what is at the output, then rerun this "
                             "--run-id to finish it") from None
        applied = {"corpus": cfg.apply.corpus, "output": output, "rows": report.rows_total}
        faults.point("realign.applied")
    pointer = reg.published_by(run_id, version)
    if pointer is None:
        with reg.lock(f"publish of realign run {run_id!r}", wait=LOCK_WAIT) as lock:
            pointer = reg.published_by(run_id, version)
            if pointer is None:
                _ours(reg, version, run_id, digest)  # still the version this run wrote
                if reg.current() != evaluation.get("current_version"):
                    log.warning("realign %s: the current version changed during the run "
                                "(%s when evaluated, %s now: a rollback?); publishing %s",
                                run_id, evaluation.get("current_version"), reg.current(),
                                version)
                pointer = reg.set_current(lock, version, action="publish", run_id=run_id)
    faults.point("realign.published")
    files.remove("pairs")
    files.remove("candidate.transform")  # the version holds it now
    verdict.update(status="published", version=version, previous=pointer.get("previous"),
                   current=reg.current(), apply=applied, finished=_now(), exit_code=0)
    files.write("verdict.json", verdict)
    log.info("realign %s: published %s (%s)", run_id, version,
             f"was {pointer['previous']}" if pointer.get("previous") else "the first version")
    return dict(verdict, already_done=False)


def _ours(reg: Registry, version: str, run_id: str, digest: str, *,
          missing_ok: bool = False) -> bool:
    """Is ``version`` still the one run ``run_id`` wrote: its record names the run and the
    candidate's transform digest ``digest``? With ``missing_ok`` (before the write) a
    missing record or another run's is False; otherwise either raises CheckpointError
    (exit 2) saying what changed (the rerun of the run id writes its version again). A
    record of this run naming another digest always raises."""
    from ..errors import CheckpointError

    record = reg.record(version, missing_ok=True)
    if record is None:
        why = "its record is gone"
    elif record.get("run_id") != run_id:
        why = f"it now holds run {record.get('run_id')!r}'s version"
    elif record.get("transform_sha256") != digest:
        why = (f"its record names transform sha256 {record.get('transform_sha256')}, this "
               f"run wrote {digest}")
        missing_ok = False
    else:
        return True
    if missing_ok:
        return False
    raise CheckpointError(f"realign {run_id}: {reg.url} {version} is no longer the version "
                          f"this run wrote ({why}); nothing was made current. Rerun this "
                          "--run-id to write its version again.")


def _check_apply_output(output: str, version: str, so) -> None:
    """Refuse (InputError) before version ``version`` is written when its ``[apply]`` output
    is taken: the apply runs after the version is written, and would otherwise leave a
    version that can never become current under this run id."""
    from ..storage.outputs import inspect

    node = inspect(output, so)
    if node.kind != "absent":
        what = f"a bigalign {node.kind}" if node.ours else "something bigalign did not write"
        raise InputError(f"[apply] output {output!r} for the next version {version} already "
                         f"holds {what}; nothing was written or published. Remove it, or "
                         "point [apply] output elsewhere, then rerun.")


def summary(verdict: dict) -> dict:
    """The verdict without its fingerprint: what ``--summary`` writes and ``--json`` prints."""
    return {k: v for k, v in verdict.items() if k != "fingerprint"}


def write_summary(path: str, value: dict, storage_options: Optional[dict] = None) -> None:
    """Write a JSON summary to a local path (atomically: temporary file, then rename) or
    an fsspec URL (one PUT)."""
    from ..jsonsafe import json_safe

    data = json.dumps(json_safe(value), indent=2) + "\n"
    if "://" in str(path):
        import fsspec
        with fsspec.open(str(path), "w", **(storage_options or {})) as f:
            f.write(data)
        return
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".summary-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

