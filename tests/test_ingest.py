"""bigalign import: the pure plan, round trips from .npy / .fvecs / Parquet into an embedding
store (file order, shard boundaries inside chunks, ids), crash safety (SIGKILL at each fault
point, then a rerun), no-op reruns, changed inputs, bad files named by file and row, and
outputs that alias inputs."""

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
from bigalign.storage.embedding_store import create_store, open_store
from bigalign.errors import InputError, NonFiniteError
from bigalign.commands.ingest import import_vectors
from bigalign.planning.import_plan import choose_chunk_rows, make_import_plan
from conftest import cli

DIM = 8


def vectors(n, dim=DIM, seed=0, dtype=np.float32):
    return np.random.default_rng(seed).standard_normal((n, dim)).astype(dtype)


def write_fvecs(path, x, headers=None):
    x = np.asarray(x, dtype=np.float32)
    h = np.full((len(x), 1), x.shape[1], np.int32) if headers is None else \
        np.asarray(headers, np.int32).reshape(-1, 1)
    with open(path, "wb") as f:
        f.write(np.concatenate([h.view(np.float32), x], axis=1).tobytes())
    return str(path)


def write_parquet(path, x, ids=None, *, array=False, column="emb", **kw):
    cols = {} if ids is None else {"doc_id": ids}
    df = pl.DataFrame({**cols, column: np.asarray(x)})
    if not array:
        df = df.with_columns(pl.col(column).arr.to_list())
    df.write_parquet(str(path), **kw)
    return str(path)


def shards(tmp_path, x, bounds, name="part", array=False, ids=True):
    """Parquet shards of rows [a, b) of ``x`` for consecutive bounds, string ids 'doc-i'."""
    out = []
    for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
        out.append(write_parquet(tmp_path / f"{name}-{i:03d}.parquet", x[a:b],
                                 [f"doc-{j}" for j in range(a, b)] if ids else None,
                                 array=array))
    return out


def read_store(url, **kw):
    emb, ids, model = open_store(str(url), **kw)
    return emb[:], None if ids is None else ids[:], model


# ---- the plan (pure) --------------------------------------------------------------------

@settings(max_examples=200, deadline=None)
@given(files=st.lists(st.integers(0, 300), min_size=1, max_size=8),
       chunk=st.integers(1, 97), per=st.integers(1, 5))
def test_plan_regions_are_whole_chunks_covered_by_file_slices(files, chunk, per):
    if sum(files) == 0:
        with pytest.raises(InputError, match="no rows"):
            make_import_plan(files, 4, chunk)
        return
    plan = make_import_plan(files, 4, chunk, block_bytes=4 * chunk * per)
    offsets = plan.offsets()
    regions = plan.region_list()
    assert regions[0].start == 0 and regions[-1].stop == sum(files)
    for r, nxt in zip(regions, regions[1:]):
        assert r.stop == nxt.start and r.stop % chunk == 0  # whole chunks: no shared chunk
    for r in regions:
        row = r.start
        for s in r.slices:  # contiguous slices of non-empty files, in file order
            assert s.start == row and s.rows > 0
            assert offsets[s.file] + s.file_start == row
            assert 0 <= s.file_start < s.file_stop <= files[s.file]
            row += s.rows
        assert row == r.stop
        assert [s.file for s in r.slices] == sorted({s.file for s in r.slices})
    for row in range(0, sum(files), max(1, sum(files) // 7)):
        f, i = plan.locate(row)
        assert files[f] > 0 and offsets[f] + i == row and i < files[f]


def test_plan_shard_boundary_inside_a_chunk():
    plan = make_import_plan([150, 250, 0, 100], 4, 64)  # small: one chunk per region
    r = plan.region_list()
    assert [(x.start, x.stop) for x in r] == [(i, min(i + 64, 500)) for i in range(0, 500, 64)]
    # region 2 reads the tail of file 0 and the head of file 1 (the boundary at row 150)
    assert [(s.file, s.file_start, s.file_stop) for s in r[2].slices] == [(0, 128, 150),
                                                                           (1, 0, 42)]
    # the empty file 2 is skipped: region 6 reads file 1's tail and file 3's head
    assert [(s.file, s.file_start, s.file_stop) for s in r[6].slices] == [(1, 234, 250),
                                                                           (3, 0, 48)]
    assert plan.locate(400) == (3, 0)
    big = make_import_plan([150, 250, 0, 100], 4, 64, block_bytes=4 * 128)
    assert big.regions.rows_per_block == 64  # at least MIN_BLOCKS regions where possible


def test_units_follow_row_groups():
    # files read directly (.npy, .fvecs): every region is a task of its own
    direct = make_import_plan([500, 500], 4, 50, block_bytes=200, row_groups=[None, None])
    assert direct.units() == [[i] for i in range(20)]
    # small row groups (50 rows): a read can start at any region cheaply
    small = make_import_plan([500, 500], 4, 50, block_bytes=200, row_groups=[(50,) * 10, (50,) * 10])
    assert small.units() == [[i] for i in range(20)]
    # one row group per file: a task streams a file (and a new one starts at a file start)
    big = make_import_plan([500, 500], 4, 50, block_bytes=200, row_groups=[(500,), ()])
    assert big.units() == [list(range(10)), list(range(10, 20))]
    assert big.restart_cost(520) == (20, 500) and big.restart_cost(500) == (0, 500)
    # a boundary inside a chunk: the unit starting there pays 30 rows of file 1's group
    odd = make_import_plan([530, 470], 4, 50, block_bytes=200, row_groups=[(530,), (470,)])
    assert odd.units() == [list(range(11)), list(range(11, 20))]
    assert odd.restart_cost(550) == (20, 470)
    # huge row groups (400 rows, regions of 50): a task per row group; in the middle of
    # one, no new task (it would decode the rows before it for nothing)
    huge = make_import_plan([1000], 4, 50, block_bytes=200, row_groups=[(400, 400, 200)])
    assert huge.units() == [list(range(8)), list(range(8, 16)), list(range(16, 20))]


@settings(max_examples=200, deadline=None)
@given(files=st.lists(st.integers(0, 60), min_size=1, max_size=12),
       groups=st.lists(st.one_of(st.none(), st.integers(1, 25)), min_size=12, max_size=12),
       chunk=st.integers(1, 20))
def test_locate_and_restart_cost_agree_with_a_linear_scan(files, groups, chunk):
    """The bisections (O(log files + log row groups)) against a row-by-row walk."""
    if sum(files) == 0:
        return
    row_groups = [None if g is None else tuple([g] * (n // g) + ([n % g] if n % g else []))
                  for g, n in zip(groups, files)]
    plan = make_import_plan(files, 4, chunk, row_groups=row_groups)
    walk = []  # (file, row in file, rows decoded for nothing, rows of its row group)
    for f, n in enumerate(files):
        g = groups[f]
        for i in range(n):
            walk.append((f, i) + ((0, 0) if g is None else (i % g, min(g, n - i // g * g))))
    for row, (f, i, cost, size) in enumerate(walk):
        assert plan.locate(row) == (f, i)
        assert plan.restart_cost(row) == (cost, size)


@pytest.mark.parametrize("rows,files", [(10**9, 4000), (10**10, 40_000)])
def test_import_plan_takes_the_apply_task_budget(rows, files):
    """At 10^10 rows the regions (64 MiB each) would be 232,520 tasks; the plan grows them
    to apply's budget, 48,000 x sqrt(N / 10^9), written 64 MiB at a time."""
    dim, item = 384, 4
    file_rows = [rows // files] * files
    chunk = choose_chunk_rows(dim, item, rows)
    plan = make_import_plan(file_rows, dim * item, chunk, row_groups=[None] * files)
    budget = int(48_000 * (rows / 1e9) ** 0.5)
    regions = -(-rows // plan.regions.rows_per_block)
    tree, width = 0, regions
    while width > 1:
        width = -(-width // 32)
        tree += width
    assert plan.tasks() == regions + tree <= budget
    unbounded = -(-rows // (64 * 2**20 // (dim * item) // chunk * chunk))
    grown = unbounded + 1 > budget
    assert (plan.regions.rows_per_block > plan.regions.rows_per_write > 0) == grown
    assert regions * 1.25 ** 2 > min(unbounded, budget)  # grown no further than needed
    write = plan.regions.rows_per_write or plan.regions.rows_per_block
    assert write % chunk == 0 and write * dim * item <= 64 * 2**20


def test_a_grown_region_is_written_a_write_at_a_time(tmp_path, monkeypatch):
    """Regions grown past the budget are written in whole-chunk writes of ~block bytes (a
    task holds one write, not a region), marked done after their last write."""
    from functools import partial

    from bigalign.commands import ingest
    from bigalign.storage import stores

    x = vectors(3000, seed=9)
    files = shards(tmp_path, x, [0, 333, 1700, 3000])
    monkeypatch.setattr(ingest, "make_import_plan", partial(make_import_plan, task_budget=10))
    calls = []
    real = stores.write_rows
    monkeypatch.setattr(stores, "write_rows", lambda arr, row, values, **kw: (
        calls.append((kw["url"].rsplit("/", 1)[1], row, len(values))),
        real(arr, row, values, **kw))[1])
    rep = import_vectors(files, str(tmp_path / "s"), ids_column="doc_id", chunk_rows=50,
                         block_bytes=50 * DIM * 4)
    got, ids, _ = read_store(tmp_path / "s")
    assert np.array_equal(got, x) and list(ids) == [f"doc-{j}" for j in range(3000)]
    assert rep.units_total <= 16  # 60 chunks in at most MIN_BLOCKS regions
    writes = sorted(c[1:] for c in calls if c[0] == "embeddings")
    assert writes == [(row, 50) for row in range(0, 3000, 50)]  # a chunk per write
    assert sorted(c[1:] for c in calls if c[0] == "ids") == writes


@pytest.mark.parametrize("row_group_size", [37, 10_000])
@pytest.mark.parametrize("batches", [True, False], ids=["stream", "slices"])
def test_parquet_row_groups_and_readers_round_trip(tmp_path, monkeypatch, row_group_size,
                                                   batches):
    from bigalign.storage.formats import parquet
    monkeypatch.setattr(parquet, "_HAS_BATCHES", batches and parquet._HAS_BATCHES)
    x = vectors(2000, seed=7)
    files = [write_parquet(tmp_path / f"p{i}.parquet", x[a:b], list(range(a, b)),
                           row_group_size=row_group_size)
             for i, (a, b) in enumerate([(0, 777), (777, 2000)])]
    rep = import_vectors(files, str(tmp_path / "s"), ids_column="doc_id", chunk_rows=50,
                         block_bytes=50 * DIM * 4)
    got, ids, _ = read_store(tmp_path / "s")
    assert np.array_equal(got, x) and np.array_equal(ids, np.arange(2000))
    assert rep.units_total == 40
    if row_group_size == 37:  # a task starts where few rows are decoded twice
        assert 10 <= rep.tasks < 40
    else:  # one row group per file: one task per file
        assert rep.tasks == 2


@pytest.mark.parametrize("dim,itemsize", [(4, 4), (64, 4), (384, 4), (768, 2), (1024, 4),
                                          (4096, 8)])
def test_default_chunks_hold_16_to_64_mb(dim, itemsize):
    rows = choose_chunk_rows(dim, itemsize, 10**9)
    assert 16 * 2**20 <= rows * dim * itemsize <= 64 * 2**20
    assert choose_chunk_rows(dim, itemsize, 1000) == 1000  # never more than the rows


# ---- round trips --------------------------------------------------------------------------

def test_npy_round_trip_keeps_dtype_and_order(tmp_path):
    x = vectors(1000, dtype=np.float64)
    np.save(tmp_path / "c.npy", x)
    np.save(tmp_path / "f.npy", np.asfortranarray(x))
    for name in ("c", "f"):
        rep = import_vectors([str(tmp_path / f"{name}.npy")], str(tmp_path / f"{name}.store"),
                             chunk_rows=96, block_bytes=96 * DIM * 8, model="m-1")
        assert rep.rows == 1000 and rep.units_total == 11 and not rep.already_complete
        got, ids, model = read_store(tmp_path / f"{name}.store")
        assert got.dtype == np.float64 and np.array_equal(got, x)
        assert ids is None and model == "m-1"
        assert zarr.open_array(str(tmp_path / f"{name}.store"), path="embeddings").chunks \
            == (96, DIM)


def test_fvecs_round_trip_with_row_ids(tmp_path):
    x = vectors(777)
    write_fvecs(tmp_path / "a.fvecs", x)
    import_vectors([str(tmp_path / "a.fvecs")], str(tmp_path / "s"), row_ids=True,
                   chunk_rows=100, block_bytes=100 * DIM * 4)
    got, ids, _ = read_store(tmp_path / "s")
    assert np.array_equal(got, x)
    assert ids.dtype == np.int64 and np.array_equal(ids, np.arange(777))


@pytest.mark.parametrize("array", [False, True], ids=["list-column", "array-column"])
def test_parquet_shards_with_string_ids_in_file_order(tmp_path, array):
    x = vectors(1000, seed=1)
    # shard boundaries (150, 400, 401, 730) fall inside chunks of 64 rows
    files = shards(tmp_path, x, [0, 150, 400, 401, 730, 1000], array=array)
    rep = import_vectors(files, str(tmp_path / "s"), ids_column="doc_id", chunk_rows=64,
                         block_bytes=64 * DIM * 4)
    got, ids, _ = read_store(tmp_path / "s")
    # 16 regions; one row group per shard, so a task streams on until a shard starts
    # near a region boundary: [0, 192), [192, 448), [448, 768), [768, 1000)
    assert rep.rows == 1000 and rep.units_total == 16 and rep.tasks == 4
    assert np.array_equal(got, x)
    assert list(ids) == [f"doc-{j}" for j in range(1000)]


def test_glob_order_and_given_order(tmp_path):
    x = vectors(600, seed=2)
    files = shards(tmp_path, x, [0, 100, 350, 600])  # part-000, part-001, part-002
    import_vectors([str(tmp_path / "part-*.parquet")], str(tmp_path / "g"),
                   ids_column="doc_id", chunk_rows=64)
    got, ids, _ = read_store(tmp_path / "g")
    assert np.array_equal(got, x) and ids[0] == "doc-0" and ids[-1] == "doc-599"
    # the order given wins over names: file 2 first, then the glob of the others
    import_vectors([files[2], str(tmp_path / "part-00[01].parquet")], str(tmp_path / "o"),
                   ids_column="doc_id", chunk_rows=64)
    got, ids, _ = read_store(tmp_path / "o")
    assert np.array_equal(got, np.concatenate([x[350:], x[:350]]))
    assert ids[0] == "doc-350" and ids[250] == "doc-0"


def test_mixed_formats_int_ids_and_empty_files(tmp_path):
    x = vectors(500, seed=3)
    np.save(tmp_path / "a.npy", x[:120])
    np.save(tmp_path / "empty.npy", np.zeros((0, DIM), np.float32))
    write_fvecs(tmp_path / "b.fvecs", x[120:300])
    write_parquet(tmp_path / "c.parquet", x[300:], array=True)
    files = [tmp_path / "a.npy", tmp_path / "empty.npy", tmp_path / "b.fvecs",
             tmp_path / "c.parquet"]
    import_vectors(files, str(tmp_path / "s"), chunk_rows=50)
    assert np.array_equal(read_store(tmp_path / "s")[0], x)
    ids = np.arange(10**12, 10**12 + 200, dtype=np.uint64)  # wide unsigned ids
    write_parquet(tmp_path / "i.parquet", x[:200], ids)
    import_vectors([tmp_path / "i.parquet"], str(tmp_path / "t"), ids_column="doc_id",
                   chunk_rows=64, dtype="float16")
    got, got_ids, _ = read_store(tmp_path / "t")
    assert got.dtype == np.float16 and np.array_equal(got, x[:200].astype(np.float16))
    assert got_ids.dtype == np.int64 and np.array_equal(got_ids, ids.astype(np.int64))


def test_fit_reads_a_store_and_a_bare_array_is_a_store(tmp_path, pair):
    s, t, a, b, q = pair(n=2000, dim_a=16)
    np.save(tmp_path / "a.npy", a)
    import_vectors([str(tmp_path / "a.npy")], str(tmp_path / "a.store"), chunk_rows=300)
    fitted = bigalign.fit(str(tmp_path / "a.store" / "embeddings"), t)
    np.testing.assert_allclose(fitted.rotation, bigalign.fit(s, t).rotation, atol=1e-6)
    emb, ids, model = open_store(s)  # a bare array: rows are its ids
    assert emb.shape == (2000, 16) and ids is None and model is None


# ---- crash safety, reruns, changes --------------------------------------------------------

@pytest.fixture
def corpus(tmp_path):
    x = vectors(3000, seed=4)
    files = shards(tmp_path, x, [0, 700, 1500, 1501, 2300, 3000])
    return x, files, tmp_path


SMALL = ["--chunk-rows", "100", "--block-mb", str(200 * DIM * 4 / 2**20), "-q",
         "--ids-column", "doc_id"]  # 15 regions of 2 chunks


@pytest.mark.slow
@pytest.mark.parametrize("fault", ["kill:import.region-written@1",
                                   "kill:import.region-written@6",
                                   "kill:import.region-done@4",
                                   "kill:import.before-complete@1"])
def test_killed_import_resumes_to_the_same_store(corpus, fault):
    x, files, tmp = corpus
    out = tmp / "s.store"
    killed = cli("import", *files, "-o", out, *SMALL, "--threads", "1", faults=fault)
    assert killed.returncode == -signal.SIGKILL
    with pytest.raises(InputError, match="incomplete"):
        open_store(str(out))
    status = cli("status", out, "--json")
    assert status.returncode == 3 and json.loads(status.stdout)["kind"] == "import"
    again = cli("import", *files, "-o", out, *[a for a in SMALL if a != "-q"], check=0)
    done = {"kill:import.region-written@1": 0, "kill:import.region-written@6": 5,
            "kill:import.region-done@4": 4, "kill:import.before-complete@1": 15}[fault]
    assert f"resuming: {done} of 15 regions done" in again.stderr
    assert "nan" not in again.stdout, again.stdout  # no rate when nothing was left to write
    assert ("rows/s" in again.stdout) == (done < 15), again.stdout
    got, ids, _ = read_store(out)
    assert np.array_equal(got, x) and list(ids) == [f"doc-{j}" for j in range(3000)]
    assert not os.path.exists(f"{out}.checkpoint")


def test_rerun_is_a_noop_and_changed_inputs_are_refused(corpus):
    x, files, tmp = corpus
    out = str(tmp / "s")
    kw = dict(ids_column="doc_id", chunk_rows=100)
    import_vectors(files, out, **kw)
    rep = import_vectors(files, out, **kw)
    assert rep.already_complete and rep.rows == 0 and rep.rows_total == 3000
    r = cli("import", *files, "-o", out, *SMALL, check=0)  # same job from the CLI: a no-op
    assert r.stdout == "" and "nothing to do" in r.stderr  # -q: the warning only
    # a shard re-written with other vectors: refused, naming the file
    write_parquet(files[1], x[700:1500] + 1, [f"doc-{j}" for j in range(700, 1500)])
    with pytest.raises(InputError, match=r"inputs\.\S*part-001\.parquet\.(size|stamp)"):
        import_vectors(files, out, **kw)
    with pytest.raises(InputError, match=r"options\.model: None -> 'e5'"):
        import_vectors(files, out, model="e5", **kw)
    rep = import_vectors(files, out, overwrite=True, **kw)
    assert rep.rows == 3000
    got = read_store(out)[0]
    assert np.array_equal(got[700:1500], x[700:1500] + 1)


def test_a_finished_store_that_lost_a_chunk_is_not_a_noop(corpus, capsys):
    """An embeddings chunk of a finished import deleted: the rerun refuses it naming the
    chunk (not "nothing to do"); info says DAMAGED (exit 3); --overwrite imports again."""
    from bigalign.cli import main

    x, files, tmp = corpus
    out = tmp / "s.store"
    kw = dict(ids_column="doc_id", chunk_rows=100)
    import_vectors(files, str(out), **kw)
    os.remove(out / "embeddings" / "c" / "7" / "0")
    with pytest.raises(bigalign.DamagedOutputError,
                       match=r"1 of 30 chunks of its embeddings are not stored or truncated \(first: rows "
                             r"700:800, c/7/0\)"):
        import_vectors(files, str(out), **kw)
    capsys.readouterr()
    assert main(["info", str(out)]) == 3 and "DAMAGED" in capsys.readouterr().out
    rep = import_vectors(files, str(out), overwrite=True, **kw)
    assert rep.rows == 3000 and np.array_equal(read_store(out)[0], x)
    assert main(["info", str(out)]) == 0


def test_changed_input_refuses_a_resume(corpus):
    x, files, tmp = corpus
    out = tmp / "s.store"
    cli("import", *files, "-o", out, *SMALL, faults="kill:import.region-done@3",
        check=-signal.SIGKILL)
    write_parquet(files[0], x[:700] * 2, [f"doc-{j}" for j in range(700)])
    r = cli("import", *files, "-o", out, *SMALL, check=2)
    assert "changed" in r.stderr and "part-000.parquet" in r.stderr
    cli("import", *files, "-o", out, *SMALL, "--restart", check=0)
    assert np.array_equal(read_store(out)[0][:700], x[:700] * 2)


# ---- bad files: errors name the file and the row --------------------------------------------

def _bad_parquet(tmp_path, name, rows):
    path = tmp_path / name
    pl.DataFrame({"emb": rows}).write_parquet(str(path))
    return str(path)


@pytest.mark.parametrize("rows,match", [
    ([[1.0, 2.0]] * 5 + [[1.0]] + [[1.0, 2.0]] * 4, r"bad\.parquet row 5: .* has 1 values, "
                                                   r"expected 2"),
    ([[1.0, 2.0]] * 7 + [None] + [[1.0, 2.0]] * 2, r"bad\.parquet row 7: .* is null"),
    ([[1.0, 2.0]] * 3 + [[1.0, None]] + [[1.0, 2.0]] * 6, r"bad\.parquet row 3: .* holds a "
                                                         r"null \(value 1\)"),
    ([[1.0, 2.0]] * 8 + [[1.0, float("nan")]] + [[1.0, 2.0]], r"bad\.parquet row 8: .* NaN "
                                                             r"or Inf"),
    ([["a", "b"]] * 10, r"bad\.parquet: column 'emb' holds List\(String\): its values are "
                        r"not numbers"),
])
def test_bad_parquet_rows_are_named(tmp_path, rows, match):
    good = write_parquet(tmp_path / "good.parquet", vectors(30, dim=2))
    bad = _bad_parquet(tmp_path, "bad.parquet", rows)
    with pytest.raises(InputError, match=match):
        import_vectors([good, bad], str(tmp_path / "s"), chunk_rows=16,
                       vector_column="emb" if "String" in match else None)


def test_bad_files_up_front(tmp_path):
    x = vectors(50)
    a = write_parquet(tmp_path / "a.parquet", x)
    b = write_parquet(tmp_path / "b.parquet", vectors(50, dim=DIM + 1))
    with pytest.raises(InputError, match=r"b\.parquet: vectors of dimension 9, but \S*"
                                         r"a\.parquet has 8"):
        import_vectors([a, b], str(tmp_path / "s"))
    assert not (tmp_path / "s").exists()  # checked before anything is written
    np.save(tmp_path / "s.npy", np.array([["x"] * 4] * 3))
    with pytest.raises(InputError, match=r"s\.npy: dtype <U1 is not numeric"):
        import_vectors([tmp_path / "s.npy"], str(tmp_path / "s"))
    np.save(tmp_path / "v.npy", np.zeros(10, np.float32))
    with pytest.raises(InputError, match=r"v\.npy: expected a 2-D"):
        import_vectors([tmp_path / "v.npy"], str(tmp_path / "s"))
    df = pl.DataFrame({"e1": x, "e2": x})
    df.write_parquet(str(tmp_path / "two.parquet"))
    with pytest.raises(InputError, match="several list-of-number columns.*--vector-column"):
        import_vectors([tmp_path / "two.parquet"], str(tmp_path / "s"))
    with pytest.raises(InputError, match=r"a\.parquet: no id column 'id'"):
        import_vectors([a], str(tmp_path / "s"), ids_column="id")
    with pytest.raises(InputError, match="matches no .npy"):
        import_vectors([str(tmp_path / "nothing-*.npy")], str(tmp_path / "s"))
    with pytest.raises(InputError, match="given twice"):
        import_vectors([a, str(tmp_path / "a.*")], str(tmp_path / "s"))
    (tmp_path / "t.csv").write_text("1,2\n")
    with pytest.raises(InputError, match="unknown format"):
        import_vectors([tmp_path / "t.csv"], str(tmp_path / "s"))


def test_bad_fvecs(tmp_path):
    x = vectors(40)
    headers = [DIM] * 40
    headers[17] = DIM - 1
    write_fvecs(tmp_path / "h.fvecs", x, headers)
    with pytest.raises(InputError, match=r"h\.fvecs row 17: its header says 7 values"):
        import_vectors([tmp_path / "h.fvecs"], str(tmp_path / "s"), chunk_rows=16)
    write_fvecs(tmp_path / "t.fvecs", x)
    with open(tmp_path / "t.fvecs", "r+b") as f:
        f.truncate(40 * 4 * (DIM + 1) - 3)
    with pytest.raises(InputError, match=r"t\.fvecs: .* not a whole number of rows"):
        import_vectors([tmp_path / "t.fvecs"], str(tmp_path / "s"))
    (tmp_path / "z.fvecs").write_bytes(np.array([-3, 0, 0], np.int32).tobytes())
    with pytest.raises(InputError, match=r"z\.fvecs: not an \.fvecs file"):
        import_vectors([tmp_path / "z.fvecs"], str(tmp_path / "s"))


def test_nan_in_npy_and_float16_overflow_are_named(tmp_path):
    x = vectors(100)
    x[63, 2] = np.inf
    np.save(tmp_path / "a.npy", vectors(10))
    np.save(tmp_path / "b.npy", x)
    with pytest.raises(NonFiniteError, match=r"b\.npy row 63: the vector holds NaN or Inf"):
        import_vectors([tmp_path / "a.npy", tmp_path / "b.npy"], str(tmp_path / "s"),
                       chunk_rows=32)
    y = vectors(20)
    y[5, 0] = 1e6
    np.save(tmp_path / "c.npy", y)
    with pytest.raises(NonFiniteError, match=r"c\.npy row 5: .*too large for float16"):
        import_vectors([tmp_path / "c.npy"], str(tmp_path / "t"), dtype="float16")


def test_null_id_is_named(tmp_path):
    ids = [f"d{i}" for i in range(20)]
    ids[11] = None
    path = write_parquet(tmp_path / "n.parquet", vectors(20), ids)
    with pytest.raises(InputError, match=r"n\.parquet row 11: the id in column 'doc_id' is "
                                         "null"):
        import_vectors([path], str(tmp_path / "s"), ids_column="doc_id")


def test_cli_errors_exit_2(tmp_path):
    bad = _bad_parquet(tmp_path, "bad.parquet", [[1.0, 2.0], [1.0]])
    r = cli("import", bad, "-o", tmp_path / "s", "-q", check=2)
    assert "bad.parquet row 1" in r.stderr and "Traceback" not in r.stderr


# ---- where things go ------------------------------------------------------------------------

def test_output_aliasing_an_input_is_refused(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    np.save(data / "a.npy", vectors(10))
    os.symlink(data, tmp_path / "link")
    for output, checkpoint in ((data, None), (str(data / "a.npy"), None),
                               (str(tmp_path / "link") + "/", None),
                               (str(tmp_path / "s"), str(data))):
        with pytest.raises(InputError, match="same or nested locations"):
            import_vectors([str(data / "a.npy")], str(output), checkpoint=checkpoint)
    assert sorted(os.listdir(data)) == ["a.npy"]


def test_foreign_output_refused_and_stores_protected_from_fit_and_apply(tmp_path, pair):
    s, t, a, b, q = pair(n=500, dim_a=DIM)
    np.save(tmp_path / "a.npy", a)
    zarr.create_array(str(tmp_path / "user.zarr"), data=a)
    with pytest.raises(InputError, match="not written by bigalign"):
        import_vectors([tmp_path / "a.npy"], str(tmp_path / "user.zarr"), overwrite=True)
    store = str(tmp_path / "s")
    import_vectors([tmp_path / "a.npy"], store)
    bigalign.fit(s, t, output=str(tmp_path / "t"))
    with pytest.raises(InputError, match="only 'bigalign import' does"):
        bigalign.apply(str(tmp_path / "t"), s, store, overwrite=True)
    with pytest.raises(InputError, match="only 'bigalign import' does"):
        bigalign.fit(s, t, output=store, overwrite=True)
    assert np.array_equal(read_store(store)[0], a)
    # and import never replaces a transform (a mistyped -o), even with --overwrite
    for overwrite in (False, True):
        with pytest.raises(InputError, match="is a transform, .*only 'bigalign fit'"):
            import_vectors([tmp_path / "a.npy"], str(tmp_path / "t"), overwrite=overwrite)
    assert bigalign.Transform.load(str(tmp_path / "t")).rotation.shape == (DIM, DIM)


def test_create_and_open_store(tmp_path):
    g = create_store(str(tmp_path / "s"), rows=10, dim=3, dtype="float32", chunk_rows=4,
                     ids_kind="string", model="m")
    assert g.attrs["bigalign"]["kind"] == "embedding-store"
    with pytest.raises(InputError, match="incomplete"):
        open_store(str(tmp_path / "s"))
    emb, ids, model = open_store(str(tmp_path / "s"), allow_incomplete=True)
    assert np.isnan(emb[:]).all() and list(ids[:]) == [""] * 10 and model == "m"
    zarr.open_group(str(tmp_path / "g"), mode="w")
    with pytest.raises(InputError, match="not an embedding store .no .embeddings. array"):
        open_store(str(tmp_path / "g"))
    from bigalign.storage.outputs import inspect
    assert inspect(str(tmp_path / "s")).kind == "embedding-store"
    assert not inspect(str(tmp_path / "s")).complete


def test_info_and_status_of_a_store(tmp_path):
    """info describes a finished store (exit 0); status says it is finished (exit 0)."""
    np.save(tmp_path / "a.npy", np.ones((300, 4), np.float32))
    run = cli
    assert run("import", tmp_path / "a.npy", "-o", tmp_path / "s.store", "--row-ids",
               "-q").returncode == 0
    info = run("info", tmp_path / "s.store")
    assert info.returncode == 0 and "embedding store" in info.stdout and "300 rows x 4" in info.stdout
    status = run("status", tmp_path / "s.store")
    assert status.returncode == 0 and "finished" in status.stdout


@pytest.mark.parametrize("kind", ["int", "string"])
def test_duplicate_ids_counted_at_import(tmp_path, kind, caplog):
    """Ids repeated across shards and inside one: the store records how many distinct ids
    occur more than once (against a plain-Python count) and warns with an example and the
    remedy; no error. Unique ids record 0, --row-ids records 0 without counting."""
    import collections
    import logging

    rng = np.random.default_rng(7)
    raw = rng.integers(0, 900, 1000)                    # ~ 1000 draws from 900: repeats
    ids = raw if kind == "int" else np.array([f"doc-{v}" for v in raw])
    x = vectors(1000, seed=7)
    files = [write_parquet(tmp_path / f"p{i}.parquet", x[a:b], ids[a:b])
             for i, (a, b) in enumerate([(0, 300), (300, 1000)])]
    with caplog.at_level(logging.WARNING, logger="bigalign"):
        import_vectors(files, str(tmp_path / "s"), ids_column="doc_id", chunk_rows=64)
    counts = collections.Counter(ids.tolist())
    want = sum(1 for c in counts.values() if c > 1)
    assert want > 100
    attrs = zarr.open_group(str(tmp_path / "s")).attrs["bigalign"]
    assert attrs["duplicate_ids"] == want and attrs["complete"]
    first = next(v for v in ids.tolist() if counts[v] > 1)   # the earliest repeated id
    rows = [i for i, v in enumerate(ids.tolist()) if v == first][:2]
    assert f"{want} ids occur more than once (e.g. id {first!r}, {counts[first]} times, at " \
        f"rows {rows[0]}, {rows[1]})" in caplog.text and "--duplicates first|last" in caplog.text
    assert f"{want:,} ids occur more than once" in cli("info", tmp_path / "s", check=0).stdout
    # unique ids, row ids
    caplog.clear()
    uniq = np.arange(1000) if kind == "int" else np.array([f"u{i}" for i in range(1000)])
    import_vectors([write_parquet(tmp_path / "u.parquet", x, uniq)], str(tmp_path / "u"),
                   ids_column="doc_id", chunk_rows=64)
    assert zarr.open_group(str(tmp_path / "u")).attrs["bigalign"]["duplicate_ids"] == 0
    assert "more than once" not in caplog.text
    np.save(tmp_path / "x.npy", x)
    import_vectors([str(tmp_path / "x.npy")], str(tmp_path / "r"), row_ids=True)
    assert zarr.open_group(str(tmp_path / "r")).attrs["bigalign"]["duplicate_ids"] == 0
    import_vectors([str(tmp_path / "x.npy")], str(tmp_path / "n"))          # no ids
    assert "duplicate_ids" not in zarr.open_group(str(tmp_path / "n")).attrs["bigalign"]
