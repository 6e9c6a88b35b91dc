"""Choosing a map family (or a family's parameter) on held-out pairs, after the fit's pass.

``fit(..., method="auto")`` (and ``method="ridge"`` / ``"reduced-rank"`` without their
parameter) runs the one streaming pass as every fit does, over all pairs; then, here:

1. **Hold out** a share of the pairs (``FitOptions.holdout``, at most ``max_holdout``
   rows) in a few seeded random windows of rows (:mod:`bigalign.planning.holdout`) and
   read them (a couple of chunks per window).
2. **Take them out** of the pass's statistics (:func:`bigalign.maths.stats.subtract`):
   the training statistics of the other pairs, with no second pass.
3. **Fit every candidate** on those (:func:`bigalign.maths.adapters.candidates`; the ridge
   penalty and the rank chosen on the held-out residual), **score** each on the held-out
   pairs (:mod:`bigalign.maths.selection`: held-out recall@1 by ``FitOptions.select``, with a
   bootstrap interval;
   the held-out relative residual) and **choose**.
4. **Refit** the chosen family, with the chosen parameter, on all pairs (the statistics of
   the whole pass), as scikit-learn's searches refit the best estimator: the held-out
   figures recorded are those of the candidate fitted without the held-out pairs.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..maths.adapters import Adapter, candidates, relative_residual_on, solve
from ..maths.bootstrap import interval
from ..maths.families import FAMILIES
from ..maths.solve import NotUniqueWarning
from ..maths.selection import CRITERIA, choose, per_query, retrieval_hits
from ..maths.stats import Moments, block_moments, subtract
from ..options import FitOptions
from ..planning.holdout import holdout_rows, holdout_windows
from ..storage.stores import read_rows

log = logging.getLogger("bigalign")

__all__ = ["select", "held_out", "Selection"]

#: The families ``method="auto"`` compares, in order (ties go to the earlier).
AUTO_FAMILIES = FAMILIES


@dataclass(frozen=True)
class Selection:
    """What :func:`select` chose: ``adapter`` (refitted on all pairs) and ``record`` (for
    the transform's ``metadata["selection"]``: criterion, held-out rows, every
    candidate's figures)."""

    adapter: Adapter
    record: dict


def held_out(src, tgt, start: int, stop: int, opts: FitOptions, seed: int):
    """(a, b, windows): the held-out rows of ``src`` (n, dA) and ``tgt`` (n, dB) as
    float64 arrays, and the windows [(a, b), ...] they came from (global row numbers)."""
    count = holdout_rows(stop - start, opts.holdout, opts.max_holdout)
    windows = holdout_windows(start, stop, count, seed)
    a = np.concatenate([read_rows(src, w0, w1) for w0, w1 in windows]).astype(np.float64)
    b = np.concatenate([read_rows(tgt, w0, w1) for w0, w1 in windows]).astype(np.float64)
    return a, b, windows


def select(moments: Moments, src, tgt, start: int, stop: int, opts: FitOptions,
           seed: int = 0) -> Selection:
    """Hold out, fit the candidates, score, choose, refit (see the module doc).
    ``moments``: the statistics of rows [start, stop) (with Gram matrices);
    ``src``/``tgt``: the inputs the pass read (:class:`EmbeddingArray` or ArrayRows)."""
    a, b, windows = held_out(src, tgt, start, stop, opts, seed)
    first = windows[0][0]
    m_h = block_moments(a, b, gram=True, normalize=opts.normalize, dtype=np.float64,
                        start=first)
    m_train = subtract(moments, m_h)
    families = AUTO_FAMILIES if opts.method == "auto" else (opts.family,)
    with warnings.catch_warnings():  # rank warnings: said once, by the final fit
        warnings.simplefilter("ignore", NotUniqueWarning)
        cands = _candidates(m_train, m_h, opts, families)
    rows = [_score(c, a, b, m_h, opts, seed) for c in cands] if len(cands) > 1 else \
        [{"family": cands[0].family, "params": _params(cands[0]),
          "heldout_relative_residual": relative_residual_on(cands[0], m_h), "score": 0.0}]
    best = choose(rows)
    for i, r in enumerate(rows):
        r["chosen"] = i == best
    won = cands[best]
    kw = {k: v for k, v in won.params.items() if k in ("ridge", "rank")}
    final = solve(moments, won.family, center=opts.center, reflection=opts.reflection, **kw)
    record = {"method": opts.method, "chosen": won.family, "params": _params(won),
              "criterion": _criterion(opts) if len(cands) > 1 else
              "the lowest held-out relative residual over the parameter's grid",
              "holdout": {"rows": int(m_h.n), "share": opts.holdout,
                          "windows": [list(w) for w in windows], "seed": seed},
              "refit": f"on all {moments.n} pairs, with the chosen family and parameter",
              "candidates": rows}
    if won.selection is not None:
        record["grid"] = won.selection
    log.info("selected %s%s on %d held-out pairs", won.family,
             "".join(f" ({k} {v:g})" for k, v in kw.items()), m_h.n)
    return Selection(final, record)


def _candidates(m_train: Moments, m_h: Moments, opts: FitOptions, families) -> list:
    """The candidates, with a parameter the options fix used as given."""
    out = []
    for c in candidates(m_train, m_h, center=opts.center, families=families,
                        reflection=opts.reflection):
        if c.family == "ridge" and opts.ridge is not None:
            c = solve(m_train, "ridge", center=opts.center, ridge=opts.ridge)
        elif c.family == "reduced-rank" and opts.rank is not None:
            c = solve(m_train, "reduced-rank", center=opts.center, rank=opts.rank)
        out.append(c)
    return out


def _params(c: Adapter) -> dict:
    return {k: float(v) if k != "rank" else int(v) for k, v in c.params.items()}


def _criterion(opts: FitOptions) -> str:
    return (CRITERIA[opts.select] + ("" if opts.select == "residual" else
            f"; {opts.select_search} cosine search") + "; ties to the lower held-out relative "
            "residual, then to the simpler family")


def _score(c: Adapter, a: np.ndarray, b: np.ndarray, m_h: Moments, opts: FitOptions,
           seed: int) -> dict:
    """One candidate's held-out figures: recall@1 and @10 both ways (``select_search``
    cosine), the criterion with its bootstrap interval, the held-out relative residual."""
    mapped = c.to_map(normalize=opts.normalize)(a, dtype=np.float64)
    hits = retrieval_hits(mapped, b, centred=opts.select_search == "centred")
    values = per_query(hits, opts.select)
    est, lo, hi = interval(values, seed=seed)
    return {"family": c.family, "params": _params(c),
            "score": float(np.mean(values)), "score_interval": [lo, hi],
            **{f"recall@{k}_{way}": float(np.mean(hits[f"{way}@{k}"]))
               for k in (1, 10) for way in ("forward", "backward")},
            "heldout_relative_residual": relative_residual_on(c, m_h)}


def describe(record: Optional[dict]) -> list[str]:
    """Lines for ``info`` / ``fit``'s summary: the candidates' figures, the winner marked."""
    if not record:
        return []
    out = [f"selected {record['chosen']} ({record['method']}) on "
           f"{record['holdout']['rows']:,} held-out pairs; {record['refit']}",
           f"  by: {record['criterion']}"]
    for r in record["candidates"]:
        params = "".join(f", {k} {v:.4g}" for k, v in r["params"].items() if k != "scale")
        figures = f"held-out relative residual {r['heldout_relative_residual']:.4f}"
        if "recall@1_forward" in r:
            lo, hi = r["score_interval"]
            figures = (f"score {r['score']:.3f} [{lo:.3f}, {hi:.3f}]; recall@1 "
                       f"{r['recall@1_forward']:.3f} / {r['recall@1_backward']:.3f} "
                       f"(mapped->target / target->mapped), " + figures)
        out.append(f"  {'*' if r['chosen'] else ' '} {r['family']}{params}: {figures}")
    return out
