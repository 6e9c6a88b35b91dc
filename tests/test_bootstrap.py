"""Bootstrap intervals (bigalign.maths.bootstrap) against slow per-resample loops, known
distributions and coverage of planted means."""

from __future__ import annotations

import numpy as np
import pytest

from bigalign.maths.bootstrap import (_resampled_means, difference_interval, interval,
                                      ratio_interval)


def loop_reference(cols, statistic, resamples, seed, level=0.95):
    """One resample at a time: n indices with replacement, the statistic of the means."""
    rng = np.random.default_rng(seed)
    n = len(cols)
    stats = []
    for _ in range(resamples):
        idx = rng.integers(0, n, size=n)
        stats.append(statistic(cols[idx].mean(axis=0)))
    tail = (1 - level) / 2
    return np.quantile(stats, [tail, 1 - tail]), np.std(stats)


def close(got, ref, spread, tol=0.15, step=0.0):
    """Both ends within ``tol`` bootstrap standard deviations (Monte-Carlo error of the
    2.5% quantile with 4,000 resamples is ~0.04 of them) plus one ``step`` of the lattice
    the statistic lives on (means of n 0/1 values: multiples of 1/n)."""
    slack = tol * spread + step
    assert abs(got.lo - ref[0]) < slack and abs(got.hi - ref[1]) < slack


@pytest.mark.parametrize("binary", [True, False])
def test_mean_interval_matches_a_loop(binary):
    rng = np.random.default_rng(1)
    x = (rng.random(300) < 0.3).astype(float) if binary else rng.exponential(size=300)
    got = interval(x, resamples=4000, seed=2)
    ref, spread = loop_reference(x[:, None], lambda m: m[0], 4000, seed=3)
    assert got.estimate == x.mean()
    close(got, ref, spread)


@pytest.mark.parametrize("binary", [True, False])
def test_ratio_is_paired(binary):
    """den and num share most of their variation: resampled together, the ratio is far
    tighter than if they were resampled apart."""
    rng = np.random.default_rng(4)
    n = 400
    if binary:
        den = (rng.random(n) < 0.5).astype(float)
        num = den * (rng.random(n) < 0.9)                 # bridge hits ~ 90% of re-embed's
    else:
        den = rng.exponential(size=n) + 0.1
        num = 0.8 * den + 0.05 * rng.standard_normal(n)
    cols = np.stack([num, den], axis=1)
    got = ratio_interval(num, den, resamples=4000, seed=5)
    assert got.estimate == pytest.approx(num.mean() / den.mean())
    ref, spread = loop_reference(cols, lambda m: m[0] / m[1], 4000, seed=6)
    close(got, ref, spread)
    unpaired = interval(num, resamples=4000, seed=7)
    assert got.hi - got.lo < 0.6 * (unpaired.hi - unpaired.lo) / den.mean()


@pytest.mark.parametrize("binary", [True, False])
def test_difference_is_paired(binary):
    rng = np.random.default_rng(8)
    n = 500
    if binary:
        a = (rng.random(n) < 0.6).astype(float)
        b = np.where(rng.random(n) < 0.05, 1 - a, a)      # b disagrees with a on ~5%
    else:
        a = rng.standard_normal(n)
        b = a + 0.1 + 0.1 * rng.standard_normal(n)
    got = difference_interval(a, b, resamples=4000, seed=9)
    assert got.estimate == pytest.approx(a.mean() - b.mean())
    ref, spread = loop_reference(np.stack([a, b], 1), lambda m: m[0] - m[1], 4000, seed=10)
    close(got, ref, spread, step=1 / n if binary else 0.0)
    # paired, the interval is that of mean(a - b), far narrower than a's alone
    alone = interval(a, resamples=4000, seed=11)
    assert got.hi - got.lo < 0.5 * (alone.hi - alone.lo)


def test_grouped_and_index_paths_agree():
    """The grouped (multinomial) path and the index path draw the same distribution."""
    rng = np.random.default_rng(12)
    cols = np.stack([(rng.random(2000) < 0.2), (rng.random(2000) < 0.7)], 1).astype(float)
    g = _resampled_means(cols, 20000, 1, grouped=True)
    i = _resampled_means(cols, 20000, 2, grouped=False)
    np.testing.assert_allclose(g.mean(0), cols.mean(0), atol=3e-4)
    np.testing.assert_allclose(i.mean(0), cols.mean(0), atol=3e-4)
    # the bootstrap variance of a mean of n values is var / n (population variance)
    np.testing.assert_allclose(g.var(0), cols.var(0) / 2000, rtol=0.05)
    np.testing.assert_allclose(i.var(0), cols.var(0) / 2000, rtol=0.05)
    np.testing.assert_allclose(np.cov(g.T)[0, 1], np.cov(i.T)[0, 1],
                               atol=0.1 * np.sqrt(g.var(0).prod()))


def test_bernoulli_coverage():
    """The true p lies inside the 95% interval in about 95% of seeded samples."""
    p, n, trials = 0.3, 200, 200
    rng = np.random.default_rng(13)
    inside = 0
    for t in range(trials):
        x = (rng.random(n) < p).astype(float)
        ci = interval(x, resamples=1000, seed=t)
        inside += ci.lo <= p <= ci.hi
    assert 0.88 * trials <= inside <= trials


def test_continuous_coverage():
    mu, n, trials = 1.0, 100, 100
    rng = np.random.default_rng(14)
    inside = sum(
        (lambda ci: ci.lo <= mu <= ci.hi)(interval(rng.exponential(mu, n), resamples=500, seed=t))
        for t in range(trials))
    assert inside >= 85


def test_seeded_and_deterministic():
    rng = np.random.default_rng(15)
    x = rng.standard_normal(1000)
    hits = (x > 0.3).astype(np.int8)
    for values in (x, hits):
        assert interval(values, seed=3) == interval(values, seed=3)
        assert interval(values, seed=3) != interval(values, seed=4)
    assert ratio_interval(hits, x > 0, seed=1) == ratio_interval(hits, x > 0, seed=1)
    assert difference_interval(x, x[::-1], seed=1) == difference_interval(x, x[::-1], seed=1)


def test_level_widens_and_constant_collapses():
    x = np.random.default_rng(16).standard_normal(500)
    wide, narrow = interval(x, level=0.99), interval(x, level=0.5)
    assert wide.lo < narrow.lo < narrow.hi < wide.hi
    assert interval(np.full(50, 0.25)) == (0.25, 0.25, 0.25)
    assert difference_interval(x, x) == (0.0, 0.0, 0.0)


def test_ratio_with_resamples_of_zero_denominator():
    den = np.zeros(30)
    den[0] = 1.0
    num = np.ones(30)
    got = ratio_interval(num, den, resamples=500, seed=0)
    assert got.estimate == 30.0 and got.hi == np.inf  # ~1/e of resamples miss the one hit


def test_refusals():
    with pytest.raises(ValueError, match="empty"):
        interval([])
    with pytest.raises(ValueError, match="empty"):
        ratio_interval([], [])
    with pytest.raises(ValueError, match="1-D"):
        interval(np.zeros((3, 2)))
    with pytest.raises(ValueError, match="one length"):
        difference_interval([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="NaN or Inf"):
        interval([1.0, np.nan])
    with pytest.raises(ValueError, match="numbers"):
        interval(np.array(["a", "b"]))
    with pytest.raises(ValueError, match="resamples"):
        interval([1.0], resamples=0)
    with pytest.raises(ValueError, match="level"):
        interval([1.0], level=1.0)
    with pytest.raises(ValueError, match="denominator's mean"):
        ratio_interval([1.0, 0.0], [0.0, 0.0])
