"""Bridge, re-embed or stay: the migration verdict from per-query retrieval figures. Pure
numpy (intervals by :mod:`bigalign.maths.bootstrap`).

Three ways to serve search once a new embedding model exists, for the same held-out queries
and documents:

* **stay**: old-model queries against old-model documents. Costs nothing; forgoes the new
  model.
* **bridge**: new-model queries against the old documents mapped into the new model's space
  by the transform (old -> new). Costs one matrix product per document; costs whatever
  quality the map loses.
* **re-embed**: new-model queries against new-model documents. Costs re-encoding the corpus;
  the best the new model can do.

The rule (:func:`decide`), on one metric (recall@10 by default), with paired bootstrap
intervals at ``level`` over the same resampled queries (:func:`figures`):

1. **bridge** when bridging is shown to beat staying, ``(bridge - stay).lo > min_gain``, and
   it is shown to keep enough of re-embedding, ``ARR.lo >= arr_threshold`` with ARR =
   bridge / re-embed (an undefined ARR, re-embedding scoring 0, counts as kept);
2. else **re-embed** when re-embedding is shown to beat staying,
   ``(re-embed - stay).lo > min_gain``;
3. else **stay**: no migration is shown to improve search, so the free option wins.

"Shown" means the lower end of the interval: with ``level`` 0.95 each comparison holds with
97.5% one-sided confidence. Where the data cannot tell, the verdict falls back to the option
that cannot make search worse than it is today for less cost: re-embed rather than a doubtful
bridge, stay rather than a doubtful migration. Defaults: ``min_gain`` 0, ``arr_threshold``
0.95 (bridging must keep at least 95% of re-embedding's figure).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .bootstrap import Interval, difference_interval, interval, ratio_interval

__all__ = ["Rule", "Figures", "Verdict", "figures", "decide", "verdict", "DECISIONS"]

#: The three answers, cheapest first.
DECISIONS = ("stay", "bridge", "re-embed")


@dataclass(frozen=True)
class Rule:
    """The thresholds of :func:`decide`.

    arr_threshold : in (0, inf); bridging needs ARR's lower end >= this (default 0.95).
    min_gain : finite float; a migration needs (its figure - stay)'s lower end > this
        (default 0: any gain the interval shows; e.g. 0.02 asks for two points of recall).
    """

    arr_threshold: float = 0.95
    min_gain: float = 0.0

    def __post_init__(self):
        if not (isinstance(self.arr_threshold, (int, float)) and
                math.isfinite(self.arr_threshold) and self.arr_threshold > 0):
            raise ValueError(f"arr_threshold must be a positive number, got "
                             f"{self.arr_threshold!r}")
        if not (isinstance(self.min_gain, (int, float)) and math.isfinite(self.min_gain)):
            raise ValueError(f"min_gain must be a finite number, got {self.min_gain!r}")


@dataclass(frozen=True)
class Figures:
    """What :func:`decide` reads, for one metric (e.g. "recall@10"): each system's mean over
    the queries with its interval, the paired differences against staying and ARR =
    bridge / re-embed (None when re-embedding scores 0 on every query), all at ``level``."""

    metric: str
    stay: Interval
    bridge: Interval
    reembed: Interval
    bridge_gain: Interval     # bridge - stay
    reembed_gain: Interval    # re-embed - stay
    arr: Optional[Interval]   # bridge / re-embed
    level: float = 0.95
    queries: int = 0

    def as_dict(self) -> dict:
        def iv(x):
            return None if x is None else {"estimate": x.estimate, "lo": x.lo, "hi": x.hi}
        return {"metric": self.metric, "level": self.level, "queries": self.queries,
                "stay": iv(self.stay), "bridge": iv(self.bridge), "re-embed": iv(self.reembed),
                "bridge - stay": iv(self.bridge_gain),
                "re-embed - stay": iv(self.reembed_gain), "arr": iv(self.arr)}


@dataclass(frozen=True)
class Verdict:
    """decision : "bridge", "re-embed" or "stay"; reason : one sentence with the intervals
    that decided it; figures, rule : what it was decided from."""

    decision: str
    reason: str
    figures: Figures
    rule: Rule

    def as_dict(self) -> dict:
        return {"decision": self.decision, "reason": self.reason,
                "rule": {"arr_threshold": self.rule.arr_threshold,
                         "min_gain": self.rule.min_gain},
                "figures": self.figures.as_dict()}


def figures(stay, bridge, reembed, *, metric: str = "recall@10", resamples: int = 1000,
            level: float = 0.95, seed=0) -> Figures:
    """:class:`Figures` from per-query values: ``stay``, ``bridge``, ``reembed`` are (n,)
    real arrays (e.g. 0/1 hits at 10, per-query recall or nDCG), row i of each the same
    query. Every interval is a seeded percentile bootstrap over the queries
    (:mod:`bigalign.maths.bootstrap`); differences and the ratio resample the two systems'
    values together. Raises ValueError for empty, unequal or non-finite input."""
    s, b, r = (np.asarray(x, dtype=np.float64) for x in (stay, bridge, reembed))
    if not (s.shape == b.shape == r.shape) or s.ndim != 1:
        raise ValueError(f"stay, bridge and re-embed need one value per query each, got "
                         f"shapes {s.shape}, {b.shape}, {r.shape}")
    kw = dict(resamples=resamples, level=level, seed=seed)
    arr = ratio_interval(b, r, **kw) if r.sum() != 0 else None
    return Figures(metric, interval(s, **kw), interval(b, **kw), interval(r, **kw),
                   difference_interval(b, s, **kw), difference_interval(r, s, **kw), arr,
                   level, len(s))


def _iv(x: Interval, signed: bool = False) -> str:
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(x.estimate)} [{f.format(x.lo)}, {f.format(x.hi)}]"


def decide(f: Figures, rule: Rule = Rule()) -> Verdict:
    """The verdict of the module's rule on ``f``: deterministic, no resampling (the
    intervals are in ``f``). Returns a :class:`Verdict` whose reason quotes the intervals
    that decided it."""
    m, pct = f.metric, f"{round(f.level * 100)}%"
    gain_b, gain_r = f.bridge_gain, f.reembed_gain
    arr_ok = f.arr is None or f.arr.lo >= rule.arr_threshold
    bridge_up = gain_b.lo > rule.min_gain
    reembed_up = gain_r.lo > rule.min_gain
    arr_text = ("ARR undefined (re-embedding scores 0)" if f.arr is None else
                f"ARR {_iv(f.arr)}")
    floor = f"> {rule.min_gain:g}"
    if bridge_up and arr_ok:
        return Verdict("bridge", (
            f"bridging beats staying on {m} (bridge - stay {_iv(gain_b, True)}, {pct} "
            f"interval, lower end {floor}) and keeps enough of re-embedding ({arr_text}, "
            f"lower end >= {rule.arr_threshold:g}): map the old documents, no re-encoding"),
            f, rule)
    if reembed_up:
        why = (f"bridging does not beat staying (bridge - stay {_iv(gain_b, True)}, lower "
               f"end not {floor})" if not bridge_up else
               f"bridging keeps too little of it ({arr_text}, lower end < "
               f"{rule.arr_threshold:g})")
        return Verdict("re-embed", (
            f"re-embedding beats staying on {m} (re-embed - stay {_iv(gain_r, True)}, {pct} "
            f"interval, lower end {floor}) but {why}: re-encode the corpus"), f, rule)
    return Verdict("stay", (
        f"no migration is shown to beat staying on {m} (re-embed - stay {_iv(gain_r, True)}, "
        f"bridge - stay {_iv(gain_b, True)}, {pct} intervals, lower ends not {floor}): keep "
        "the old model, migrating costs compute for no measured gain"), f, rule)


def verdict(stay, bridge, reembed, *, metric: str = "recall@10", rule: Rule = Rule(),
            resamples: int = 1000, level: float = 0.95, seed=0) -> Verdict:
    """:func:`decide` on :func:`figures` of the per-query values (see both)."""
    return decide(figures(stay, bridge, reembed, metric=metric, resamples=resamples,
                          level=level, seed=seed), rule)
