"""bigalign.maths.verdict: the bridge / re-embed / stay rule on hand-made intervals (each
branch and its boundaries) and on planted per-query hits (intervals against an independent
bootstrap, determinism with a seed)."""

from __future__ import annotations

import numpy as np
import pytest

from bigalign.maths.bootstrap import Interval
from bigalign.maths.verdict import Figures, Rule, decide, figures, verdict


def iv(est, lo, hi):
    return Interval(float(est), float(lo), float(hi))


def made(gain_b, gain_r, arr, stay=0.5):
    """Figures with the comparisons given as (estimate, lo, hi) triples (arr may be None)."""
    return Figures("recall@10", iv(stay, stay - .02, stay + .02),
                   iv(stay + gain_b[0], 0, 1), iv(stay + gain_r[0], 0, 1),
                   iv(*gain_b), iv(*gain_r), None if arr is None else iv(*arr), 0.95, 500)


@pytest.mark.parametrize("gain_b, gain_r, arr, want", [
    # bridge: clearly above stay and keeps >= 95% of re-embed at the lower end
    ((.20, .15, .25), (.22, .17, .27), (.99, .96, 1.02), "bridge"),
    # bridge even where re-embed is not shown better (bridge beats re-embed)
    ((.05, .01, .09), (.01, -.02, .04), (1.05, 1.0, 1.1), "bridge"),
    # ARR point estimate fine but its lower end below 0.95: re-embed
    ((.20, .15, .25), (.22, .17, .27), (.97, .93, 1.01), "re-embed"),
    # bridge worse than staying (static64 -> MiniLM), re-embed far better
    ((-.10, -.13, -.07), (.47, .44, .50), (.39, .36, .42), "re-embed"),
    # bridge above stay point-wise but not shown (lower end <= 0): re-embed
    ((.03, -.01, .07), (.20, .15, .25), (.99, .97, 1.01), "re-embed"),
    # new model no better than the old (e5 -> MiniLM): stay
    ((-.05, -.07, -.03), (.0, -.01, .01), (.95, .93, .97), "stay"),
    # new model worse: stay
    ((-.2, -.25, -.15), (-.1, -.15, -.05), (.8, .7, .9), "stay"),
    # re-embed scores 0 everywhere (ARR undefined) and bridge is clearly up: bridge
    ((.1, .05, .15), (-.5, -.55, -.45), None, "bridge"),
])
def test_each_branch(gain_b, gain_r, arr, want):
    v = decide(made(gain_b, gain_r, arr))
    assert v.decision == want, v.reason
    assert v.reason.startswith({"bridge": "bridging beats", "re-embed": "re-embedding beats",
                                "stay": "no migration"}[want])
    # the reason quotes the intervals that decided it
    assert f"[{gain_r[1]:+.3f}, {gain_r[2]:+.3f}]" in v.reason or want == "bridge"
    assert f"[{gain_b[1]:+.3f}, {gain_b[2]:+.3f}]" in v.reason or \
        (want == "re-embed" and "keeps too little" in v.reason)


def test_boundaries_and_thresholds():
    # lower end exactly at the thresholds: a gain must be strictly above, ARR may equal
    assert decide(made((.2, 0.0, .3), (.2, 0.0, .3), (1, .95, 1.05))).decision == "stay"
    assert decide(made((.2, 1e-9, .3), (.2, .1, .3), (1, .95, 1.05))).decision == "bridge"
    f = made((.2, .1, .3), (.25, .15, .35), (.9, .85, .95))
    assert decide(f).decision == "re-embed"
    assert decide(f, Rule(arr_threshold=0.8)).decision == "bridge"
    # min_gain asks for more than any gain
    assert decide(f, Rule(arr_threshold=0.8, min_gain=0.12)).decision == "re-embed"
    assert decide(f, Rule(min_gain=0.2)).decision == "stay"
    for bad in (dict(arr_threshold=0), dict(arr_threshold=float("nan")),
                dict(min_gain=float("inf")), dict(arr_threshold="0.9")):
        with pytest.raises(ValueError):
            Rule(**bad)


def planted_hits(n, p_stay, p_bridge, p_reembed, seed):
    """Per-query 0/1 hits with the given rates, positively correlated across systems (one
    uniform per query, as real systems agree on easy queries)."""
    u = np.random.default_rng(seed).random(n)
    return [(u < p).astype(float) for p in (p_stay, p_bridge, p_reembed)]


@pytest.mark.parametrize("rates, want", [
    ((0.40, 0.79, 0.80), "bridge"),      # bridge keeps 99% of a large gain
    ((0.40, 0.30, 0.80), "re-embed"),    # bridge worse than staying
    ((0.40, 0.60, 0.80), "re-embed"),    # bridge gains, keeps 75%
    ((0.80, 0.70, 0.80), "stay"),        # new model no better
])
def test_planted_hits(rates, want):
    s, b, r = planted_hits(4000, *rates, seed=1)
    v = verdict(s, b, r, seed=3)
    assert v.decision == want, v.reason
    f = v.figures
    for x in (f.stay, f.bridge, f.reembed, f.bridge_gain, f.reembed_gain, f.arr):
        assert x.lo <= x.estimate <= x.hi
    assert f.stay.estimate == pytest.approx(s.mean())
    assert f.reembed_gain.estimate == pytest.approx(r.mean() - s.mean())
    assert f.arr.estimate == pytest.approx(b.mean() / r.mean())
    # determinism: the same seed gives the same figures, another seed other intervals
    assert verdict(s, b, r, seed=3).figures == f
    assert verdict(s, b, r, seed=4).figures.stay.lo != f.stay.lo or \
        verdict(s, b, r, seed=4).figures.stay.hi != f.stay.hi


def test_intervals_match_an_independent_bootstrap():
    """The difference interval against a plain loop over resampled indices (numpy): the
    percentile bounds agree to the Monte-Carlo error of 2,000 resamples."""
    s, b, r = planted_hits(600, 0.5, 0.6, 0.65, seed=7)
    f = figures(s, b, r, resamples=2000, seed=0)
    rng = np.random.default_rng(123)
    idx = rng.integers(0, 600, size=(2000, 600))
    diffs = (b[idx] - s[idx]).mean(axis=1)
    ratios = b[idx].mean(axis=1) / r[idx].mean(axis=1)
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    assert f.bridge_gain.lo == pytest.approx(lo, abs=0.01)
    assert f.bridge_gain.hi == pytest.approx(hi, abs=0.01)
    lo, hi = np.quantile(ratios, [0.025, 0.975])
    assert f.arr.lo == pytest.approx(lo, abs=0.015)
    assert f.arr.hi == pytest.approx(hi, abs=0.015)


def test_bad_input():
    with pytest.raises(ValueError, match="one value per query"):
        figures(np.ones(3), np.ones(4), np.ones(3))
    with pytest.raises(ValueError, match="NaN"):
        figures(np.ones(3), np.ones(3), np.array([1, np.nan, 0]))
    f = figures(np.zeros(5), np.ones(5), np.zeros(5))
    assert f.arr is None and "ARR undefined" in decide(f).reason
    assert decide(f).decision == "bridge"
    d = decide(f).as_dict()
    assert d["figures"]["arr"] is None and d["rule"]["arr_threshold"] == 0.95
