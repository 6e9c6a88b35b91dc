"""Held-out evaluation of an alignment, its baselines, and the paper's diagnostics.

Before rewriting a billion vectors a user wants to know *how good* the map is on pairs it
has not seen, *compared with what*, and *whether it could be better at all*. This module
answers with:

* relative residual  ``sum ||f(x_i) - y_i||^2 / sum ||y_i - mean(y)||^2`` (0 = perfect,
  1 = no better than always answering the target mean);
* the cosine between each mapped source row and its own target row (mean and percentiles);
* cross-model retrieval recall@k: each mapped source row is a query searched, by exact
  cosine, among *all* held-out target rows; a hit when its own pair ranks within the top k.
  Measured twice: in the raw target space, and "centred" (each side with its own mean
  removed), because a large common offset in a model's space hurts cosine search itself;
* optional CSLS re-scoring (Conneau et al. 2018), which penalises "hub" targets;
* baselines fitted from the same d x d statistics as the transform (no second pass once the
  statistics are stored): no alignment (identity, dA == dB), least squares, ridge, and
  orthogonal with and without centring;
* the dot-product discrepancy epsilon of arXiv 2510.13406, delta, the bound and the achieved
  residual (:func:`fit_diagnostics`).

Layout: the maths (maps, search, ranks, nDCG, histograms) is pure numpy and works on
in-memory blocks; the streaming edge (:func:`evaluate`, :func:`evaluate_retrieval`,
:func:`learning_curve`) reads Zarr arrays (or numpy arrays, for tests) block by block.
Memory is bounded by the block size, the query sample (``max_queries`` x d) and one
float32 score block; never by the number of rows.

Retrieval is exact: every query is scored against every held-out target, blockwise. A
query's rank is the number of *other* targets scoring strictly higher than its own pair
(ties count in the query's favour), so recall@k = mean(rank < k). When the held-out set
has more than ``max_queries`` rows, a seeded random sample of them are the queries; the
searched set is always every held-out target.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from .errors import InputError
from .solve import NotUniqueWarning, discrepancy, paper_bound, procrustes, sums
from .solve import least_squares as _least_squares
from .stats import Moments, block_moments, merge

log = logging.getLogger("bigalign")

__all__ = ["AffineMap", "Method", "fit_diagnostics", "baseline_methods", "training_moments",
           "unit_rows", "row_cosine", "topk_merge", "exact_search", "count_better",
           "recall_from_ranks", "ndcg_at_k", "recall_at_k", "CosineHistogram",
           "evaluate_maps", "evaluate", "evaluate_retrieval", "learning_curve",
           "load_qrels", "default_sizes", "DEFAULT_MAX_QUERIES"]

#: Queries searched when the held-out set is larger (seeded sample); exact search of 10^4
#: queries among 10^5 targets of 384 dims is ~1.5 TFLOP per method and search variant.
DEFAULT_MAX_QUERIES = 10_000
#: Input bytes per streamed block.
BLOCK_BYTES = 32 * 2**20
#: Bytes of one float32 score block (queries x targets).
SCORE_BYTES = 64 * 2**20
#: Recall within this of the largest training size counts as saturated (learning curve).
SATURATION = 0.01
#: Fine histogram for cosine percentiles (resolution 0.001); the reported one is coarser.
_FINE_BINS, _COARSE_BINS = 2000, 100


# ---------------------------------------------------------------------------------------
# maps
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class AffineMap:
    """y = (normalize(x) - source_mean) @ matrix + target_mean.

    matrix : (dA, dB) float64 (for a Transform: scale * rotation).
    source_mean, target_mean : (dA,), (dB,) float64 (zeros for uncentred maps).
    normalize : L2-normalise source rows first (as a transform fitted with normalize does).
    """

    matrix: np.ndarray
    source_mean: np.ndarray
    target_mean: np.ndarray
    normalize: bool = False

    @property
    def dims(self) -> tuple[int, int]:
        return self.matrix.shape

    @classmethod
    def identity(cls, dim: int, normalize: bool = False) -> "AffineMap":
        return cls(np.eye(dim), np.zeros(dim), np.zeros(dim), normalize)

    @classmethod
    def from_transform(cls, t) -> "AffineMap":
        """The map a :class:`bigalign.Transform` applies (before any renormalisation)."""
        return cls(t.scale * np.asarray(t.rotation, dtype=np.float64),
                   np.asarray(t.source_mean, dtype=np.float64),
                   np.asarray(t.target_mean, dtype=np.float64), bool(t.normalize))

    def __call__(self, x: np.ndarray, dtype=np.float32) -> np.ndarray:
        """Map (n, dA) rows to (n, dB) in ``dtype`` (float32 or float64)."""
        work = np.dtype(dtype)
        x = np.asarray(x)
        if self.normalize:
            x = unit_rows(x, work)
        else:
            x = x.astype(work, copy=False)
        y = (x - self.source_mean.astype(work)) @ self.matrix.astype(work)
        y += self.target_mean.astype(work)
        return y


@dataclass
class Method:
    """One row of an evaluation table: a named map plus what is known of it from training.

    train : training-set numbers computed from the statistics (no pass over data):
        relative_residual (same definition as held-out), residual.
    this : True for the transform being evaluated.
    """

    name: str
    map: AffineMap
    note: str = ""
    train: dict = field(default_factory=dict)
    this: bool = False


def fit_diagnostics(m: Moments, *, center: bool = False) -> dict:
    """The paper's quantities for the training set summarised by ``m`` (needs Gram stats).

    epsilon : ||A A^T - B B^T||_F, the dot-product discrepancy over all n^2 pairs (exact).
    delta : epsilon / n, the root mean squared dot-product gap per pair of items.
    bound_residual : (2D)^(1/4) sqrt(epsilon), the bound on ||A Q - B||_F for the best
        orthogonal Q (D = max(dA, dB)).
    bound_mean_sq_distance : sqrt(2D) delta, the same bound per pair.
    achieved_residual, achieved_mean_sq_distance : what the best orthogonal Q (no scale)
        actually reaches, from the same statistics.
    bound_holds : achieved <= bound (it must; False would mean a bug or broken statistics).
    tightness : achieved / bound (small: the bound is loose; near 1: it is tight).

    With ``center`` the centred statistics are used, as a centred fit does.
    """
    eps = discrepancy(m, center=center)
    out = paper_bound(eps, *m.dims, m.n)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotUniqueWarning)
        sol = procrustes(m, center=center)
    if sol.residual is not None:
        achieved = math.sqrt(sol.residual)
        out["achieved_residual"] = achieved
        out["achieved_mean_sq_distance"] = sol.residual / m.n
        out["bound_holds"] = bool(achieved <= out["bound_residual"] * (1 + 1e-9) + 1e-12)
        out["tightness"] = achieved / out["bound_residual"] if out["bound_residual"] > 0 \
            else float("nan")
    out["center"] = bool(center)
    out["n"] = int(m.n)
    return out


def _train_numbers(residual: Optional[float], m: Moments) -> dict:
    if residual is None:
        return {}
    return {"residual": float(residual),
            "relative_residual": float(residual / m.sq_b) if m.sq_b > 0 else float("nan")}


def baseline_methods(m: Moments, *, center: bool = False, normalize: bool = False,
                     scale: bool = False, reflection: bool = True, ridge: float = 0.0,
                     transform=None) -> list[Method]:
    """Methods fitted from the statistics ``m`` alone (one d x d solve each, no data pass).

    Returns, in order: ``none`` (identity, dA == dB only), ``least squares`` (centred, i.e.
    with an intercept, when ``center``), ``ridge`` (when ``ridge`` > 0), ``orthogonal``
    (uncentred Procrustes) and ``orthogonal + centring``. When ``transform`` is given (the
    one being evaluated), it replaces the orthogonal row with its own centring and is
    marked ``this``; ``center``/``normalize``/``scale``/``reflection`` then default to its
    options. Least squares needs Gram statistics.
    """
    if transform is not None:
        o = transform.options
        center = bool(o.get("center", center))
        normalize = bool(o.get("normalize", normalize))
        scale = bool(o.get("scale", scale))
        reflection = bool(o.get("reflection", reflection))
    dim_a, dim_b = m.dims
    zeros = np.zeros
    means = (m.mean_a.copy(), m.mean_b.copy()) if center else (zeros(dim_a), zeros(dim_b))
    how = "centred (with intercept)" if center else "uncentred"
    out = []
    if dim_a == dim_b:
        c, qa, qb, _, _ = sums(m, False)
        res = max(qa + qb - 2 * float(np.trace(c)), 0.0)
        out.append(Method("none", AffineMap.identity(dim_a, normalize), "source vectors as they are",
                          _train_numbers(res, m)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotUniqueWarning)
        if m.has_gram:
            w, res = _least_squares(m, center=center)
            out.append(Method("least squares", AffineMap(w, *means, normalize),
                              f"unconstrained linear map, {how}", _train_numbers(res, m)))
            if ridge > 0:
                w, res = _least_squares(m, center=center, ridge=ridge)
                out.append(Method(f"ridge {ridge:g}", AffineMap(w, *means, normalize),
                                  f"linear map, penalty {ridge:g}, {how}", _train_numbers(res, m)))
        for c in (False, True):
            name = "orthogonal + centring" if c else "orthogonal"
            if transform is not None and c == center:
                tr = transform.metadata.get("residual")
                out.append(Method(name, AffineMap.from_transform(transform), "this transform",
                                  _train_numbers(tr, m) if tr is not None else {}, this=True))
                continue
            if not reflection and dim_a != dim_b:
                continue
            sol = procrustes(m, center=c, scale=scale, reflection=reflection)
            mc = (m.mean_a.copy(), m.mean_b.copy()) if c else (zeros(dim_a), zeros(dim_b))
            out.append(Method(name, AffineMap(sol.scale * sol.rotation, *mc, normalize),
                              "Procrustes" + (" with scale" if scale else ""),
                              _train_numbers(sol.residual, m)))
    return out


def transform_methods(transform) -> list[Method]:
    """Without statistics: ``none`` (dA == dB) and the transform itself."""
    dim_a, dim_b = transform.dims
    out = []
    if dim_a == dim_b:
        out.append(Method("none", AffineMap.identity(dim_a, transform.normalize),
                          "source vectors as they are"))
    name = "orthogonal + centring" if transform.options.get("center") else "orthogonal"
    out.append(Method(name, AffineMap.from_transform(transform), "this transform", this=True))
    return out


# ---------------------------------------------------------------------------------------
# metrics: pure numpy
# ---------------------------------------------------------------------------------------

def unit_rows(x: np.ndarray, dtype=None) -> np.ndarray:
    """Rows scaled to unit L2 norm (zero rows stay zero), in ``dtype`` (default: x's)."""
    x = np.asarray(x, dtype=dtype) if dtype is not None else np.asarray(x)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, np.finfo(x.dtype).tiny)


def row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Cosine between row i of ``a`` and row i of ``b``, (n,) float64 (0 for zero rows)."""
    a64 = np.asarray(a, dtype=np.float64)
    b64 = np.asarray(b, dtype=np.float64)
    num = np.einsum("ij,ij->i", a64, b64)
    den = np.linalg.norm(a64, axis=1) * np.linalg.norm(b64, axis=1)
    return np.divide(num, den, out=np.zeros_like(num), where=den > 0)


def topk_merge(best_scores: np.ndarray, best_index: np.ndarray, scores: np.ndarray,
               offset: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Keep the ``k`` largest of running (nq, <=k) bests and a new (nq, b) score block
    whose column j is item ``offset + j``. Returns unsorted (nq, min(k, total)) arrays."""
    index = np.broadcast_to(np.arange(offset, offset + scores.shape[1]), scores.shape)
    s = np.concatenate([best_scores, scores], axis=1)
    i = np.concatenate([best_index, index], axis=1)
    if s.shape[1] > k:
        part = np.argpartition(-s, k - 1, axis=1)[:, :k]
        s = np.take_along_axis(s, part, axis=1)
        i = np.take_along_axis(i, part, axis=1)
    return s, i


def _sort_topk(s: np.ndarray, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row by score descending, ties by item index ascending."""
    order = np.lexsort((i, -s), axis=-1)
    return np.take_along_axis(s, order, axis=1), np.take_along_axis(i, order, axis=1)


def exact_search(queries: np.ndarray, blocks, k: int, *, query_block: Optional[int] = None):
    """Exact top-``k`` inner-product search, streamed over database blocks.

    queries : (nq, d) (unit rows for cosine). blocks : iterable of (offset, (b, d) rows).
    Returns (scores, index), each (nq, k') sorted best first, k' = min(k, database size).
    """
    nq = len(queries)
    best_s = np.empty((nq, 0), dtype=queries.dtype)
    best_i = np.empty((nq, 0), dtype=np.int64)
    for offset, block in blocks:
        best_s, best_i = _topk_block(queries, block, offset, k, best_s, best_i, query_block)
    return _sort_topk(best_s, best_i)


def _topk_block(queries, block, offset, k, best_s, best_i, query_block=None):
    qb = query_block or _query_block(len(queries), len(block))
    out_s, out_i = [], []
    for q0 in range(0, len(queries), qb):
        scores = queries[q0:q0 + qb] @ block.T
        s, i = topk_merge(best_s[q0:q0 + qb], best_i[q0:q0 + qb], scores, offset, k)
        out_s.append(s)
        out_i.append(i)
    if not out_s:
        return best_s, best_i
    return np.concatenate(out_s), np.concatenate(out_i)


def _query_block(nq: int, b: int) -> int:
    return max(1, min(nq, SCORE_BYTES // (4 * max(b, 1))))


def count_better(queries: np.ndarray, true_scores: np.ndarray, true_index: np.ndarray,
                 block: np.ndarray, offset: int, counts: np.ndarray, *,
                 target_bias: Optional[np.ndarray] = None, scale: float = 1.0,
                 query_block: Optional[int] = None) -> None:
    """Add to ``counts[i]`` how many items of ``block`` (item j = ``offset + j``), other
    than query i's own pair ``true_index[i]``, score strictly higher than ``true_scores[i]``.

    Score = scale * queries @ block.T - target_bias[offset + j] (plain: scale 1, no bias;
    CSLS: scale 2, bias r_S). ``true_scores`` must use the same formula. In place.
    """
    b = len(block)
    qb = query_block or _query_block(len(queries), b)
    bias = None if target_bias is None else target_bias[offset:offset + b]
    for q0 in range(0, len(queries), qb):
        s = queries[q0:q0 + qb] @ block.T
        if scale != 1.0:
            s *= scale
        if bias is not None:
            s -= bias
        greater = s > true_scores[q0:q0 + qb, None]
        own = true_index[q0:q0 + qb] - offset
        rows = np.flatnonzero((own >= 0) & (own < b))
        greater[rows, own[rows]] = False
        counts[q0:q0 + qb] += greater.sum(axis=1)


def recall_from_ranks(ranks: np.ndarray, ks: Sequence[int]) -> dict:
    """{"recall@k": share of queries with rank < k} plus "mrr" (mean 1 / (rank + 1))."""
    ranks = np.asarray(ranks)
    out = {f"recall@{k}": float(np.mean(ranks < k)) for k in ks}
    out["mrr"] = float(np.mean(1.0 / (ranks + 1.0)))
    return out


def ndcg_at_k(ranked: np.ndarray, relevance: Sequence[dict], k: int = 10) -> np.ndarray:
    """nDCG@k per query: DCG = sum_r rel(doc_r) / log2(r + 1) over ranks r = 1..k (linear
    gain, as trec_eval), divided by the DCG of the ideal order of the judged relevant docs.

    ranked : (nq, >=k) doc ids best first. relevance : per query {doc_id: relevance}; only
    relevance > 0 counts. Queries with no relevant doc get NaN (callers skip them).
    """
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    out = np.full(len(relevance), np.nan)
    for q, rel in enumerate(relevance):
        ideal = sorted((r for r in rel.values() if r > 0), reverse=True)[:k]
        if not ideal:
            continue
        gains = np.array([max(rel.get(int(d), 0.0), 0.0) for d in ranked[q, :k]], dtype=np.float64)
        dcg = float(gains @ discount[:len(gains)])
        out[q] = dcg / float(np.asarray(ideal, dtype=np.float64) @ discount[:len(ideal)])
    return out


def recall_at_k(ranked: np.ndarray, relevance: Sequence[dict], k: int) -> np.ndarray:
    """Per query: share of its relevant docs (relevance > 0) found in the top ``k``."""
    out = np.full(len(relevance), np.nan)
    for q, rel in enumerate(relevance):
        wanted = {d for d, r in rel.items() if r > 0}
        if wanted:
            out[q] = len(wanted.intersection(int(d) for d in ranked[q, :k])) / len(wanted)
    return out


class CosineHistogram:
    """Streaming histogram of cosines on [-1, 1]: exact mean, percentiles to +-0.001."""

    def __init__(self):
        self.counts = np.zeros(_FINE_BINS, dtype=np.int64)
        self.total = 0.0
        self.n = 0

    def add(self, values: np.ndarray) -> None:
        v = np.asarray(values, dtype=np.float64)
        self.total += float(v.sum())
        self.n += v.size
        idx = np.clip(((v + 1.0) * (_FINE_BINS / 2)).astype(np.int64), 0, _FINE_BINS - 1)
        self.counts += np.bincount(idx, minlength=_FINE_BINS)

    def percentile(self, q: float) -> float:
        """Linear interpolation inside the fine bin holding the q-th percentile."""
        if self.n == 0:
            return float("nan")
        cum = np.cumsum(self.counts)
        target = q / 100.0 * self.n
        i = int(np.searchsorted(cum, target, side="left"))
        i = min(i, _FINE_BINS - 1)
        before = cum[i - 1] if i else 0
        frac = (target - before) / self.counts[i] if self.counts[i] else 0.0
        return -1.0 + (i + frac) * (2.0 / _FINE_BINS)

    def summary(self) -> dict:
        out = {"mean": self.total / self.n if self.n else float("nan")}
        for q in (5, 25, 50, 75, 95):
            out[f"p{q}"] = self.percentile(q)
        return out

    def coarse(self) -> dict:
        """{"edges": [-1..1] (COARSE+1), "counts": COARSE ints} for JSON and plots."""
        counts = self.counts.reshape(_COARSE_BINS, -1).sum(axis=1)
        return {"edges": np.linspace(-1, 1, _COARSE_BINS + 1).round(6).tolist(),
                "counts": counts.tolist()}


# ---------------------------------------------------------------------------------------
# streaming edge: reading rows in blocks
# ---------------------------------------------------------------------------------------

class _Rows:
    """A numpy array or a validated Zarr embedding array, read in whole-chunk blocks."""

    def __init__(self, data, side: str, storage_options=None, check_chunks=True):
        self.side = side
        if isinstance(data, np.ndarray):
            if data.ndim != 2 or data.shape[0] == 0 or data.shape[1] == 0:
                raise InputError(f"{side}: expected a non-empty 2-D (rows, dim) array, "
                                 f"got shape {data.shape}")
            self.data, self.emb = data, None
            self.rows, self.dim = data.shape
            self.dtype = data.dtype
            self.step, self.url = 1, f"<{side} array>"
            self.row_bytes = self.dim * data.dtype.itemsize
        else:
            from .stores import EmbeddingArray, open_embeddings

            emb = data if isinstance(data, EmbeddingArray) else open_embeddings(
                data, side=side, storage_options=storage_options, check_chunks=check_chunks)
            self.data, self.emb = None, emb
            self.rows, self.dim, self.step, self.url = emb.rows, emb.dim, emb.row_step, emb.url
            self.dtype = emb.dtype
            self.row_bytes = emb.row_bytes

    def read(self, start: int, stop: int) -> np.ndarray:
        if self.emb is None:
            return self.data[start:stop]
        from .stores import read_rows

        return np.asarray(read_rows(self.emb, start, stop))

    def take(self, rows: np.ndarray, block_rows: Optional[int] = None) -> np.ndarray:
        """Rows at sorted indices ``rows``, reading only the blocks that hold some."""
        rows = np.asarray(rows, dtype=np.int64)
        out = np.empty((len(rows), self.dim), dtype=np.float64 if self.dtype == np.float64
                       else np.float32)
        if not len(rows):
            return out
        per = block_rows or self.block_rows()
        for s, e in _ranges(int(rows[0]), int(rows[-1]) + 1, per):
            lo, hi = np.searchsorted(rows, [s, e])
            if hi > lo:
                block = self.read(s, e)
                out[lo:hi] = block[rows[lo:hi] - s]
        return out

    def block_rows(self, other: Optional["_Rows"] = None) -> int:
        row_bytes = self.row_bytes + (other.row_bytes if other is not None else 0)
        step = max(self.step, other.step if other is not None else 1)
        per = max(1, BLOCK_BYTES // max(row_bytes, 1))
        return max(step, per // step * step)


def _ranges(start: int, stop: int, per: int, cuts: Sequence[int] = ()) -> list[tuple[int, int]]:
    """[start, stop) cut at multiples of ``per`` (absolute) and at ``cuts``."""
    edges = set(range((start // per + 1) * per, stop, per))
    edges.update(c for c in cuts if start < c < stop)
    edges = [start, *sorted(edges), stop]
    return list(zip(edges[:-1], edges[1:]))


def _open_pair(source, target, storage_options, check_chunks) -> tuple[_Rows, _Rows]:
    """Open paired arrays (already opened _Rows pass through) and check the row counts."""
    src = source if isinstance(source, _Rows) else \
        _Rows(source, "source", storage_options, check_chunks)
    tgt = target if isinstance(target, _Rows) else \
        _Rows(target, "target", storage_options, check_chunks)
    if src.rows != tgt.rows:
        raise InputError(f"source has {src.rows} rows but target has {tgt.rows}: row i of "
                         "source is paired with row i of target, so they must match")
    return src, tgt


def _rows(rows, n: int, what: str) -> tuple[int, int]:
    from .stores import parse_rows

    try:
        return parse_rows(rows, n)
    except InputError as e:
        raise InputError(f"{what}: {e}") from None


def training_moments(source, target, rows=None, *, normalize: bool = False,
                     gram: bool = True, dtype=None, cuts: Sequence[int] = (),
                     block_rows: Optional[int] = None, storage_options=None,
                     check_chunks: bool = True) -> "Moments | list[Moments]":
    """Statistics of paired rows [start, stop) in one sequential streaming pass (each chunk
    read once; memory one block plus d x d sums). The merge order is fixed by row range.

    With ``cuts`` (absolute row indices), returns the statistics of every prefix
    [start, cut) for each cut in order, then of [start, stop): the learning curve's nested
    training sets, still in one pass.
    """
    src, tgt = _open_pair(source, target, storage_options, check_chunks)
    start, stop = _rows(rows, src.rows, "training rows")
    per = block_rows or src.block_rows(tgt)
    cuts = sorted(set(int(c) for c in cuts if start < c < stop))
    snaps, acc = [], Moments.empty(src.dim, tgt.dim, gram)
    pending = list(cuts)
    for s, e in _ranges(start, stop, per, cuts):
        acc = merge(acc, block_moments(src.read(s, e), tgt.read(s, e), gram=gram,
                                       normalize=normalize, dtype=dtype, start=s))
        if pending and e == pending[0]:
            snaps.append(acc)
            pending.pop(0)
    if cuts:
        return snaps + [acc]
    return acc


# ---------------------------------------------------------------------------------------
# the evaluation engine: many maps, one set of passes over held-out pairs
# ---------------------------------------------------------------------------------------

class _Pool:
    """Run independent numpy tasks on threads, BLAS pinned to one thread each.

    Multi-threaded OpenBLAS under a thread pool, or on a machine busy with other work,
    collapses (measured here: 28 s instead of 1.6 s for one learning curve on a loaded
    2-core box); one BLAS thread per Python thread, parallel over independent tasks (numpy
    releases the GIL in GEMM), is robust. The engine pins BLAS the same way."""

    def __init__(self, workers: Optional[int] = None):
        self.workers = workers or _cores()

    def __enter__(self):
        from concurrent.futures import ThreadPoolExecutor
        from threadpoolctl import threadpool_limits

        self._limits = threadpool_limits(limits=1)
        self._executor = ThreadPoolExecutor(self.workers) if self.workers > 1 else None
        return self

    def __exit__(self, *exc):
        if self._executor is not None:
            self._executor.shutdown()
        self._limits.restore_original_limits()

    def run(self, tasks) -> None:
        """Call every zero-argument task; re-raise the first error."""
        if self._executor is None:
            for task in tasks:
                task()
            return
        for future in [self._executor.submit(task) for task in tasks]:
            future.result()

    def query_block(self, b: int) -> int:
        """Queries per GEMM against ``b`` targets so that all threads together hold at most
        SCORE_BYTES of float32 scores."""
        return max(1, SCORE_BYTES // (4 * max(b, 1) * self.workers))

    def chunks(self, n: int, minimum: int = 256) -> list[tuple[int, int]]:
        """Split n queries into about ``workers`` contiguous chunks of >= ``minimum``."""
        size = max(minimum, -(-n // self.workers))
        return [(i, min(i + size, n)) for i in range(0, n, size)]


def _cores() -> int:
    import os

    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _sample(n: int, max_queries: Optional[int], seed: int) -> np.ndarray:
    if not max_queries or max_queries >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_queries, replace=False))


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

    def tasks(self, pool: "_Pool", block: np.ndarray, offset: int) -> list:
        """Independent tasks scoring one target block: a rank count per query chunk (each
        writes its own slice of ``counts``), plus the CSLS neighbourhoods of the block."""
        qb = pool.query_block(len(block))
        out = [lambda q0=q0, q1=q1: count_better(
                   self.q[q0:q1], self.true[q0:q1], self.true_index[q0:q1], block, offset,
                   self.counts[q0:q1], query_block=qb) for q0, q1 in pool.chunks(len(self.q))]
        if self.csls_k:
            out.append(lambda: self._collect_r_s(block, offset, pool.query_block(len(self.q))))
        return out

    def _collect_r_s(self, block: np.ndarray, offset: int, query_block: int) -> None:
        empty_s = np.empty((len(block), 0), dtype=block.dtype)
        empty_i = np.empty((len(block), 0), dtype=np.int64)
        s, _ = _topk_block(block, self.q, 0, self.csls_k, empty_s, empty_i, query_block)
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

    def csls_tasks(self, pool: "_Pool", block: np.ndarray, offset: int) -> list:
        qb = pool.query_block(len(block))
        return [lambda q0=q0, q1=q1: count_better(
                    self.q[q0:q1], self.csls_true[q0:q1], self.true_index[q0:q1], block,
                    offset, self.csls_counts[q0:q1], target_bias=self.r_s, scale=2.0,
                    query_block=qb)
                for q0, q1 in pool.chunks(len(self.q))]


def evaluate_maps(methods: Sequence[Method], source, target, rows=None, *,
                  ks: Sequence[int] = (1, 10), max_queries: Optional[int] = DEFAULT_MAX_QUERIES,
                  seed: int = 0, csls: bool = False, csls_k: int = 10, dtype="float32",
                  block_rows: Optional[int] = None, storage_options=None,
                  check_chunks: bool = True, workers: Optional[int] = None) -> dict:
    """Evaluate every map in ``methods`` on paired rows [start, stop) of source / target.

    Pass 1 reads the held-out pairs once: residuals, raw cosines, each side's mean, and the
    sampled query rows. Pass 2 reads them again: centred cosines, and every target block
    scored against every method's queries in both search variants ("raw": cosine in the
    target space; "centred": each side minus its own held-out mean). With ``csls`` a third
    pass over the targets re-ranks with CSLS (its target neighbourhoods use the query
    sample). All maps share the passes: adding a method costs compute, not I/O.

    Returns {"rows", "pairs", "queries", "targets", "ks", "chance", "methods": [...]}.
    """
    src, tgt = _open_pair(source, target, storage_options, check_chunks)
    start, stop = _rows(rows, src.rows, "held-out rows")
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
    per = block_rows or src.block_rows(tgt)
    ranges = _ranges(start, stop, per)
    sample = _sample(n, max_queries, seed)
    nq = len(sample)
    csls_k = min(csls_k, nq) if csls else 0
    t0 = time.perf_counter()
    log.info("evaluate: %d held-out pairs (rows %d:%d), %d methods, %d queries among %d "
             "targets", n, start, stop, len(methods), nq, n)

    # ---- pass 1 ------------------------------------------------------------------------
    sq_err = {m.name: 0.0 for m in methods}
    mapped_sum = {m.name: np.zeros(tgt.dim) for m in methods}
    hist_raw = {m.name: CosineHistogram() for m in methods}
    t_sum, t_sq = np.zeros(tgt.dim), 0.0
    xs = np.empty((nq, src.dim), dtype=work)
    ys = np.empty((nq, tgt.dim), dtype=work)
    for s, e in ranges:
        a, b = src.read(s, e), tgt.read(s, e).astype(work, copy=False)
        _check_finite(b, s, "target")
        t_sum += b.sum(axis=0, dtype=np.float64)
        t_sq += float(np.einsum("ij,ij->", b, b, dtype=np.float64))
        lo, hi = np.searchsorted(sample, [s - start, e - start])
        xs[lo:hi] = a[sample[lo:hi] - (s - start)]
        ys[lo:hi] = b[sample[lo:hi] - (s - start)]
        for m in methods:
            y = m.map(a, work)
            _check_finite(y, s, "source")
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
    with _Pool(workers) as pool:
        for s, e in ranges:
            a, b = src.read(s, e), tgt.read(s, e).astype(work, copy=False)
            bc = b - mu_t_w
            blocks = {"raw": unit_rows(b), "centred": unit_rows(bc)}
            tasks = []
            for m in methods:
                y = m.map(a, work)
                hist_cen[m.name].add(row_cosine(y - mu_f[m.name].astype(work), bc))
                for variant, block in blocks.items():
                    tasks += scorers[(m.name, variant)].tasks(pool, block, s - start)
            pool.run(tasks)
        # ---- pass 3 (CSLS) ---------------------------------------------------------------
        if csls_k:
            for sc in scorers.values():
                sc.start_csls(n)
            for s, e in ranges:
                b = tgt.read(s, e).astype(work, copy=False)
                blocks = {"raw": unit_rows(b), "centred": unit_rows(b - mu_t_w)}
                pool.run([t for (name, variant), sc in scorers.items()
                          for t in sc.csls_tasks(pool, blocks[variant], s - start)])

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
    log.info("evaluate: done in %.1fs", seconds)
    return {"rows": [start, stop], "pairs": n, "queries": nq, "targets": n,
            "sampled": nq < n, "seed": seed, "ks": ks, "csls_k": csls_k or None,
            "chance": {f"recall@{k}": min(k / n, 1.0) for k in ks},
            "seconds": seconds, "methods": out_methods}


def _check_finite(x: np.ndarray, start: int, side: str) -> None:
    if not np.isfinite(x.sum(axis=0, dtype=np.float64)).all():
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        row = start + int(bad[0]) if bad.size else start
        raise InputError(f"{side} row {row} holds NaN or Inf (block rows {start}:{start + len(x)})")


# ---------------------------------------------------------------------------------------
# public entry points
# ---------------------------------------------------------------------------------------

def _load_transform(transform, storage_options=None):
    from .transform import Transform

    if isinstance(transform, Transform):
        return transform
    try:
        return Transform.load(transform, storage_options=storage_options)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f"transform {str(transform)!r}: {e}") from None


def _default_heldout(train: Optional[Sequence[int]], n: int) -> tuple[int, int]:
    """Rows the transform was not fitted on: after its training range, else before it."""
    if train is None:
        raise InputError("the transform does not record its training rows; pass --rows "
                         "START:STOP for the held-out pairs")
    a, b = int(train[0]), int(train[1])
    if b < n:
        return b, n
    if a > 0:
        return 0, a
    raise InputError(f"the transform was fitted on all {n} rows, so none are held out; pass "
                     "--rows START:STOP (rows it was fitted on flatter every method)")


def _statistics(t, statistics, want: bool, train_source, train_target, storage_options,
                check_chunks, block_rows) -> tuple[Optional[Moments], Optional[str]]:
    """The training statistics for baselines: given, stored with the transform, or streamed
    once over the transform's training rows of ``train_source``/``train_target``."""
    if statistics is not None:
        return statistics, "given"
    stored = getattr(t, "statistics", None)
    if stored is not None:
        return stored, "stored with the transform"
    if not want or train_source is None or train_target is None:
        return None, None
    train = t.options.get("rows")
    if not train:
        log.warning("no baselines: the transform does not record its training rows")
        return None, None
    try:
        src, tgt = _open_pair(train_source, train_target, storage_options, check_chunks)
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
        fitted = (inputs.get(side) or {}).get("url")
        if fitted and arr.emb is not None and fitted.rstrip("/") != arr.url.rstrip("/"):
            log.warning("baselines: fitting on rows %d:%d of %s %s; the transform was fitted "
                        "on %s", a, b, side, arr.url, fitted)
    log.info("baselines: one streaming pass over training rows %d:%d for their statistics "
             "(store the fit's statistics with the transform to skip it)", a, b)
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


def evaluate(transform, source, target, rows=None, *, baselines: bool = True,
             statistics: Optional[Moments] = None, train_source=None, train_target=None,
             ridge: float = 0.0, ks: Sequence[int] = (1, 10),
             max_queries: Optional[int] = DEFAULT_MAX_QUERIES, seed: int = 0,
             csls: bool = False, csls_k: int = 10, dtype="float32",
             block_rows: Optional[int] = None, storage_options=None,
             check_chunks: bool = True) -> dict:
    """Evaluate ``transform`` on held-out pairs of ``source`` (N, dA) / ``target`` (N, dB).

    rows : the held-out row range (default: the rows after, else before, the transform's
        training rows).
    baselines : also evaluate none / least squares / ridge / the other centring, fitted from
        the training statistics: ``statistics`` when given, else those stored with the
        transform, else one streaming pass over the transform's training rows of
        ``train_source``/``train_target`` (default: ``source``/``target``).
    Other options as :func:`evaluate_maps`. Returns a JSON-ready dict ("kind": "evaluate").
    """
    t = _load_transform(transform, storage_options)
    src, tgt = _open_pair(source, target, storage_options, check_chunks)
    if (src.dim, tgt.dim) != tuple(t.dims):
        raise InputError(f"the transform maps {t.dims[0]} -> {t.dims[1]} dims but source has "
                         f"{src.dim} and target {tgt.dim}")
    train = t.options.get("rows")
    start, stop = _rows(rows, src.rows, "held-out rows") if rows is not None else \
        _default_heldout(train, src.rows)
    overlap = 0
    if train:
        overlap = max(0, min(stop, int(train[1])) - max(start, int(train[0])))
        if overlap:
            log.warning("%d of the %d evaluated rows were used to fit the transform: the "
                        "numbers flatter every fitted method", overlap, stop - start)
    if train_source is None and train_target is None:
        train_source, train_target = src, tgt
    elif (train_source is None) != (train_target is None):
        raise InputError("give both --train-source and --train-target, or neither")
    moments, origin = _statistics(t, statistics, baselines, train_source, train_target,
                                  storage_options, check_chunks, block_rows)
    if moments is not None and baselines:
        methods = baseline_methods(moments, transform=t, ridge=ridge)
    else:
        methods = transform_methods(t)
    result = evaluate_maps(methods, src, tgt, (start, stop), ks=ks, max_queries=max_queries,
                           seed=seed, csls=csls, csls_k=csls_k, dtype=dtype,
                           block_rows=block_rows)
    training = {"rows": train, "statistics": origin,
                "fit_diagnostics": t.metadata.get("discrepancy")}
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
            "overlap_with_training": overlap, "training": training, **result}


# ---- retrieval with relevance judgements -------------------------------------------------

def load_qrels(qrels) -> dict[int, dict[int, float]]:
    """Relevance judgements {query_id: {doc_id: relevance}} from a parquet / CSV / TSV file
    (read with polars) or a polars DataFrame with columns query_id, doc_id and optionally
    relevance (default 1). Ids are row indices of the query and document arrays."""
    import polars as pl

    if isinstance(qrels, pl.DataFrame):
        df = qrels
    else:
        path = str(qrels)
        try:
            if path.endswith((".parquet", ".pq")):
                df = pl.read_parquet(path)
            elif path.endswith((".tsv", ".tsv.gz")):
                df = pl.read_csv(path, separator="\t")
            else:
                df = pl.read_csv(path)
        except FileNotFoundError:
            raise InputError(f"qrels {path!r}: no such file") from None
        except Exception as e:
            raise InputError(f"qrels {path!r}: cannot read it as parquet/CSV ({e})") from None
    missing = {"query_id", "doc_id"} - set(df.columns)
    if missing:
        raise InputError(f"qrels: missing column(s) {sorted(missing)}; expected query_id, "
                         f"doc_id[, relevance], got {df.columns}")
    if "relevance" not in df.columns:
        df = df.with_columns(pl.lit(1.0).alias("relevance"))
    try:
        df = df.select(pl.col("query_id").cast(pl.Int64, strict=True),
                       pl.col("doc_id").cast(pl.Int64, strict=True),
                       pl.col("relevance").cast(pl.Float64, strict=True))
    except Exception:
        raise InputError("qrels: query_id and doc_id must be integer row indices of the query "
                         "and document arrays, relevance a number") from None
    if df.null_count().sum_horizontal().item():
        raise InputError("qrels: null values in query_id, doc_id or relevance")
    if not len(df):
        raise InputError("qrels: no judgements")
    out: dict[int, dict[int, float]] = {}
    for q, d, r in df.iter_rows():
        out.setdefault(q, {})[d] = max(r, out.get(q, {}).get(d, r))
    return out


def evaluate_retrieval(transform, queries, docs, qrels, *, map_side: str = "queries",
                       native=None, statistics: Optional[Moments] = None, train_source=None,
                       train_target=None, ridge: float = 0.0, query_rows=None, doc_rows=None,
                       ks: Sequence[int] = (1, 10, 100), ndcg_k: int = 10,
                       max_queries: Optional[int] = DEFAULT_MAX_QUERIES, seed: int = 0,
                       dtype="float32", block_rows: Optional[int] = None,
                       storage_options=None, check_chunks: bool = True) -> dict:
    """Query -> document retrieval when queries and documents come from different models.

    queries : (Nq, d) query embeddings; docs : (Nd, d') document embeddings; qrels : see
    :func:`load_qrels` (query_id / doc_id are row indices of ``queries`` / ``docs``).
    map_side : "queries": ``transform`` maps the query model into the document model's
        space and queries are mapped (the paper's "upgrade the query model"); "docs": it maps
        the document model into the query model's space and documents are mapped.
    native : the same texts embedded by the other model (queries by the document model when
        map_side="queries", documents by the query model otherwise): the no-migration
        ceiling.
    Baselines come from training statistics as in :func:`evaluate` (``statistics``, stored,
    or ``train_source``/``train_target`` = the transform's training pairs).

    Every method is searched twice: raw cosine, and "centred" (query side minus the query
    set's mean, document side minus the collection's mean). Returns nDCG@``ndcg_k`` and
    recall@k per method and variant ("kind": "retrieval").
    """
    if map_side not in ("queries", "docs"):
        raise InputError(f"map side must be 'queries' or 'docs', got {map_side!r}")
    t = _load_transform(transform, storage_options)
    qa = _Rows(queries, "queries", storage_options, check_chunks)
    da = _Rows(docs, "documents", storage_options, check_chunks)
    dim_a, dim_b = t.dims
    mapped, fixed = (qa, da) if map_side == "queries" else (da, qa)
    if mapped.dim != dim_a or fixed.dim != dim_b:
        raise InputError(
            f"the transform maps {dim_a} -> {dim_b} dims; with --map {map_side} the "
            f"{mapped.side} must have {dim_a} dims (got {mapped.dim}) and the {fixed.side} "
            f"{dim_b} (got {fixed.dim})")
    nat = None
    if native is not None:
        nat = _Rows(native, "native " + mapped.side, storage_options, check_chunks)
        if nat.rows != mapped.rows or nat.dim != dim_b:
            raise InputError(f"native {mapped.side} must be the {mapped.side} embedded by the "
                             f"other model: shape ({mapped.rows}, {dim_b}), got "
                             f"({nat.rows}, {nat.dim})")
    q0, q1 = _rows(query_rows, qa.rows, "query rows")
    d0, d1 = _rows(doc_rows, da.rows, "document rows")
    judged = load_qrels(qrels)
    judged = {q: rel for q, rel in judged.items() if q0 <= q < q1}
    bad_docs = sorted({d for rel in judged.values() for d in rel if not d0 <= d < d1})
    if bad_docs:
        raise InputError(f"qrels name {len(bad_docs)} document(s) outside the searched rows "
                         f"{d0}:{d1} (first: {bad_docs[0]}); pass --doc-rows to include them")
    qids = np.array(sorted(q for q, rel in judged.items() if any(r > 0 for r in rel.values())),
                    dtype=np.int64)
    if not len(qids):
        raise InputError(f"no query in rows {q0}:{q1} has a relevant document (relevance > 0) "
                         "in the qrels")
    n_judged = len(qids)
    qids = qids[_sample(n_judged, max_queries, seed)]
    relevance = [judged[int(q)] for q in qids]
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1 or ndcg_k < 1:
        raise InputError("cut-offs must be positive integers")
    n_docs = d1 - d0
    depth = min(max(max(ks), ndcg_k), n_docs)
    work = np.dtype(dtype)
    t0 = time.perf_counter()

    if train_source is not None or train_target is not None:
        if train_source is None or train_target is None:
            raise InputError("give both --train-source and --train-target, or neither")
    moments, origin = _statistics(t, statistics, True, train_source, train_target,
                                  storage_options, check_chunks, block_rows)
    methods = baseline_methods(moments, transform=t, ridge=ridge) if moments is not None \
        else transform_methods(t)
    log.info("evaluate-retrieval: %d queries (rows %d:%d) among %d documents (rows %d:%d), "
             "%s mapped, %d methods", len(qids), q0, q1, n_docs, d0, d1, map_side,
             len(methods) + (nat is not None))

    # entries: (name, note, this, query vectors, doc stream key); streams: key -> (rows, map)
    q_raw = qa.take(qids)
    entries, streams = [], {}
    if map_side == "queries":
        streams["docs"] = (da, None)
        if nat is not None:
            entries.append(("native", "queries embedded by the document model", False,
                            nat.take(qids).astype(work), "docs"))
        for m in methods:
            entries.append((m.name, m.note, m.this, m.map(q_raw, work), "docs"))
    else:
        q_work = q_raw.astype(work)
        if nat is not None:
            streams["native"] = (nat, None)
            entries.append(("native", "documents embedded by the query model", False,
                            q_work, "native"))
        for i, m in enumerate(methods):
            streams[f"m{i}"] = (da, m.map)
            entries.append((m.name, m.note, m.this, q_work, f"m{i}"))

    per = block_rows or max(s[0].block_rows() for s in streams.values())
    ranges = _ranges(d0, d1, per)

    def blocks():
        """Yield (offset, {stream key: mapped block}) reading each array once per block."""
        for s, e in ranges:
            cache = {}
            out = {}
            for key, (arr, fn) in streams.items():
                if id(arr) not in cache:
                    cache[id(arr)] = arr.read(s, e)
                    _check_finite(cache[id(arr)], s, arr.side)
                x = cache[id(arr)]
                out[key] = fn(x, work) if fn is not None else x.astype(work, copy=False)
            yield s, out

    # pass 1: the mean of each document stream (for centred search)
    sums_ = {key: np.zeros(dim_b) for key in streams}
    for _, out in blocks():
        for key, y in out.items():
            sums_[key] += y.sum(axis=0, dtype=np.float64)
    doc_mean = {key: (v / n_docs).astype(work) for key, v in sums_.items()}
    # queries, both variants
    search = []
    for name, note, this, qv, key in entries:
        qv = np.asarray(qv, dtype=work)
        search.append((name, "raw", unit_rows(qv), key))
        search.append((name, "centred", unit_rows(qv - qv.mean(axis=0)), key))
    # pass 2: exact top-k; one running best per (search, query chunk), filled in parallel
    with _Pool() as pool:
        chunks = pool.chunks(len(qids))
        best = {(j, c): (np.empty((c[1] - c[0], 0), dtype=work),
                         np.empty((c[1] - c[0], 0), dtype=np.int64))
                for j in range(len(search)) for c in chunks}

        def task(j, c, docs, offset):
            qv = search[j][2]
            best[(j, c)] = _topk_block(qv[c[0]:c[1]], docs, offset, depth, *best[(j, c)],
                                       pool.query_block(len(docs)))

        for s, out in blocks():
            units = {}
            for key, y in out.items():
                units[(key, "raw")] = unit_rows(y)
                units[(key, "centred")] = unit_rows(y - doc_mean[key])
            pool.run([lambda j=j, c=c, d=units[(key, variant)], s=s: task(j, c, d, s)
                      for j, (_, variant, _, key) in enumerate(search) for c in chunks])
    results = {}
    for j, (name, variant, _, _) in enumerate(search):
        _, ranked = _sort_topk(np.concatenate([best[(j, c)][0] for c in chunks]),
                               np.concatenate([best[(j, c)][1] for c in chunks]))
        scores = {f"ndcg@{ndcg_k}": float(np.nanmean(ndcg_at_k(ranked, relevance, ndcg_k)))}
        for k in ks:
            scores[f"recall@{k}"] = float(np.nanmean(recall_at_k(ranked, relevance, k)))
        results.setdefault(name, {})[variant] = scores
    out_methods = [{"name": name, "note": note, "this": this, "retrieval": results[name]}
                   for name, note, this, _, _ in entries]
    seconds = time.perf_counter() - t0
    log.info("evaluate-retrieval: done in %.1fs", seconds)
    return {"kind": "retrieval", "map": map_side, "queries": int(len(qids)),
            "query_rows": [q0, q1], "doc_rows": [d0, d1], "documents": n_docs,
            "sampled": len(qids) < n_judged, "ks": ks,
            "ndcg_k": ndcg_k, "training": {"rows": t.options.get("rows"), "statistics": origin},
            "transform": {"dims": list(t.dims), "options": t.options},
            "seconds": seconds, "methods": out_methods}


# ---- learning curve ----------------------------------------------------------------------

def default_sizes(n: int) -> list[int]:
    """Training-set sizes 100, 300, 1000, 3000, 10000, ... below ``n``, then ``n``."""
    out, base = [], 100
    while base < n:
        for step in (1, 3):
            if base * step < n:
                out.append(base * step)
        base *= 10
    return sorted(set(out)) + [n]


def learning_curve(source, target, train_rows, eval_rows, *, sizes: Optional[Sequence[int]] = None,
                   center: bool = False, normalize: bool = False, scale: bool = False,
                   reflection: bool = True, least_squares: bool = True, ridge: float = 0.0,
                   ks: Sequence[int] = (1, 10), max_queries: Optional[int] = DEFAULT_MAX_QUERIES,
                   seed: int = 0, dtype="float32", block_rows: Optional[int] = None,
                   storage_options=None, check_chunks: bool = True) -> dict:
    """Quality against the number of training pairs.

    Fits on the first ``n`` rows of ``train_rows`` for each ``n`` in ``sizes`` (nested
    prefixes: one streaming pass snapshots the statistics at each size) and evaluates every
    fit (orthogonal, and least squares unless disabled) on the same held-out ``eval_rows``.
    ``saturation``: the smallest size whose centred recall@1 (orthogonal) is within
    ``SATURATION`` (0.01) of the largest size's; None when only the largest size gets there
    (still improving: more pairs would help). Returns a JSON-ready dict ("kind": "curve").
    """
    src, tgt = _open_pair(source, target, storage_options, check_chunks)
    a, b = _rows(train_rows, src.rows, "training rows")
    c, d = _rows(eval_rows, src.rows, "held-out rows")
    if max(a, c) < min(b, d):
        raise InputError(f"training rows {a}:{b} and held-out rows {c}:{d} overlap")
    total = b - a
    sizes = default_sizes(total) if not sizes else sorted({int(s) for s in sizes})
    if sizes[0] < 2 or sizes[-1] > total:
        raise InputError(f"training sizes must lie in 2..{total} (the training rows), got {sizes}")
    b = a + sizes[-1]
    snaps = training_moments(src, tgt, (a, b), normalize=normalize, gram=True,
                             cuts=[a + s for s in sizes[:-1]], block_rows=block_rows)
    if not isinstance(snaps, list):
        snaps = [snaps]
    methods, diags = [], {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotUniqueWarning)
        for size, m in zip(sizes, snaps):
            sol = procrustes(m, center=center, scale=scale, reflection=reflection)
            means = (m.mean_a, m.mean_b) if center else (np.zeros(src.dim), np.zeros(tgt.dim))
            methods.append(Method(f"orthogonal@{size}",
                                  AffineMap(sol.scale * sol.rotation, *means, normalize),
                                  train=_train_numbers(sol.residual, m)))
            if least_squares:
                w, res = _least_squares(m, center=center, ridge=ridge)
                methods.append(Method(f"least squares@{size}", AffineMap(w, *means, normalize),
                                      train=_train_numbers(res, m)))
            diags[size] = fit_diagnostics(m, center=center)
    res = evaluate_maps(methods, src, tgt, (c, d), ks=ks, max_queries=max_queries, seed=seed,
                        dtype=dtype, block_rows=block_rows)
    points = []
    for entry in res.pop("methods"):
        method, size = entry["name"].rsplit("@", 1)
        entry = dict(entry, name=method, pairs=int(size))
        if method == "orthogonal":
            entry["diagnostics"] = diags[int(size)]
        points.append(entry)
    k0 = f"recall@{res['ks'][0]}"
    orth = [p for p in points if p["name"] == "orthogonal"]
    top = orth[-1]["retrieval"]["centred"][k0]
    sat = next(p["pairs"] for p in orth if p["retrieval"]["centred"][k0] >= top - SATURATION)
    if sat == sizes[-1] and len(sizes) > 1:
        sat = None  # still improving at the largest size
    return {"kind": "curve", "source": src.url, "target": tgt.url, "train_rows": [a, b],
            "sizes": sizes, "options": {"center": center, "normalize": normalize,
                                         "scale": scale, "reflection": reflection,
                                         "ridge": ridge},
            "saturation": {"metric": f"centred {k0}", "pairs": sat, "value": top},
            "points": points, **res}
