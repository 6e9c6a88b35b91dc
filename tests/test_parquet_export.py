"""bigalign export --format parquet: the pure plan, round trips (export -> polars equals the
store: int and string ids, a bare array, a row range starting inside a chunk, float16 and
float64 vectors, a sharded source), crash safety (SIGKILL at each fault point, then a rerun
that writes only the missing files), no-op reruns, changed inputs, the output folder's
safety (foreign files refused and kept; --overwrite removes only bigalign's files), the
command line's errors, export -> import giving the same store, and one export to S3."""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import polars as pl
import pytest
import zarr
from hypothesis import given, settings, strategies as st

import bigalign
from bigalign.commands import parquet_export
from bigalign.cli import main
from bigalign.storage.embedding_store import create_store, open_store
from bigalign.errors import InputError, NonFiniteError
from bigalign.commands.parquet_export import (MANIFEST, check_folder, export_manifest, export_parquet,
                                     part_name)
from bigalign.planning.plan import FILE_BYTES, ExportPlan, make_export_plan, max_tasks
from conftest import cli, planted, write_zarr

ROWS, DIM, CHUNK = 3000, 8, 100


def vectors(n=ROWS, dim=DIM, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(dtype)


def make_store(path, x, ids=None, *, chunk=CHUNK, model="e5", complete=True, so=None):
    """An embedding store holding ``x`` and ``ids`` (None: no ids array)."""
    kind = None if ids is None else ("string" if isinstance(ids[0], str) else "int64")
    g = create_store(str(path), rows=len(x), dim=x.shape[1], dtype=x.dtype, chunk_rows=chunk,
                     ids_kind=kind, model=model, storage_options=so)
    g["embeddings"][:] = x
    if ids is not None:
        g["ids"][:] = np.asarray(ids)
    attrs = dict(g.attrs["bigalign"], complete=complete)
    g.attrs["bigalign"] = attrs
    return str(path)


def read_back(folder):
    """(ids, vectors, frame) of every part file of ``folder``, in name order."""
    df = pl.read_parquet(f"{folder}/*.parquet")
    return df["id"].to_numpy(), df["embedding"].to_numpy(), df


def parts(folder):
    return sorted(n for n in os.listdir(folder) if n.endswith(".parquet"))


def run(capsys, *argv):
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


# ---- the plan (pure) --------------------------------------------------------------------

@settings(max_examples=300, deadline=None)
@given(start=st.integers(0, 5000), rows=st.integers(1, 20000), reads=st.integers(1, 40),
       per_step=st.integers(1, 5), files=st.integers(1, 8), group_mb=st.integers(1, 8))
def test_plan_files_are_whole_chunks_and_cover_the_rows(start, rows, reads, per_step, files,
                                                        group_mb):
    step = reads * per_step
    plan = make_export_plan(start, start + rows, step, 100, read_step=reads,
                            rows_per_file=files * step, group_bytes=group_mb * 1000)
    blocks = plan.blocks()
    assert [b.index for b in blocks] == list(range(len(blocks)))
    assert blocks[0].start == start and blocks[-1].stop == start + rows
    for a, b in zip(blocks, blocks[1:]):
        assert a.stop == b.start and a.stop % step == 0  # tasks own whole chunks
    assert all(0 < b.rows <= plan.rows_per_file for b in blocks)
    assert plan.rows_per_group % reads == 0 and plan.rows_per_group <= plan.rows_per_file
    for b in blocks:
        groups = plan.groups(b)
        assert groups[0].start == b.start and groups[-1].stop == b.stop
        assert all(g.stop % reads == 0 for g in groups[:-1])
        assert all(g.rows <= plan.rows_per_group for g in groups)
    assert plan.tasks() >= len(blocks)


@pytest.mark.parametrize("dim,itemsize,chunk", [(384, 4, 21504), (1024, 4, 8192),
                                                (768, 2, 1000), (4096, 8, 1024)])
def test_default_files_hold_about_256_mb_of_whole_chunks(dim, itemsize, chunk):
    plan = make_export_plan(0, 10**7, chunk, dim * itemsize + 8)
    size = plan.rows_per_file * (dim * itemsize + 8)
    assert plan.rows_per_file % chunk == 0 and 128 * 2**20 <= size <= 512 * 2**20
    assert 16 * 2**20 <= plan.rows_per_group * (dim * itemsize + 8) <= 64 * 2**20


def test_files_grow_to_the_task_budget_and_wrong_file_rows_are_refused():
    rows = 10**10
    plan = make_export_plan(0, rows, 8192, 1024 * 4 + 8)
    assert plan.tasks() <= max_tasks(rows)
    assert plan.rows_per_file * (1024 * 4 + 8) >= FILE_BYTES
    with pytest.raises(ValueError):
        make_export_plan(0, 1000, 100, 32, rows_per_file=150)
    assert part_name(7, 12) == "part-00007.parquet"
    assert part_name(7, 123456) == "part-000007.parquet"  # one width: name order = row order


# ---- round trips: export -> polars equals the store ---------------------------------------

@pytest.mark.parametrize("ids", ["string", "int64", None])
def test_store_round_trip(tmp_path, ids):
    x = vectors()
    given_ids = {"string": [f"doc-{i}" for i in range(ROWS)],
                 "int64": list(np.arange(ROWS, dtype=np.int64) * 7 - 5), None: None}[ids]
    store = make_store(tmp_path / "s.store", x, given_ids)
    rep = export_parquet(store, tmp_path / "out", rows_per_file=700)
    plan = make_export_plan(0, ROWS, CHUNK, 40, rows_per_file=700)
    assert rep.units_total == len(plan.blocks()) == len(parts(tmp_path / "out")) == 5
    got_ids, got, df = read_back(tmp_path / "out")
    assert df.schema == pl.Schema({"id": pl.String if ids == "string" else pl.Int64,
                                   "embedding": pl.Array(pl.Float32, DIM)})
    assert np.array_equal(got, x)
    want = np.arange(ROWS) if given_ids is None else np.asarray(given_ids)
    assert list(got_ids) == list(want)
    meta = json.loads(pl.read_parquet_metadata(tmp_path / "out" / "part-00001.parquet")
                      ["bigalign"])
    assert meta["rows"] == [700, 1400] and meta["model"] == "e5"
    assert meta["source"] == os.path.realpath(store)
    m = export_manifest(tmp_path / "out")
    assert m["complete"] and [f["rows"] for f in m["files"]] == \
        [[0, 700], [700, 1400], [1400, 2100], [2100, 2800], [2800, 3000]]
    assert all(f["bytes"] == os.path.getsize(tmp_path / "out" / f["name"]) for f in m["files"])
    assert sorted(os.listdir(tmp_path / "out")) == ["_SUCCESS", MANIFEST,
                                                   *parts(tmp_path / "out")]
    assert not os.path.exists(tmp_path / "out.checkpoint")


def test_bare_array_rows_inside_a_chunk_and_float16(tmp_path):
    x = vectors(seed=1)
    src = write_zarr(tmp_path / "a.zarr", x, CHUNK)
    rep = export_parquet(src, tmp_path / "out", rows="150:2950", rows_per_file=1000,
                         dtype="float16", ids_column="row", vector_column="vec")
    df = pl.read_parquet(f"{tmp_path / 'out'}/*.parquet")
    assert df.schema == pl.Schema({"row": pl.Int64, "vec": pl.Array(pl.Float16, DIM)})
    assert np.array_equal(df["row"].to_numpy(), np.arange(150, 2950))
    assert np.array_equal(df["vec"].to_numpy(), x[150:2950].astype(np.float16))
    # the first file runs to the first chunk boundary past 1000 rows: whole chunks after
    assert [f["rows"] for f in export_manifest(tmp_path / "out")["files"]] == \
        [[150, 1100], [1100, 2100], [2100, 2950]]
    assert rep.rows == 2800


def test_float64_from_float32_sharded_source_and_zstd(tmp_path):
    x = vectors(seed=2)
    src = write_zarr(tmp_path / "a.zarr", x, 50, shards=(200, DIM))
    export_parquet(src, tmp_path / "out", dtype="float64", compression="zstd",
                   rows_per_file=400)
    got = read_back(tmp_path / "out")[1]
    assert got.dtype == np.float64 and np.array_equal(got, x.astype(np.float64))
    assert [f["rows"][0] % 200 for f in export_manifest(tmp_path / "out")["files"]] == [0] * 8
    with pytest.raises(InputError, match="multiple of 200"):  # files own whole shards
        export_parquet(src, tmp_path / "o2", rows_per_file=300)


def test_a_file_has_the_row_groups_of_its_plan(tmp_path):
    import fsspec

    from bigalign.storage.formats.parquet import parquet_row_groups
    from bigalign.commands.parquet_export import FileSpec, file_task, open_source

    x = vectors()
    emb, ids, _ = open_source(write_zarr(tmp_path / "a.zarr", x, CHUNK))
    plan = ExportPlan(start=50, stop=1100, step=CHUNK, rows_per_file=1100, rows_per_group=300,
                      read_step=CHUNK)
    spec = FileSpec(str(tmp_path / "out"), "id", "embedding", "int64", DIM, "float32",
                    "snappy", {"format": "test"})
    assert file_task(emb, ids, plan, 0, 50, 1100, spec, 1, None) == (1050, [])
    path = str(tmp_path / "out" / "_in_progress" / "part-00000.parquet")  # until completed
    fs = fsspec.filesystem("file")
    # reads on chunk boundaries (250, 300, 300, 200 rows); row groups of 300 from the file's start
    assert parquet_row_groups(fs, path) == (300, 300, 300, 150)
    assert np.array_equal(pl.read_parquet(path)["embedding"].to_numpy(), x[50:1100])
    assert os.listdir(tmp_path / "out") == ["_in_progress"]  # no temporary left
    assert os.listdir(tmp_path / "out" / "_in_progress") == ["part-00000.parquet"]


def test_without_streaming_polars_the_files_are_the_same(tmp_path, monkeypatch):
    x = vectors(seed=3)
    store = make_store(tmp_path / "s.store", x, [f"d{i}" for i in range(ROWS)])
    export_parquet(store, tmp_path / "a", rows_per_file=1000)
    monkeypatch.setattr(parquet_export, "_CAN_STREAM", False)
    export_parquet(store, tmp_path / "b", rows_per_file=1000)
    for name in parts(tmp_path / "a"):
        a = pl.read_parquet(tmp_path / "a" / name)
        assert a.equals(pl.read_parquet(tmp_path / "b" / name))


def test_export_then_import_gives_the_same_store(tmp_path):
    x = vectors(seed=4)
    ids = [f"doc-{i}" for i in range(ROWS)]
    store = make_store(tmp_path / "s.store", x, ids)
    cli("export", store, "--format", "parquet", "-o", tmp_path / "out", "--rows-per-file",
        "600", "-q", check=0)
    cli("import", f"{tmp_path / 'out'}/*.parquet", "-o", tmp_path / "back.store",
        "--ids-column", "id", "-q", check=0)
    emb, got_ids, model = open_store(str(tmp_path / "back.store"))  # the model comes back too
    assert np.array_equal(emb[:], x) and list(got_ids[:]) == ids and model == "e5"
    cli("import", f"{tmp_path / 'out'}/*.parquet", "-o", tmp_path / "other.store",
        "--ids-column", "id", "--model", "mine", "-q", check=0)  # --model still wins
    assert open_store(str(tmp_path / "other.store"))[2] == "mine"
    pl.DataFrame({"id": ["z"], "embedding": [x[0].tolist()]}).write_parquet(tmp_path / "z.parquet")
    cli("import", f"{tmp_path / 'out'}/*.parquet", tmp_path / "z.parquet", "-o",
        tmp_path / "mixed.store", "--ids-column", "id", "-q", check=0)  # not all name it
    assert open_store(str(tmp_path / "mixed.store"))[2] is None


def test_nan_rows_and_float16_overflow_are_named(tmp_path):
    x = vectors()
    x[1234, 3] = np.nan
    src = write_zarr(tmp_path / "a.zarr", x, CHUNK)
    with pytest.raises(NonFiniteError, match="row 1234: the vector holds NaN or Inf"):
        export_parquet(src, tmp_path / "out", rows_per_file=1000)
    y = vectors()
    y[2001, 0] = 1e6
    src = write_zarr(tmp_path / "b.zarr", y, CHUNK)
    with pytest.raises(NonFiniteError, match="row 2001.*too large for float16"):
        export_parquet(src, tmp_path / "out2", dtype="float16")


@pytest.mark.parametrize("policy", ["nan", "zero"])
def test_bad_rows_of_an_apply_are_named_or_skipped(tmp_path, policy, capsys):
    """An apply with --bad-rows nan/zero writes its bad rows as NaN/zero rows, which no vector
    database can index: the export stops at the first, naming it and how to go on; rerun
    with --bad-rows skip, it resumes and the files hold every other row with its id, in
    order, and the manifest lists the rows left out."""
    a, b, _ = planted(ROWS, DIM, seed=4)
    ids = [f"doc{i}" for i in range(ROWS)]
    t = bigalign.fit(make_store(tmp_path / "a.store", a, ids), make_store(tmp_path / "b.store",
                                                                         b, ids), center=True)
    a[[7, 1234, 2999]] = np.nan
    src = make_store(tmp_path / "src.store", a, ids)
    mapped = str(tmp_path / "mapped.store")
    assert bigalign.apply(t, src, mapped, bad_rows=policy).bad_rows == [7, 1234, 2999]
    out = tmp_path / "out"
    what = "holds NaN or Inf" if policy == "nan" else "is all zeros"
    with pytest.raises(NonFiniteError, match=rf"row (7|1234|2999): the vector {what}.*"
                                             "--bad-rows skip"):
        export_parquet(mapped, out, rows_per_file=1000)
    rep = export_parquet(mapped, out, rows_per_file=1000, bad_rows="skip")
    assert rep.bad_rows == [7, 1234, 2999] and not rep.already_complete
    got_ids, got, _ = read_back(out)
    keep = np.setdiff1d(np.arange(ROWS), [7, 1234, 2999])
    assert got_ids.tolist() == [ids[i] for i in keep]
    np.testing.assert_allclose(got, t.transform(a[keep]), rtol=1e-5, atol=1e-5)
    m = export_manifest(out)
    assert m["complete"] and m["bad_rows"] == {"policy": "skip", "count": 3,
                                               "rows": [7, 1234, 2999]}
    code, text, _ = run(capsys, "export", mapped, "--format", "parquet", "-o", tmp_path / "o2",
                        "--bad-rows", "skip")
    assert code == 0 and "wrote 2,997 rows (3 bad rows left out" in text
    assert len(pl.read_parquet(f"{tmp_path / 'o2'}/*.parquet")) == ROWS - 3


def test_skip_keeps_genuine_zero_rows_of_other_sources(tmp_path):
    """All-zero rows are bad rows only in the output of an apply with --bad-rows zero: in any
    other source they are vectors and are written."""
    x = vectors()
    x[[10, 20]] = 0.0
    x[30, 1] = np.inf
    rep = export_parquet(make_store(tmp_path / "s.store", x, list(range(ROWS))),
                         tmp_path / "out", bad_rows="skip")
    assert rep.bad_rows == [30]
    got_ids, got, _ = read_back(tmp_path / "out")
    assert got_ids.tolist() == [i for i in range(ROWS) if i != 30]
    assert not got[[10, 20]].any()


def test_unfinished_inputs_and_transforms_are_refused(tmp_path, pair):
    make_store(tmp_path / "s.store", vectors(), complete=False)
    with pytest.raises(InputError, match="unfinished embedding store"):
        export_parquet(tmp_path / "s.store", tmp_path / "out")
    s, t, *_ = pair(n=400, dim_a=6)
    bigalign.fit(s, t, output=str(tmp_path / "t"))
    with pytest.raises(InputError, match="is a transform"):
        export_parquet(tmp_path / "t", tmp_path / "out")
    bigalign.apply(str(tmp_path / "t"), s, str(tmp_path / "o.zarr"))
    arr = zarr.open_array(str(tmp_path / "o.zarr"), mode="r+")
    arr.attrs["bigalign"] = dict(arr.attrs["bigalign"], complete=False)
    with pytest.raises(InputError, match="unfinished apply output"):
        export_parquet(tmp_path / "o.zarr", tmp_path / "out")
    assert not os.path.exists(tmp_path / "out")


# ---- crash safety, reruns, changes --------------------------------------------------------

SMALL = ["--format", "parquet", "--rows-per-file", "300", "-q"]  # 10 files


@pytest.fixture
def corpus(tmp_path):
    x = vectors(seed=5)
    return x, make_store(tmp_path / "s.store", x, [f"doc-{i}" for i in range(ROWS)]), tmp_path


@pytest.mark.slow
@pytest.mark.parametrize("fault,done", [("kill:export.begun@1", 0),
                                        ("kill:export.file-written@1", 0),
                                        ("kill:export.file-written@4", 3),
                                        ("kill:export.file-done@6", 6),
                                        ("kill:export.before-complete@1", 10)])
def test_killed_export_resumes_writing_only_the_missing_files(corpus, fault, done):
    x, store, tmp = corpus
    out = tmp / "out"
    killed = cli("export", store, "-o", out, *SMALL, "--threads", "1", faults=fault)
    assert killed.returncode == -signal.SIGKILL
    m = export_manifest(out)
    assert m is None or not m["complete"]  # nothing that looks finished
    if m is not None:
        assert cli("status", out, "--json").returncode == 3
        assert cli("info", out).returncode == 3
    assert parts(out) == [] if out.exists() else True  # a glob of DIR/*.parquet: nothing
    waiting = out / "_in_progress"
    before = {n: os.stat(waiting / n).st_mtime_ns for n in parts(waiting)} \
        if waiting.exists() else {}
    if m is not None:  # what a writer killed in the middle of a file leaves
        waiting.mkdir(exist_ok=True)
        (waiting / ".part-00000.parquet.tmp-0123abcd").write_bytes(b"PAR1")
    again = cli("export", store, "-o", out, *SMALL[:-1], check=0)  # not -q
    if fault != "kill:export.begun@1":
        assert f"resuming: {done} of 10 files done" in again.stderr
    assert "nan" not in again.stdout, again.stdout  # no rate when nothing was left to write
    assert ("rows/s" in again.stdout) == (done < 10), again.stdout
    after = {n: os.stat(out / n).st_mtime_ns for n in parts(out)}
    rewritten = [n for n in after if before.get(n) != after[n]]
    assert len(rewritten) == 10 - done
    ids, got, _ = read_back(out)
    assert np.array_equal(got, x) and list(ids) == [f"doc-{i}" for i in range(ROWS)]
    # no temporaries left, _in_progress empty
    assert sorted(os.listdir(out)) == ["_SUCCESS", MANIFEST, *parts(out)]
    assert not os.path.exists(f"{out}.checkpoint") and export_manifest(out)["complete"]


def test_rerun_is_a_noop_changes_are_refused_and_overwrite_replaces(corpus):
    x, store, tmp = corpus
    out = tmp / "out"
    export_parquet(store, out, rows_per_file=300)
    stamps = {n: os.stat(out / n).st_mtime_ns for n in parts(out)}
    rep = export_parquet(store, out, rows_per_file=300)
    assert rep.already_complete and rep.rows == 0 and rep.rows_total == ROWS
    r = cli("export", store, "-o", out, *SMALL, check=0)
    assert r.stdout == "" and "nothing to do" in r.stderr
    r = cli("export", store, "-o", out, *SMALL[:-1], "--overwrite", check=0)  # same job
    assert r.stdout == "" and (r.stdout + r.stderr).count("nothing to do") == 1
    assert stamps == {n: os.stat(out / n).st_mtime_ns for n in parts(out)}
    with pytest.raises(InputError, match=r"options\.dtype: 'float32' -> 'float16'"):
        export_parquet(store, out, rows_per_file=300, dtype="float16")
    g = zarr.open_group(store, mode="r+")
    g["embeddings"][:100] = x[:100] + 1  # re-embedded in place
    r = cli("export", store, "-o", out, *SMALL, check=2)
    assert "source.content" in r.stderr and "--overwrite" in r.stderr
    # --overwrite: the old files go, the new export has fewer (and only its own) files
    rep = export_parquet(store, out, rows_per_file=1000, overwrite=True)
    assert rep.rows == ROWS and parts(out) == [part_name(i, 3) for i in range(3)]
    assert np.array_equal(read_back(out)[1][:100], x[:100] + 1)
    assert sorted(os.listdir(out)) == ["_SUCCESS", MANIFEST, *parts(out)]
    rep = export_parquet(store, out, rows_per_file=1000, restart=True)  # same job, again
    assert rep.rows == ROWS and not rep.already_complete


def test_a_finished_export_that_lost_a_file_is_not_called_complete(corpus, capsys):
    """A part file deleted (or truncated) after the export finished: the rerun does not say
    "nothing to do" but refuses, naming how many files and the first (exit 2); info and
    status say DAMAGED (exit 3); --overwrite writes the export again."""
    x, store, tmp = corpus
    out = tmp / "out"
    export_parquet(store, out, rows_per_file=300)
    os.remove(out / part_name(3, 10))
    code, stdout, err = run(capsys, "export", store, "-o", out, *SMALL)
    assert code == 2 and stdout == "" and "nothing to do" not in err
    assert "marked complete but is damaged: 1 of 10 files listed in its manifest are " \
        "missing or changed (first: part-00003.parquet, missing)" in err
    assert "Rerun with --overwrite" in err
    with pytest.raises(bigalign.DamagedOutputError, match="part-00003.parquet"):
        export_parquet(store, out, rows_per_file=300)
    code, stdout, _ = run(capsys, "info", out)
    assert code == 3 and "Parquet export" in stdout and "DAMAGED" in stdout
    assert "part-00003.parquet" in stdout and "complete," not in stdout
    code, stdout, _ = run(capsys, "info", out, "--json")
    doc = json.loads(stdout)
    assert code == 3 and doc["complete"] is False and "part-00003.parquet" in doc["damaged"]
    code, stdout, _ = run(capsys, "status", out)
    assert code == 3 and "DAMAGED" in stdout and "part-00003.parquet" in stdout
    rep = export_parquet(store, out, rows_per_file=300, overwrite=True)
    assert rep.rows == ROWS and np.array_equal(read_back(out)[1], x)
    assert run(capsys, "info", out)[0] == 0 and run(capsys, "status", out)[0] == 0
    (out / part_name(5, 10)).write_bytes(b"PAR1")  # truncated: changed, not complete either
    with pytest.raises(bigalign.DamagedOutputError, match=r"part-00005.parquet, 4 bytes"):
        export_parquet(store, out, rows_per_file=300)
    assert run(capsys, "info", out)[0] == 3


def test_changed_input_refuses_a_resume(corpus):
    x, store, tmp = corpus
    out = tmp / "out"
    cli("export", store, "-o", out, *SMALL, "--threads", "1",
        faults="kill:export.file-done@3", check=-signal.SIGKILL)
    zarr.open_group(store, mode="r+")["embeddings"][:100] = x[:100] * 2
    r = cli("export", store, "-o", out, *SMALL, check=2)
    assert "changed" in r.stderr and "source.content" in r.stderr
    cli("export", store, "-o", out, *SMALL, "--restart", check=0)
    assert np.array_equal(read_back(out)[1][:100], x[:100] * 2)


def test_unfinished_export_without_its_checkpoint_needs_overwrite(corpus):
    x, store, tmp = corpus
    out = tmp / "out"
    cli("export", store, "-o", out, *SMALL, "--threads", "1",
        faults="kill:export.file-done@3", check=-signal.SIGKILL)
    import shutil

    shutil.rmtree(f"{out}.checkpoint")
    with pytest.raises(InputError, match="unfinished export with no recorded progress"):
        export_parquet(store, out, rows_per_file=300)
    export_parquet(store, out, rows_per_file=300, overwrite=True)
    assert np.array_equal(read_back(out)[1], x)


# ---- the output folder: bigalign deletes only what it wrote --------------------------------

def test_foreign_folders_and_files_are_refused_and_kept(corpus):
    x, store, tmp = corpus
    mine = tmp / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep me")
    for overwrite in (False, True):
        with pytest.raises(InputError, match=r"not write \(notes\.txt.*even with --overwrite"):
            export_parquet(store, mine, overwrite=overwrite)
    assert os.listdir(mine) == ["notes.txt"]
    (tmp / "afile").write_text("x")
    with pytest.raises(InputError, match="is a file"):
        export_parquet(store, tmp / "afile")
    # an export folder someone added a file to is not bigalign's to delete any more
    out = tmp / "out"
    export_parquet(store, out, rows_per_file=1000)
    (out / "part-00099.parquet").write_bytes(b"user data")
    with pytest.raises(InputError, match="part-00099.parquet"):
        export_parquet(store, out, rows_per_file=300, overwrite=True)
    assert (out / "part-00099.parquet").read_bytes() == b"user data"
    assert len(parts(out)) == 4
    # an empty folder is fine; a Zarr store is not an export folder
    (tmp / "empty").mkdir()
    export_parquet(store, tmp / "empty")
    other = make_store(tmp / "s2.store", x)
    with pytest.raises(InputError, match="did not write"):
        export_parquet(store, other, overwrite=True)
    assert open_store(other)[0].shape == x.shape
    assert check_folder(tmp / "nothing") is None


def test_a_tampered_manifest_cannot_make_overwrite_delete_other_files(corpus):
    """--overwrite deletes only part files the old manifest lists; a manifest edited to list
    another name, or a path outside the folder, protects nothing it names from being
    refused, and deletes nothing outside."""
    x, store, tmp = corpus
    out = tmp / "out"
    export_parquet(store, out, rows_per_file=1000)
    victim = tmp / "victim.txt"
    victim.write_text("keep me")
    (out / "notes.txt").write_text("mine")
    manifest = json.loads((out / "_bigalign_export.json").read_text())
    manifest["files"] += [{"name": "../victim.txt", "rows": [0, 1], "bytes": 7},
                          {"name": "notes.txt", "rows": [0, 1], "bytes": 4}]
    (out / "_bigalign_export.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="notes.txt"):
        export_parquet(store, out, rows_per_file=300, overwrite=True)
    assert victim.read_text() == "keep me" and (out / "notes.txt").read_text() == "mine"


def test_output_must_not_alias_the_input(corpus):
    x, store, tmp = corpus
    for out in (store, f"{store}/", f"{store}/parquet", os.path.relpath(store)):
        with pytest.raises(InputError, match="same or nested"):
            export_parquet(store, out)
    with pytest.raises(InputError, match="same or nested"):
        export_parquet(store, tmp / "out", checkpoint=f"{store}/ck")


# ---- the command line ---------------------------------------------------------------------

def test_cli_export_prints_and_json(corpus, capsys):
    x, store, tmp = corpus
    code, out, err = run(capsys, "export", store, "--format", "parquet", "-o", tmp / "out",
                         "--rows-per-file", "1000")
    assert code == 0, err
    assert f"wrote 3,000 rows to {tmp / 'out'} as 3 Parquet files" in out
    assert "columns id: string, embedding: float32[8]" in out
    assert "export: 3000 rows x 8 (float32, ids string) to 3 Parquet files" in err
    code, out, _ = run(capsys, "export", store, "--format", "parquet", "-o", tmp / "out",
                       "--rows-per-file", "1000", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["already_complete"] and doc["files"] == 3 and doc["rows"] == 3000
    assert doc["columns"] == {"id": "string", "embedding": "float32[8]"}
    code, out, _ = run(capsys, "info", tmp / "out")
    assert code == 0 and "Parquet export" in out and "complete, rows 0:3,000" in out
    code, out, _ = run(capsys, "status", tmp / "out")
    assert code == 0 and "finished" in out


def test_cli_errors_exit_2(corpus, capsys, pair):
    x, store, tmp = corpus
    s, t, *_ = pair(n=300, dim_a=8)
    bigalign.fit(s, t, output=str(tmp / "t"))
    cases = [
        (("export", store, "-o", tmp / "x.npz"), "its vectors export as Parquet files"),
        (("export", store, "--format", "json", "-o", tmp / "x.json"), "not a transform"),
        (("export", tmp / "t", "--format", "parquet", "-o", tmp / "x"), "is a transform"),
        (("export", tmp / "t", "-o", tmp / "x.npz", "--rows-per-file", "100"),
         "--rows-per-file: only for --format parquet"),
        (("export", store, "--format", "parquet", "-o", tmp / "x", "--no-inverse"),
         "--no-inverse: only for a transform export"),
        (("export", store, "--format", "parquet", "-o", tmp / "x", "--rows-per-file", "150"),
         "multiple of 100 (e.g. 100 or 200)"),
        (("export", store, "--format", "parquet", "-o", tmp / "x", "--rows", "0:4000"),
         "outside the array"),
        (("export", store, "--format", "parquet", "-o", tmp / "x", "--ids-column",
          "embedding"), "two different names"),
        (("export", tmp / "nothing", "--format", "parquet", "-o", tmp / "x"),
         "no transform, embedding store or Zarr array"),
        (("export", tmp / "t", "-o", tmp / "x.npz", "--dtype", "float16"), "float16"),
    ]
    for argv, message in cases:
        code, out, err = run(capsys, *argv)
        assert code == 2 and message in err, (argv, err)
        assert "Traceback" not in err
    assert not any(os.path.exists(tmp / n) for n in ("x", "x.npz", "x.json"))
    code, out, err = run(capsys, "export", tmp / "t", "-o", tmp / "t.npz", "--json")
    assert code == 0 and json.loads(out)["kind"] == "transform-export"


def test_cli_help_explains_both_uses(capsys):
    with pytest.raises(SystemExit) as e:
        main(["export", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0
    for text in ("A transform:", "--format parquet", "_bigalign_export.json", "--ids-column",
                 "--rows-per-file", "--workers", "--scheduler", "--threads", "--allow-lossy",
                 "docs/transforms.md"):
        assert text in out, text


# ---- elsewhere: a cluster, an object store ---------------------------------------------------

@pytest.mark.slow
def test_export_on_a_local_cluster(corpus):
    x, store, tmp = corpus
    rep = export_parquet(store, tmp / "out", rows_per_file=500, workers=2)
    assert rep.tasks == 6 and np.array_equal(read_back(tmp / "out")[1], x)


def test_export_to_s3(corpus):
    s3fs = pytest.importorskip("s3fs")
    pytest.importorskip("moto.server")
    from conftest import moto_s3

    x, _, tmp = corpus
    with moto_s3("bigalign-export") as so:
        fs = s3fs.S3FileSystem(**so)
        store = make_store("s3://bigalign-export/s.store", x, [f"doc-{i}" for i in range(ROWS)],
                           so=so)
        out = "s3://bigalign-export/corpus/"
        rep = export_parquet(store, out, rows_per_file=1000, storage_options=so)
        assert rep.rows == ROWS
        names = sorted(p.rsplit("/", 1)[1] for p in fs.ls("bigalign-export/corpus"))
        assert names == ["_SUCCESS", MANIFEST, *(part_name(i, 3) for i in range(3))]
        frames = [pl.read_parquet(fs.cat_file(f"bigalign-export/corpus/{n}")) for n in names[2:]]
        got = pl.concat(frames)
        assert np.array_equal(got["embedding"].to_numpy(), x)
        assert got["id"].to_list() == [f"doc-{i}" for i in range(ROWS)]
        assert export_parquet(store, out, rows_per_file=1000, storage_options=so).already_complete
        assert not fs.exists("bigalign-export/corpus.checkpoint/manifest.json")
        y = x.copy()
        y[2500, 1] = np.nan  # file 2 fails while uploading: the upload is abandoned
        bad = make_store("s3://bigalign-export/bad.store", y, so=so)
        with pytest.raises(NonFiniteError, match="row 2500"):
            export_parquet(bad, "s3://bigalign-export/bad", rows_per_file=1000,
                           storage_options=so)
        assert not fs.exists("bigalign-export/bad/_in_progress/part-00002.parquet")
        assert not fs.exists("bigalign-export/bad/part-00000.parquet")  # not moved: failed
        assert not export_manifest("s3://bigalign-export/bad", so)["complete"]
        fs.pipe("bigalign-export/other/x.txt", b"x")
        with pytest.raises(InputError, match="did not write"):
            export_parquet(store, "s3://bigalign-export/other", overwrite=True,
                           storage_options=so)
        assert fs.cat("bigalign-export/other/x.txt") == b"x"


# ---- an interrupted export does not look complete to a glob or a dataset reader -----------

@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill:export.file-done@4", "kill:export.before-complete@1"])
def test_interrupted_export_shows_no_parquet_to_a_glob_or_a_pyarrow_dataset(corpus, fault):
    import glob

    import pyarrow.dataset as pads

    x, store, tmp = corpus
    out = tmp / "out"
    cli("export", store, "-o", out, *SMALL, "--threads", "1", faults=fault,
        check=-signal.SIGKILL)
    assert glob.glob(f"{out}/*.parquet") == [] and not (out / "_SUCCESS").exists()
    assert os.listdir(out / "_in_progress")  # the parts written so far wait there
    assert pads.dataset(str(out), format="parquet").count_rows() == 0
    cli("export", store, "-o", out, *SMALL, check=0)
    assert (out / "_SUCCESS").exists() and pads.dataset(str(out)).count_rows() == ROWS


@pytest.mark.slow
def test_kill_in_the_middle_of_the_moves_resumes_them(corpus):
    import pyarrow.dataset as pads

    x, store, tmp = corpus
    out = tmp / "out"
    cli("export", store, "-o", out, *SMALL, "--threads", "1",
        faults="kill:export.file-moved@4", check=-signal.SIGKILL)
    assert len(parts(out)) == 4 and len(parts(out / "_in_progress")) == 6
    assert not (out / "_SUCCESS").exists() and not export_manifest(out)["complete"]
    again = cli("export", store, "-o", out, *SMALL[:-1], check=0)
    assert "resuming: 10 of 10 files done" in again.stderr
    ids, got, _ = read_back(out)
    assert np.array_equal(got, x) and list(ids) == [f"doc-{i}" for i in range(ROWS)]
    assert sorted(os.listdir(out)) == ["_SUCCESS", MANIFEST, *parts(out)]
    assert pads.dataset(str(out)).count_rows() == ROWS
