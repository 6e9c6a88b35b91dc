"""The learning curve: alignment quality against the number of training pairs.

:func:`learning_curve` fits on nested prefixes of the training rows (one streaming pass
snapshots the statistics at each size, :func:`bigalign.commands.evaluate.training_moments`) and
evaluates every fit on the same held-out rows (:func:`bigalign.commands.evaluate.evaluate_maps`):
it shows where more pairs stop helping, and where least squares overfits.
"""

from __future__ import annotations

import warnings
from typing import Optional, Sequence

import numpy as np

from ..errors import InputError
from .evaluate import (DEFAULT_MAX_QUERIES, evaluate_maps, open_input, pairing_summary, row_range,
                       training_moments)
from ..execution.pairing import gathered, join, pair_by_ids
from ..storage.stores import validate_pair
from ..maths.metrics import AffineMap, Method, fit_diagnostics, train_numbers
from ..maths.solve import NotUniqueWarning, least_squares as fit_least_squares, procrustes

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
                   center: bool = True, normalize: bool = False, scale: bool = False,
                   reflection: bool = True, least_squares: bool = True, ridge: float = 0.0,
                   ks: Sequence[int] = (1, 10), max_queries: Optional[int] = DEFAULT_MAX_QUERIES,
                   seed: int = 0, dtype="float32", block_rows: Optional[int] = None,
                   pair_by: str = "auto", duplicates: str = "error",
                   scratch: Optional[str] = None, storage_options=None,
                   check_chunks: bool = True) -> dict:
    """Quality against the number of training pairs.

    Fits on the first ``n`` rows of ``train_rows`` for each ``n`` in ``sizes`` (nested
    prefixes: one streaming pass snapshots the statistics at each size) and evaluates every
    fit (orthogonal, and least squares unless disabled) on the same held-out ``eval_rows``.
    ``saturation``: the smallest size whose centred recall@1 (orthogonal) is within
    ``SATURATION`` (0.01) of the largest size's; None when only the largest size gets there
    (still improving: more pairs would help). Returns a JSON-ready dict ("kind": "curve").

    ``pair_by`` / ``duplicates`` / ``scratch``: as for :func:`bigalign.fit`. By ids (both
    inputs stores with ids, unless ``pair_by="rows"``), ``train_rows`` and ``eval_rows``
    are positions START:STOP in the list of pairs matched by id (sorted by source row);
    those pairs are gathered (:func:`bigalign.execution.pairing.gathered`) and the curve runs on
    them, so it equals the curve of the explicitly joined arrays. ``pairing`` in the result
    reports the matched pairs and the ids found on one side only.
    """
    src, src_ids = open_input(source, "source", storage_options, check_chunks)
    tgt, tgt_ids = open_input(target, "target", storage_options, check_chunks)
    joined = None
    if pair_by_ids(pair_by, src_ids, tgt_ids):
        joined = join(src_ids, tgt_ids, duplicates=duplicates)
        n, what = joined.matched, " (positions in the pairs matched by id)"
    else:
        validate_pair(src, tgt)
        n, what = src.rows, ""
    a, b = row_range(train_rows, n, "training rows" + what)
    c, d = row_range(eval_rows, n, "held-out rows" + what)
    if max(a, c) < min(b, d):
        raise InputError(f"training rows {a}:{b} and held-out rows {c}:{d} overlap")
    total = b - a
    sizes = default_sizes(total) if not sizes else sorted({int(s) for s in sizes})
    if sizes[0] < 2 or sizes[-1] > total:
        raise InputError(f"training sizes must lie in 2..{total} (the training rows), got {sizes}")
    b = a + sizes[-1]
    pairs, train, held, pairing = None, (a, b), (c, d), {"by": "rows"}
    if joined is not None:  # training pairs, then held-out pairs, gathered end to end
        pairs = joined.take(np.concatenate([np.arange(a, b), np.arange(c, d)]))
        train, held = (0, b - a), (b - a, b - a + d - c)
        pairing = pairing_summary(joined, duplicates)
    with gathered(pairs, src, tgt, scratch, normalize=dtype if normalize else None) as (x, y):
        res = _curve(x, y, train, held, sizes, center=center, normalize=normalize,
                     scale=scale, reflection=reflection, least_squares=least_squares,
                     ridge=ridge, ks=ks, max_queries=max_queries, seed=seed, dtype=dtype,
                     block_rows=block_rows)
    return dict(res, source=src.url, target=tgt.url, train_rows=[a, b], rows=[c, d],
                pairing=pairing)


def _curve(src, tgt, train: tuple, held: tuple, sizes: list, *, center, normalize, scale,
           reflection, least_squares, ridge, ks, max_queries, seed, dtype, block_rows) -> dict:
    """The curve on row-aligned opened inputs: prefixes of rows ``train`` = (a, b) of
    ``sizes`` rows, evaluated on rows ``held`` = (c, d)."""
    (a, b), (c, d) = train, held
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
                        dtype=dtype, block_rows=block_rows, normalize_target=normalize,
                        command="curve")
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
