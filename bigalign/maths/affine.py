"""Composing and inverting affine maps ``y = (x - mu) * s @ Q + nu`` (pure numpy).

The maths of :meth:`bigalign.Transform.then` and :meth:`bigalign.Transform.inverse` (and of
``bigalign compose|invert``): arrays in, arrays out; what a derived transform records and
refuses lives in :mod:`bigalign.transform`.
"""

from __future__ import annotations

import numpy as np

__all__ = ["ORTHONORMAL_TOL", "orthonormality_error", "compose_affine", "inverse_rotation",
           "rank"]

#: max |Q Q^T - I| (or |Q^T Q - I|) below which a rotation counts as orthonormal
ORTHONORMAL_TOL = 1e-6


def orthonormality_error(rotation: np.ndarray) -> float:
    """max |Q Q^T - I| when dA <= dB (orthonormal rows), else max |Q^T Q - I| (columns)."""
    q = np.asarray(rotation, dtype=np.float64)
    g = q @ q.T if q.shape[0] <= q.shape[1] else q.T @ q
    g[np.diag_indices_from(g)] -= 1.0
    return float(np.abs(g).max()) if g.size else 0.0


def compose_affine(rotation_1: np.ndarray, scale_1: float, target_mean_1: np.ndarray,
                   rotation_2: np.ndarray, scale_2: float, source_mean_2: np.ndarray,
                   target_mean_2: np.ndarray) -> tuple[np.ndarray, float, np.ndarray]:
    """Map 1 (dA -> dB) then map 2 (dB -> dC) as one map with map 1's source mean:
    rotation Q1 Q2 (dA, dC), scale s1 s2, target mean (nu1 - mu2) s2 Q2 + nu2 (dC,), i.e.
    map 2 applied to nu1 (the form (x - mean) * scale @ rotation + mean holds any affine
    map whose matrix is scale * rotation)."""
    rotation = rotation_1 @ rotation_2
    scale = float(scale_1 * scale_2)
    target_mean = (target_mean_1 - source_mean_2) * scale_2 @ rotation_2 + target_mean_2
    return rotation, scale, target_mean


def inverse_rotation(rotation: np.ndarray, orthonormal: bool) -> np.ndarray:
    """The rotation of the map back (dB, dA): Q^T when Q is orthonormal (rows or columns),
    else the Moore-Penrose pseudo-inverse pinv(Q)."""
    return rotation.T.copy() if orthonormal else np.linalg.pinv(rotation)


def rank(rotation: np.ndarray, orthonormal: bool) -> int:
    """Rank of a (dA, dB) rotation: min(dA, dB) when orthonormal, else computed."""
    d_a, d_b = rotation.shape
    return min(d_a, d_b) if orthonormal else int(np.linalg.matrix_rank(rotation))
