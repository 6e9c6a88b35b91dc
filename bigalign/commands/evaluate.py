"""Held-out evaluation of an alignment next to its baselines, streaming.

Before rewriting a billion vectors a user wants to know *how good* the map is on pairs it
has not seen, *compared with what*, and *whether it could be better at all*.
:func:`evaluate` answers with, for the transform and each baseline
(:func:`bigalign.maths.metrics.baseline_methods`, fitted from the training statistics):

* relative residual  ``sum ||f(x_i) - y_i||^2 / sum ||y_i - mean(y)||^2`` (0 = perfect,
  1 = no better than always answering the target mean);
* the cosine between each mapped source row and its own target row (mean and percentiles);
* cross-model retrieval recall@k: each mapped source row is a query searched, by exact
  cosine, among *all* held-out target rows; a hit when its own pair ranks within the top k.
  Measured twice: in the raw target space, and "centred" (each side with its own mean
  removed), because a large common offset in a model's space hurts cosine search itself;
* optional CSLS re-scoring (Conneau et al. 2018), which penalises "hub" targets;
* the paper's diagnostics on the training set (:func:`bigalign.maths.metrics.fit_diagnostics`).

This module is the streaming edge: it reads Zarr arrays (or numpy arrays, for tests) block
by block and feeds the pure-numpy maths of :mod:`bigalign.maths.metrics`. It also holds what the
other evaluations (:mod:`bigalign.commands.retrieval`, :mod:`bigalign.commands.curve`) share: opening inputs,
blocks of whole chunks, training statistics. Memory is bounded by the block size, the
query sample (``max_queries`` x d) and one float32 score block; never by the number of rows.

Retrieval is exact: every query is scored against every held-out target, blockwise. When
the held-out set has more than ``max_queries`` rows, a seeded random sample of them are the
queries; the searched set is always every held-out target.
"""

from __future__ import annotations

import logging
import os
import time
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence, Union

import numpy as np
from dask.system import CPU_COUNT

from ..execution.cluster import Session
from ..storage.embedding_store import store_parts
from ..errors import InputError, NonFiniteError
from ..storage.locations import canonical_url
from ..execution.pairing import (Pairs, common_positions, fitted_pairing, gathered, join, pair_by_ids,
                      training_positions)
from ..maths.metrics import (CosineHistogram, Method, count_better, fit_diagnostics, methods_for,
                      query_sample, recall_from_ranks, row_cosine, score_rows, topk_block,
                      unit_rows)
from ..planning.plan import Block, choose_block_rows, common_step, plan_blocks
from ..maths.solve import NotUniqueWarning, procrustes
from ..maths.stats import Moments, block_moments, check_finite, merge, normalize_rows
from ..storage.stores import (ArrayRows, EmbeddingArray, open_embeddings, parse_rows, read_rows,
                     validate_pair)

log = logging.getLogger("bigalign")

__all__ = ["evaluate", "evaluate_maps", "training_moments", "training_arrays", "same_array",
           "canonical_url", "open_input", "pairing_summary", "HeldOut", "DEFAULT_MAX_QUERIES",
           "counted"]


def counted(n: int, one: str, many: str) -> str:
    """``n`` with its noun: "1 query", "2,000 queries"."""
    return f"{n:,} {one if n == 1 else many}"

#: Queries searched when the held-out set is larger (seeded sample); exact search of 10^4
#: queries among 10^5 targets of 384 dims is ~1.5 TFLOP per method and search variant.
DEFAULT_MAX_QUERIES = 10_000
#: Input bytes per streamed block (all arrays read together).
BLOCK_BYTES = 32 * 2**20


# ---------------------------------------------------------------------------------------
# inputs: Zarr arrays (bigalign.storage.stores) or numpy arrays, read in blocks of whole chunks
# ---------------------------------------------------------------------------------------

Rows = Union[EmbeddingArray, ArrayRows]


def open_input(data, side: str, storage_options=None, check_chunks: bool = True):
    """``(rows, ids)`` of a numpy array, an opened input (passed through), a Zarr path / URL
    / array, or an embedding store (:func:`bigalign.storage.embedding_store.store_parts`: its
    ``embeddings``). ``ids``: the store's (N,) ids array, or None (row numbers are the
    ids)."""
    if isinstance(data, (EmbeddingArray, ArrayRows)):
        return data, None
    if isinstance(data, np.ndarray):
        return ArrayRows(data, side), None
    url, ids, _ = store_parts(data, storage_options)
    return open_embeddings(url, side=side, storage_options=storage_options,
                           check_chunks=check_chunks), ids


def open_rows(data, side: str, storage_options=None, check_chunks: bool = True) -> Rows:
    """The rows of an input (:func:`open_input` without its ids)."""
    return open_input(data, side, storage_options, check_chunks)[0]


def open_pair(source, target, storage_options=None, check_chunks: bool = True):
    """Open paired arrays and check their row counts: (source, target)."""
    src = open_rows(source, "source", storage_options, check_chunks)
    tgt = open_rows(target, "target", storage_options, check_chunks)
    validate_pair(src, tgt)
    return src, tgt


def row_range(rows, n: int, what: str) -> tuple[int, int]:
    """:func:`bigalign.storage.stores.parse_rows` with ``what`` the rows are named in errors."""
    try:
        return parse_rows(rows, n)
    except InputError as e:
        raise InputError(f"{what}: {e}") from None


def blocks(start: int, stop: int, arrays: Sequence[Rows],
           block_rows: Optional[int] = None) -> list[Block]:
    """Rows [start, stop) in blocks read from all ``arrays`` together: boundaries on whole
    chunks of every array (:func:`bigalign.planning.plan.common_step`), about BLOCK_BYTES of input
    each, or ``block_rows`` rows rounded down to whole chunks."""
    row_bytes = sum(a.row_bytes for a in arrays)
    step, _ = common_step([a.row_step for a in arrays], row_bytes, BLOCK_BYTES)
    per = max(step, block_rows // step * step) if block_rows else \
        choose_block_rows(stop - start, step, row_bytes, BLOCK_BYTES)
    return plan_blocks(start, stop, step, per)


def read_checked(arr: Rows, start: int, stop: int, dtype=None) -> np.ndarray:
    """Rows [start, stop) of ``arr`` (as ``dtype`` when given); NaN/Inf raise
    NonFiniteError naming the row."""
    x = read_rows(arr, start, stop)
    if dtype is not None:
        x = x.astype(dtype, copy=False)
    check_finite(x.sum(axis=0, dtype=np.float64), x, start, arr.side)
    return x


def take_rows(arr: Rows, rows: np.ndarray, block_rows: Optional[int] = None) -> np.ndarray:
    """Rows at sorted indices ``rows`` (float32, float64 for float64 input), reading only
    the blocks that hold some. NaN/Inf in a row taken raise NonFiniteError naming it."""
    rows = np.asarray(rows, dtype=np.int64)
    out = np.empty((len(rows), arr.dim), dtype=np.float64 if arr.dtype == np.float64
                   else np.float32)
    if not len(rows):
        return out
    for b in blocks(int(rows[0]), int(rows[-1]) + 1, [arr], block_rows):
        lo, hi = np.searchsorted(rows, [b.start, b.stop])
        if hi > lo:
            out[lo:hi] = read_rows(arr, b.start, b.stop)[rows[lo:hi] - b.start]
    bad = np.flatnonzero(~np.isfinite(out).all(axis=1))
    if bad.size:
        raise NonFiniteError(f"{arr.side} row {rows[bad[0]]} holds NaN or Inf "
                             f"({bad.size} of the {len(rows)} rows read)")
    return out


def training_moments(source, target, rows=None, *, normalize: bool = False,
                     gram: bool = True, dtype=None, cuts: Sequence[int] = (),
                     block_rows: Optional[int] = None, storage_options=None,
                     check_chunks: bool = True) -> "Moments | list[Moments]":
    """Statistics of paired rows [start, stop) in one sequential streaming pass (each chunk
    read once; memory one block plus d x d sums), computed as the fit computes them
    (:func:`bigalign.maths.stats.block_moments`, merged in row order).

    With ``cuts`` (absolute row indices), returns the statistics of every prefix
    [start, cut) for each cut in order, then of [start, stop): the learning curve's nested
    training sets, still in one pass.
    """
    src, tgt = open_pair(source, target, storage_options, check_chunks)
    start, stop = row_range(rows, src.rows, "training rows")
    cuts = sorted(set(int(c) for c in cuts if start < c < stop))
    snaps, acc = [], Moments.empty(src.dim, tgt.dim, gram)
    for s0, s1 in zip([start, *cuts], [*cuts, stop]):
        for b in blocks(s0, s1, [src, tgt], block_rows):
            acc = merge(acc, block_moments(read_rows(src, b.start, b.stop),
                                           read_rows(tgt, b.start, b.stop), gram=gram,
                                           normalize=normalize, dtype=dtype, start=b.start))
        snaps.append(acc)
    return snaps if cuts else acc


# ---------------------------------------------------------------------------------------
# parallel scoring
# ---------------------------------------------------------------------------------------

class Parallel:
    """Independent numpy tasks on the in-process threads of :class:`bigalign.execution.cluster.Session`
    (which pins BLAS to one thread per task: multi-threaded OpenBLAS under a thread pool
    collapses), queries split into one contiguous chunk per thread."""

    def __init__(self, workers: Optional[int] = None):
        self.workers = int(workers or CPU_COUNT)
        self.session = Session(None, threads=self.workers)

    def run(self, tasks) -> None:
        """Call every zero-argument task; re-raise the first error."""
        graph = {("score", i): (task,) for i, task in enumerate(tasks)}
        if graph:
            self.session.get(graph, list(graph))

    def chunks(self, n: int, minimum: int = 256) -> list[tuple[int, int]]:
        """Split n queries into about ``workers`` contiguous chunks of >= ``minimum``."""
        size = max(minimum, -(-n // self.workers))
        return [(i, min(i + size, n)) for i in range(0, n, size)]


class _Scorer:
    """Ranks of one method's queries in one search variant, accumulated over target blocks.

    queries : (nq, dB) unit rows; true_targets : (nq, dB) unit rows of each query's own
    pair; true_index : (nq,) held-out index of that pair. With ``csls_k``, also collects
    r_S(t), the mean cosine of each target's csls_k nearest queries, for a CSLS pass."""

    def __init__(self, queries, true_targets, true_index, csls_k: int = 0):
        self.q = queries
        self.true = np.einsum("ij,ij->i", queries, true_targets)
        self.true_index = true_index
        self.counts = np.zeros(len(queries), dtype=np.int64)
        self.csls_k = csls_k
        self._r_s: list = []
        self.csls_counts: Optional[np.ndarray] = None

    def tasks(self, pool: Parallel, block: np.ndarray, offset: int) -> list:
        """Independent tasks scoring one target block: a rank count per query chunk (each
        writes its own slice of ``counts``), plus the CSLS neighbourhoods of the block."""
        qb = score_rows(len(self.q), len(block), pool.workers)
        out = [lambda q0=q0, q1=q1: count_better(
                   self.q[q0:q1], self.true[q0:q1], self.true_index[q0:q1], block, offset,
                   self.counts[q0:q1], query_block=qb) for q0, q1 in pool.chunks(len(self.q))]
        if self.csls_k:
            out.append(lambda: self._collect_r_s(
                block, offset, score_rows(len(block), len(self.q), pool.workers)))
        return out

    def _collect_r_s(self, block: np.ndarray, offset: int, query_block: int) -> None:
        empty_s = np.empty((len(block), 0), dtype=block.dtype)
        empty_i = np.empty((len(block), 0), dtype=np.int64)
        s, _ = topk_block(block, self.q, 0, self.csls_k, empty_s, empty_i, query_block)
        self._r_s.append((offset, s.mean(axis=1, dtype=np.float64)))

    def start_csls(self, n_targets: int) -> None:
        r_s = np.zeros(n_targets)
        for offset, v in self._r_s:
            r_s[offset:offset + len(v)] = v
        self.r_s = r_s.astype(self.q.dtype)
        # CSLS(q, t) = 2 cos(q, t) - r_T(q) - r_S(t); r_T(q) is the same for every target
        # of one query, so it drops out of the ranking.
        self.csls_true = 2 * self.true - self.r_s[self.true_index]
        self.csls_counts = np.zeros(len(self.q), dtype=np.int64)

    def csls_tasks(self, pool: Parallel, block: np.ndarray, offset: int) -> list:
        qb = score_rows(len(self.q), len(block), pool.workers)
        return [lambda q0=q0, q1=q1: count_better(
                    self.q[q0:q1], self.csls_true[q0:q1], self.true_index[q0:q1], block,
                    offset, self.csls_counts[q0:q1], target_bias=self.r_s, scale=2.0,
                    query_block=qb)
                for q0, q1 in pool.chunks(len(self.q))]


# ---------------------------------------------------------------------------------------
# the evaluation engine: many maps, one set of passes over held-out pairs
# ---------------------------------------------------------------------------------------

def evaluate_maps(methods: Sequence[Method], source, target, rows=None, *,
                  ks: Sequence[int] = (1, 10), max_queries: Optional[int] = DEFAULT_MAX_QUERIES,
                  seed: int = 0, csls: bool = False, csls_k: int = 10, dtype="float32",
                  block_rows: Optional[int] = None, storage_options=None,
                  check_chunks: bool = True, workers: Optional[int] = None,
                  normalize_target: bool = False, command: str = "evaluate") -> dict:
    """Evaluate every map in ``methods`` on paired rows [start, stop) of source / target.
    ``command`` names the caller in the log lines (``curve`` evaluates through this too).

    ``normalize_target``: L2-normalise the target rows before comparing, as a fit with
    ``normalize`` did (its maps normalise source rows themselves; the target rows they were
    fitted to were unit vectors too, and so must be the ones they are compared with).

    Pass 1 reads the held-out pairs once: residuals, raw cosines, each side's mean, and the
    sampled query rows. Pass 2 reads them again: centred cosines, and every target block
    scored against every method's queries in both search variants ("raw": cosine in the
    target space; "centred": each side minus its own held-out mean). With ``csls`` a third
    pass over the targets re-ranks with CSLS (its target neighbourhoods use the query
    sample). All maps share the passes: adding a method costs compute, not I/O.

    Returns {"rows", "pairs", "queries", "targets", "ks", "chance", "methods": [...]}.
    """
    src, tgt = open_pair(source, target, storage_options, check_chunks)
    start, stop = row_range(rows, src.rows, "held-out rows")
    names = [m.name for m in methods]
    if len(set(names)) != len(names):
        raise ValueError(f"method names must be unique, got {names}")
    for m in methods:
        if m.map.dims != (src.dim, tgt.dim):
            raise InputError(f"method {m.name!r} maps {m.map.dims[0]} -> {m.map.dims[1]} dims "
                             f"but source/target have {src.dim} and {tgt.dim}")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise InputError(f"recall cut-offs must be positive integers, got {ks}")
    work = np.dtype(dtype)
    n = stop - start
    ranges = blocks(start, stop, [src, tgt], block_rows)

    def targets_of(s: int, e: int, checked: bool = False) -> np.ndarray:
        """Target rows [s, e) in ``work``, preprocessed as the fit did."""
        b = read_checked(tgt, s, e, work) if checked else \
            read_rows(tgt, s, e).astype(work, copy=False)
        return normalize_rows(b, work, s, "target") if normalize_target else b

    sample = query_sample(n, max_queries, seed)
    nq = len(sample)
    csls_k = min(csls_k, nq) if csls else 0
    t0 = time.perf_counter()
    log.info("%s: %s (rows %d:%d), %s, %s among %s", command,
             counted(n, "held-out pair", "held-out pairs"), start, stop,
             counted(len(methods), "method", "methods"), counted(nq, "query", "queries"),
             counted(n, "target", "targets"))

    # ---- pass 1 ------------------------------------------------------------------------
    sq_err = {m.name: 0.0 for m in methods}
    mapped_sum = {m.name: np.zeros(tgt.dim) for m in methods}
    hist_raw = {m.name: CosineHistogram() for m in methods}
    t_sum, t_sq = np.zeros(tgt.dim), 0.0
    xs = np.empty((nq, src.dim), dtype=work)
    ys = np.empty((nq, tgt.dim), dtype=work)
    for blk in ranges:
        s, e = blk.start, blk.stop
        a, b = read_rows(src, s, e), targets_of(s, e, checked=True)
        t_sum += b.sum(axis=0, dtype=np.float64)
        t_sq += float(np.einsum("ij,ij->", b, b, dtype=np.float64))
        lo, hi = np.searchsorted(sample, [s - start, e - start])
        xs[lo:hi] = a[sample[lo:hi] - (s - start)]
        ys[lo:hi] = b[sample[lo:hi] - (s - start)]
        for m in methods:
            y = m.map(a, work, start=s)  # NaN/Inf in the source raise here, naming the row
            d = y - b
            sq_err[m.name] += float(np.einsum("ij,ij->", d, d, dtype=np.float64))
            mapped_sum[m.name] += y.sum(axis=0, dtype=np.float64)
            hist_raw[m.name].add(row_cosine(y, b))
    mu_t = t_sum / n
    spread = max(t_sq - n * float(mu_t @ mu_t), 0.0)
    mu_f = {k: v / n for k, v in mapped_sum.items()}

    # ---- queries ------------------------------------------------------------------------
    mu_t_w = mu_t.astype(work)
    true_raw = unit_rows(ys)
    true_cen = unit_rows(ys - mu_t_w)
    scorers = {}
    for m in methods:
        yq = m.map(xs, work)
        scorers[(m.name, "raw")] = _Scorer(unit_rows(yq), true_raw, sample, csls_k)
        scorers[(m.name, "centred")] = _Scorer(unit_rows(yq - mu_f[m.name].astype(work)),
                                               true_cen, sample, csls_k)

    # ---- pass 2 ------------------------------------------------------------------------
    hist_cen = {m.name: CosineHistogram() for m in methods}
    pool = Parallel(workers)
    for blk in ranges:
        s, e = blk.start, blk.stop
        a, b = read_rows(src, s, e), targets_of(s, e)
        bc = b - mu_t_w
        targets = {"raw": unit_rows(b), "centred": unit_rows(bc)}
        tasks = []
        for m in methods:
            y = m.map(a, work, start=s)
            hist_cen[m.name].add(row_cosine(y - mu_f[m.name].astype(work), bc))
            for variant, block in targets.items():
                tasks += scorers[(m.name, variant)].tasks(pool, block, s - start)
        pool.run(tasks)
    # ---- pass 3 (CSLS) -------------------------------------------------------------------
    if csls_k:
        for sc in scorers.values():
            sc.start_csls(n)
        for blk in ranges:
            b = targets_of(blk.start, blk.stop)
            targets = {"raw": unit_rows(b), "centred": unit_rows(b - mu_t_w)}
            pool.run([t for (name, variant), sc in scorers.items()
                      for t in sc.csls_tasks(pool, targets[variant], blk.start - start)])

    out_methods = []
    for m in methods:
        entry = {"name": m.name, "note": m.note, "this": m.this, "train": m.train,
                 "relative_residual": sq_err[m.name] / spread if spread > 0 else float("nan"),
                 "mean_sq_distance": sq_err[m.name] / n,
                 "cosine": hist_raw[m.name].summary(),
                 "cosine_centred": hist_cen[m.name].summary(),
                 "histogram": hist_raw[m.name].coarse(),
                 "histogram_centred": hist_cen[m.name].coarse(),
                 "retrieval": {}}
        for variant in ("raw", "centred"):
            sc = scorers[(m.name, variant)]
            entry["retrieval"][variant] = recall_from_ranks(sc.counts, ks)
            if csls_k:
                entry["retrieval"][f"{variant}+csls"] = recall_from_ranks(sc.csls_counts, ks)
        out_methods.append(entry)
    seconds = time.perf_counter() - t0
    log.info("%s: done in %.1fs", command, seconds)
    return {"rows": [start, stop], "pairs": n, "queries": nq, "targets": n,
            "sampled": nq < n, "seed": seed, "ks": ks, "csls_k": csls_k or None,
            "normalized_targets": bool(normalize_target),
            "chance": {f"recall@{k}": min(k / n, 1.0) for k in ks},
            "seconds": seconds, "methods": out_methods}


# ---------------------------------------------------------------------------------------
# the transform and its training statistics
# ---------------------------------------------------------------------------------------

def load_transform(transform, storage_options=None):
    """A :class:`bigalign.Transform`, or one loaded from its path / URL."""
    from ..transform import Transform

    if isinstance(transform, Transform):
        return transform
    try:
        return Transform.load(transform, storage_options=storage_options)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f"transform {str(transform)!r}: {e}") from None


def _default_heldout(train: Optional[Sequence[int]], n: int) -> tuple[int, int]:
    """Rows of the training arrays the transform was not fitted on: after its training
    range, else before it."""
    if train is None:
        raise InputError("the transform does not record its training rows; pass --rows "
                         "START:STOP for the held-out pairs")
    a, b = int(train[0]), int(train[1])
    if b < n:
        return b, n
    if a > 0:
        return 0, a
    raise InputError(f"the transform was fitted on all {n} rows of these arrays, so none are "
                     "held out; pass the held-out arrays, or --rows START:STOP (rows it was "
                     "fitted on flatter every method)")


# ---- which arrays a transform was fitted on ------------------------------------------------

def _path_parts(path: str) -> list[str]:
    return [p for p in os.path.normpath(path).split(os.sep) if p not in ("", ".", "..")]


def same_array(recorded: Optional[dict], arr) -> Optional[bool]:
    """Is ``arr`` the array whose fingerprint (:meth:`bigalign.storage.stores.EmbeddingArray.
    fingerprint`, recorded by the fit in ``Transform.metadata["inputs"]``) is ``recorded``?

    True: the same location (compared as :func:`canonical_url`), whatever its shape now (an
    array rewritten or grown in place still holds the rows fitted on). For a recorded
    *relative* path, whose working directory is unknown: also when the path of ``arr`` ends
    with it (``data/a.zarr`` matches ``/home/u/data/a.zarr``). A recorded ``canonical_url``
    (:func:`canonical_url` where the fit ran) is compared exactly instead. False: provably
    another array. None: cannot tell (nothing recorded, or ``arr`` is an in-memory numpy
    array).
    """
    url = (recorded or {}).get("url")
    if not url or not isinstance(arr, EmbeddingArray):
        return None
    here = canonical_url(arr.url)
    if recorded.get("canonical_url"):  # resolved where the fit ran: no guessing needed
        return recorded["canonical_url"] == here
    if canonical_url(url) == here:
        return True
    spelled = str(url).split("::")[-1]
    if "://" not in spelled and not os.path.isabs(os.path.expanduser(spelled)):
        tail = _path_parts(spelled)
        given = arr.url.split("::")[-1].removeprefix("file://")
        for path in (here, os.path.abspath(os.path.expanduser(given))):
            parts = _path_parts(path)
            if tail and parts[-len(tail):] == tail:
                return True
    return False


def training_arrays(t, source, target) -> str:
    """Are ``source`` / ``target`` the arrays ``t`` was fitted on (its recorded input
    fingerprints, :func:`same_array`)? "same" when either is either training array (an
    inverted transform maps its fit's target to its source); "different" only when both
    provably are neither (then none of their rows were used to fit it); "unknown" when it
    cannot be told, which callers treat as "same" (the cautious side: a training row taken
    for a held-out one would flatter every number)."""
    inputs = (getattr(t, "metadata", None) or {}).get("inputs") or {}
    found = [same_array(inputs.get(side), arr) for side in ("source", "target")
             for arr in (source, target)]
    if True in found:
        return "same"
    if found and all(f is False for f in found):
        return "different"
    return "unknown"


def training_statistics(t, statistics: Optional[Moments] = None, *, want: bool = True,
                        train_source=None, train_target=None, storage_options=None,
                        check_chunks: bool = True, block_rows: Optional[int] = None
                        ) -> tuple[Optional[Moments], Optional[str]]:
    """The training statistics for baselines and where they came from: ``statistics`` when
    given, else those stored with the transform (``Transform.statistics``, saved by every
    fit), else (a transform built by hand or saved before statistics were stored) one
    streaming pass over the transform's training rows of ``train_source``/``train_target``.
    (None, None) when there are none to be had (or ``want`` is False)."""
    if (train_source is None) != (train_target is None):
        raise InputError("give both --train-source and --train-target, or neither")
    if statistics is not None:
        return statistics, "given"
    stored = getattr(t, "statistics", None)
    if stored is not None:
        return stored, "stored with the transform"
    if not want or train_source is None:
        return None, None
    train = t.options.get("rows")
    if fitted_pairing(t.metadata) is not None:  # its rows are positions of gathered pairs
        log.warning("no baselines: the transform was fitted on pairs matched by id and "
                    "stores no training statistics")
        return None, None
    if not train:
        log.warning("no baselines: the transform does not record its training rows")
        return None, None
    try:
        src, tgt = open_pair(train_source, train_target, storage_options, check_chunks)
    except InputError as e:
        raise InputError(f"training pairs for the baselines: {e}") from None
    if (src.dim, tgt.dim) != tuple(t.dims):
        raise InputError(f"training pairs have dims {src.dim} and {tgt.dim} but the transform "
                         f"maps {t.dims[0]} -> {t.dims[1]}")
    a, b = int(train[0]), int(train[1])
    if b > src.rows:
        log.warning("no baselines: the transform was fitted on rows %d:%d but the training "
                    "arrays have %d rows (pass --train-source/--train-target)", a, b, src.rows)
        return None, None
    inputs = t.metadata.get("inputs") or {}
    for side, arr in (("source", src), ("target", tgt)):
        if same_array(inputs.get(side), arr) is False:
            log.warning("baselines: fitting on rows %d:%d of %s %s; the transform was fitted "
                        "on %s", a, b, side, arr.url, inputs[side]["url"])
    log.info("baselines: one streaming pass over training rows %d:%d for their statistics "
             "(transforms saved by bigalign fit store them and skip this)", a, b)
    m = training_moments(src, tgt, (a, b), normalize=t.normalize, gram=True,
                         block_rows=block_rows)
    return m, "streamed from the training rows"


def _reproduces(t, m: Moments) -> Optional[bool]:
    """Do the statistics reproduce the transform's own training residual?"""
    recorded = t.metadata.get("residual")
    if recorded is None:
        return None
    o = t.options
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotUniqueWarning)
        try:
            sol = procrustes(m, center=bool(o.get("center")), scale=bool(o.get("scale")),
                             reflection=bool(o.get("reflection", True)))
        except ValueError:
            return None
    if sol.residual is None:
        return None
    return bool(abs(sol.residual - recorded) <= 1e-6 * max(sol.target_energy, 1e-300))


# ---- which pairs are held out --------------------------------------------------------------

@dataclass
class HeldOut:
    """The pairs an evaluation reads. ``pairs``: by id, the evaluated pairs (gathered
    before reading; ``rows`` is then (0, len)); None: rows [start, stop) of row-aligned
    inputs. ``overlap``: how many of them the transform was fitted on (None: cannot be
    told). ``pairing``: what the result reports ({"by": "rows"}, or the id pairing:
    matched pairs, ids found on one side only, training pairs and how they are known)."""

    rows: tuple
    overlap: Optional[int]
    pairing: dict
    pairs: Optional[Pairs] = None


def pairing_summary(joined: Pairs, policy: str) -> dict:
    """What an evaluation reports of a pairing by id: {"by": "ids", "duplicates": policy,
    "matched": pairs, "source_only" / "target_only": ids found on one side only,
    "duplicates_dropped": {side: rows}}."""
    return {"by": "ids", "duplicates": policy, "matched": joined.matched,
            "source_only": joined.source_only, "target_only": joined.target_only,
            "duplicates_dropped": dict(joined.duplicates)}


def _training_pairs(t, joined: Pairs, policy: str, source_ids, target_ids
                    ) -> tuple[Optional[np.ndarray], str]:
    """Positions in ``joined`` (sorted (k,) int64) of the pairs the transform was fitted on,
    and how that is known; (None, why) when it cannot be told. A fit by id: its recorded
    pairing rebuilt (:func:`bigalign.execution.pairing.training_positions`, with the fit's duplicates
    policy, a second join when ``policy`` differs or the transform is an inverse, whose
    record is marked ``swapped``) and verified by its SHA-256. A fit by rows [a, b): the
    matched pairs (i, i) with a <= i < b."""
    record = fitted_pairing(t.metadata)
    if record is None:
        train = t.options.get("rows")
        if not train:
            return None, "the transform records neither its pairs nor its training rows"
        a, b = int(train[0]), int(train[1])
        s, g = joined.source_rows, joined.target_rows
        return (np.flatnonzero((s == g) & (s >= a) & (s < b)),
                f"fitted row by row on rows {a}:{b}: the matched pairs (i, i) in that range")
    swapped = bool(record.get("swapped"))  # an inverse: the fit's source is our target
    fit_join = joined
    if swapped or record["duplicates"] != policy:
        sides = (target_ids, source_ids) if swapped else (source_ids, target_ids)
        try:
            fit_join = join(*sides, duplicates=record["duplicates"])
        except InputError as e:
            return None, f"its pairs cannot be rebuilt ({e})"
    pos = training_positions(fit_join, record)
    if pos is None:
        return None, ("its recorded pairs are not the pairs of these stores' ids (the stores "
                      "or their ids changed since the fit: sha256 differs)")
    if fit_join is not joined:
        fitted = fit_join.take(pos)
        if swapped:
            fitted = Pairs(fitted.target_rows, fitted.source_rows)
        pos = np.sort(common_positions(fitted, joined))
    how = (f"a sample of {record['matched']:,}, seed {record['seed']}" if record["sample"]
           and record["matched"] < fit_join.matched else "every matched pair")
    return pos, (f"the fit's pairs ({how}; duplicates {record['duplicates']}), rebuilt from "
                 "its record and verified by their sha256")


def _ids_heldout(t, source_ids, target_ids, arrays: str, rows, duplicates: Optional[str]
                 ) -> HeldOut:
    """Held-out pairs matched by id: the matched pairs (:func:`bigalign.execution.pairing.join`,
    sorted by source row) the transform was not fitted on; all of them on stores it was not
    fitted on. ``rows``: positions START:STOP in the list of matched pairs instead (pairs
    it was fitted on are counted, with a warning). ``duplicates``: None = the fit's policy
    (on its stores), else "error"."""
    record = fitted_pairing(t.metadata)
    policy = duplicates or (record["duplicates"] if record and arrays != "different"
                            else "error")
    joined = join(source_ids, target_ids, duplicates=policy)
    if arrays == "different":
        train, how = np.empty(0, np.int64), ("none: these are not the stores the transform "
                                            "was fitted on")
    else:
        train, how = _training_pairs(t, joined, policy, source_ids, target_ids)
    m = joined.matched
    if rows is not None:
        start, stop = row_range(rows, m, "held-out pairs (positions in the matched pairs)")
        positions = np.arange(start, stop, dtype=np.int64)
        overlap = None
        if train is None:
            log.warning("which matched pairs the transform was fitted on cannot be told (%s): "
                        "pairs %d:%d may include training pairs", how, start, stop)
        else:
            overlap = int(np.count_nonzero((train >= start) & (train < stop)))
            if overlap:
                log.warning("%d of the %d evaluated pairs were used to fit the transform: the "
                            "numbers flatter every fitted method", overlap, stop - start)
    else:
        if train is None:
            raise InputError(f"which of the {m:,} matched pairs the transform was fitted on "
                             f"cannot be told: {how}. Pass --rows START:STOP (positions in "
                             "the list of matched pairs) to evaluate some anyway")
        keep = np.ones(m, dtype=bool)
        keep[train] = False
        positions, overlap = np.flatnonzero(keep), 0
        if not len(positions):
            raise InputError(f"the transform was fitted on all {m:,} pairs matched by id in "
                             "these stores, so none are held out; pass held-out stores, or "
                             "--rows START:STOP (positions in the list of matched pairs; "
                             "pairs it was fitted on flatter every method)")
    pairing = dict(pairing_summary(joined, policy),
               training_pairs=None if train is None else int(len(train)),
               training=how, evaluated=int(len(positions)),
               positions=None if rows is None else [int(positions[0]), int(positions[-1]) + 1])
    log.info("evaluate: paired by id: %d matched pairs (%d source and %d target ids "
             "unmatched); %s pairs held out", m, joined.source_only, joined.target_only,
             f"{len(positions):,}")
    return HeldOut((0, len(positions)), overlap, pairing, joined.take(positions))


def _rows_heldout(t, src: Rows, tgt: Rows, source_ids, target_ids, arrays: str, rows
                  ) -> HeldOut:
    """Held-out rows of row-aligned inputs (row i with row i): ``rows``, else every row of
    arrays the transform was not fitted on, else the rows after (else before) its training
    rows. A transform fitted by id has no training row range: ``rows`` is then required,
    and its overlap is counted from its rebuilt pairs (i, i) when the inputs have ids."""
    validate_pair(src, tgt)
    record = fitted_pairing(t.metadata)
    train = None if record else t.options.get("rows")
    if rows is not None:
        start, stop = row_range(rows, src.rows, "held-out rows")
    elif arrays == "different":
        start, stop = 0, src.rows
    elif record:
        raise InputError("the transform was fitted on pairs matched by id, so its training "
                         "pairs are not a row range: pair by ids (--pair-by ids, the default "
                         "when both inputs are stores with ids), or pass --rows START:STOP")
    else:
        start, stop = _default_heldout(train, src.rows)
    overlap: Optional[int] = 0
    if arrays != "different" and record:
        overlap = _id_fit_overlap_with_rows(t, source_ids, target_ids, start, stop)
    elif train and arrays != "different":
        overlap = max(0, min(stop, int(train[1])) - max(start, int(train[0])))
    if overlap:
        log.warning("%d of the %d evaluated rows were used to fit the transform: the "
                    "numbers flatter every fitted method", overlap, stop - start)
    return HeldOut((start, stop), overlap, {"by": "rows"})


def _id_fit_overlap_with_rows(t, source_ids, target_ids, start: int, stop: int
                              ) -> Optional[int]:
    """How many rows i in [start, stop) a transform fitted by id used as a pair (i, i):
    from its rebuilt pairs; None (with a warning) when they cannot be rebuilt."""
    why = "the inputs have no ids"
    if source_ids is not None and target_ids is not None:
        record = fitted_pairing(t.metadata)
        try:
            joined = join(source_ids, target_ids, duplicates=record["duplicates"])
            pos, why = _training_pairs(t, joined, record["duplicates"], source_ids, target_ids)
        except InputError as e:
            pos, why = None, str(e)
        if pos is not None:
            s, g = joined.source_rows[pos], joined.target_rows[pos]
            return int(np.count_nonzero((s == g) & (s >= start) & (s < stop)))
    log.warning("the transform was fitted on pairs matched by id, and which of rows %d:%d "
                "it used cannot be told (%s)", start, stop, why)
    return None


def evaluate(transform, source, target, rows=None, *, pair_by: str = "auto",
             duplicates: Optional[str] = None, scratch: Optional[str] = None,
             baselines: bool = True,
             statistics: Optional[Moments] = None, train_source=None, train_target=None,
             ridge: float = 0.0, ks: Sequence[int] = (1, 10),
             max_queries: Optional[int] = DEFAULT_MAX_QUERIES, seed: int = 0,
             csls: bool = False, csls_k: int = 10, dtype="float32",
             block_rows: Optional[int] = None, storage_options=None,
             check_chunks: bool = True) -> dict:
    """Evaluate ``transform`` on held-out pairs of ``source`` (N, dA) / ``target`` (M, dB):
    Zarr arrays, embedding stores, or numpy arrays.

    pair_by : "rows" (row i with row i), "ids" (rows with equal ids, the inner join
        :func:`bigalign.execution.pairing.join`, as ``bigalign.fit`` pairs; both inputs must be stores
        with ids) or "auto" (ids when both have them).
    duplicates : by ids: "error", "first" or "last", as for fit; default (None): the fit's
        own policy on the stores it was fitted on, else "error".
    scratch : by ids, the folder the held-out pairs are gathered into (as fit's: pairs x
        (dA + dB) x itemsize bytes, removed after).
    rows : row-aligned: the held-out row range. Default: every row when ``source``/
        ``target`` are not the arrays the transform was fitted on (:func:`training_arrays`,
        from the input fingerprints the fit recorded), else the rows after, else before,
        its training rows. By ids: positions START:STOP in the list of matched pairs (sorted
        by source row). Default: the matched pairs the fit did not use (rebuilt from what
        it recorded: its duplicates policy, ``sample``/``seed``, verified by the SHA-256 of
        its pairs); every matched pair on stores it was not fitted on.
    baselines : also evaluate none / least squares / ridge / the other centring, fitted from
        the training statistics: ``statistics`` when given, else those stored with the
        transform, else one streaming pass over the transform's training rows of
        ``train_source``/``train_target`` (default: ``source``/``target``).
    Other options as :func:`evaluate_maps`. Returns a JSON-ready dict ("kind": "evaluate");
    ``pairing`` says how pairs were formed (by ids: matched pairs, ids found on one side
    only, training and held-out pairs), ``overlap_with_training`` how many evaluated pairs
    the transform was fitted on (None: cannot be told).
    """
    t = load_transform(transform, storage_options)
    src, src_ids = open_input(source, "source", storage_options, check_chunks)
    tgt, tgt_ids = open_input(target, "target", storage_options, check_chunks)
    if (src.dim, tgt.dim) != tuple(t.dims):
        raise InputError(f"the transform maps {t.dims[0]} -> {t.dims[1]} dims but source has "
                         f"{src.dim} and target {tgt.dim}")
    arrays = training_arrays(t, src, tgt)
    if arrays == "different":
        log.info("%s and %s are not the arrays the transform was fitted on (%s, %s): all "
                 "their rows are held out", src.url, tgt.url,
                 t.metadata["inputs"]["source"]["url"], t.metadata["inputs"]["target"]["url"])
    if pair_by_ids(pair_by, src_ids, tgt_ids):
        held = _ids_heldout(t, src_ids, tgt_ids, arrays, rows, duplicates)
    else:
        held = _rows_heldout(t, src, tgt, src_ids, tgt_ids, arrays, rows)
    if train_source is None and train_target is None and arrays != "different":
        train_source, train_target = src, tgt  # they hold the training rows
    moments, origin = training_statistics(
        t, statistics, want=baselines, train_source=train_source, train_target=train_target,
        storage_options=storage_options, check_chunks=check_chunks, block_rows=block_rows)
    if moments is None and baselines and train_source is None and arrays == "different":
        log.warning("no baselines: the transform stores no training statistics, and %s / %s "
                    "are not its training arrays (pass --train-source/--train-target)",
                    src.url, tgt.url)
    methods = methods_for(t, moments if baselines else None, ridge)
    with gathered(held.pairs, src, tgt, scratch,
                  normalize=dtype if t.normalize else None) as (a, b):
        result = evaluate_maps(methods, a, b, held.rows, ks=ks, max_queries=max_queries,
                               seed=seed, csls=csls, csls_k=csls_k, dtype=dtype,
                               block_rows=block_rows, normalize_target=t.normalize)
    if held.pairs is not None:
        result["rows"] = held.pairing["positions"]
    training = {"rows": t.options.get("rows"), "arrays": arrays, "statistics": origin,
                "fit_diagnostics": t.metadata.get("discrepancy"),
                "pairs": fitted_pairing(t.metadata)}
    if moments is not None:
        training["n"] = int(moments.n)
        training["reproduces_transform"] = _reproduces(t, moments)
        if training["reproduces_transform"] is False:
            log.warning("the training statistics do not reproduce the transform's recorded "
                        "residual: the baselines were fitted on different data")
        if moments.has_gram:
            training["diagnostics"] = fit_diagnostics(moments, center=bool(t.options.get("center")))
    return {"kind": "evaluate", "source": src.url, "target": tgt.url,
            "transform": {"path": None if not isinstance(transform, str) else transform,
                          "dims": list(t.dims), "options": t.options,
                          "n_pairs": t.metadata.get("n_pairs")},
            "pairing": held.pairing, "overlap_with_training": held.overlap,
            "training": training, **result}
