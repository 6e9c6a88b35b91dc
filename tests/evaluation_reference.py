"""Planted pairs and brute-force references shared by the evaluation tests
(test_metrics, test_evaluate, test_retrieval, test_curve)."""

from __future__ import annotations

import math

import numpy as np
import scipy.linalg

from bigalign import Transform
from bigalign.maths.metrics import unit_rows
from bigalign.maths.solve import procrustes
from bigalign.maths.stats import block_moments, merge_all


def pairs(n=300, dim_a=12, dim_b=12, noise=0.3, offset=1.5, seed=0):
    """Paired rows with a planted orthogonal map and common offsets on both sides."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, dim_a)) / math.sqrt(dim_a)
    q, _ = np.linalg.qr(rng.standard_normal((max(dim_a, dim_b), max(dim_a, dim_b))))
    q = q[:dim_a, :dim_b]
    a = z + offset * rng.standard_normal(dim_a) / math.sqrt(dim_a)
    b = z @ q + noise * rng.standard_normal((n, dim_b)) / math.sqrt(dim_b) \
        + offset * rng.standard_normal(dim_b) / math.sqrt(dim_b)
    return a, b


def streamed(a, b, step=37, center=False):
    """Statistics merged over blocks, as the streaming fit computes them."""
    return merge_all(block_moments(a[i:i + step], b[i:i + step], gram=True, dtype=np.float64)
                     for i in range(0, len(a), step))


def transform_from(m, center, rows):
    sol = procrustes(m, center=center)
    dim_a, dim_b = m.dims
    return Transform(sol.rotation, m.mean_a.copy() if center else np.zeros(dim_a),
                     m.mean_b.copy() if center else np.zeros(dim_b), 1.0,
                     {"center": center, "normalize": False, "scale": False, "reflection": True,
                      "rows": list(rows)}, {"residual": sol.residual})


def brute_ranks(q, t):
    """rank_i = #{j != i : cos(q_i, t_j) > cos(q_i, t_i)} with a full score matrix."""
    s = unit_rows(q.astype(np.float64)) @ unit_rows(t.astype(np.float64)).T
    own = np.diag(s).copy()
    better = s > own[:, None]
    np.fill_diagonal(better, False)
    return better.sum(axis=1)


def brute_ndcg(scores, rel, k):
    """nDCG@k straight from the definition with a full sort."""
    order = np.argsort(-scores, kind="stable")[:k]
    dcg = sum(rel.get(int(d), 0) / math.log2(r + 2) for r, d in enumerate(order))
    ideal = sorted((v for v in rel.values() if v > 0), reverse=True)[:k]
    return dcg / sum(v / math.log2(r + 2) for r, v in enumerate(ideal))



def near_isometric(n=1500, d=32, noise=1e-4, offset=2.0, seed=11, identical=False):
    """float32 rows B = A Q0 + tiny noise (or B = A), with common offsets: the pairs whose
    discrepancy and residual are differences of nearly equal large sums."""
    rng = np.random.default_rng(seed)
    q0, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a = rng.standard_normal((n, d)) + offset * rng.standard_normal(d)
    b = a.copy() if identical else \
        a @ q0 + noise * rng.standard_normal((n, d)) + offset * rng.standard_normal(d)
    return a.astype(np.float32), b.astype(np.float32)


def isometry_oracle(a, b, center):
    """float64 in memory: (eps = ||A A^T - B B^T||_F straight from the n x n matrices, the
    optimal residual ||A Q - B||_F^2 from scipy, A, B as float64 (centred with ``center``))."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    if center:
        a, b = a - a.mean(0), b - b.mean(0)
    q, _ = scipy.linalg.orthogonal_procrustes(a, b)
    return float(np.linalg.norm(a @ a.T - b @ b.T)), float(np.sum((a @ q - b) ** 2)), a, b


def agrees(text, truth):
    """Does a figure printed by bigalign.maths.metrics.figure ("= v", "= v +- e", "<= x") state
    something true about ``truth``?"""
    text = text.strip()
    if text.startswith("<="):
        return truth <= float(text[2:])
    if "+-" in text:
        v, e = (float(x) for x in text.lstrip("= ").split("+-"))
        return abs(truth - v) <= e
    v = float(text.lstrip("= "))
    digits = len(text.lstrip("= ").split("e")[0].replace(".", "").replace("-", "").lstrip("0"))
    half_unit = 0.5 * 10.0 ** (math.floor(math.log10(abs(v))) - digits + 1) if v else 0.0
    return abs(truth - v) <= half_unit * (1 + 1e-9)
