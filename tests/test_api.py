import numpy as np
import pytest
import scipy.linalg
import zarr

import bigalign
from bigalign.errors import InputError, NonFiniteError
from conftest import imported_store, planted, write_zarr


def oracle_rotation(a, b, center):
    a, b = a.astype(np.float64), b.astype(np.float64)
    if center:
        a, b = a - a.mean(0), b - b.mean(0)
    return scipy.linalg.orthogonal_procrustes(a, b)[0]


@pytest.mark.parametrize("n,chunk_a,chunk_b", [
    (1000, 300, 300),     # ragged last chunk
    (1000, 1000, 1000),   # one chunk
    (37, 1, 1),           # one row per chunk
    (1000, 200, 300),     # different chunkings (lcm-aligned tasks)
])
@pytest.mark.parametrize("center", [False, True])
def test_fit_matches_scipy_across_chunkings(tmp_path, n, chunk_a, chunk_b, center):
    a, b, _ = planted(n, 8, noise=0.3, offset_a=2.0, offset_b=-1.0, seed=n)
    s = write_zarr(tmp_path / "a.zarr", a, chunk_a)
    t = write_zarr(tmp_path / "b.zarr", b, chunk_b)
    tr = bigalign.fit(s, t, center=center, block_bytes=4096)
    np.testing.assert_allclose(tr.rotation, oracle_rotation(a, b, center), atol=1e-5)
    assert tr.metadata["n_pairs"] == n


@pytest.mark.parametrize("dtype,atol", [("float16", 1e-3), ("float32", 1e-5), ("float64", 1e-11)])
def test_fit_dtypes(tmp_path, dtype, atol):
    a, b, _ = planted(800, 10, noise=0.2, seed=1, dtype=dtype)
    s, t = write_zarr(tmp_path / "a.zarr", a, 100), write_zarr(tmp_path / "b.zarr", b, 100)
    tr = bigalign.fit(s, t, center=True, block_bytes=8192)
    np.testing.assert_allclose(tr.rotation, oracle_rotation(a, b, True), atol=atol)
    assert tr.options["precision"] == ("float64" if dtype == "float64" else "float32")


def test_float64_precision_option(tmp_path):
    a, b, _ = planted(500, 6, noise=0.2, seed=9)
    s, t = write_zarr(tmp_path / "a.zarr", a, 100), write_zarr(tmp_path / "b.zarr", b, 100)
    tr = bigalign.fit(s, t, center=True, precision="float64")
    np.testing.assert_allclose(tr.rotation, oracle_rotation(a, b, True), atol=1e-12)


@pytest.mark.parametrize("da,db", [(6, 12), (12, 6)])
def test_unequal_dims_fit_and_apply(tmp_path, da, db):
    a, b, _ = planted(600, da, db, noise=0.1, seed=2)
    s, t = write_zarr(tmp_path / "a.zarr", a, 128), write_zarr(tmp_path / "b.zarr", b, 128)
    tr = bigalign.fit(s, t, center=True)
    assert tr.rotation.shape == (da, db)
    ac, bc = a - a.mean(0, dtype=np.float64), b - b.mean(0, dtype=np.float64)
    assert tr.metadata["residual"] == pytest.approx(np.sum((ac @ tr.rotation - bc) ** 2), rel=1e-4)
    bigalign.apply(tr, s, str(tmp_path / "o.zarr"))
    out = zarr.open_array(str(tmp_path / "o.zarr"))
    assert out.shape == (600, db)


def test_options_scale_normalize_reflection(tmp_path):
    a, b, _ = planted(700, 5, noise=0.1, seed=3)
    b = 3 * b
    s, t = write_zarr(tmp_path / "a.zarr", a, 100), write_zarr(tmp_path / "b.zarr", b, 100)
    assert bigalign.fit(s, t, scale=True).scale == pytest.approx(3, rel=0.02)
    b[:, 0] *= -1
    s, t = write_zarr(tmp_path / "a.zarr", a, 100), write_zarr(tmp_path / "b.zarr", b, 100)
    assert np.linalg.det(bigalign.fit(s, t).rotation) == pytest.approx(-1.0)
    tr = bigalign.fit(s, t, reflection=False)
    assert np.linalg.det(tr.rotation) == pytest.approx(1.0)
    trn = bigalign.fit(s, t, normalize=True, center=False)
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    bn = b / np.linalg.norm(b, axis=1, keepdims=True)
    np.testing.assert_allclose(trn.rotation, oracle_rotation(an, bn, False), atol=1e-5)


def test_rows_range_is_a_training_split(tmp_path):
    a, b, _ = planted(1000, 6, noise=0.3, seed=4)
    s, t = write_zarr(tmp_path / "a.zarr", a, 64), write_zarr(tmp_path / "b.zarr", b, 64)
    tr = bigalign.fit(s, t, rows="100:700", center=True)
    np.testing.assert_allclose(tr.rotation, oracle_rotation(a[100:700], b[100:700], True),
                               atol=1e-5)
    assert tr.metadata["n_pairs"] == 600 and tr.options["rows"] == [100, 700]


def test_result_independent_of_threads_and_blocks(tmp_path):
    a, b, _ = planted(3000, 8, noise=0.3, seed=5, offset_a=1.0)
    s, t = write_zarr(tmp_path / "a.zarr", a, 100), write_zarr(tmp_path / "b.zarr", b, 100)
    r1 = bigalign.fit(s, t, center=True, threads=1, block_bytes=20000)
    r2 = bigalign.fit(s, t, center=True, threads=2, block_bytes=20000)
    assert np.array_equal(r1.rotation, r2.rotation)  # fixed merge tree: bit-identical
    r3 = bigalign.fit(s, t, center=True, block_bytes=200000)
    np.testing.assert_allclose(r1.rotation, r3.rotation, atol=1e-9)


def test_apply_matches_in_memory_transform(tmp_path):
    a, b, _ = planted(1000, 8, noise=0.1, offset_a=3.0, seed=6)
    s, t = write_zarr(tmp_path / "a.zarr", a, 96), write_zarr(tmp_path / "b.zarr", b, 96)
    tr = bigalign.fit(s, t, center=True, scale=True, output=str(tmp_path / "t"))
    for dtype in ("float32", "float64", "float16"):
        out = str(tmp_path / f"o-{dtype}.zarr")
        rep = bigalign.apply(str(tmp_path / "t"), s, out, dtype=dtype, block_bytes=5000)
        arr = zarr.open_array(out)
        assert arr.dtype == np.dtype(dtype) and arr.chunks == (96, 8)
        assert arr.attrs["bigalign"]["complete"] is True
        # float32 GEMM round-off depends on the block's shape: equal to 1 ulp-ish
        np.testing.assert_allclose(arr[:].astype(np.float64), tr.transform(a, dtype=dtype),
                                   rtol=2e-3 if dtype == "float16" else 1e-6, atol=1e-6)
        assert rep.rows == 1000 and rep.tasks > 1
    # renormalize + compression
    out = str(tmp_path / "o-r.zarr")
    bigalign.apply(tr, s, out, renormalize=True, compression="lz4", chunk_rows=192)
    y = zarr.open_array(out)[:]
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), 1, atol=1e-5)
    assert bigalign.output_status(out)["complete"]
    # source untouched
    np.testing.assert_array_equal(zarr.open_array(s)[:], a)


def test_up_front_errors(tmp_path):
    a, b, _ = planted(100, 4)
    s, t = write_zarr(tmp_path / "a.zarr", a, 10), write_zarr(tmp_path / "b.zarr", b[:90], 10)
    with pytest.raises(InputError, match="100 rows but target has 90"):
        bigalign.fit(s, t)
    t = write_zarr(tmp_path / "b.zarr", b, 10)
    first = bigalign.fit(s, t, output=str(tmp_path / "t"))
    # the same job again: a no-op returning the finished transform
    again = bigalign.fit(s, t, output=str(tmp_path / "t"))
    assert again.metadata["job"] == first.metadata["job"]
    with pytest.raises(InputError, match=r"already exists and is complete.*\n.*"
                                         r"options.center: True -> False"):
        bigalign.fit(s, t, output=str(tmp_path / "t"), center=False)
    bigalign.fit(s, t, output=str(tmp_path / "t"), overwrite=True, center=False)
    bigalign.apply(str(tmp_path / "t"), s, str(tmp_path / "o.zarr"))
    assert bigalign.apply(str(tmp_path / "t"), s, str(tmp_path / "o.zarr")).already_complete
    with pytest.raises(InputError, match="options.dtype: 'float32' -> 'float64'"):
        bigalign.apply(str(tmp_path / "t"), s, str(tmp_path / "o.zarr"), dtype="float64")
    with pytest.raises(InputError, match="dimension 3 but the transform maps dimension 4"):
        bigalign.apply(str(tmp_path / "t"), write_zarr(tmp_path / "c.zarr", a[:, :3], 10),
                       str(tmp_path / "o2.zarr"))
    with pytest.raises(InputError, match="never writes over its inputs"):
        bigalign.apply(str(tmp_path / "t"), s, s)


def test_nan_found_while_streaming_names_rows(tmp_path):
    a, b, _ = planted(500, 4)
    a[321, 2] = np.nan
    s, t = write_zarr(tmp_path / "a.zarr", a, 50), write_zarr(tmp_path / "b.zarr", b, 50)
    with pytest.raises(NonFiniteError, match="source row 321"):
        bigalign.fit(s, t, block_bytes=1000)
    tr = bigalign.fit(s, t, rows="0:300")
    with pytest.raises(NonFiniteError, match="source row 321"):
        bigalign.apply(tr, s, str(tmp_path / "o.zarr"), block_bytes=1000)
    assert not bigalign.output_status(str(tmp_path / "o.zarr"))["complete"]


def test_fsspec_urls_end_to_end():
    """Inputs, transform, output and checkpoints all through an fsspec URL (memory://):
    the object-store code path (no rename; single-object writes; listings)."""
    import fsspec
    root = "memory://bigalign-test-fsspec"
    a, b, _ = planted(1200, 8, noise=0.1, offset_a=1.0, seed=13)
    zarr.create_array(f"{root}/a.zarr", data=a, chunks=(100, 8))
    zarr.create_array(f"{root}/b.zarr", data=b, chunks=(100, 8))
    try:
        tr = bigalign.fit(f"{root}/a.zarr", f"{root}/b.zarr", center=True, output=f"{root}/t",
                          keep_checkpoint=True)
        fs = fsspec.filesystem("memory")
        assert fs.ls("/bigalign-test-fsspec/t.checkpoint/units")  # unit statistics stored
        bigalign.apply(f"{root}/t", f"{root}/a.zarr", f"{root}/o.zarr")
        assert bigalign.output_status(f"{root}/o.zarr")["complete"]
        np.testing.assert_allclose(zarr.open_array(f"{root}/o.zarr")[:], tr.transform(a),
                                   rtol=1e-6, atol=1e-6)
        assert not fs.exists("/bigalign-test-fsspec/o.zarr.checkpoint")
    finally:
        fsspec.filesystem("memory").rm("/bigalign-test-fsspec", recursive=True)


def test_apply_target_centred(tmp_path):
    a, b, _ = planted(600, 6, noise=0.1, offset_b=4.0, seed=14)
    s, t = write_zarr(tmp_path / "a.zarr", a, 100), write_zarr(tmp_path / "b.zarr", b, 100)
    tr = bigalign.fit(s, t, center=True)
    bigalign.apply(tr, s, str(tmp_path / "o.zarr"), target_centred=True)
    out = zarr.open_array(str(tmp_path / "o.zarr"))
    assert out.attrs["bigalign"]["target_centred"] is True
    np.testing.assert_allclose(out[:], tr.transform(a) - tr.target_mean, atol=1e-5)


def test_no_buffers_held_after_a_run(tmp_path):
    from bigalign.execution import engine
    a, b, _ = planted(500, 8)
    s, t = write_zarr(tmp_path / "a.zarr", a, 100), write_zarr(tmp_path / "b.zarr", b, 100)
    bigalign.fit(s, t)
    assert engine._buffers == {}
    engine.buffer("x", 10, 4, np.float32)
    assert engine._buffers
    engine.release_buffers()
    assert engine._buffers == {}


# ---- apply of an embedding store: an embedding store with the source's ids ----------------

def oracle_map(tr, x):
    """The independent oracle of apply: (x - mu_A) s Q + mu_B in float64 numpy."""
    return (x.astype(np.float64) - tr.source_mean) * tr.scale @ tr.rotation + tr.target_mean


def check_mapped(tr, got, x):
    """``got`` (the output's embeddings) is ``x`` mapped: equal to Transform.transform and
    to the float64 oracle within float32 round-off (a row off by one fails by ~1)."""
    np.testing.assert_allclose(got, tr.transform(x), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got.astype(np.float64), oracle_map(tr, x), rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("kind", ["string", "int"])
@pytest.mark.parametrize("rows,first,last", [
    (None, 0, 2000),
    ("300:1700", 300, 1700),   # starts inside a 128-row chunk
    ("256:1024", 256, 1024),   # on chunk boundaries
])
def test_apply_of_an_imported_store_writes_a_store_with_its_ids(tmp_path, kind, rows, first,
                                                                last):
    from bigalign.storage.embedding_store import open_store
    from bigalign.storage.outputs import inspect

    a, b, _ = planted(2000, 8, noise=0.1, offset_a=2.0, offset_b=-1.0, seed=31)
    order = np.random.default_rng(7).permutation(2000)  # ids not in row order
    ids = np.array([f"doc-{i:05d}-é" for i in order]) if kind == "string" else \
        order.astype(np.int64) * 1_000_003 - 5
    s = imported_store(tmp_path / "a.store", a, ids, model="old-model", chunk_rows=128)
    t = imported_store(tmp_path / "b.store", b, ids, model="new-model", chunk_rows=128)
    tr = bigalign.fit(s, t, center=True, scale=True, output=str(tmp_path / "t"))
    out = str(tmp_path / "o.store")
    rep = bigalign.apply(str(tmp_path / "t"), s, out, rows=rows, block_bytes=3000)
    assert rep.rows == last - first and rep.tasks > 1
    emb, got_ids, model = open_store(out)
    assert emb.shape == (last - first, 8) and emb.chunks == (128, 8)
    assert got_ids.shape == (last - first,) and got_ids.chunks == (128,)
    assert got_ids[:].tolist() == ids[first:last].tolist()
    assert model == tr.metadata["target_model"] == "new-model"
    check_mapped(tr, emb[:], a[first:last])
    meta = zarr.open_group(out).attrs["bigalign"]
    assert (meta["kind"], meta["made_by"], meta["complete"]) == ("embedding-store", "apply",
                                                                 True)
    assert meta["ids"] == ("string" if kind == "string" else "int64")
    assert meta["source_rows"] == [first, last] and meta["rows"] == last - first
    assert inspect(out).kind == "apply-store" and bigalign.output_status(out)["complete"]
    # a finished apply store is an input like an imported one: fit pairs it with b by id
    again = bigalign.fit(out, t, center=True)
    assert again.metadata["n_pairs"] == last - first
    assert again.metadata["source_model"] == "new-model"


def test_apply_of_a_user_made_sharded_store(tmp_path):
    """A group a user made (no bigalign attribute), sharded, uint32 ids, no model: the
    output is sharded like it, ids (int64) chunked by whole shards, no model stamp."""
    from bigalign.storage.embedding_store import open_store

    a, b, _ = planted(1700, 8, noise=0.1, offset_a=1.0, seed=32)
    ids = (np.arange(1700, dtype=np.uint32) * 3 + 4_000_000_000).astype(np.uint32)
    g = zarr.open_group(str(tmp_path / "a.store"), mode="w")
    g.create_array("embeddings", data=a, chunks=(50, 8), shards=(200, 8), compressors=None)
    g.create_array("ids", data=ids, chunks=(50,))
    tr = bigalign.fit(str(tmp_path / "a.store"), write_zarr(tmp_path / "b.zarr", b, 100),
                      center=True)
    out = str(tmp_path / "o.store")
    bigalign.apply(tr, str(tmp_path / "a.store"), out, rows="130:1530", block_bytes=4000)
    emb, got_ids, model = open_store(out)
    assert emb.shards == (200, 8) and emb.chunks == (50, 8) and got_ids.chunks == (200,)
    assert got_ids.dtype == np.int64 and model is None
    np.testing.assert_array_equal(got_ids[:], ids[130:1530].astype(np.int64))
    check_mapped(tr, emb[:], a[130:1530])
    assert "model" not in zarr.open_group(out).attrs


@pytest.mark.parametrize("rows,ids", [(None, None), ("100:1000", np.arange(100, 1000))])
def test_apply_of_a_store_without_ids(tmp_path, rows, ids):
    """A store without ids: row numbers are its ids. The output has no ids while its row
    numbers are the source's; past row 0 it gets the source row numbers as ids."""
    from bigalign.storage.embedding_store import open_store

    a, b, _ = planted(1000, 6, noise=0.1, seed=33)
    s = imported_store(tmp_path / "a.store", a, chunk_rows=128)
    tr = bigalign.fit(s, write_zarr(tmp_path / "b.zarr", b, 100), center=True)
    out = str(tmp_path / "o.store")
    bigalign.apply(tr, s, out, rows=rows, block_bytes=2000)
    emb, got_ids, _ = open_store(out)
    if ids is None:
        assert got_ids is None and emb.shape == (1000, 6)
    else:
        np.testing.assert_array_equal(got_ids[:], ids)
    check_mapped(tr, emb[:], a[ids if ids is not None else slice(None)])


def test_apply_of_a_bare_array_still_writes_a_bare_array(tmp_path):
    """Backward compatible: an array source (also STORE/embeddings) gives an array."""
    a, b, _ = planted(500, 4, seed=34)
    s = imported_store(tmp_path / "a.store", a, np.arange(500) + 7, model="m")
    tr = bigalign.fit(s, write_zarr(tmp_path / "b.zarr", b, 100))
    bigalign.apply(tr, f"{s}/embeddings", str(tmp_path / "o.zarr"))
    out = zarr.open_array(str(tmp_path / "o.zarr"))
    assert out.attrs["bigalign"]["complete"] is True and "made_by" not in out.attrs["bigalign"]
    check_mapped(tr, out[:], a)
