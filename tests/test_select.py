"""Map families in fit (bigalign/commands/fit.py, select.py; bigalign/planning/holdout.py;
bigalign/maths/selection.py, stats.subtract): every family's streaming fit equals an
in-memory float64 numpy reference; auto holds out, scores, chooses and refits; the
families travel through apply, Transform.transform, invert, compose and export."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

import bigalign
from bigalign import InputError
from bigalign.maths.selection import choose, own_ranks, retrieval_hits
from bigalign.maths.stats import block_moments, merge, subtract
from bigalign.planning.holdout import holdout_rows, holdout_windows
from conftest import make_store, write_zarr


def anisotropic(n, dim_a, dim_b, seed=0, noise=0.05):
    """B = A W + c + noise with W far from orthogonal (gains 0.2 .. 3): least squares
    fits it, an orthogonal map cannot."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n, dim_a)) + 0.5
    u, _ = np.linalg.qr(rng.standard_normal((dim_a, dim_a)))
    v, _ = np.linalg.qr(rng.standard_normal((dim_b, dim_b)))
    k = min(dim_a, dim_b)
    w = u[:, :k] @ np.diag(np.linspace(0.2, 3.0, k)) @ v[:, :k].T
    b = a @ w + 1.0 + noise * rng.standard_normal((n, dim_b))
    return a.astype(np.float32), b.astype(np.float32)


def lstsq_reference(a, b, center, ridge=0.0):
    """float64 in memory: W (and means) of min ||(A - mu) W + nu - B||^2 + ridge ||W||^2."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    mu = a64.mean(0) if center else np.zeros(a.shape[1])
    nu = b64.mean(0) if center else np.zeros(b.shape[1])
    x, y = a64 - mu, b64 - nu
    w = np.linalg.solve(x.T @ x + ridge * np.eye(a.shape[1]), x.T @ y)
    return w, mu, nu


# ---- pure pieces ---------------------------------------------------------------------

def test_subtract_is_merge_backwards():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(400, 5)) + 3, rng.normal(size=(400, 7)) - 1
    kw = dict(gram=True, dtype=np.float64)
    total, part = block_moments(a, b, **kw), block_moments(a[50:90], b[50:90], **kw)
    rest = block_moments(np.r_[a[:50], a[90:]], np.r_[b[:50], b[90:]], **kw)
    got = subtract(total, part)
    assert got.n == 360
    for f in ("mean_a", "mean_b", "cross", "gram_a", "gram_b"):
        np.testing.assert_allclose(getattr(got, f), getattr(rest, f), atol=1e-9)
    assert got.sq_b == pytest.approx(rest.sq_b, rel=1e-12)
    back = merge(got, part)
    np.testing.assert_allclose(back.cross, total.cross, atol=1e-9)
    with pytest.raises(ValueError, match="at least one row"):
        subtract(part, part)


def test_holdout_windows_are_disjoint_sorted_seeded():
    for start, stop, count in ((0, 1000, 200), (7, 50, 21), (0, 10, 9), (100, 10**9, 10_000)):
        w = holdout_windows(start, stop, count, seed=3)
        assert sum(b - a for a, b in w) == count
        assert all(start <= a < b <= stop for a, b in w)
        assert all(w[i][1] <= w[i + 1][0] for i in range(len(w) - 1))
        assert len(w) <= 16
        assert w == holdout_windows(start, stop, count, seed=3)
    assert holdout_windows(0, 10**6, 1000, seed=1) != holdout_windows(0, 10**6, 1000, seed=2)
    # spread over the rows, not a tail: windows in every quarter of a large range
    w = holdout_windows(0, 10**6, 1600, seed=0)
    assert {a * 4 // 10**6 for a, _ in w} == {0, 1, 2, 3}
    assert holdout_rows(1000, 0.2, 10_000) == 200 and holdout_rows(10**9, 0.2, 5000) == 5000
    assert holdout_rows(10, 0.9, 100) == 5  # never more than half
    with pytest.raises(ValueError):
        holdout_rows(3, 0.5, 10)


def test_own_ranks_and_hits_against_a_loop():
    rng = np.random.default_rng(2)
    q, d = rng.normal(size=(50, 8)), rng.normal(size=(50, 8))
    s = q @ d.T
    ref = np.array([(s[i] > s[i, i]).sum() for i in range(50)])
    np.testing.assert_array_equal(own_ranks(q, d, block=7), ref)
    hits = retrieval_hits(d + 0.01 * q, d)
    assert hits["forward@1"].all() and hits["backward@10"].all()


def test_choose_ties_go_to_the_lower_residual_then_the_first():
    rows = [{"score": 0.5, "heldout_relative_residual": 0.3},
            {"score": 0.7, "heldout_relative_residual": 0.9},
            {"score": 0.7, "heldout_relative_residual": 0.4}]
    assert choose(rows) == 2
    assert choose(rows[:2] + [dict(rows[1])]) == 1
    # residuals equal but for round-off (reduced-rank at full rank is affine): the simpler
    rows = [{"score": 0.4, "heldout_relative_residual": 0.7140000000001},
            {"score": 0.4, "heldout_relative_residual": 0.7139999999999}]
    assert choose(rows) == 0


# ---- every family through fit -------------------------------------------------------

@pytest.mark.parametrize("dims", [(6, 6), (5, 9), (9, 5)])
@pytest.mark.parametrize("center", [True, False])
def test_affine_and_ridge_fits_equal_numpy(tmp_path, dims, center):
    a, b = anisotropic(900, *dims, seed=sum(dims))
    s, t = write_zarr(tmp_path / "a.zarr", a, 100), write_zarr(tmp_path / "b.zarr", b, 70)
    for method, lam in (("affine", 0.0), ("ridge", 3.0)):
        tr = bigalign.fit(s, t, method=method, center=center, precision="float64",
                          **({"ridge": lam} if method == "ridge" else {}))
        w, mu, nu = lstsq_reference(a, b, center, lam)
        np.testing.assert_allclose(tr.rotation, w, atol=1e-6, rtol=1e-6)
        np.testing.assert_allclose(tr.source_mean, mu, atol=1e-9)
        np.testing.assert_allclose(tr.target_mean, nu, atol=1e-9)
        assert tr.scale == 1.0 and tr.options["family"] == method
        assert tr.metadata["orthogonal"] is False and "bound" in tr.metadata
        res = (a.astype(np.float64) - mu) @ w + nu - b  # float64 statistics: resolved
        assert tr.metadata["residual"] == pytest.approx(float((res ** 2).sum()), rel=1e-6)


def test_reduced_rank_equals_the_svd_of_the_fitted_values(tmp_path):
    a, b = anisotropic(800, 8, 10, seed=5)
    s, t = write_zarr(tmp_path / "a.zarr", a, 100), write_zarr(tmp_path / "b.zarr", b, 100)
    tr = bigalign.fit(s, t, method="reduced-rank", rank=3)
    w, mu, _ = lstsq_reference(a, b, True)
    fitted = (a.astype(np.float64) - mu) @ w
    _, _, vt = np.linalg.svd(fitted, full_matrices=False)
    ref = w @ vt[:3].T @ vt[:3]
    np.testing.assert_allclose(tr.rotation, ref, atol=1e-6)
    assert np.linalg.matrix_rank(tr.rotation, tol=1e-8) == 3
    assert tr.metadata["params"] == {"rank": 3}


def test_similarity_is_scale(tmp_path):
    a, b = anisotropic(500, 6, 6, seed=7)
    s, t = write_zarr(tmp_path / "a.zarr", a, 100), write_zarr(tmp_path / "b.zarr", b, 100)
    one = bigalign.fit(s, t, method="similarity")
    two = bigalign.fit(s, t, scale=True)
    np.testing.assert_array_equal(one.rotation, two.rotation)
    assert one.scale == two.scale != 1.0
    assert one.options["family"] == two.options["family"] == "similarity"


def test_apply_equals_transform_and_ids_equal_rows_for_every_family(tmp_path):
    a, b = anisotropic(600, 6, 8, seed=9)
    ids = np.arange(600) * 7
    src = make_store(tmp_path / "src.store", a, ids)
    order = np.random.default_rng(0).permutation(600)  # the target in another order
    tgt = make_store(tmp_path / "tgt.store", b[order], ids[order])
    sa, sb = write_zarr(tmp_path / "a.zarr", a, 100), write_zarr(tmp_path / "b.zarr", b, 100)
    for method in ("orthogonal", "similarity", "affine", "ridge", "reduced-rank"):
        kw = {"ridge": 1.0} if method == "ridge" else {"rank": 4} if method == "reduced-rank" \
            else {}
        by_rows = bigalign.fit(sa, sb, method=method, **kw)
        by_ids = bigalign.fit(src, tgt, method=method, **kw)
        np.testing.assert_allclose(by_ids.rotation, by_rows.rotation, atol=1e-6)
        out = str(tmp_path / f"{method}.zarr")
        by_rows.save(str(tmp_path / f"{method}.transform"))
        bigalign.apply(str(tmp_path / f"{method}.transform"), sa, out)
        np.testing.assert_array_equal(zarr.open_array(out)[:], by_rows.transform(a))


def test_auto_prefers_affine_on_an_anisotropic_map_and_records_why(tmp_path):
    a, b = anisotropic(3000, 8, 8, seed=11, noise=0.02)
    s, t = write_zarr(tmp_path / "a.zarr", a, 250), write_zarr(tmp_path / "b.zarr", b, 250)
    tr = bigalign.fit(s, t, method="auto", seed=4)
    sel = tr.metadata["selection"]
    assert tr.options["method"] == "auto" and sel["chosen"] == tr.options["family"]
    assert sel["chosen"] in ("affine", "ridge", "reduced-rank")  # not an orthogonal map
    fams = [c["family"] for c in sel["candidates"]]
    assert fams == ["orthogonal", "similarity", "affine", "ridge", "reduced-rank"]
    assert sum(c["chosen"] for c in sel["candidates"]) == 1
    orth = sel["candidates"][0]
    win = next(c for c in sel["candidates"] if c["chosen"])
    assert win["heldout_relative_residual"] < orth["heldout_relative_residual"]
    lo, hi = win["score_interval"]
    assert lo <= win["score"] <= hi
    assert sel["holdout"]["rows"] == 600 and sel["holdout"]["seed"] == 4
    # refitted on all pairs: equal to that family fitted directly with the chosen parameter
    kw = {k: v for k, v in sel["params"].items() if k in ("ridge", "rank")}
    direct = bigalign.fit(s, t, method=sel["chosen"], **kw)
    np.testing.assert_allclose(tr.rotation, direct.rotation, atol=1e-9)
    # the held-out residual of a candidate is the one of a fit that never saw those rows
    rows = np.concatenate([np.arange(w0, w1) for w0, w1 in sel["holdout"]["windows"]])
    keep = np.setdiff1d(np.arange(3000), rows)
    w, mu, nu = lstsq_reference(a[keep], b[keep], True)
    aff = next(c for c in sel["candidates"] if c["family"] == "affine")
    res = (a[rows].astype(np.float64) - mu) @ w + nu - b[rows]
    spread = ((b[rows] - b[rows].astype(np.float64).mean(0)) ** 2).sum()
    assert aff["heldout_relative_residual"] == pytest.approx((res ** 2).sum() / spread, rel=1e-5)


def test_auto_keeps_orthogonal_on_a_noisy_rotation(tmp_path):
    from conftest import planted
    a, b, _ = planted(400, 24, noise=0.6, seed=12)  # few pairs, much noise: LS overfits
    s, t = write_zarr(tmp_path / "a.zarr", a, 100), write_zarr(tmp_path / "b.zarr", b, 100)
    tr = bigalign.fit(s, t, method="auto")
    assert tr.options["family"] in ("orthogonal", "similarity")
    assert "discrepancy" in tr.metadata  # an orthogonal map keeps the paper's bound


def test_ridge_without_a_penalty_chooses_one_on_held_out_pairs(tmp_path):
    a, b = anisotropic(1000, 10, 10, seed=13, noise=0.5)
    s, t = write_zarr(tmp_path / "a.zarr", a, 100), write_zarr(tmp_path / "b.zarr", b, 100)
    tr = bigalign.fit(s, t, method="ridge")
    sel = tr.metadata["selection"]
    lam = sel["params"]["ridge"]
    assert lam == tr.metadata["params"]["ridge"]
    table = sel["grid"]["table"]
    assert min(table, key=lambda r: r[1])[0] == lam
    w, _, _ = lstsq_reference(a, b, True, lam)
    np.testing.assert_allclose(tr.rotation, w, atol=1e-6)


def test_family_options_are_checked(tmp_path):
    a, b = anisotropic(100, 4, 4)
    s, t = write_zarr(tmp_path / "a.zarr", a, 50), write_zarr(tmp_path / "b.zarr", b, 50)
    for kw, msg in (({"method": "lasso"}, "--method must be one of"),
                    ({"method": "affine", "diagnostics": False}, "needs the Gram"),
                    ({"method": "affine", "ridge": 1.0}, "--ridge is the penalty"),
                    ({"method": "ridge", "ridge": -1.0}, "--ridge must be"),
                    ({"method": "affine", "scale": True}, "--scale is a similarity"),
                    ({"holdout": 1.5}, "--holdout")):
        with pytest.raises(InputError, match=msg):
            bigalign.fit(s, t, **kw)
    for kw in ({"method": "auto"}, {"method": "ridge"}):  # 3 pairs: none to hold out
        with pytest.raises(InputError, match="3 pairs are too few"):
            bigalign.fit(s, t, rows="0:3", **kw)


def test_non_orthogonal_maps_invert_compose_and_export(tmp_path):
    from bigalign.commands.compose import compose, invert
    from bigalign.commands.map_export import export

    a, b = anisotropic(500, 6, 6, seed=14)
    s, t = write_zarr(tmp_path / "a.zarr", a, 100), write_zarr(tmp_path / "b.zarr", b, 100)
    tr = bigalign.fit(s, t, method="affine")
    back = invert(tr)
    x = a[:20].astype(np.float64)
    np.testing.assert_allclose(back.transform(tr.transform(x, dtype=np.float64),
                                              dtype=np.float64), x, atol=1e-8)
    assert "not a map fitted from target to source" in back.metadata["inverse"]["meaning"]
    both = compose(tr, back)
    np.testing.assert_allclose(both.transform(x, dtype=np.float64), x, atol=1e-8)
    r = export(tr, str(tmp_path / "m.npz"))
    f = np.load(str(tmp_path / "m.npz"))
    np.testing.assert_allclose((x - f["forward_source_mean"]) @ f["forward_matrix"]
                               + f["forward_target_mean"], tr.transform(x, dtype=np.float64),
                               atol=1e-10)
    assert r.metadata["transform_options"]["family"] == "affine"
    tr.save(str(tmp_path / "aff.transform"))
    again = bigalign.Transform.load(str(tmp_path / "aff.transform"))
    assert again.options["family"] == "affine" and again.metadata["orthogonal"] is False


def test_options_auto_does_not_read_are_not_part_of_an_orthogonal_fits_identity(tmp_path):
    """A finished orthogonal fit rerun with another --select or --holdout is the same job
    (a no-op); for auto they choose the map, so they are another job."""
    a, b = anisotropic(400, 4, 4, seed=15)
    s, t = write_zarr(tmp_path / "a.zarr", a, 100), write_zarr(tmp_path / "b.zarr", b, 100)
    out = str(tmp_path / "t")
    first = bigalign.fit(s, t, output=out)
    again = bigalign.fit(s, t, output=out, select="residual", holdout=0.3)
    assert again.metadata["job"] == first.metadata["job"]
    out2 = str(tmp_path / "t2")
    bigalign.fit(s, t, output=out2, method="auto")
    with pytest.raises(InputError, match="select"):
        bigalign.fit(s, t, output=out2, method="auto", select="residual")
