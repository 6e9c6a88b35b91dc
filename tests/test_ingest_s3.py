"""bigalign import with inputs and store on an S3-compatible server (moto's, on 127.0.0.1):
.npy and .fvecs read by byte ranges through fsspec, Parquet rows through polars' own object-store
client (the s3fs-style storage options translated) and Parquet footers through pyarrow over an
fsspec file (byte ranges at the end), the store and its checkpoint on S3."""

import numpy as np
import polars as pl
import pytest

from bigalign.storage.embedding_store import open_store
from bigalign.errors import InputError
from bigalign.commands.ingest import import_vectors
from bigalign.storage.formats.parquet import _polars_options

s3fs = pytest.importorskip("s3fs")
moto_server = pytest.importorskip("moto.server")
from conftest import moto_s3  # noqa: E402


@pytest.fixture(scope="module")
def s3():
    with moto_s3("bigalign-import") as opts:
        yield opts


def test_polars_options_translate_s3fs_keys():
    got = _polars_options("s3://b/k", {"key": "k", "secret": "s", "anon": False,
                                       "client_kwargs": {"endpoint_url": "http://h:1",
                                                         "region_name": "eu-west-1"},
                                       "aws_session_token": "t", "default_block_size": 5})
    assert got == {"aws_access_key_id": "k", "aws_secret_access_key": "s",
                   "aws_endpoint_url": "http://h:1", "aws_region": "eu-west-1",
                   "aws_session_token": "t", "aws_allow_http": "true"}


def test_import_from_and_to_s3(s3, tmp_path):
    fs = s3fs.S3FileSystem(**s3)
    x = np.random.default_rng(5).standard_normal((900, 6)).astype(np.float32)
    np.save(tmp_path / "a.npy", x[:250])
    with open(tmp_path / "b.fvecs", "wb") as f:
        head = np.full((250, 1), 6, np.int32).view(np.float32)
        f.write(np.concatenate([head, x[250:500]], axis=1).tobytes())
    for i, (a, b) in enumerate([(500, 730), (730, 900)]):
        pl.DataFrame({"id": [f"r{j}" for j in range(a, b)], "v": x[a:b]}).with_columns(
            pl.col("v").arr.to_list()).write_parquet(tmp_path / f"p{i}.parquet")
    for name in ("a.npy", "b.fvecs", "p0.parquet", "p1.parquet"):
        fs.put(str(tmp_path / name), f"bigalign-import/in/{name}")
    inputs = ["s3://bigalign-import/in/a.npy", "s3://bigalign-import/in/b.fvecs",
              "s3://bigalign-import/in/p*.parquet"]
    out = "s3://bigalign-import/out/s.store"
    rep = import_vectors(inputs, out, chunk_rows=64, row_ids=True, storage_options=s3)
    assert rep.rows == 900
    emb, ids, _ = open_store(out, storage_options=s3)
    assert np.array_equal(emb[:], x) and np.array_equal(ids[:], np.arange(900))
    assert not fs.exists("bigalign-import/out/s.store.checkpoint/manifest.json")
    again = import_vectors(inputs, out, chunk_rows=64, row_ids=True, storage_options=s3)
    assert again.already_complete  # ETags unchanged: a no-op
    fs.put(str(tmp_path / "p0.parquet"), "bigalign-import/in/p1.parquet")  # rewritten
    with pytest.raises(InputError, match=r"p1\.parquet\.(size|stamp|rows)"):
        import_vectors(inputs, out, chunk_rows=64, row_ids=True, storage_options=s3)
    with pytest.raises(InputError, match="same or nested"):
        import_vectors(inputs, "s3a://bigalign-import/in/", storage_options=s3)


def test_probing_remote_parquet_reads_the_footer_only(s3, tmp_path, monkeypatch):
    """pyarrow reads the footer through an fsspec file object: byte ranges at the end of the
    file, never the whole file (a corpus of large shards is probed in seconds)."""
    import fsspec

    from bigalign.storage.formats import probe

    fs = s3fs.S3FileSystem(**s3)
    x = np.random.default_rng(6).standard_normal((20_000, 64)).astype(np.float32)
    pl.DataFrame({"id": np.arange(20_000), "v": x}).with_columns(
        pl.col("v").arr.to_list()).write_parquet(tmp_path / "big.parquet", row_group_size=4096,
                                                 compression="uncompressed")
    fs.put(str(tmp_path / "big.parquet"), "bigalign-import/probe/big.parquet")
    size = fs.size("bigalign-import/probe/big.parquet")
    fetched = []
    real = s3fs.core.S3File._fetch_range
    monkeypatch.setattr(s3fs.core.S3File, "_fetch_range",
                        lambda self, start, end: fetched.append(end - start) or
                        real(self, start, end))
    url = "s3://bigalign-import/probe/big.parquet"
    sfs, path = fsspec.core.url_to_fs(url, **s3)
    f = probe(url, url, sfs, path, False, ids_column="id")
    assert (f.rows, f.dim, f.row_groups, f.ids_kind) == (20_000, 64, (4096,) * 4 + (3616,),
                                                         "int64")
    assert size > 4 * 2**20 and 0 < sum(fetched) <= 2**17  # the footer's 64 KiB, not 5 MB
