import os

import numpy as np
import pytest
import zarr

from bigalign.errors import ChunkReadError, InputError
from bigalign.storage.stores import create_output, open_embeddings, parse_rows, read_rows
from conftest import planted, write_zarr


def test_opens_v3_and_v2(tmp_path):
    x = np.arange(40, dtype=np.float32).reshape(10, 4)
    for fmt in (2, 3):
        p = write_zarr(tmp_path / f"v{fmt}.zarr", x, 3, zarr_format=fmt)
        e = open_embeddings(p)
        assert e.shape == (10, 4) and e.row_step == 3
        assert np.array_equal(read_rows(e, 2, 7), x[2:7])
        assert e.fingerprint()["zarr_format"] == fmt


def test_sharded_row_step_is_the_shard(tmp_path):
    zarr.create_array(str(tmp_path / "s.zarr"), shape=(100, 4), chunks=(10, 4), shards=(50, 4),
                      dtype="f4", fill_value=0.0)[:] = 1.0
    assert open_embeddings(str(tmp_path / "s.zarr")).row_step == 50


@pytest.mark.parametrize("setup,message", [
    (lambda p: None, "no such Zarr array"),
    (lambda p: zarr.open_group(p, mode="w"), "Zarr group, not an array"),
    (lambda p: zarr.create_array(p, shape=(10,), dtype="f4"), "expected a 2-D"),
    (lambda p: zarr.create_array(p, shape=(10, 4), dtype="i4"), "not float16, float32 or float64"),
    (lambda p: zarr.create_array(p, shape=(0, 4), dtype="f4"), "empty array"),
    (lambda p: zarr.create_array(p, shape=(10, 4), chunks=(5, 2), dtype="f4"), "whole rows"),
    (lambda p: os.makedirs(p), "not a readable Zarr array|no such Zarr array"),
])
def test_bad_inputs_named(tmp_path, setup, message):
    p = str(tmp_path / "x.zarr")
    setup(p)
    with pytest.raises(InputError, match=message) as e:
        open_embeddings(p, side="target")
    assert "target" in str(e.value) and "x.zarr" in str(e.value)


def test_missing_chunk_refused_up_front(tmp_path):
    p = write_zarr(tmp_path / "m.zarr", np.ones((10, 4), np.float32), 3)
    os.remove(tmp_path / "m.zarr" / "c" / "1" / "0")
    with pytest.raises(InputError, match=r"1 of 4 chunks are not stored \(first missing: rows 3:6\)"
                       r".* pass --allow-missing-chunks if that is intended"):
        open_embeddings(p)
    open_embeddings(p, check_chunks=False)  # allowed on request


def test_corrupt_chunk_named_while_reading(tmp_path):
    p = write_zarr(tmp_path / "c.zarr", np.ones((10, 4), np.float32), 3)
    with open(tmp_path / "c.zarr" / "c" / "2" / "0", "wb") as f:
        f.write(b"garbage")
    e = open_embeddings(p)
    with pytest.raises(ChunkReadError, match=r"source rows 6:9 .*c\.zarr"):
        read_rows(e, 6, 9)


def test_parse_rows():
    assert parse_rows(None, 10) == (0, 10)
    assert parse_rows("2:5", 10) == (2, 5)
    assert parse_rows(":5", 10) == (0, 5)
    assert parse_rows("-3:", 10) == (7, 10)
    assert parse_rows((1, 4), 10) == (1, 4)
    assert parse_rows("0:10", 10) == (0, 10) and parse_rows("-10:-1", 10) == (0, 9)
    assert parse_rows("1_000:2_000", 5000) == (1000, 2000)
    for bad in ("5:2", "1", "a:b", "20:30", "0:11", "-11:", "5:10000", (0, 11)):
        with pytest.raises(InputError):
            parse_rows(bad, 10)


def test_parse_rows_never_clips():
    """Out-of-range bounds name the array's row count instead of fitting on fewer rows."""
    with pytest.raises(InputError, match=r"row range 0:5000: stop 5000 is outside the "
                                         r"array's 1,500 rows"):
        parse_rows("0:5000", 1500)
    with pytest.raises(InputError, match=r"start -2000 is outside the array's 1,500 rows"):
        parse_rows((-2000, None), 1500)


def test_big_endian_zarr_v2(tmp_path):
    """'>f4' Zarr v2 arrays: accepted, read in native byte order (also into the engine's
    reused native buffers), and the fit's statistics match the little-endian copy."""
    import bigalign
    from conftest import planted

    a, b, _ = planted(900, 6, noise=0.1, offset_a=3.0, seed=4)
    p = str(tmp_path / "be.zarr")
    zarr.create_array(p, shape=a.shape, chunks=(100, 6), dtype=">f4", zarr_format=2,
                      compressors=None)[:] = a.astype(">f4")
    assert zarr.open_array(p).dtype == np.dtype(">f4")
    e = open_embeddings(p)
    assert e.dtype == np.dtype("float32") and e.dtype.isnative
    x = read_rows(e, 100, 300)
    assert x.dtype.isnative and np.array_equal(x, a[100:300])
    buf = np.empty((200, 6), np.float32)
    assert read_rows(e, 100, 300, out=buf) is buf and np.array_equal(buf, a[100:300])
    le = write_zarr(tmp_path / "le.zarr", a, 100)
    t = write_zarr(tmp_path / "t.zarr", b, 100)
    ref, got = bigalign.fit(le, t, center=True), bigalign.fit(p, t, center=True)
    assert np.array_equal(got.rotation, ref.rotation)
    assert got.statistics.equals(ref.statistics)
    rep = bigalign.apply(got, p, str(tmp_path / "o.zarr"))
    assert rep.rows == 900
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "o.zarr"))[:], ref.transform(a))


def test_create_output_template(tmp_path):
    out = create_output(str(tmp_path / "o.zarr"), rows=10, dim=3, chunk_rows=4, dtype="float32")
    assert out.chunks == (4, 3) and [type(c).__name__ for c in out.compressors] == \
        ["Crc32cCodec"]
    assert np.isnan(out[:]).all()  # unwritten rows read as NaN, not plausible zeros
    with pytest.raises(InputError, match="already exists"):
        create_output(str(tmp_path / "o.zarr"), rows=10, dim=3, chunk_rows=4, dtype="float32")
    lz = create_output(str(tmp_path / "l.zarr"), rows=10, dim=3, chunk_rows=4, dtype="float32",
                       compression="lz4")
    assert [type(c).__name__ for c in lz.compressors] == ["BloscCodec", "Crc32cCodec"]


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_a_damaged_chunk_of_an_output_fails_on_read(tmp_path, damage):
    """Outputs carry crc32c: a chunk truncated or altered after it was written is an error
    naming its rows, never rows of garbage; the listing check sees a truncated one."""
    from bigalign.errors import ChunkReadError
    from bigalign.storage.stores import describe_unstored, open_embeddings, read_rows

    url = str(tmp_path / "o.zarr")
    out = create_output(url, rows=12, dim=3, chunk_rows=4, dtype="float32")
    out[:] = np.arange(36, dtype=np.float32).reshape(12, 3)
    assert describe_unstored(out, "it") is None
    chunk = tmp_path / "o.zarr" / "c" / "1" / "0"
    with open(chunk, "r+b") as f:
        if damage == "truncate":
            f.truncate(10)
        else:
            f.seek(5)
            f.write(b"\xff\xff")
    emb = open_embeddings(url, check_chunks=False)
    assert read_rows(emb, 0, 4).sum() == np.arange(12).sum()  # other chunks read
    with pytest.raises(ChunkReadError, match="rows 4:8"):
        read_rows(emb, 4, 8)
    lost = describe_unstored(out, "it")
    assert (lost is not None and "rows 4:8" in lost) == (damage == "truncate")


def test_storage_options_apply_to_remote_urls_only(tmp_path):
    """One set of storage options serves every path of a run: a local transform with an S3
    corpus is the common case. Local paths open without them (Zarr refuses options a local
    path cannot use: fit, apply and info of local paths failed when any were given)."""
    from bigalign.cli import main
    from bigalign.storage.locations import options_for

    so = {"endpoint_url": "http://127.0.0.1:9", "key": "x"}
    assert options_for("s3://bucket/x.zarr", so) is so
    assert options_for("gs://bucket/x.zarr", so) is so
    for local in ("x.zarr", "/tmp/x.zarr", "file:///tmp/x.zarr", tmp_path / "x.zarr"):
        assert options_for(local, so) is None
    assert options_for("s3://bucket/x.zarr", None) is None
    a, b, _ = planted(600, 4, seed=1)
    s, t = write_zarr(tmp_path / "a.zarr", a, 100), write_zarr(tmp_path / "b.zarr", b, 100)
    opts = ["--storage-option", "endpoint_url=http://127.0.0.1:9", "--storage-option", "key=x"]
    assert main(["fit", s, t, "-o", str(tmp_path / "t"), "-q", *opts]) == 0
    assert main(["apply", str(tmp_path / "t"), s, "-o", str(tmp_path / "m.zarr"), "-q",
                 *opts]) == 0
    assert main(["info", str(tmp_path / "t"), *opts]) == 0


def test_an_in_memory_numpy_array_is_named_not_printed():
    """A numpy array passed where a Zarr array or path belongs is named by its type and
    shape (the error printed the whole array as a "path", and a file-name-too-long error)."""
    with pytest.raises(InputError) as e:
        open_embeddings(np.zeros((5, 32), np.float32), side="source")
    message = str(e.value)
    assert "a numpy.ndarray of shape (5, 32) is not an input here" in message
    assert "0. 0." not in message and len(message) < 300
