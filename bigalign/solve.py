"""Solve from sufficient statistics: Procrustes rotation, scale, residual, baselines and the
paper's dot-product discrepancy bound. Pure numpy; everything here costs O(d^3), never O(n).

Notation: A (n, dA) source rows, B (n, dB) target rows, centred by their means when
``center`` is set. C = A^T B (dA, dB), qa = ||A||_F^2, qb = ||B||_F^2, Ga = A^T A, Gb = B^T B.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .stats import Moments

__all__ = ["Procrustes", "procrustes", "least_squares", "discrepancy", "paper_bound",
           "sums", "NotUniqueWarning"]


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
    """

    rotation: np.ndarray
    scale: float
    singular_values: np.ndarray
    residual: Optional[float]
    target_energy: float
    rank: int = 0

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
    residual = None if mapped is None else max(k * k * mapped - 2 * k * trace + qb, 0.0)
    return Procrustes(q, float(k), s, residual, float(qb), rank)


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
    """epsilon = ||A A^T - B B^T||_F, exact from d x d statistics:
    ||Ga||^2 + ||Gb||^2 - 2 ||C||^2 (clamped at 0 against round-off)."""
    m._need_gram()
    c, _, _, ga, gb = sums(m, center)
    sq = float(np.sum(ga * ga) + np.sum(gb * gb) - 2 * np.sum(c * c))
    return math.sqrt(max(sq, 0.0))


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
