"""What an evaluation compares and how it scores them: maps, baselines fitted from the
training statistics, the paper's diagnostics, exact search, ranks, recall, nDCG and cosine
histograms. Pure numpy on in-memory blocks: no Dask, no Zarr, no I/O.

The streaming edge that reads held-out rows block by block and feeds these functions is
:mod:`bigalign.commands.evaluate` (held-out pairs), :mod:`bigalign.commands.retrieval` (queries -> documents)
and :mod:`bigalign.commands.curve` (learning curve).

Ranks: a query's rank is the number of *other* targets scoring strictly higher than its own
pair (ties count in the query's favour), so recall@k = mean(rank < k).
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Optional, Sequence

import numpy as np

from .solve import (NotUniqueWarning, discrepancy_interval, least_squares, paper_bound,
                    procrustes, sums)
from .families import ORTHOGONAL
from .stats import Moments, unit_roundoff
from .mapping import map_rows

__all__ = ["AffineMap", "Method", "fit_diagnostics", "figure", "baseline_methods",
           "transform_methods",
           "methods_for", "train_numbers", "unit_rows", "row_cosine", "topk_merge", "sort_topk",
           "exact_search", "topk_block", "count_better", "score_rows", "recall_from_ranks",
           "ndcg_at_k", "recall_at_k", "CosineHistogram", "query_sample", "SCORE_BYTES"]

#: Bytes of float32 scores (queries x targets) held at once, over all threads together.
SCORE_BYTES = 64 * 2**20
#: Fine histogram for cosine percentiles (resolution 0.001); the reported one is coarser.
_FINE_BINS, _COARSE_BINS = 2000, 100


# ---------------------------------------------------------------------------------------
# maps and the methods compared
# ---------------------------------------------------------------------------------------

@dataclass(frozen=True, eq=False)
class AffineMap:
    """y = (normalize(x) - source_mean) @ matrix + target_mean, computed by the apply kernel
    (:func:`bigalign.maths.mapping.map_rows`), so a map evaluates exactly as ``apply`` writes.

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

    def __call__(self, x: np.ndarray, dtype=np.float32, start: int = 0) -> np.ndarray:
        """Map (n, dA) rows to (n, dB) in ``dtype`` (float32 or float64). Raises
        NonFiniteError naming the first bad row (``start``: the block's global offset)."""
        work = np.dtype(dtype)
        return map_rows(x, self.matrix.astype(work), self.source_mean, self.target_mean,
                        normalize=self.normalize, dtype=work, start=start)


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


def fit_diagnostics(m: Moments, *, center: bool = False, solution=None) -> dict:
    """The paper's quantities for the training set summarised by ``m`` (needs Gram stats).

    epsilon : ||A A^T - B B^T||_F, the dot-product discrepancy over all n^2 pairs.
    delta : epsilon / n, the root mean squared dot-product gap per pair of items.
    bound_residual : (2D)^(1/4) sqrt(epsilon), the bound on ||A Q - B||_F for the best
        orthogonal Q (D = max(dA, dB)).
    bound_mean_sq_distance : sqrt(2D) delta, the same bound per pair.
    achieved_residual, achieved_mean_sq_distance : what the best orthogonal Q (no scale)
        actually reaches, from the same statistics.
    *_interval : [lo, hi] for each of the above: where the exact value lies, given the
        round-off of the statistics (:func:`bigalign.maths.solve.discrepancy_interval`,
        ``Procrustes.residual_error``). epsilon and the achieved residual are differences of
        nearly equal large numbers when the models are nearly isometric; lo == 0 means the
        arithmetic cannot resolve the figure: report "<= hi" (:func:`figure`), never the
        computed value, which may be far off (float32 statistics gave epsilon 13.1 where the
        float64 value is 2.3).
    resolved : {"epsilon": lo > 0, "achieved_residual": lo > 0}.
    bound_check : "holds" (achieved <= bound even at the ends of both intervals),
        "holds within round-off" (the intervals overlap: neither proven nor refuted) or
        "violated" (proven: it would mean a bug or broken statistics).
    bound_holds : bound_check != "violated".
    tightness : achieved / bound when both are resolved, else None.
    precision : the GEMM precision of the statistics ("float32", "float64", "unknown").

    With ``center`` the centred statistics are used, as a centred fit does. ``solution``:
    the :func:`bigalign.maths.solve.procrustes` result of ``m`` with the same ``center``, no scale
    and reflections allowed, when the caller has it (the fit does: it saves a second d x d
    SVD, 0.3 s at d = 1024).
    """
    eps, eps_lo, eps_hi = discrepancy_interval(m, center=center)
    out = paper_bound(eps, *m.dims, m.n)
    lo, hi = paper_bound(eps_lo, *m.dims, m.n), paper_bound(eps_hi, *m.dims, m.n)
    for key in ("epsilon", "delta", "bound_residual", "bound_mean_sq_distance"):
        out[f"{key}_interval"] = [lo[key], hi[key]]
    out["resolved"] = {"epsilon": eps_lo > 0}
    sol = solution
    if sol is None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", NotUniqueWarning)
            sol = procrustes(m, center=center)
    if sol.residual is not None:
        r, err = sol.residual, sol.residual_error
        r_lo, r_hi = max(r - err, 0.0), r + err
        achieved = math.sqrt(r)
        out["achieved_residual"] = achieved
        out["achieved_residual_interval"] = [math.sqrt(r_lo), math.sqrt(r_hi)]
        out["achieved_mean_sq_distance"] = r / m.n
        out["achieved_mean_sq_distance_interval"] = [r_lo / m.n, r_hi / m.n]
        out["resolved"]["achieved_residual"] = r_lo > 0
        if math.sqrt(r_hi) <= lo["bound_residual"]:
            check = "holds"
        elif math.sqrt(r_lo) > hi["bound_residual"] * (1 + 1e-12):
            check = "violated"
        else:
            check = "holds within round-off"
        out["bound_check"] = check
        out["bound_holds"] = check != "violated"
        both = eps_lo > 0 and r_lo > 0 and out["bound_residual"] > 0
        out["tightness"] = achieved / out["bound_residual"] if both else None
    out["precision"] = _precision_name(m)
    out["center"] = bool(center)
    out["n"] = int(m.n)
    return out


def _precision_name(m: Moments) -> str:
    if m.rounding is None:
        return "unknown"
    u = float(m.rounding[0])
    for name in ("float32", "float64"):
        if u == unit_roundoff(name):
            return name
    return "unknown"


def figure(value: Optional[float], interval: Optional[Sequence[float]] = None,
           digits: int = 4) -> str:
    """A figure as text, honest about round-off: "= 78.54" when its interval (see
    :func:`fit_diagnostics`) lies within half a unit of the last digit shown, "= 78.5 +- 0.8"
    otherwise, "<= 14.3" when the interval reaches 0 (the arithmetic cannot tell the figure
    from 0), "-" when unknown. Bounds are rounded outwards, so the text is never wrong.
    E.g. 13.1 computed with interval [0, 14.21] prints "<= 14.3", not "= 13.1".
    Without an interval, the value as recorded."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    if interval is None:
        return f"= {value:.{digits}g}"
    lo, hi = float(interval[0]), float(interval[1])
    if hi <= 0:
        return "= 0"
    if lo <= 0:
        return f"<= {_round_up(hi, 3)}"
    shown = f"{value:.{digits}g}"
    v = float(shown)
    err = max(hi - v, v - lo, 0.0)
    half_unit = 0.5 * 10.0 ** (math.floor(math.log10(abs(v))) - digits + 1) if v else 0.0
    if err <= half_unit:
        return f"= {shown}"
    return f"= {shown} +- {_round_up(err, 2)}"


def _round_up(x: float, digits: int) -> str:
    """``x`` > 0 to ``digits`` significant digits, rounded up (an upper bound stays one, to
    within 1e-9 relative: far inside the slack of the worst-case bounds it prints)."""
    step = 10.0 ** (math.floor(math.log10(x)) - digits + 1)
    return f"{math.ceil(x / step * (1 - 1e-9)) * step:.{digits}g}"


def train_numbers(residual: Optional[float], m: Moments) -> dict:
    """{residual, relative_residual} of a map on the training set: ``residual`` =
    sum ||f(a_i) - b_i||^2, divided by the target's spread about its mean (``m.sq_b``)."""
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
                          train_numbers(res, m)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotUniqueWarning)
        if m.has_gram:
            w, res = least_squares(m, center=center)
            out.append(Method("least squares", AffineMap(w, *means, normalize),
                              f"unconstrained linear map, {how}", train_numbers(res, m)))
            if ridge > 0:
                w, res = least_squares(m, center=center, ridge=ridge)
                out.append(Method(f"ridge {ridge:g}", AffineMap(w, *means, normalize),
                                  f"linear map, penalty {ridge:g}, {how}", train_numbers(res, m)))
        own = transform is not None and (transform.options.get("family") or "orthogonal") \
            in ORTHOGONAL
        for c in (False, True):
            name = "orthogonal + centring" if c else "orthogonal"
            if own and c == center:
                tr = transform.metadata.get("residual")
                out.append(Method(family_name(transform), AffineMap.from_transform(transform),
                                  "this transform",
                                  train_numbers(tr, m) if tr is not None else {}, this=True))
                continue
            if not reflection and dim_a != dim_b:
                continue
            sol = procrustes(m, center=c, scale=scale, reflection=reflection)
            mc = (m.mean_a.copy(), m.mean_b.copy()) if c else (zeros(dim_a), zeros(dim_b))
            out.append(Method(name, AffineMap(sol.scale * sol.rotation, *mc, normalize),
                              "Procrustes" + (" with scale" if scale else ""),
                              train_numbers(sol.residual, m)))
    if transform is not None and not own:  # another family: its own row, after the baselines
        tr = transform.metadata.get("residual")
        out.append(Method(family_name(transform), AffineMap.from_transform(transform),
                          "this transform", train_numbers(tr, m) if tr is not None else {},
                          this=True))
    return out


def transform_methods(transform) -> list[Method]:
    """Without statistics: ``none`` (dA == dB) and the transform itself."""
    dim_a, dim_b = transform.dims
    out = []
    if dim_a == dim_b:
        out.append(Method("none", AffineMap.identity(dim_a, transform.normalize),
                          "source vectors as they are"))
    out.append(Method(family_name(transform), AffineMap.from_transform(transform),
                      "this transform", this=True))
    return out


def family_name(transform) -> str:
    """A transform's row name: its family ("orthogonal" for transforms that record none),
    "+ centring" when centred."""
    family = transform.options.get("family") or "orthogonal"
    return family + (" + centring" if transform.options.get("center") else "")


def methods_for(transform, m: Optional[Moments], ridge: float = 0.0) -> list[Method]:
    """The rows of an evaluation of ``transform``: its baselines from the training
    statistics ``m`` when there are any, else only ``none`` and the transform."""
    if m is None:
        return transform_methods(transform)
    return baseline_methods(m, transform=transform, ridge=ridge)


# ---------------------------------------------------------------------------------------
# per-pair scores
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
# exact search and ranks
# ---------------------------------------------------------------------------------------

def query_sample(n: int, max_queries: Optional[int], seed: int) -> np.ndarray:
    """Sorted int64 indices of the queries searched among ``n``: all of them, or a seeded
    random sample of ``max_queries`` when there are more (0 or None: all; below 0 is
    refused with InputError)."""
    if max_queries is not None and max_queries < 0:
        from ..errors import InputError
        raise InputError(f"--max-queries (max_queries) must be 0 (all) or more, got "
                         f"{max_queries}")
    if not max_queries or max_queries >= n:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_queries, replace=False))


def score_rows(nq: int, b: int, threads: int = 1) -> int:
    """Queries per GEMM against ``b`` targets so that ``threads`` such GEMMs together hold
    at most SCORE_BYTES of float32 scores (at least one, at most ``nq``)."""
    return max(1, min(nq, SCORE_BYTES // (4 * max(b, 1) * max(threads, 1))))


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


def sort_topk(s: np.ndarray, i: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort each row of (nq, k) scores ``s`` / item ids ``i`` by score descending, ties by
    item id ascending."""
    order = np.lexsort((i, -s), axis=-1)
    return np.take_along_axis(s, order, axis=1), np.take_along_axis(i, order, axis=1)


def topk_block(queries: np.ndarray, block: np.ndarray, offset: int, k: int,
               best_s: np.ndarray, best_i: np.ndarray,
               query_block: Optional[int] = None) -> tuple[np.ndarray, np.ndarray]:
    """Fold one database block (b, d) (item j = ``offset + j``) into the running top-``k``
    (``best_s``, ``best_i``: (nq, <=k) scores and int64 ids) of (nq, d) ``queries``,
    ``query_block`` queries per GEMM. Returns the new unsorted bests."""
    qb = query_block or score_rows(len(queries), len(block))
    out_s, out_i = [], []
    for q0 in range(0, len(queries), qb):
        scores = queries[q0:q0 + qb] @ block.T
        s, i = topk_merge(best_s[q0:q0 + qb], best_i[q0:q0 + qb], scores, offset, k)
        out_s.append(s)
        out_i.append(i)
    if not out_s:
        return best_s, best_i
    return np.concatenate(out_s), np.concatenate(out_i)


def exact_search(queries: np.ndarray, blocks, k: int, *, query_block: Optional[int] = None):
    """Exact top-``k`` inner-product search, streamed over database blocks.

    queries : (nq, d) (unit rows for cosine). blocks : iterable of (offset, (b, d) rows).
    Returns (scores, index), each (nq, k') sorted best first, k' = min(k, database size).
    """
    nq = len(queries)
    best_s = np.empty((nq, 0), dtype=queries.dtype)
    best_i = np.empty((nq, 0), dtype=np.int64)
    for offset, block in blocks:
        best_s, best_i = topk_block(queries, block, offset, k, best_s, best_i, query_block)
    return sort_topk(best_s, best_i)


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
    qb = query_block or score_rows(len(queries), b)
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


# ---------------------------------------------------------------------------------------
# graded relevance (query -> document retrieval)
# ---------------------------------------------------------------------------------------

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
