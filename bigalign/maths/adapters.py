"""Adapter families solved from one pass of statistics, scored and tuned on held-out pairs.

Every family here is a map ``y = (x - source_mean) @ matrix + target_mean`` (exactly a
:class:`bigalign.maths.metrics.AffineMap`, and what a Transform stores), solved from one
:class:`bigalign.maths.stats.Moments` in O(d^3), never O(n). Notation as in
:mod:`bigalign.maths.solve`: C = A^T B (dA, dB), Ga = A^T A (dA, dA), qb = ||B||_F^2, over
the training rows centred by their means when ``center`` (then the map has an intercept,
``source_mean``/``target_mean`` are the training means) or raw when not (means are zeros).
All families allow dA != dB.

=============  ====================================================  ===============
family         matrix W                                              needs Gram
=============  ====================================================  ===============
orthogonal     Q = U V^T from C = U S V^T (Procrustes)               only if dA > dB
similarity     s Q, s = tr S / tr(Q^T Ga Q) (Procrustes with scale)  only if dA > dB
affine         Ga^+ C (least squares; min-norm if Ga is singular)    yes
ridge          (Ga + lam I)^-1 C, lam >= 0 (centred: no penalty on   yes
               the intercept; raw: every coefficient penalised)
reduced-rank   W_ls V_r V_r^T, V_r the top-r eigenvectors of         yes
               W_ls^T Ga W_ls (classic reduced-rank regression)
=============  ====================================================  ===============

Only ``orthogonal`` and ``similarity`` carry the paper's bound (``Adapter.orthogonal``).

Held-out residual (:func:`residual_on`): for held-out pairs summarised by another Moments
(mean a', b', centred C', Ga', qb', n' rows) and an adapter with training means mu, nu:
with delta = a' - mu and h = nu - b' (the offset every row's residual shares),

    sum_i ||(a_i - mu) W + nu - b_i||^2
        = tr(W^T Ga' W) - 2 tr(W^T C') + qb' + n' ||delta W + h||^2,

exactly (the centred rows sum to zero, so the cross terms with the shared offset vanish).
The centred form of the held-out sums is used rather than their raw sums because it has no
cancellation of n mean mean^T terms; the two are algebraically equal. The *held-out
relative residual* (:func:`relative_residual_on`) is that sum divided by qb' = sum ||b_i -
b'||^2, the held-out targets' spread about their own mean (the definition the training
figures use, :func:`bigalign.maths.metrics.train_numbers`): 0 is a perfect map, 1 is what
predicting the held-out target mean for every row would score.

Round-off: the residual is a difference of sums (as in :mod:`bigalign.maths.solve`); it is
clamped at 0 and resolved to ~1e-12 of qb' with float64 statistics.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, replace
from typing import Optional, Sequence

import numpy as np

from .families import FAMILIES, ORTHOGONAL as _ORTHOGONAL
from .metrics import AffineMap
from .solve import procrustes, sums
from .stats import Moments

__all__ = ["FAMILIES", "Adapter", "solve", "residual_on", "relative_residual_on",
           "choose_ridge", "choose_rank", "candidates", "ridge_scale", "default_ridge_grid",
           "default_rank_grid", "DEFAULT_RIDGE", "DEFAULT_RANK_ENERGY"]


#: Ridge penalty without held-out data: DEFAULT_RIDGE x trace(Ga) / dA (the mean eigenvalue
#: of the Gram matrix the fit uses, so the figure is independent of n and of the scale).
DEFAULT_RIDGE = 1e-3
#: Rank without held-out data: the smallest r whose top eigenvalues of W_ls^T Ga W_ls hold
#: this fraction of its trace (the energy of the least-squares fit on the training rows).
DEFAULT_RANK_ENERGY = 0.99
#: The default ridge grid, relative to trace(Ga) / dA: 10^-6 .. 10^2, half a decade apart.
_RIDGE_RELATIVE = 10.0 ** np.arange(-6.0, 2.01, 0.5)
#: The default rank grid holds every rank up to this many, else this many log-spaced ones.
_RANK_POINTS = 32


@dataclass(frozen=True, eq=False)
class Adapter:
    """One fitted map y = (x - source_mean) @ matrix + target_mean.

    family : one of FAMILIES.
    matrix : (dA, dB) float64, W (scale * rotation for orthogonal/similarity).
    source_mean, target_mean : (dA,), (dB,) float64: the training means when ``center``,
        zeros otherwise.
    center : whether the map was fitted on centred rows (has an intercept).
    params : {"scale": s} (similarity), {"ridge": lam}, {"rank": r}; {} otherwise.
    rotation, scale : what a Transform stores: Q and s for orthogonal/similarity (s = 1 for
        orthogonal); ``matrix`` and 1.0 for the other families. rotation * scale == matrix.
    residual : sum ||f(a_i) - b_i||^2 over the training rows, closed form from the
        statistics; None for orthogonal/similarity with dA > dB without Gram statistics.
    target_energy : the training targets' centred spread (Moments.sq_b), the denominator
        of ``relative_residual``.
    selection : how a tuned parameter was chosen: {"by": "held-out", "table": [(value,
        held-out residual), ...]} or {"by": "default", "rule": text}; None when given.
    """

    family: str
    matrix: np.ndarray
    source_mean: np.ndarray
    target_mean: np.ndarray
    center: bool
    params: dict
    rotation: np.ndarray
    scale: float
    residual: Optional[float]
    target_energy: float
    selection: Optional[dict] = None

    @property
    def orthogonal(self) -> bool:
        """True for orthogonal/similarity: only those carry the paper's bound."""
        return self.family in _ORTHOGONAL

    @property
    def dims(self) -> tuple[int, int]:
        return self.matrix.shape

    @property
    def relative_residual(self) -> Optional[float]:
        if self.residual is None or self.target_energy <= 0:
            return None
        return self.residual / self.target_energy

    def to_map(self, normalize: bool = False) -> AffineMap:
        """The :class:`AffineMap` that applies this adapter (``normalize``: L2-normalise
        source rows first, as a transform fitted with normalize does)."""
        return AffineMap(self.matrix, self.source_mean, self.target_mean, normalize)


# ---------------------------------------------------------------------------------------
# checks
# ---------------------------------------------------------------------------------------

def _check_family(family: str) -> None:
    if family not in FAMILIES:
        raise ValueError(f"unknown adapter family {family!r}: expected one of "
                         f"{', '.join(FAMILIES)}")


def _check_pairs(m: Moments, what: str = "training") -> None:
    if m.n == 0:
        raise ValueError(f"no {what} pairs: the statistics summarise zero rows")


def _need_gram(m: Moments, why: str) -> None:
    if not m.has_gram:
        raise ValueError(f"{why} needs Gram statistics (gram_a), and these statistics have "
                         "none (fit without --no-diagnostics to get them)")


def _check_ridge(lam) -> float:
    if isinstance(lam, bool) or not isinstance(lam, numbers.Real) or not math.isfinite(lam) \
            or lam < 0:
        raise ValueError(f"the ridge penalty must be a finite number >= 0, got {lam!r}")
    return float(lam)


def _check_rank(rank, dims: tuple[int, int]) -> int:
    top = min(dims)
    if isinstance(rank, bool) or not isinstance(rank, numbers.Integral) or not 1 <= rank <= top:
        raise ValueError(f"the rank must be an integer from 1 to min(dA, dB) = {top}, "
                         f"got {rank!r}")
    return int(rank)


def _check_same_dims(m: Moments, other: Moments, what: str) -> None:
    if tuple(m.dims) != tuple(other.dims):
        raise ValueError(f"the {what} statistics have dimensions {other.dims}, the training "
                         f"statistics {m.dims}")


# ---------------------------------------------------------------------------------------
# solving
# ---------------------------------------------------------------------------------------

def ridge_scale(m: Moments, center: bool = True) -> float:
    """trace(Ga) / dA of the Gram matrix a fit with ``center`` uses (the mean eigenvalue):
    the unit of the default ridge penalties. Needs Gram statistics."""
    _need_gram(m, "a ridge penalty scale")
    ga = sums(m, center)[3]
    return float(np.trace(ga)) / ga.shape[0]


def default_ridge_grid(m: Moments, center: bool = True) -> np.ndarray:
    """(17,) float64: ridge_scale x 10^-6, 10^-5.5, ..., 10^2."""
    return ridge_scale(m, center) * _RIDGE_RELATIVE


def default_rank_grid(dims: tuple[int, int]) -> np.ndarray:
    """int64 ranks: all of 1..min(dA, dB) up to 32 of them, else 32 log-spaced ones from 1
    to min(dA, dB) (both ends included, duplicates removed)."""
    top = min(dims)
    if top <= _RANK_POINTS:
        return np.arange(1, top + 1)
    return np.unique(np.round(np.geomspace(1, top, _RANK_POINTS)).astype(np.int64))


def _means(m: Moments, center: bool) -> tuple[np.ndarray, np.ndarray]:
    if center:
        return m.mean_a.astype(np.float64, copy=True), m.mean_b.astype(np.float64, copy=True)
    return np.zeros(m.dims[0]), np.zeros(m.dims[1])


def _least_squares_matrix(m: Moments, center: bool, lam: float = 0.0) -> np.ndarray:
    """(Ga + lam I)^+ C, (dA, dB) float64 (min-norm, as numpy.linalg.lstsq(A, B), at 0)."""
    c, _, _, ga, _ = sums(m, center)
    return np.linalg.lstsq(ga + lam * np.eye(ga.shape[0]), c, rcond=None)[0]


def _rrr_basis(w_ls: np.ndarray, ga: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(eigenvalues descending (dB,), eigenvectors (dB, dB) as columns) of W^T Ga W, the
    Gram matrix of the least-squares fitted values A W."""
    fitted = w_ls.T @ ga @ w_ls
    vals, vecs = np.linalg.eigh((fitted + fitted.T) / 2)
    return vals[::-1], vecs[:, ::-1]


def _default_rank(vals: np.ndarray) -> int:
    vals = np.clip(vals, 0.0, None)
    total = float(vals.sum())
    if total <= 0:
        return 1
    return int(np.searchsorted(np.cumsum(vals) / total, DEFAULT_RANK_ENERGY - 1e-12) + 1)


def solve(m: Moments, family: str, *, center: bool = True, ridge: Optional[float] = None,
          rank: Optional[int] = None, reflection: bool = True) -> Adapter:
    """The adapter of ``family`` fitted to the statistics ``m`` (one d x d solve).

    center : fit on centred rows (a map with intercept; means = m's means) or raw rows.
    ridge : the penalty lam >= 0 of family "ridge" (None: DEFAULT_RIDGE x ridge_scale).
    rank : r in 1..min(dA, dB) of family "reduced-rank" (None: the smallest rank holding
        DEFAULT_RANK_ENERGY of the fitted energy).
    reflection : orthogonal/similarity only: False forces det Q = +1 (dA == dB only).

    Raises ValueError for an unknown family, n == 0, a family that needs Gram statistics
    without them, a negative or non-finite ridge, a rank out of range, or ``ridge``/``rank``
    given to a family that has no such parameter. May warn NotUniqueWarning (Procrustes).
    """
    _check_family(family)
    _check_pairs(m)
    if ridge is not None and family != "ridge":
        raise ValueError(f"ridge= applies to the 'ridge' family only, not {family!r}")
    if rank is not None and family != "reduced-rank":
        raise ValueError(f"rank= applies to the 'reduced-rank' family only, not {family!r}")
    selection = None
    if family in _ORTHOGONAL:
        if family == "similarity" and m.dims[0] > m.dims[1]:
            _need_gram(m, "a similarity scale with dA > dB")
        sol = procrustes(m, center=center, scale=family == "similarity", reflection=reflection)
        rotation, scale = sol.rotation, float(sol.scale)
        params = {"scale": scale} if family == "similarity" else {}
        matrix = scale * rotation
    else:
        _need_gram(m, f"the {family} family")
        params = {}
        if family == "affine":
            matrix = _least_squares_matrix(m, center)
        elif family == "ridge":
            if ridge is None:
                ridge = DEFAULT_RIDGE * ridge_scale(m, center)
                selection = {"by": "default", "rule": f"{DEFAULT_RIDGE:g} x trace(Ga) / dA"}
            lam = _check_ridge(ridge)
            matrix, params = _least_squares_matrix(m, center, lam), {"ridge": lam}
        else:
            w_ls = _least_squares_matrix(m, center)
            vals, vecs = _rrr_basis(w_ls, sums(m, center)[3])
            if rank is None:
                rank = _default_rank(vals)
                selection = {"by": "default", "rule": f"smallest rank holding "
                             f"{DEFAULT_RANK_ENERGY:g} of tr(W_ls^T Ga W_ls)"}
            r = _check_rank(rank, m.dims)
            matrix, params = (w_ls @ vecs[:, :r]) @ vecs[:, :r].T, {"rank": r}
        rotation, scale = matrix, 1.0
    mu, nu = _means(m, center)
    residual = None
    if m.has_gram or (family in _ORTHOGONAL and m.dims[0] <= m.dims[1]):
        residual = _residual(matrix, scale, family in _ORTHOGONAL, mu, nu, m)
    return Adapter(family, matrix, mu, nu, bool(center), params, rotation, scale, residual,
                   float(m.sq_b), selection)


# ---------------------------------------------------------------------------------------
# held-out residuals
# ---------------------------------------------------------------------------------------

def _residual(matrix, scale, orthogonal, mu, nu, m_eval: Moments) -> float:
    """The module doc's closed form; tr(W^T Ga' W) = s^2 qa' when W = s Q with orthonormal
    rows (orthogonal/similarity with dA <= dB), else from gram_a."""
    dim_a, dim_b = matrix.shape
    if orthogonal and dim_a <= dim_b:
        mapped = scale * scale * float(m_eval.sq_a)
    else:
        _need_gram(m_eval, "a residual of this map on other statistics")
        mapped = float(np.einsum("ij,ij->", matrix, m_eval.gram_a @ matrix))
    offset = (m_eval.mean_a - mu) @ matrix + (nu - m_eval.mean_b)
    total = (mapped - 2 * float(np.einsum("ij,ij->", matrix, m_eval.cross)) + float(m_eval.sq_b)
             + m_eval.n * float(offset @ offset))
    return max(total, 0.0)


def residual_on(adapter: Adapter, m_eval: Moments) -> float:
    """sum ||(a_i - source_mean) W + target_mean - b_i||^2 over the pairs that ``m_eval``
    summarises (held-out pairs), with the adapter's own training means: closed form (module
    doc), O(d^3). Needs m_eval's Gram statistics unless the adapter is orthogonal/
    similarity with dA <= dB. Raises ValueError for n == 0 or mismatched dimensions."""
    _check_pairs(m_eval, "held-out")
    if tuple(m_eval.dims) != tuple(adapter.dims):
        raise ValueError(f"the held-out statistics have dimensions {m_eval.dims}, the adapter "
                         f"maps {adapter.dims}")
    return _residual(adapter.matrix, adapter.scale, adapter.orthogonal, adapter.source_mean,
                     adapter.target_mean, m_eval)


def relative_residual_on(adapter: Adapter, m_eval: Moments) -> float:
    """The held-out relative residual: :func:`residual_on` / m_eval.sq_b, the held-out
    targets' spread about their own mean (0: perfect; 1: as good as predicting the held-out
    mean; nan when that spread is 0)."""
    r = residual_on(adapter, m_eval)
    return r / float(m_eval.sq_b) if m_eval.sq_b > 0 else float("nan")


# ---------------------------------------------------------------------------------------
# tuning on held-out pairs
# ---------------------------------------------------------------------------------------

def _heldout_terms(m_train: Moments, m_heldout: Moments, center: bool):
    """Everything the held-out residual of a training-means map needs: (Ga', C', qb', n',
    delta = a' - mu (dA,), h = nu - b' (dB,))."""
    _check_pairs(m_train)
    _check_pairs(m_heldout, "held-out")
    _check_same_dims(m_train, m_heldout, "held-out")
    _need_gram(m_train, "tuning ridge or rank (the training side)")
    _need_gram(m_heldout, "tuning ridge or rank (the held-out side)")
    mu, nu = _means(m_train, center)
    return (m_heldout.gram_a, m_heldout.cross, float(m_heldout.sq_b), m_heldout.n,
            m_heldout.mean_a - mu, nu - m_heldout.mean_b)


def choose_ridge(m_train: Moments, m_heldout: Moments, *, center: bool = True,
                 grid: Optional[Sequence[float]] = None) -> tuple[float, list]:
    """The ridge penalty of ``grid`` (default :func:`default_ridge_grid`) whose adapter,
    fitted on ``m_train``, has the least residual on ``m_heldout`` (the first in grid
    order on ties). Returns (lam, [(lam, held-out residual), ...] in grid order).

    One eigendecomposition Ga = U diag(e) U^T serves the whole grid: W(lam) = U diag(1 /
    (e + lam)) U^T C, so each value costs O(dA^2 + dA dB) after an O(d^3) start (values
    with e + lam below lstsq's cut-off count as zero, i.e. the min-norm solution). Needs
    Gram statistics on both sides."""
    ga_e, c_e, qb_e, n_e, delta, h = _heldout_terms(m_train, m_heldout, center)
    grid = default_ridge_grid(m_train, center) if grid is None else \
        np.array([_check_ridge(v) for v in grid], dtype=np.float64)
    if len(grid) == 0:
        raise ValueError("an empty ridge grid")
    c, _, _, ga, _ = sums(m_train, center)
    e, u = np.linalg.eigh((ga + ga.T) / 2)
    p = u.T @ c                                   # (dA, dB)
    k = (u.T @ ga_e @ u) * (p @ p.T)              # sum_ij D_i D_j H_ij (P P^T)_ij
    t = np.einsum("ij,ij->i", p, u.T @ c_e)       # tr(W^T C') = sum_i D_i t_i
    du = delta @ u                                # delta W = (delta U) D P
    table = []
    for lam in grid:
        lhs = e + lam
        cut = np.finfo(np.float64).eps * len(e) * max(float(np.abs(lhs).max()), 0.0)
        d = np.divide(1.0, lhs, out=np.zeros_like(lhs), where=np.abs(lhs) > cut)
        offset = (du * d) @ p + h
        r = float(d @ k @ d) - 2 * float(d @ t) + qb_e + n_e * float(offset @ offset)
        table.append((float(lam), max(r, 0.0)))
    best = min(range(len(table)), key=lambda i: table[i][1])
    return table[best][0], table


def choose_rank(m_train: Moments, m_heldout: Moments, *, center: bool = True,
                grid: Optional[Sequence[int]] = None) -> tuple[int, list]:
    """The rank of ``grid`` (default :func:`default_rank_grid`) whose reduced-rank adapter,
    fitted on ``m_train``, has the least residual on ``m_heldout`` (the first in grid order
    on ties). Returns (r, [(r, held-out residual), ...] in grid order).

    W_r = W V_r V_r^T with V the eigenvectors of W^T Ga W, so every term of the residual is
    a cumulative sum over V's columns: all ranks cost one O(d^3) start. Needs Gram
    statistics on both sides."""
    ga_e, c_e, qb_e, n_e, delta, h = _heldout_terms(m_train, m_heldout, center)
    grid = default_rank_grid(m_train.dims) if grid is None else \
        [_check_rank(v, m_train.dims) for v in grid]
    if len(grid) == 0:
        raise ValueError("an empty rank grid")
    w = _least_squares_matrix(m_train, center)
    _, v = _rrr_basis(w, sums(m_train, center)[3])
    wv = w @ v                                            # (dA, dB)
    mapped = np.cumsum(np.einsum("ij,ij->j", wv, ga_e @ wv))
    cross = np.cumsum(np.einsum("ij,ij->j", wv, c_e @ v))
    g, hv = delta @ wv, h @ v                             # offset = g[:r] V_r^T + h
    offset = np.cumsum(g * g + 2 * g * hv) + float(h @ h)
    table = []
    for r in grid:
        i = int(r) - 1
        res = float(mapped[i]) - 2 * float(cross[i]) + qb_e + n_e * float(offset[i])
        table.append((int(r), max(res, 0.0)))
    best = min(range(len(table)), key=lambda i: table[i][1])
    return table[best][0], table


def candidates(m_train: Moments, m_heldout: Optional[Moments] = None, *, center: bool = True,
               families: Sequence[str] = FAMILIES, reflection: bool = True) -> list[Adapter]:
    """One adapter per family of ``families`` (in that order), fitted on ``m_train``. With
    ``m_heldout`` the ridge penalty and the rank are chosen on it (:func:`choose_ridge`,
    :func:`choose_rank`, the table kept in ``Adapter.selection``); without, the defaults
    of :func:`solve` (DEFAULT_RIDGE x trace(Ga)/dA, DEFAULT_RANK_ENERGY of the fitted
    energy). ``reflection`` goes to orthogonal/similarity. Raises as :func:`solve` does."""
    families = list(families)
    for f in families:
        _check_family(f)
    if m_heldout is not None:
        _check_same_dims(m_train, m_heldout, "held-out")
    out = []
    for family in families:
        kw, selection = {}, None
        if m_heldout is not None and family in ("ridge", "reduced-rank"):
            choose, key = (choose_ridge, "ridge") if family == "ridge" else (choose_rank, "rank")
            value, table = choose(m_train, m_heldout, center=center)
            kw[key] = value
            selection = {"by": "held-out", "table": table}
        if family in _ORTHOGONAL:
            kw["reflection"] = reflection
        adapter = solve(m_train, family, center=center, **kw)
        if selection is not None:
            adapter = replace(adapter, selection=selection)
        out.append(adapter)
    return out

