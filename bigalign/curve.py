"""The learning curve: alignment quality against the number of training pairs.

:func:`learning_curve` fits on nested prefixes of the training rows (one streaming pass
snapshots the statistics at each size, :func:`bigalign.evaluate.training_moments`) and
evaluates every fit on the same held-out rows (:func:`bigalign.evaluate.evaluate_maps`):
it shows where more pairs stop helping, and where least squares overfits.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import numpy as np

from .errors import InputError
from .evaluate import DEFAULT_MAX_QUERIES, evaluate_maps, open_pair, row_range, training_moments
from .metrics import AffineMap, Method, fit_diagnostics, train_numbers
from .solve import NotUniqueWarning, least_squares as fit_least_squares, procrustes

__all__ = ["learning_curve", "default_sizes", "SATURATION"]

#: Recall within this of the largest training size counts as saturated.
SATURATION = 0.01


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
    src, tgt = open_pair(source, target, storage_options, check_chunks)
    a, b = row_range(train_rows, src.rows, "training rows")
    c, d = row_range(eval_rows, src.rows, "held-out rows")
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
                                  train=train_numbers(sol.residual, m)))
            if least_squares:
                w, res = fit_least_squares(m, center=center, ridge=ridge)
                methods.append(Method(f"least squares@{size}", AffineMap(w, *means, normalize),
                                      train=train_numbers(res, m)))
            diags[size] = fit_diagnostics(m, center=center)
    res = evaluate_maps(methods, src, tgt, (c, d), ks=ks, max_queries=max_queries, seed=seed,
                        dtype=dtype, block_rows=block_rows, normalize_target=normalize)
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
