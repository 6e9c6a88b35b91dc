"""The streaming evaluation engine: inputs read in blocks of whole chunks, and
:func:`evaluate_maps`, which scores many maps on held-out pairs in one set of passes.

What the evaluations (:mod:`bigalign.commands.evaluate`, :mod:`bigalign.commands.retrieval`,
:mod:`bigalign.commands.curve`, realign's gate) share: opening inputs, blocks of whole chunks,
training statistics (:func:`training_moments`), parallel scoring. It reads Zarr arrays (or
numpy arrays, for tests) block by block and feeds the pure-numpy maths of
:mod:`bigalign.maths.metrics`. Memory is bounded by the block size, the query sample
(``max_queries`` x d) and one float32 score block; never by the number of rows.
"""

from __future__ import annotations

import logging
import time
from typing import Optional, Sequence, Union

import numpy as np
from dask.system import CPU_COUNT

from ..execution.cluster import Session
from ..storage.embedding_store import store_parts
from ..errors import InputError, NonFiniteError
from ..maths.metrics import (CosineHistogram, Method, count_better, query_sample,
                             recall_from_ranks, row_cosine, score_rows, topk_block, unit_rows)
from ..planning.plan import DEFAULT_MAX_QUERIES, Block, choose_block_rows, common_step, plan_blocks
from ..words import counted
from ..maths.stats import Moments, block_moments, check_finite, merge, normalize_rows
from ..storage.stores import (ArrayRows, EmbeddingArray, open_embeddings, parse_rows, read_rows,
                              validate_pair)

log = logging.getLogger("bigalign")

__all__ = ["evaluate_maps", "training_moments", "open_input", "open_rows", "open_pair",
           "row_range", "blocks", "read_checked", "take_rows", "take_rows_in_order", "counted", "Parallel", "Rows",
           "DEFAULT_MAX_QUERIES", "BLOCK_BYTES"]

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


def take_rows_in_order(arr: Rows, rows: np.ndarray) -> np.ndarray:
    """Rows at indices ``rows`` in any order (:func:`take_rows` of them sorted, put back in
    the order asked)."""
    order = np.argsort(rows, kind="stable")
    out = take_rows(arr, rows[order])
    back = np.empty_like(order)
    back[order] = np.arange(len(order))
    return out[back]


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

# evaluate_maps is over 80 lines: its three passes share the block list, the query sample
# and the per-method accumulators, and read best top to bottom as the passes they are
# (splitting them would pass a dozen accumulators between functions).
def evaluate_maps(methods: Sequence[Method], source, target, rows=None, *,
                  ks: Sequence[int] = (1, 10), max_queries: Optional[int] = DEFAULT_MAX_QUERIES,
                  seed: int = 0, csls: bool = False, csls_k: int = 10, dtype="float32",
                  block_rows: Optional[int] = None, storage_options=None,
                  check_chunks: bool = True, workers: Optional[int] = None,
                  normalize_target: bool = False, command: str = "evaluate",
                  per_query: bool = False) -> dict:
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

    ``per_query`` (for bootstrap intervals, not JSON-ready): each method also gets
    "per_query" = {"ranks_raw", "ranks_centred": (nq,) int64 rank of each sampled query's
    own pair (recall@k = mean(rank < k)), "sq_error": (n,) float64 ||y_i - b_i||^2 per
    held-out pair}, and the result "per_pair_spread": (n,) float64 ||b_i - mean b||^2, so
    that relative_residual = sq_error.sum() / per_pair_spread.sum() (up to rounding).
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
    sq_rows = {m.name: np.zeros(n) for m in methods} if per_query else None
    spread_rows = np.zeros(n) if per_query else None
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
            if per_query:
                sq_rows[m.name][s - start:e - start] = np.einsum("ij,ij->i", d, d,
                                                                 dtype=np.float64)
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
        if per_query:
            spread_rows[s - start:e - start] = np.einsum("ij,ij->i", bc, bc, dtype=np.float64)
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
        if per_query:
            entry["per_query"] = {"ranks_raw": scorers[(m.name, "raw")].counts,
                                  "ranks_centred": scorers[(m.name, "centred")].counts,
                                  "sq_error": sq_rows[m.name]}
        out_methods.append(entry)
    seconds = time.perf_counter() - t0
    log.info("%s: done in %.1fs", command, seconds)
    extra = {"per_pair_spread": spread_rows} if per_query else {}
    return {**extra, "rows": [start, stop], "pairs": n, "queries": nq, "targets": n,
            "sampled": nq < n, "seed": seed, "ks": ks, "csls_k": csls_k or None,
            "normalized_targets": bool(normalize_target),
            "chance": {f"recall@{k}": min(k / n, 1.0) for k in ks},
            "seconds": seconds, "methods": out_methods}
