"""Solve from sufficient statistics: Procrustes rotation, scale, residual, baselines and the
paper's dot-product discrepancy bound. Pure numpy; everything here costs O(d^3), never O(n).

Notation: A (n, dA) source rows, B (n, dB) target rows, centred by their means when
``center`` is set. C = A^T B (dA, dB), qa = ||A||_F^2, qb = ||B||_F^2, Ga = A^T A, Gb = B^T B.

Round-off. Two figures are differences of large, nearly equal numbers when the two models
are nearly isometric: the closed-form residual qa - 2 tr S + qb and the discrepancy
epsilon^2 = ||Ga||^2 + ||Gb||^2 - 2 ||C||^2. Their round-off is not small relative to them:
from float32 block GEMMs, epsilon of B = A Q0 + 1e-4 noise (1,200 x 32) came out 1.38 where
the float64 value is 0.96, and identical inputs gave epsilon 0 (clamped) next to an achieved
residual of 0.06, or epsilon 1.86 where it is 0. No rewriting of these
formulas helps, because the error is already in the sums (epsilon as a function of the d x d
statistics is not Lipschitz at 0). So every such figure comes with a rigorous bound on its
round-off (:func:`statistic_errors`, :func:`discrepancy_interval`,
``Procrustes.residual_error``), from the magnitudes of the sums and the unit round-off of
the arithmetic that made them (``Moments.rounding``), and callers print "<= bound" instead
of a figure that the arithmetic cannot resolve. The bound is worst case: the standard model
of floating-point arithmetic, |fl(x^T y) - x^T y| <= gamma_k |x|^T |y| for an inner product
of k terms summed in any order (so it holds for any BLAS), and LAPACK's SVD backward error
taken as p u ||C||_2 with p = 10 max(dA, dB). With float64 statistics (``precision=
"float64"``) it is ~1e-12 of the magnitudes; with float32 block GEMMs it is ~k x 6e-8, which
is often more than a nearly isometric pair's discrepancy: those figures then print as upper
bounds, and a float64 fit resolves them.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .stats import Moments, _gamma, unit_roundoff

__all__ = ["Procrustes", "procrustes", "least_squares", "discrepancy", "discrepancy_interval",
           "paper_bound", "statistic_errors", "sums", "NotUniqueWarning"]

_U64 = unit_roundoff(np.float64)
_U32 = unit_roundoff(np.float32)
#: LAPACK's SVD: computed singular values are those of C + F, ||F||_2 <= p u ||C||_2, with p
#: "a modestly growing function" of the dimensions; we take p = SVD_P x max(dA, dB).
SVD_P = 10


#: Singular values below this fraction of the largest count as zero: float32 block GEMMs
#: carry ~1e-7 relative round-off, so directions below ~1e-6 are noise.
RANK_RTOL = 1e-6


class NotUniqueWarning(UserWarning):
    """Fewer pairs than dimensions: the cross-covariance is rank-deficient and Q not unique."""


def sums(m: Moments, center: bool):
    """(C, qa, qb, Ga, Gb) centred or raw, float64. Ga, Gb are None without Gram stats."""
    if center:
        return m.cross, m.sq_a, m.sq_b, m.gram_a, m.gram_b
    qa, qb = m.raw_sq()
    ga, gb = m.raw_gram() if m.has_gram else (None, None)
    return m.raw_cross(), qa, qb, ga, gb


@dataclass(frozen=True)
class Procrustes:
    """Solution of min_{Q, s} ||s A Q - B||_F over Q with orthonormal rows (dA <= dB) or
    columns (dA > dB).

    rotation : (dA, dB) float64, Q = U V^T from the thin SVD C = U S V^T.
    scale : float, 1.0 unless a similarity scale was fitted.
    singular_values : (min(dA, dB),) float64, S (the last one negated when a reflection was
        forbidden and had to be undone).
    residual : ||s A Q - B||_F^2, closed form; None when dA > dB without Gram statistics.
    target_energy : qb = ||B||_F^2 (relative residual = residual / target_energy).
    rank : numerical rank of C (singular values above RANK_RTOL x the largest).
    residual_error : a rigorous bound on the round-off in ``residual`` (see the module doc):
        the exact ||s A Q - B||_F^2 of this Q and s on the exact rows lies within
        ``residual +- residual_error``. A residual below it is not resolved by the
        arithmetic (print "<= residual + residual_error"). None when residual is None.
    """

    rotation: np.ndarray
    scale: float
    singular_values: np.ndarray
    residual: Optional[float]
    target_energy: float
    rank: int = 0
    residual_error: Optional[float] = None

    @property
    def relative_residual(self) -> Optional[float]:
        if self.residual is None or self.target_energy <= 0:
            return None
        return self.residual / self.target_energy


def procrustes(m: Moments, *, center: bool = False, scale: bool = False,
               reflection: bool = True) -> Procrustes:
    """Orthogonal Procrustes from statistics (one SVD of a dA x dB matrix).

    ``reflection=False`` forces det(Q) = +1 (a proper rotation); only defined for dA == dB.
    With dA > dB, Q has orthonormal columns and the map projects the source onto a dB-dim
    subspace before rotating (lossy); with dA < dB it embeds the source isometrically into
    a dA-dim subspace of the target space.
    """
    if m.n == 0:
        raise ValueError("no pairs: cannot fit an alignment from zero rows")
    dim_a, dim_b = m.dims
    if not reflection and dim_a != dim_b:
        raise ValueError(f"reflection=False (a proper rotation) needs equal dimensions, "
                         f"got {dim_a} and {dim_b}")
    rank_cap = m.n - 1 if center else m.n
    if rank_cap < min(dim_a, dim_b):
        warnings.warn(f"{m.n} pairs for dimensions {dim_a}x{dim_b}: the cross-covariance has "
                      f"rank <= {rank_cap} < {min(dim_a, dim_b)}, so the rotation is not unique "
                      "(directions outside the data's span are arbitrary)",
                      NotUniqueWarning, stacklevel=2)
    c, qa, qb, ga, _ = sums(m, center)
    u, s, vt = np.linalg.svd(c, full_matrices=False)
    s = s.copy()
    rank = int(np.sum(s > s[0] * RANK_RTOL)) if s[0] > 0 else 0
    if rank < len(s) and rank_cap >= min(dim_a, dim_b):
        warnings.warn(f"the cross-covariance is numerically rank-deficient (rank {rank} of "
                      f"{len(s)}, singular values below {RANK_RTOL:g} x the largest): the map "
                      "is determined on the span of the data but arbitrary outside it, so "
                      "rotations from different runs may differ there",
                      NotUniqueWarning, stacklevel=2)
    if not reflection and np.linalg.det(u) * np.linalg.det(vt) < 0:
        u[:, -1] *= -1
        s[-1] *= -1
    q = u @ vt
    trace = float(s.sum())
    # energy of the mapped source: qa when Q has orthonormal rows, tr(Q^T Ga Q) otherwise
    if dim_a <= dim_b:
        mapped = qa
    elif ga is not None:
        mapped = float(np.einsum("ij,ij->", q, ga @ q))
    else:
        mapped = None
    k = 1.0
    if scale:
        if mapped is None:
            raise ValueError("a similarity scale with dA > dB needs Gram statistics (diagnostics)")
        k = trace / mapped if mapped > 0 else 1.0
    residual = error = None
    if mapped is not None:
        residual = max(k * k * mapped - 2 * k * trace + qb, 0.0)
        error = _residual_error(m, k, mapped, trace, float(np.abs(s).max(initial=0.0)), qa, qb)
    return Procrustes(q, float(k), s, residual, float(qb), rank, error)


def _residual_error(m: Moments, k: float, mapped: float, trace: float, top: float,
                    qa: float, qb: float) -> float:
    """Bound on the round-off of k^2 mapped - 2 k tr S + qb (see the module doc).

    tr S moves by at most the nuclear norm of the error E in C (Mirsky), <= sqrt(min(dA, dB))
    ||E||_F; plus the SVD's own backward error. ``mapped`` is qa (dA <= dB, Q with
    orthonormal rows to round-off) or tr(Q^T Ga Q) (dA > dB), which moves by at most
    ||E_Ga||_F ||Q Q^T||_F = sqrt(dB) ||E_Ga||_F."""
    e = statistic_errors(m)
    dim_a, dim_b = m.dims
    small, big = min(dim_a, dim_b), max(dim_a, dim_b)
    e_trace = math.sqrt(small) * e["cross"] + small * _gamma(SVD_P * big, _U64) * top
    if dim_a <= dim_b:
        e_mapped = e["sq_a"] + _gamma(SVD_P * big, _U64) * qa
    else:  # tr(Q^T Ga Q): the error of Ga, Q's orthonormality and the evaluation's
        e_mapped = (math.sqrt(dim_b) * e["gram_a"]
                    + _gamma(SVD_P * big + dim_a * (dim_b + 1), _U64) * qa * dim_b)
    return float(k * k * e_mapped + 2 * abs(k) * e_trace + e["sq_b"]
                 + _gamma(3, _U64) * (k * k * abs(mapped) + 2 * abs(k * trace) + qb))


def statistic_errors(m: Moments) -> dict:
    """Rigorous bounds on the round-off in the statistics ``m`` (centred and raw alike:
    the raw sums add n mean mean^T in float64, which the float64 term covers).

    Returns {"cross", "gram_a", "gram_b": bounds on the Frobenius norm of the error of each
    matrix, "sq_a", "sq_b": bounds on the absolute error of the sums of squares}. (The
    nuclear norm of an error is at most sqrt(its rank) times its Frobenius norm.)

    How (``m.rounding`` = [u, k, depth, eta_a, eta_b], see :mod:`bigalign.maths.stats`): a block's
    GEMM X^T Y over k rows errs entrywise by at most gamma_k |X|^T |Y| (any summation
    order), whose Frobenius norm is at most gamma_k ||X||_F ||Y||_F; rounding the centred
    values adds 2 to k. Summed over blocks (Cauchy-Schwarz) that is gamma_(k+2) sqrt(Sa Sb),
    with Sa, Sb the centred sums of squares (block-centred sums add up to at most the
    whole's). A relative perturbation eta of the rows before centring (a cast, the
    normalisation) adds eta sqrt(Ra Sb) and alike, with the raw (uncentred) sums Ra, Rb.
    Everything done in float64 (means, the merge tree's Chan updates of depth ``depth``,
    adding n mean mean^T) is covered by gamma_(4 depth + k + 16)(2^-53) sqrt(Ra Rb). A sum
    of squares adds gamma_(d+3) Sa for the per-row sums in the GEMM dtype. Without a record
    (statistics of an older version, or built by hand) the worst the code could have done is
    assumed: float32 GEMMs over all n rows, n merge levels, normalised rows.
    """
    dim_a, dim_b = m.dims
    n = max(int(m.n), 1)
    if m.rounding is not None:
        u, k, depth, eta_a, eta_b = (float(v) for v in m.rounding)
    else:
        u, k, depth = _U32, float(n), float(n)
        eta_a, eta_b = _gamma(dim_a + 5, _U32), _gamma(dim_b + 5, _U32)
    g = _gamma(k + 2, u)
    g_sq_a, g_sq_b = _gamma(dim_a + 3, u), _gamma(dim_b + 3, u)
    g64 = _gamma(4 * depth + k + 16, _U64)
    # centred and raw sums of squares, rounded up past their own error
    sa, sb = max(m.sq_a, 0.0), max(m.sq_b, 0.0)
    sa *= 1 + 2 * (g_sq_a + 2 * eta_a + eta_a * eta_a + g64)
    sb *= 1 + 2 * (g_sq_b + 2 * eta_b + eta_b * eta_b + g64)
    ra = (sa + n * float(m.mean_a @ m.mean_a)) * (1 + 4 * _U64)
    rb = (sb + n * float(m.mean_b @ m.mean_b)) * (1 + 4 * _U64)
    sqrt = math.sqrt

    def product(s1, s2, r1, r2, e1, e2):
        return (g * sqrt(s1 * s2) + (1 + g) * (e1 * sqrt(r1 * s2) + e2 * sqrt(s1 * r2)
                                               + e1 * e2 * sqrt(r1 * r2))
                + g64 * sqrt(r1 * r2))

    def squares(gs, s, r, e):
        return gs * s + (1 + gs) * (2 * e * sqrt(r * s) + e * e * r) + g64 * r

    return {"cross": product(sa, sb, ra, rb, eta_a, eta_b),
            "gram_a": product(sa, sa, ra, ra, eta_a, eta_a),
            "gram_b": product(sb, sb, rb, rb, eta_b, eta_b),
            "sq_a": squares(g_sq_a, sa, ra, eta_a),
            "sq_b": squares(g_sq_b, sb, rb, eta_b)}


def least_squares(m: Moments, *, center: bool = False, ridge: float = 0.0):
    """Least-squares / ridge map W = (Ga + ridge I)^+ C, (dA, dB) float64, and its residual
    ||A W - B||_F^2 = tr(W^T Ga W) - 2 tr(W^T C) + qb. Needs Gram statistics.

    With ridge = 0 and a rank-deficient Ga this is the minimum-norm solution, as
    numpy.linalg.lstsq(A, B) gives."""
    m._need_gram()
    c, _, qb, ga, _ = sums(m, center)
    lhs = ga + ridge * np.eye(ga.shape[0])
    w = np.linalg.lstsq(lhs, c, rcond=None)[0]
    residual = float(np.einsum("ij,ij->", w, ga @ w) - 2 * np.einsum("ij,ij->", w, c) + qb)
    return w, max(residual, 0.0)


def discrepancy(m: Moments, *, center: bool = False) -> float:
    """epsilon = ||A A^T - B B^T||_F from d x d statistics:
    ||Ga||^2 + ||Gb||^2 - 2 ||C||^2 (clamped at 0). Nearly isometric pairs make this a
    difference of nearly equal numbers: use :func:`discrepancy_interval` to know how much of
    it the arithmetic resolves."""
    return discrepancy_interval(m, center=center)[0]


def discrepancy_interval(m: Moments, *, center: bool = False) -> tuple[float, float, float]:
    """(epsilon, lo, hi): epsilon as computed, and an interval that rigorously holds the
    exact ||A A^T - B B^T||_F of the rows, from the round-off bounds of the statistics
    (:func:`statistic_errors`). lo == 0 means the arithmetic cannot tell epsilon from 0:
    report "epsilon <= hi".

    Each term: | ||X + E||^2 - ||X||^2 | <= (2 ||X + E||_F + ||E||_F) ||E||_F; the squares
    and sums of N entries in float64 add gamma_(N+1) of each term, the final two additions
    gamma_3 of their sum."""
    m._need_gram()
    c, _, _, ga, gb = sums(m, center)
    e = statistic_errors(m)
    sq2 = 0.0
    err = 0.0
    terms = []
    for x, ex, w in ((ga, e["gram_a"], 1.0), (gb, e["gram_b"], 1.0), (c, e["cross"], 2.0)):
        v = float(np.vdot(x, x))
        terms.append(w * v)
        sq2 += w * v if w == 1.0 else -w * v
        err += w * ((2 * math.sqrt(v) + ex) * ex + _gamma(x.size + 1, _U64) * v)
    err += _gamma(3, _U64) * sum(terms)
    eps = math.sqrt(max(sq2, 0.0))
    return eps, math.sqrt(max(sq2 - err, 0.0)), math.sqrt(max(sq2 + err, 0.0))


def paper_bound(epsilon: float, dim_a: int, dim_b: int, n: int) -> dict:
    """The bound of arXiv 2510.13406 from epsilon = ||A A^T - B B^T||_F.

    With D = max(dA, dB) (the smaller side zero-padded), the best orthogonal Q has
    ||A Q - B||_F <= (2D)^(1/4) sqrt(epsilon). Per pair: with delta^2 the mean squared
    dot-product gap over all n^2 pairs (delta = epsilon / n), the mean squared distance after
    alignment is at most sqrt(2D) delta.
    """
    d = max(dim_a, dim_b)
    delta = epsilon / n if n else float("nan")
    return {
        "epsilon": epsilon,
        "delta": delta,
        "bound_residual": (2 * d) ** 0.25 * math.sqrt(epsilon),
        "bound_mean_sq_distance": math.sqrt(2 * d) * delta,
    }
