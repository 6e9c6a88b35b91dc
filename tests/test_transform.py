import numpy as np
import pytest
import zarr

from bigalign import Transform
from bigalign.errors import InputError, NonFiniteError
from conftest import planted


def make(dim_a=6, dim_b=6, normalize=False, seed=0):
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((max(dim_a, dim_b),) * 2))
    return Transform(q[:dim_a, :dim_b], rng.standard_normal(dim_a), rng.standard_normal(dim_b),
                     1.7, {"center": True, "normalize": normalize}, {"n_pairs": 10})


def test_transform_matches_formula_and_dtypes():
    t = make()
    x = np.random.default_rng(1).standard_normal((50, 6))
    ref = (x - t.source_mean) * t.scale @ t.rotation + t.target_mean
    np.testing.assert_allclose(t.transform(x), ref, atol=1e-12)
    y32 = t.transform(x.astype(np.float32))
    assert y32.dtype == np.float32
    np.testing.assert_allclose(y32, ref, atol=1e-5)
    assert t.transform(x, dtype="float16").dtype == np.float16
    np.testing.assert_allclose(t.transform(x[3]), ref[3], atol=1e-12)


def test_normalize_and_renormalize():
    t = make(normalize=True)
    x = np.random.default_rng(2).standard_normal((20, 6))
    xn = x / np.linalg.norm(x, axis=1, keepdims=True)
    ref = (xn - t.source_mean) * t.scale @ t.rotation + t.target_mean
    np.testing.assert_allclose(t.transform(x), ref, atol=1e-12)
    y = t.transform(x, renormalize=True)
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1.0, atol=1e-12)


def test_nonfinite_input_named():
    t = make()
    x = np.ones((5, 6))
    x[2, 1] = np.nan
    with pytest.raises(NonFiniteError, match="row 2"):
        t.transform(x)


def test_float16_overflow_named():
    """A cast to float16 must not turn big values into Inf silently."""
    from bigalign.maths.mapping import map_rows
    x = np.ones((40, 3), np.float32)
    x[29, 1] = 2e4
    matrix = 4 * np.eye(3, dtype=np.float32)
    with pytest.raises(NonFiniteError, match=r"source row 129 maps to values up to 80000.*"
                                             r"beyond the float16 range"):
        map_rows(x, matrix, np.zeros(3), np.zeros(3), dtype=np.float16, start=100)
    ok = map_rows(x, matrix, np.zeros(3), np.zeros(3), dtype=np.float16, renormalize=True)
    assert ok.dtype == np.float16 and np.isfinite(ok).all()
    assert np.isfinite(map_rows(x, matrix, np.zeros(3), np.zeros(3), dtype=np.float32)).all()


@pytest.mark.parametrize("fmt", [2, 3])
def test_load_of_a_plain_array_says_what_it_is(tmp_path, fmt):
    p = str(tmp_path / "x.zarr")
    zarr.create_array(p, shape=(12, 5), dtype="f4", zarr_format=fmt)
    with pytest.raises(InputError, match=r"is a Zarr array of shape \(12, 5\), not a "
                                         r"bigalign transform"):
        Transform.load(p)


def test_wrong_dimension():
    with pytest.raises(ValueError, match="dimension 6"):
        make().transform(np.ones((3, 5)))


def test_inverse_roundtrip():
    t = make()
    x = np.random.default_rng(3).standard_normal((10, 6))
    np.testing.assert_allclose(t.inverse().transform(t.transform(x)), x, atol=1e-12)


def test_save_load_roundtrip(tmp_path):
    t = make(4, 7)
    t.save(tmp_path / "t")
    u = Transform.load(tmp_path / "t")
    for k in ("rotation", "source_mean", "target_mean"):
        assert np.array_equal(getattr(t, k), getattr(u, k))
    assert u.scale == t.scale and u.options == t.options and u.metadata == t.metadata
    with pytest.raises(Exception):
        t.save(tmp_path / "t")  # refuses to overwrite by default
    t.save(tmp_path / "t", overwrite=True)


def test_loading_a_store_or_an_apply_output_says_what_it_is(tmp_path):
    """Transform.load of vectors says which vectors they are (it said "not a complete
    bigalign transform"): an imported store, apply's mapped store, a user's group holding
    embeddings, an unfinished save."""
    import bigalign
    from bigalign.commands.ingest import import_vectors

    a = np.random.default_rng(0).standard_normal((200, 4)).astype(np.float32)
    np.save(tmp_path / "x.npy", a)
    store = str(tmp_path / "s.store")
    import_vectors([str(tmp_path / "x.npy")], store, progress=False)
    with pytest.raises(InputError, match=r"is an imported embedding store written by 'bigalign "
                                         r"import', not a bigalign transform: pass it as the "
                                         r"vectors"):
        Transform.load(store)
    t = bigalign.fit(store, store, progress=False, output=str(tmp_path / "t"))
    bigalign.apply(t, store, str(tmp_path / "m.store"), progress=False)
    with pytest.raises(InputError, match=r"is an embedding store of mapped vectors written by "
                                         r"'bigalign apply', not a bigalign transform"):
        Transform.load(tmp_path / "m.store")
    g = zarr.open_group(str(tmp_path / "u.zarr"), mode="w")
    g.create_array("embeddings", data=a)
    with pytest.raises(InputError, match=r"is an embedding store \(a group holding "
                                         r"'embeddings'\), not a bigalign transform"):
        Transform.load(tmp_path / "u.zarr")
    zarr.open_group(str(tmp_path / "t"), mode="r+").attrs["bigalign"] = {
        "format": zarr.open_group(str(tmp_path / "t")).attrs["bigalign"]["format"],
        "state": "writing"}
    with pytest.raises(InputError, match="is an unfinished transform"):
        Transform.load(tmp_path / "t")


def test_unfinished_save_is_not_a_transform(tmp_path):
    g = zarr.open_group(str(tmp_path / "t"), mode="w")
    g.create_array("rotation", data=np.eye(3))
    with pytest.raises(InputError, match="not a complete bigalign transform"):
        Transform.load(tmp_path / "t")
    with pytest.raises(InputError, match="no transform at"):
        Transform.load(tmp_path / "nothing")


def test_statistics_saved_with_the_fit(tmp_path):
    import bigalign
    from conftest import write_zarr
    a, b, _ = planted(500, 5, noise=0.1)
    s, t = write_zarr(tmp_path / "a.zarr", a, 100), write_zarr(tmp_path / "b.zarr", b, 100)
    tr = bigalign.fit(s, t, center=True, output=str(tmp_path / "t"))
    back = Transform.load(tmp_path / "t")
    assert back.statistics is not None and back.statistics.equals(tr.statistics)
    assert back.statistics.n == 500 and back.statistics.has_gram
    assert make().statistics is None  # hand-built: none


def test_target_centred_leaves_out_the_target_mean():
    t = make()
    x = np.random.default_rng(4).standard_normal((5, 6))
    np.testing.assert_allclose(t.transform(x, target_centred=True),
                               t.transform(x) - t.target_mean, atol=1e-12)


def test_transform_refuses_what_it_cannot_map_and_save_says_why(tmp_path):
    """Non-real input (complex, bool, object) and a non-float output dtype are refused with
    bigalign's InputError (an int8 output silently truncated every value to 0); a save over
    an existing transform without overwrite says so, not zarr's "Cannot create ''"."""
    import bigalign
    from bigalign.errors import InputError

    rng = np.random.default_rng(0)
    a = rng.standard_normal((200, 4)).astype(np.float32)
    t = bigalign.Transform.load(_fit_saved(tmp_path, a))
    x = a[:5]
    for bad in (x.astype(np.complex64) + 1j, x > 0, x.astype(object)):
        with pytest.raises(InputError, match="expected real-valued rows"):
            t.transform(bad)
    for dtype in ("int8", "uint8", "int32", "bogus"):
        with pytest.raises(InputError, match="dtype must be float16, float32 or float64"):
            t.transform(x, dtype=dtype)
    with pytest.raises(InputError, match="expected rows of dimension 4"):
        t.transform(x[:, :3])
    np.testing.assert_allclose(t.transform(np.arange(8).reshape(2, 4)),
                               t.transform(np.arange(8, dtype=np.float32).reshape(2, 4)))
    with pytest.raises(InputError, match="already exists .*overwrite=True"):
        t.save(str(tmp_path / "t"))
    t.save(str(tmp_path / "t"), overwrite=True)


def _fit_saved(tmp_path, a):
    import bigalign
    from conftest import write_zarr

    s = write_zarr(tmp_path / "a.zarr", a, 50)
    bigalign.fit(s, s, output=str(tmp_path / "t"), center=True)
    return str(tmp_path / "t")
