"""Sampling which items to re-embed: reproducible, distinct, in range; chunk-aware samples
touch few chunks; the Parquet file holds rows and ids."""

import json
import os

import numpy as np
import polars as pl
import pytest

from bigalign.errors import InputError
from bigalign.commands.parquet_export import export_parquet
from bigalign.commands.sampling import sample_corpus, sample_rows
from test_pairing import make_store


@pytest.mark.parametrize("method", ["uniform", "chunks"])
def test_sample_rows_distinct_sorted_reproducible(method):
    a = sample_rows(10_000, 700, method=method, seed=3, chunk_rows=250)
    assert len(a) == 700 and len(np.unique(a)) == 700 and np.all(np.diff(a) > 0)
    assert a.min() >= 0 and a.max() < 10_000
    assert np.array_equal(a, sample_rows(10_000, 700, method=method, seed=3, chunk_rows=250))
    assert not np.array_equal(a, sample_rows(10_000, 700, method=method, seed=4, chunk_rows=250))
    touched = len(np.unique(a // 250))
    if method == "chunks":
        assert touched == 3  # 700 rows = 2 whole chunks + 200 rows of a third
    else:
        assert touched > 30


def test_sample_rows_errors():
    with pytest.raises(InputError, match="cannot sample"):
        sample_rows(10, 11)
    with pytest.raises(InputError, match="--method"):
        sample_rows(10, 5, method="stratified")


def test_sample_corpus_writes_rows_and_ids(tmp_path):
    vecs = np.random.default_rng(0).standard_normal((1000, 4)).astype(np.float32)
    ids = np.array([f"doc-{i}" for i in range(1000)])
    store = make_store(tmp_path / "c.store", vecs, ids, model="old", chunk=100)
    out = str(tmp_path / "s.parquet")
    summary = sample_corpus(store, 250, out, method="chunks", seed=1)
    frame = pl.read_parquet(out)
    assert frame.columns == ["row", "id"] and frame.height == 250
    assert frame["id"].to_list() == [f"doc-{r}" for r in frame["row"].to_list()]
    assert summary["chunks_touched"] == 3 and summary["chunks_total"] == 10
    meta = json.loads(pl.read_parquet_metadata(out)["bigalign"])
    assert meta["method"] == "chunks" and meta["seed"] == 1 and meta["model"] == "old"
    mtime = os.stat(out).st_mtime_ns
    again = sample_corpus(store, 250, out, method="chunks", seed=1)  # the same job: a no-op
    assert again["already_complete"] and os.stat(out).st_mtime_ns == mtime
    with pytest.raises(InputError, match="already exists"):
        sample_corpus(store, 250, out)  # another method: refused without --overwrite
    sample_corpus(store, 100, out, overwrite=True)
    assert pl.read_parquet(out).height == 100
    export_parquet(store, str(tmp_path / "ex"))  # an export's file has bigalign metadata too
    part = tmp_path / "ex" / "part-00000.parquet"
    before = part.read_bytes()
    with pytest.raises(InputError, match="was not written by 'bigalign sample'"):
        sample_corpus(store, 10, str(part), overwrite=True)
    assert part.read_bytes() == before
    foreign = tmp_path / "mine.parquet"
    foreign.write_bytes(b"not ours")
    with pytest.raises(InputError, match="was not written by 'bigalign sample'"):
        sample_corpus(store, 10, str(foreign), overwrite=True)
    assert foreign.read_bytes() == b"not ours"
    with pytest.raises(InputError, match="never writes over its inputs"):
        sample_corpus(store, 10, str(tmp_path / "c.store" / "x.parquet"))


def test_sample_into_a_missing_folder_creates_it(tmp_path, capsys):
    """As import, fit, apply and export do for their outputs; a folder that cannot be
    made (a file in the way) is refused naming the output, not a temporary file."""
    from bigalign.cli import main

    vecs = np.zeros((100, 4), np.float32)
    store = make_store(tmp_path / "c.store", vecs, np.arange(100))
    out = tmp_path / "new" / "deeper" / "s.parquet"
    assert main(["sample", store, "--pairs", "10", "-o", str(out)]) == 0
    assert pl.read_parquet(out).height == 10
    capsys.readouterr()
    (tmp_path / "afile").write_text("x")
    assert main(["sample", store, "--pairs", "10", "-o", str(tmp_path / "afile" / "s.parquet")]) == 2
    err = capsys.readouterr().err
    assert "afile/s.parquet" in err and "cannot create its folder" in err
    assert ".bigalign-sample-" not in err and "Traceback" not in err
