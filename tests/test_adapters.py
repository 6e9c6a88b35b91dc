"""Adapter families from the statistics (bigalign.maths.adapters) against in-memory float64
numpy/scipy references: the streamed statistics give the reference maps, the closed-form
residuals equal explicit sums over rows, and the held-out tuning equals brute force."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg

from bigalign.maths.adapters import (FAMILIES, Adapter, candidates, choose_rank, choose_ridge,
                                     default_rank_grid, default_ridge_grid,
                                     relative_residual_on, residual_on, ridge_scale, solve)
from bigalign.maths.solve import NotUniqueWarning
from bigalign.maths.stats import Moments, block_moments, merge_all

DIMS = [(6, 9), (9, 6), (8, 8)]


def linear_pairs(n, dim_a, dim_b, *, noise=0.3, rank=None, seed=0):
    """Rows with offsets and an anisotropic planted linear map (of ``rank`` when given)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, dim_a)) * np.linspace(0.5, 2.0, dim_a) + rng.standard_normal(dim_a)
    w = rng.standard_normal((dim_a, dim_b))
    if rank is not None:
        w = rng.standard_normal((dim_a, rank)) @ rng.standard_normal((rank, dim_b))
    b = a @ w + noise * rng.standard_normal((n, dim_b)) + 3.0 * rng.standard_normal(dim_b)
    return a, b


def streamed(a, b, step=37, gram=True):
    """Statistics merged over blocks, as the streaming fit computes them (float64)."""
    return merge_all(block_moments(a[i:i + step], b[i:i + step], gram=gram, dtype=np.float64)
                     for i in range(0, len(a), step))


def centred(a, b, center):
    return (a - a.mean(0), b - b.mean(0)) if center else (a, b)


def explicit_residual(adapter: Adapter, a, b) -> float:
    y = (a - adapter.source_mean) @ adapter.matrix + adapter.target_mean
    return float(np.sum((y - b) ** 2))


def procrustes_oracle(ac, bc):
    """scipy's orthogonal Procrustes on the zero-padded rows, cut back to (dA, dB)."""
    d = max(ac.shape[1], bc.shape[1])
    pad = lambda x: np.hstack([x, np.zeros((len(x), d - x.shape[1]))])  # noqa: E731
    r, _ = scipy.linalg.orthogonal_procrustes(pad(ac), pad(bc))
    return r[:ac.shape[1], :bc.shape[1]]


def reference(family, a, b, center, *, ridge=0.0, rank=None):
    """(matrix, target offset = target_mean - source_mean @ matrix) from the rows."""
    ac, bc = centred(a, b, center)
    dim_a, dim_b = a.shape[1], b.shape[1]
    if family in ("orthogonal", "similarity"):
        q = procrustes_oracle(ac, bc)
        s = float(np.sum((ac @ q) * bc) / np.sum((ac @ q) ** 2)) if family == "similarity" else 1.0
        w = s * q
    elif family == "affine":  # intercept column when centred
        x = np.hstack([a, np.ones((len(a), 1))]) if center else a
        sol = np.linalg.lstsq(x, b, rcond=None)[0]
        w = sol[:dim_a]
        return w, (sol[dim_a] if center else np.zeros(dim_b))
    elif family == "ridge":  # augmented least squares: [Ac; sqrt(lam) I] W = [Bc; 0]
        x = np.vstack([ac, np.sqrt(ridge) * np.eye(dim_a)])
        w = np.linalg.lstsq(x, np.vstack([bc, np.zeros((dim_a, dim_b))]), rcond=None)[0]
    else:  # reduced rank: project the least-squares fit onto its top-r right singular vectors
        w_ls = np.linalg.lstsq(ac, bc, rcond=None)[0]
        v = np.linalg.svd(ac @ w_ls, full_matrices=False)[2][:rank].T
        w = w_ls @ v @ v.T
    offset = b.mean(0) - a.mean(0) @ w if center else np.zeros(dim_b)
    return w, offset


def params_for(family, m, center):
    if family == "ridge":
        return {"ridge": 0.7 * ridge_scale(m, center)}
    if family == "reduced-rank":
        return {"rank": 3}
    return {}


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("family", FAMILIES)
def test_streamed_statistics_give_the_reference_map(family, center, dims):
    a, b = linear_pairs(220, *dims, seed=10 * FAMILIES.index(family) + DIMS.index(dims))
    m = streamed(a, b)
    kw = params_for(family, m, center)
    ad = solve(m, family, center=center, **kw)
    w, offset = reference(family, a, b, center, **kw)
    scale = np.abs(w).max()
    np.testing.assert_allclose(ad.matrix, w, rtol=1e-8, atol=1e-9 * scale)
    np.testing.assert_allclose(ad.target_mean - ad.source_mean @ ad.matrix, offset,
                               rtol=1e-8, atol=1e-8 * np.abs(b).max())
    assert ad.matrix.shape == dims and ad.matrix.dtype == np.float64
    np.testing.assert_allclose(ad.scale * ad.rotation, ad.matrix, rtol=1e-15, atol=0)
    if not center:
        assert not ad.source_mean.any() and not ad.target_mean.any()
    # the closed-form training residual is the explicit one
    assert ad.residual == pytest.approx(explicit_residual(ad, a, b), rel=1e-8)
    assert ad.relative_residual == pytest.approx(ad.residual / np.sum((b - b.mean(0)) ** 2))
    assert ad.orthogonal == (family in ("orthogonal", "similarity"))
    if family == "similarity":
        assert ad.params == {"scale": ad.scale}
        np.testing.assert_allclose(ad.rotation, procrustes_oracle(*centred(a, b, center)),
                                   atol=1e-9)
    elif family in ("ridge", "reduced-rank"):
        assert ad.params == kw and ad.selection is None


@pytest.mark.parametrize("dims", DIMS)
@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("family", FAMILIES)
def test_heldout_residual_is_the_explicit_sum(family, center, dims):
    a, b = linear_pairs(300, *dims, seed=7)
    m = streamed(a[:180], b[:180])
    held = streamed(a[180:], b[180:], step=29)
    ad = solve(m, family, center=center, **params_for(family, m, center))
    direct = explicit_residual(ad, a[180:], b[180:])
    assert residual_on(ad, held) == pytest.approx(direct, rel=1e-8)
    spread = np.sum((b[180:] - b[180:].mean(0)) ** 2)
    assert relative_residual_on(ad, held) == pytest.approx(direct / spread, rel=1e-8)
    # and as the map is applied (AffineMap, the apply kernel) in float64
    mapped = ad.to_map()(a[180:], dtype=np.float64)
    assert np.sum((mapped - b[180:]) ** 2) == pytest.approx(direct, rel=1e-8)


@pytest.mark.parametrize("dims", [(6, 9), (8, 8)])
def test_orthogonal_needs_no_gram_when_da_le_db(dims):
    a, b = linear_pairs(200, *dims, seed=3)
    m, held = streamed(a[:120], b[:120], gram=False), streamed(a[120:], b[120:], gram=False)
    for family in ("orthogonal", "similarity"):
        ad = solve(m, family)
        assert ad.residual == pytest.approx(explicit_residual(ad, a[:120], b[:120]), rel=1e-8)
        assert residual_on(ad, held) == pytest.approx(
            explicit_residual(ad, a[120:], b[120:]), rel=1e-8)


def test_orthogonal_without_gram_when_da_gt_db():
    a, b = linear_pairs(200, 9, 6, seed=3)
    m = streamed(a, b, gram=False)
    ad = solve(m, "orthogonal")
    assert ad.residual is None and ad.relative_residual is None
    with pytest.raises(ValueError, match="Gram"):
        residual_on(ad, m)
    with pytest.raises(ValueError, match="Gram"):
        solve(m, "similarity")


def test_no_reflection_gives_a_proper_rotation():
    a, b = linear_pairs(200, 5, 5, seed=1)
    b[:, 0] *= -1
    ad = solve(streamed(a, b), "orthogonal", reflection=False)
    assert np.linalg.det(ad.rotation) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="equal dimensions"):
        solve(streamed(*linear_pairs(50, 4, 6)), "orthogonal", reflection=False)


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("dims", DIMS)
def test_choose_ridge_is_brute_force(center, dims):
    a, b = linear_pairs(120, *dims, noise=2.0, seed=5)
    m, held = streamed(a[:40], b[:40]), streamed(a[40:], b[40:])
    lam, table = choose_ridge(m, held, center=center)
    grid = default_ridge_grid(m, center)
    assert [v for v, _ in table] == pytest.approx(list(grid))
    brute = [residual_on(solve(m, "ridge", center=center, ridge=v), held) for v in grid]
    np.testing.assert_allclose([r for _, r in table], brute, rtol=1e-7)
    assert lam == grid[int(np.argmin(brute))]
    # a user grid with 0 (= least squares) in it
    lam0, table0 = choose_ridge(m, held, center=center, grid=[0.0, 1.0])
    assert table0[0][1] == pytest.approx(residual_on(solve(m, "affine", center=center), held),
                                         rel=1e-7)


def test_ridge_helps_with_few_noisy_pairs():
    a, b = linear_pairs(140, 12, 10, noise=4.0, seed=2)
    m, held = streamed(a[:20], b[:20]), streamed(a[20:], b[20:])
    lam, table = choose_ridge(m, held)
    assert lam > 0
    assert residual_on(solve(m, "ridge", ridge=lam), held) < \
        residual_on(solve(m, "affine"), held)


@pytest.mark.parametrize("center", [True, False])
@pytest.mark.parametrize("dims", DIMS)
def test_choose_rank_is_brute_force(center, dims):
    a, b = linear_pairs(200, *dims, noise=1.0, rank=2, seed=9)
    m, held = streamed(a[:60], b[:60]), streamed(a[60:], b[60:])
    r, table = choose_rank(m, held, center=center)
    grid = list(default_rank_grid(dims))
    assert [v for v, _ in table] == grid == list(range(1, min(dims) + 1))
    brute = [residual_on(solve(m, "reduced-rank", center=center, rank=v), held) for v in grid]
    np.testing.assert_allclose([x for _, x in table], brute, rtol=1e-7)
    assert r == grid[int(np.argmin(brute))]
    assert r <= 3  # the planted map has rank 2


def test_default_rank_grid_is_log_spaced_when_wide():
    g = default_rank_grid((300, 1000))
    assert g[0] == 1 and g[-1] == 300 and np.all(np.diff(g) > 0) and len(g) <= 32


def test_affine_beats_orthogonal_on_an_anisotropic_map():
    a, b = linear_pairs(600, 8, 8, noise=0.2, seed=4)
    m, held = streamed(a[:400], b[:400]), streamed(a[400:], b[400:])
    aff, orth = solve(m, "affine"), solve(m, "orthogonal")
    assert relative_residual_on(aff, held) < 0.5 * relative_residual_on(orth, held)


def test_orthogonal_beats_affine_with_few_pairs_on_a_rotation():
    rng = np.random.default_rng(6)
    d = 20
    q, _ = np.linalg.qr(rng.standard_normal((d, d)))
    a = rng.standard_normal((400, d))
    b = a @ q + 0.7 * rng.standard_normal((400, d))
    m, held = streamed(a[:30], b[:30]), streamed(a[30:], b[30:])
    assert residual_on(solve(m, "orthogonal"), held) < residual_on(solve(m, "affine"), held)


def test_candidates_one_per_family_tuned_on_heldout():
    a, b = linear_pairs(300, 7, 9, noise=1.0, seed=8)
    m, held = streamed(a[:150], b[:150]), streamed(a[150:], b[150:])
    with warnings.catch_warnings():
        warnings.simplefilter("error", NotUniqueWarning)
        out = candidates(m, held)
    assert [c.family for c in out] == list(FAMILIES)
    by = {c.family: c for c in out}
    assert by["ridge"].params["ridge"] == choose_ridge(m, held)[0]
    assert by["reduced-rank"].params["rank"] == choose_rank(m, held)[0]
    assert by["ridge"].selection["by"] == "held-out"
    assert len(by["reduced-rank"].selection["table"]) == 7
    defaults = candidates(m, families=("ridge", "reduced-rank"), center=False)
    assert all(c.selection["by"] == "default" and not c.center for c in defaults)
    assert 1 <= defaults[1].params["rank"] <= 7


def test_refusals():
    a, b = linear_pairs(100, 5, 7, seed=0)
    m, no_gram = streamed(a, b), streamed(a, b, gram=False)
    with pytest.raises(ValueError, match="unknown adapter family 'lasso'"):
        solve(m, "lasso")
    with pytest.raises(ValueError, match="zero rows"):
        solve(Moments.empty(5, 7, gram=True), "affine")
    for family in ("affine", "ridge", "reduced-rank"):
        with pytest.raises(ValueError, match="Gram"):
            solve(no_gram, family)
    with pytest.raises(ValueError, match="Gram"):
        residual_on(solve(m, "affine"), no_gram)
    with pytest.raises(ValueError, match="Gram"):
        choose_ridge(m, no_gram)
    for bad in (0, 6, 2.5, True):
        with pytest.raises(ValueError, match="rank must be an integer from 1 to"):
            solve(m, "reduced-rank", rank=bad)
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="ridge penalty must be a finite number >= 0"):
            solve(m, "ridge", ridge=bad)
    with pytest.raises(ValueError, match="ridge= applies"):
        solve(m, "affine", ridge=1.0)
    with pytest.raises(ValueError, match="rank= applies"):
        solve(m, "ridge", rank=2)
    with pytest.raises(ValueError, match="held-out statistics have dimensions"):
        residual_on(solve(m, "affine"), streamed(b, a))
    with pytest.raises(ValueError, match="zero rows"):
        residual_on(solve(m, "affine"), Moments.empty(5, 7, gram=True))
    with pytest.raises(ValueError, match="empty ridge grid"):
        choose_ridge(m, m, grid=[])
    with pytest.raises(ValueError, match="unknown adapter family"):
        candidates(m, families=("affine", "nope"))
