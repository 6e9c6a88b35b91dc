"""Input formats (bigalign/storage/formats/): the registry by extension, each reader's probe,
slices, batches and restart points, Parquet metadata through pyarrow (row groups, the list
column's dimension from value counts, key-value metadata), probed files that pickle (tasks on
Dask workers receive them), and a new format added as one class."""

from __future__ import annotations

import math
import os
import pickle
from typing import Optional

import fsspec
import numpy as np
import polars as pl
import pytest

from bigalign.errors import InputError
from bigalign.storage.formats import (FORMATS, Reader, base, iter_rows, probe, read_slice,
                                      reader_for, register, restart_points)
from bigalign.storage.formats.parquet import parquet_metadata, parquet_row_groups

DIM = 8


def vectors(n, dim=DIM, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(dtype)


def write_parquet(path, x, ids=None, *, column="emb", **kw):
    cols = {} if ids is None else {"doc_id": ids}
    pl.DataFrame({**cols, column: np.asarray(x)}).with_columns(
        pl.col(column).arr.to_list()).write_parquet(str(path), **kw)
    return str(path)


def write_fvecs(path, x):
    x = np.asarray(x, dtype=np.float32)
    head = np.full((len(x), 1), x.shape[1], np.int32).view(np.float32)
    with open(path, "wb") as f:
        f.write(np.concatenate([head, x], axis=1).tobytes())
    return str(path)


def probed(path, **kw):
    fs = fsspec.filesystem("file")
    return probe(str(path), os.path.abspath(path), fs, str(path), True, **kw)


# ---- the registry ---------------------------------------------------------------------------

def test_formats_by_extension():
    assert FORMATS == {".npy": "npy", ".fvecs": "fvecs", ".parquet": "parquet",
                       ".pq": "parquet", ".lance": "lance"}
    assert reader_for("a/B.PARQUET").format == "parquet" and reader_for("x.pq").columns
    assert reader_for("x.fvecs").format == "fvecs" and not reader_for("x.npy").columns
    assert reader_for("x.csv") is None

    class Clash(Reader):
        format, extensions = "other", (".npy",)

    with pytest.raises(TypeError, match=r"\.npy is already 'npy'"):
        register(Clash)
    assert FORMATS[".npy"] == "npy"


# ---- each reader: probe, slices, batches, restart points --------------------------------------

@pytest.fixture
def three(tmp_path):
    """The same 300 x 8 float32 rows as .npy (Fortran order), .fvecs and Parquet (row
    groups of 64, int ids)."""
    x = vectors(300, seed=3)
    np.save(tmp_path / "x.npy", np.asfortranarray(x))
    write_fvecs(tmp_path / "x.fvecs", x)
    write_parquet(tmp_path / "x.parquet", x, list(range(300)), row_group_size=64)
    return x, tmp_path


@pytest.mark.parametrize("name", ["x.npy", "x.fvecs", "x.parquet"])
def test_readers_probe_read_and_stream_the_same_rows(three, name):
    x, tmp = three
    f = probed(tmp / name, ids_column="doc_id" if name.endswith("parquet") else None)
    assert (f.rows, f.dim, np.dtype(f.dtype)) == (300, DIM, np.float32)
    assert f.size == os.path.getsize(tmp / name) and f.stamp
    assert pickle.loads(pickle.dumps(f)) == f  # tasks on Dask workers receive it
    values, ids = read_slice(f, 70, 133)
    assert np.array_equal(values, x[70:133])
    got = list(iter_rows(f, 5, 290, 50))
    assert [row for row, *_ in got][0] == 5 and sum(len(v) for _, v, _ in got) == 285
    assert all(len(v) <= 64 for _, v, _ in got)  # batches of about 50 (a row group at most)
    assert np.array_equal(np.concatenate([v for _, v, _ in got]), x[5:290])
    if name.endswith("parquet"):
        assert f.ids_kind == "int64" and np.array_equal(ids, np.arange(70, 133))
        assert restart_points(f) == f.row_groups == (64, 64, 64, 64, 44)
    else:
        assert ids is None and f.ids_kind is None and restart_points(f) is None


def test_columns_only_where_a_format_has_them(three):
    _, tmp = three
    with pytest.raises(InputError, match=r"x\.fvecs: --ids-column applies to Parquet"):
        probed(tmp / "x.fvecs", ids_column="doc_id")
    with pytest.raises(InputError, match=r"x\.parquet: no id column 'id'"):
        probed(tmp / "x.parquet", ids_column="id")
    with pytest.raises(InputError, match=r"x\.parquet: column 'doc_id' is Int64, not a list"):
        probed(tmp / "x.parquet", vector_column="doc_id")


# ---- Parquet metadata (pyarrow) -----------------------------------------------------------

def _bad_parquet(tmp_path, name, rows):
    path = tmp_path / name
    pl.DataFrame({"emb": rows}).write_parquet(str(path))
    return str(path)


@pytest.mark.parametrize("groups", [7, 64, 1000, None], ids=lambda g: f"row-groups-{g}")
def test_parquet_row_groups_from_the_footer(tmp_path, groups):
    x = vectors(1000, seed=6)
    path = write_parquet(tmp_path / "r.parquet", x, [str(i) for i in range(1000)],
                         **({"row_group_size": groups} if groups else {}))
    fs = fsspec.filesystem("file")
    got = parquet_row_groups(fs, path)
    assert sum(got) == 1000 and len(got) == (math.ceil(1000 / groups) if groups else 1)
    assert parquet_row_groups(fs, path, local=True) == got  # pyarrow opens the path itself
    (tmp_path / "junk.parquet").write_bytes(b"PAR1" + b"\xff" * 40 + b"\x10\0\0\0PAR1")
    assert parquet_row_groups(fs, str(tmp_path / "junk.parquet")) is None
    with pytest.raises(InputError, match=r"junk\.parquet: not a readable Parquet file"):
        probed(tmp_path / "junk.parquet")
    # the vector length, from the leaf values per row group (spares reading a row)
    meta = parquet_metadata(fs, path)
    assert meta.dim("emb") == DIM and meta.values("doc_id") == got and meta.rows == 1000
    assert meta.values("nothing") is None
    bad = _bad_parquet(tmp_path, "ragged.parquet", [[1.0, 2.0], [1.0], [1.0, 2.0]])
    assert parquet_metadata(fs, bad).dim("emb") is None
    assert probed(bad).dim == 2  # learnt from row 0; row 1 fails when read
    # ragged rows whose values happen to add up to rows x 3: still caught row by row
    odd = _bad_parquet(tmp_path, "odd.parquet", [[1.0, 2.0, 3.0], [1.0, 2.0], [1.0] * 4])
    assert parquet_metadata(fs, odd).dim("emb") == 3
    f = probed(odd)
    with pytest.raises(InputError, match=r"odd\.parquet row 1: .* has 2 values, expected 3"):
        list(iter_rows(f, 0, 3, 10))


def test_parquet_key_value_metadata_names_the_model(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    x = vectors(10)
    table = pa.table({"emb": pa.array(list(x), pa.list_(pa.float32()))})
    for name, meta, model in [("a", {"bigalign": '{"model": "m-1", "format": 1}'}, "m-1"),
                              ("b", {"bigalign": "not json"}, None), ("c", None, None)]:
        pq.write_table(table.replace_schema_metadata(meta), tmp_path / f"{name}.parquet")
        f = probed(tmp_path / f"{name}.parquet")
        assert f.model == model and f.dim == DIM and f.rows == 10


def test_empty_parquet_and_array_column(tmp_path):
    empty = write_parquet(tmp_path / "e.parquet", np.zeros((0, DIM), np.float32))
    f = probed(empty)
    assert (f.rows, f.dim, f.row_groups) == (0, 0, ())
    x = vectors(20)
    pl.DataFrame({"emb": x}).write_parquet(tmp_path / "a.parquet")  # Array(Float32, 8)
    f = probed(tmp_path / "a.parquet")
    assert (f.rows, f.dim) == (20, DIM)
    assert np.array_equal(read_slice(f, 3, 9)[0], x[3:9])


# ---- a new format is one class --------------------------------------------------------------

class TextReader(Reader):
    """Whitespace-separated numbers, a vector per line (small files: read whole)."""

    format = "vtxt"
    extensions = (".vtxt",)

    def probe(self, at, *, vector_column=None, ids_column=None):
        with at.fs.open(at.path, "rt") as fh:
            first = fh.readline().split()
            rows = (1 + sum(1 for _ in fh)) if first else 0
        return at.source(self, rows=rows, dim=len(first), dtype="<f8")

    def read(self, f, start, stop, storage_options: Optional[dict] = None):
        with fsspec.open(f.url, "rt", **(storage_options or {})) as fh:
            x = np.loadtxt(fh, ndmin=2, skiprows=start, max_rows=stop - start)
        if x.shape[1] != f.dim:
            raise InputError(f"{f.name} row {start}: {x.shape[1]} values, expected {f.dim}")
        return x, None


def test_a_new_format_is_one_reader_class(tmp_path, monkeypatch):
    from bigalign.commands.ingest import import_vectors
    from bigalign.storage.embedding_store import open_store

    monkeypatch.setattr(base, "FORMATS", dict(base.FORMATS))
    monkeypatch.setattr(base, "READERS", dict(base.READERS))
    register(TextReader)
    x = vectors(50, dtype=np.float64)
    np.savetxt(tmp_path / "v.vtxt", x, fmt="%.17g")
    np.save(tmp_path / "w.npy", x[:7])
    rep = import_vectors([str(tmp_path / "v.vtxt"), str(tmp_path / "w.npy")],
                         str(tmp_path / "s"), chunk_rows=16)
    emb, _, _ = open_store(str(tmp_path / "s"))
    assert rep.rows == 57 and np.array_equal(emb[:], np.concatenate([x, x[:7]]))


def test_remote_footer_reads_retry_transient_errors_and_name_bad_files(tmp_path, monkeypatch):
    """A remote footer read that fails on the connection is retried, then reported as
    transient (exit 75); bytes that are no Parquet are bad input (exit 2), named."""
    from bigalign.errors import TransientError, exit_code
    from bigalign.storage import stores

    monkeypatch.setattr(stores, "RETRY_BACKOFF", 0)
    fs = fsspec.filesystem("memory")
    with open(write_parquet(tmp_path / "m.parquet", vectors(30)), "rb") as src:
        fs.pipe("/bucket/m.parquet", src.read())
    fs.pipe("/bucket/junk.parquet", b"PAR1" + b"\xff" * 40 + b"\x10\0\0\0PAR1")
    real, calls = fs.open, []

    def flaky(path, *a, fails=1, **kw):
        calls.append(path)
        if len(calls) <= fails:
            raise ConnectionError("connection reset")
        return real(path, *a, **kw)

    monkeypatch.setattr(fs, "open", flaky)
    assert parquet_metadata(fs, "/bucket/m.parquet").rows == 30 and len(calls) == 2
    calls.clear()
    monkeypatch.setattr(fs, "open", lambda path, *a, **kw: flaky(path, *a, fails=99, **kw))
    with pytest.raises(TransientError, match=r"m\.parquet.*ConnectionError") as e:
        parquet_metadata(fs, "/bucket/m.parquet")
    assert exit_code(e.value) == 75 and len(calls) == stores.RETRIES + 1
    monkeypatch.setattr(fs, "open", real)
    with pytest.raises(InputError, match=r"junk\.parquet: not a readable Parquet") as e:
        parquet_metadata(fs, "/bucket/junk.parquet", name="memory://bucket/junk.parquet")
    assert exit_code(e.value) == 2
