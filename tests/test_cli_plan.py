"""``bigalign plan fit|apply``: the dry run from shapes and from real inputs (metadata only),
text and JSON, and its numbers equal to the plan a real run makes."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import zarr

import bigalign
from bigalign.storage import stores
from bigalign.cli import main
from conftest import planted, write_zarr


def run(capsys, *argv):
    assert main(["plan", *map(str, argv)]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("kind", ["fit", "apply", "export"])
def test_plan_from_shapes_at_scale(capsys, kind):
    est = json.loads(run(capsys, kind, "--rows", "1e10", "--dims", "1024", "--workers", "100",
                         "--threads-per-worker", "8", "--json"))
    assert est["rows"] == 10**10 and est["tasks"] <= 200_000
    assert est["memory"]["per_worker"] < 8 * 2**30 and est["time"]["cores"] == 800
    if kind == "fit":
        assert est["checkpoint"]["units"] <= 1024
        assert est["checkpoint"]["fraction_of_input"] <= 0.02
    elif kind == "apply":
        assert est["checkpoint"]["markers"] == est["region_tasks"]
        assert est["requests"]["verify_list_pages"] <= 200
    else:  # whole chunks per file; files * rows per file cover the rows
        assert est["checkpoint"]["markers"] == est["files"]
        assert est["rows_per_file"] % est["plan"]["step"] == 0
        assert (est["files"] - 1) * est["rows_per_file"] < 10**10 <= est["files"] * est["rows_per_file"]
        assert est["bytes_written"] == 10**10 * (1024 * 4 + 8)
    text = run(capsys, kind, "--rows", "10_000_000_000", "--dims",
               "1024" if kind == "export" else "1024,768")
    assert "tasks" in text and "pass --workers" in text


def test_plan_from_real_inputs_reads_metadata_only(capsys, tmp_path, monkeypatch):
    a, b, _ = planted(5000, 16, seed=1)
    s = write_zarr(tmp_path / "a.zarr", a, 100)
    t = write_zarr(tmp_path / "b.zarr", b, 100)
    bigalign.fit(s, t, output=str(tmp_path / "t"))

    def no_listing(*_a, **_k):
        raise AssertionError("plan listed the input's chunks")

    monkeypatch.setattr(stores, "list_objects", no_listing)
    fit = json.loads(run(capsys, "fit", s, t, "--json"))
    assert fit["rows"] == 5000 and fit["dims"] == [16, 16]
    apply = json.loads(run(capsys, "apply", tmp_path / "t", s, "--json", "--rows", "100:4100"))
    assert apply["rows"] == 4000 and apply["dims"] == [16, 16]
    monkeypatch.undo()
    # the plan printed is the one a real run stores
    from bigalign.planning.plan import make_fit_plan
    real = make_fit_plan(0, 5000, (100, 100), (16, 16), (4, 4), True, read_steps=(100, 100))
    assert fit["plan"]["rows_per_block"] == real.rows_per_block
    assert fit["tasks"] == real.tasks()


def test_plan_apply_of_a_store_counts_the_ids(capsys, tmp_path):
    """A store source gives an output store with ids: the plan reads and writes them too
    (ids PUTs: one per output chunk, as the vectors'), as the real apply does (its output
    holds the ids of the same rows); a bare array has no ids to count."""
    from conftest import make_store

    a, b, _ = planted(5000, 16, seed=2)
    ids = [f"doc-{i}" for i in range(5000)]
    s = make_store(tmp_path / "a.store", a, ids, chunk=100)
    bigalign.fit(s, make_store(tmp_path / "b.store", b, ids, chunk=100),
                 output=str(tmp_path / "t"))
    est = json.loads(run(capsys, "apply", tmp_path / "t", s, "--json"))
    bare = json.loads(run(capsys, "apply", tmp_path / "t", write_zarr(tmp_path / "a.zarr", a,
                                                                      100), "--json"))
    assert est["ids"] == "string" and "ids" not in bare
    assert est["bytes_read"] - bare["bytes_read"] == 5000 * 16  # ~16 bytes per string id
    assert est["bytes_written"] - bare["bytes_written"] == 5000 * 16
    r = est["requests"]
    assert r["ids_puts"] == r["output_puts"] and r["ids_gets"] >= 5000 // 100
    rep = bigalign.apply(str(tmp_path / "t"), s, str(tmp_path / "o.store"))
    out = zarr.open_group(str(tmp_path / "o.store"), mode="r")
    assert rep.rows == 5000 and out["ids"][:].tolist() == ids
    assert -(-5000 // out["ids"].chunks[0]) == r["ids_puts"]  # one PUT per ids chunk
    text = run(capsys, "apply", tmp_path / "t", s)
    assert "a store: ids (string) written with the rows" in text and "ids PUTs" in text


def test_plan_of_sharded_inputs(capsys, tmp_path):
    x = np.ones((4000, 8), np.float32)
    p = str(tmp_path / "s.zarr")
    zarr.create_array(p, data=x, chunks=(100, 8), shards=(1000, 8), compressors=None)
    est = json.loads(run(capsys, "apply", p, "--dims", "8,8", "--json"))
    assert est["output"] == {"chunk_rows": 100, "shard_rows": 1000}
    assert est["requests"]["shard_index_gets"] > 0


def test_plan_refuses_what_it_cannot_plan(capsys):
    assert main(["plan", "fit", "--rows", "1e9"]) == 2
    assert "needs --rows N and --dims" in capsys.readouterr().err
    assert main(["plan", "fit", "--rows", "abc", "--dims", "8"]) == 2
    for flag, value in (("--workers", "-3"), ("--workers", "0"),
                        ("--threads-per-worker", "0"), ("--rate", "-1")):
        assert main(["plan", "fit", "--rows", "1e9", "--dims", "8", flag, value]) == 2
        assert f"{flag} {value}" in capsys.readouterr().err  # not a negative time
    assert main(["plan", "export", "--rows", "1e9", "--dims", "1024,384"]) == 2
    assert "give one dimension" in capsys.readouterr().err


def test_plan_text_of_a_small_job(capsys):
    """A file never holds more rows than the export; a job too small for the 2 % budget
    still saves one unit, and the text says so rather than breaking its own budget."""
    text = run(capsys, "export", "--rows", "100000", "--dims", "384")
    assert "1 Parquet file of up to 100,000 rows (~154.4 MB each" in text
    text = run(capsys, "fit", "--rows", "20000", "--dims", "384")
    assert "2 % budget, but a job saves at least one unit" in text


@pytest.mark.parametrize("rows_per_file", [None, 700])
def test_plan_export_equals_the_files_an_export_writes(capsys, tmp_path, rows_per_file):
    from bigalign.commands.parquet_export import export_parquet
    from conftest import make_store

    x = np.random.default_rng(3).standard_normal((5000, 12)).astype(np.float32)
    s = make_store(tmp_path / "s.store", x, [f"doc-{i}" for i in range(5000)], chunk=100)
    extra = ["--rows-per-file", rows_per_file] if rows_per_file else []
    est = json.loads(run(capsys, "export", s, "--rows", "150:4950", "--json", *extra))
    out = tmp_path / "out"
    export_parquet(s, str(out), rows="150:4950", rows_per_file=rows_per_file)
    written = sorted(p.name for p in out.glob("*.parquet"))
    assert est["files"] == len(written) and est["rows"] == 4800
    assert est["ids"] == "string" and est["bytes_read"] == 4800 * (12 * 4 + 16)
    text = run(capsys, "export", s, *extra)
    assert re.search(r"\d+ Parquet files? of up to [\d,]+ rows", text), text
    assert "ids: string" in text


def test_plan_export_refuses_rows_per_file_off_the_chunks(tmp_path):
    x = np.zeros((1000, 4), np.float32)
    s = write_zarr(tmp_path / "a.zarr", x, 100)
    assert main(["plan", "export", s, "--rows-per-file", "150"]) == 2


def test_plan_fit_of_stores_paired_by_id_says_how_to_plan_it(capsys, tmp_path):
    """Stores with ids of different lengths: fit pairs them by id, which plan (metadata
    only) cannot do; it says so and how to plan from shapes, not that the rows must match."""
    from conftest import make_store

    a = np.zeros((300, 8), np.float32)
    s = make_store(tmp_path / "a.store", a, [f"d{i}" for i in range(300)])
    t = make_store(tmp_path / "b.store", np.zeros((500, 4), np.float32),
                   [f"d{i}" for i in range(500)])
    assert main(["plan", "fit", s, t]) == 2
    err = capsys.readouterr().err
    assert "pairs these stores by id" in err and "--rows N --dims 8,4" in err
    assert "at most 300" in err
    assert main(["plan", "fit", write_zarr(tmp_path / "a.zarr", a, 100), t + "/embeddings"]) == 2
    assert "row i of source is paired with row i of target" in capsys.readouterr().err


# ---- time bounded by compute, reads and writes -------------------------------------------

def test_apply_time_is_bound_by_writes_not_only_compute(capsys):
    """1.5 TB written by 50 workers at 200 MB/s each is 154 s, whatever the cores; the
    estimate once said 3 s (compute alone). Every figure here is arithmetic on the flags:
    the rows, the bytes (rows x d x 4), the workers and the bandwidths given."""
    rows, workers, threads, rate = 10**9, 50, 8, 500_000.0
    est = json.loads(run(capsys, "apply", "--rows", "1e9", "--dims", "64,384", "--workers",
                         workers, "--threads-per-worker", threads, "--rate", rate,
                         "--read-mb-s", 100, "--write-mb-s", 200, "--json"))
    t = est["time"]
    compute = rows / (rate * workers * threads)            # 5 s
    reads = rows * 64 * 4 / (100e6 * workers)               # 51.2 s
    writes = rows * 384 * 4 / (200e6 * workers)             # 153.6 s
    assert est["bytes_written"] == rows * 384 * 4
    assert t["bound"] == "write" and t["seconds"] == pytest.approx(writes)
    assert (t["compute_seconds"], t["read_seconds"]) == (pytest.approx(compute),
                                                         pytest.approx(reads))
    assert t["serial_seconds"] == pytest.approx(compute + reads + writes)
    assert (t["read_bytes_per_second"], t["write_bytes_per_second"]) == (5e9, 1e10)
    # a storage ceiling under what the workers could write bounds it instead
    capped = json.loads(run(capsys, "apply", "--rows", "1e9", "--dims", "64,384",
                            "--workers", workers, "--write-mb-s", 200, "--max-write-gb-s", 4,
                            "--json"))["time"]
    assert capped["seconds"] == pytest.approx(rows * 384 * 4 / 4e9)  # 384 s
    text = run(capsys, "apply", "--rows", "1e9", "--dims", "64,384", "--workers", workers,
               "--threads-per-worker", threads, "--rate", rate, "--read-mb-s", 100,
               "--write-mb-s", 200)
    assert "100.0 MB/s read and 200.0 MB/s written per worker (given on the command line)" \
        in text
    assert "estimated time    3 min on 50 workers x 8 threads (400 cores), bound by " \
        "writing" in text and "reads 51 s at 5.0 GB/s, writes 3 min at 10.0 GB/s" in text


@pytest.mark.parametrize("kind", ["fit", "apply", "export", "import"])
def test_every_estimate_is_bound_by_reads_and_writes(capsys, kind):
    """With storage slow enough, every kind's time is its bytes over the bandwidth."""
    dims = "64" if kind in ("export", "import") else "64,64"
    base = [kind, "--rows", "1e8", "--dims", dims, "--workers", 10, "--json"]
    slow_read = json.loads(run(capsys, *base, "--read-mb-s", 0.01))
    assert slow_read["time"]["bound"] == "read"
    assert slow_read["time"]["seconds"] == pytest.approx(slow_read["bytes_read"] / (0.01e6 * 10))
    if kind != "fit":  # a fit writes a few partials: reads or compute bound it
        slow_write = json.loads(run(capsys, *base, "--write-mb-s", 0.01))
        assert slow_write["time"]["bound"] == "write"
        assert slow_write["time"]["seconds"] == pytest.approx(
            slow_write["bytes_written"] / (0.01e6 * 10))
    default = json.loads(run(capsys, *base))["bandwidth"]
    assert "benchmarks/io_rates.py" in default["source"]
    assert default["read_per_worker"] > 0 and default["write_per_worker"] > 0


# ---- plan import ----------------------------------------------------------------------------

def test_plan_import_from_shapes_at_scale(capsys):
    """10^10 rows in 40,000 Parquet files: within apply's task budget (48,000 x sqrt(10)),
    a marker per region, the bytes of the rows, and a write (not a region) per thread."""
    est = json.loads(run(capsys, "import", "--rows", "1e10", "--files", "40000", "--dims",
                         "1024", "--ids", "string", "--workers", 100, "--json"))
    assert est["rows"] == 10**10 and est["files"] == 40_000
    assert est["tasks"] <= int(48_000 * 10 ** 0.5)
    assert est["checkpoint"]["markers"] == est["regions"]
    assert est["regions"] == -(-10**10 // est["rows_per_region"])
    assert est["bytes_written"] == 10**10 * (1024 * 4 + 16)
    assert est["rows_per_write"] * 1024 * 4 <= 64 * 2**20 < est["rows_per_region"] * 1024 * 4
    text = run(capsys, "import", "--rows", "1e9", "--files", "4000", "--dims", "384")
    assert "4,000 Parquet files; ids: none" in text and "pass --workers" in text
    assert main(["plan", "import", "--rows", "10", "--files", "11", "--dims", "4"]) == 2
    assert "more files than" in capsys.readouterr().err


def test_plan_import_of_files_is_the_plan_the_import_makes(capsys, tmp_path):
    import polars as pl

    x = np.random.default_rng(5).standard_normal((3000, 8)).astype(np.float32)
    files = []
    for i, (a, b) in enumerate([(0, 700), (700, 1500), (1500, 3000)]):
        files.append(str(tmp_path / f"p{i}.parquet"))
        pl.DataFrame({"doc_id": [f"d{j}" for j in range(a, b)], "emb": x[a:b]}).with_columns(
            pl.col("emb").arr.to_list()).write_parquet(files[-1], row_group_size=250)
    block = str(100 * 8 * 4 / 2**20)
    est = json.loads(run(capsys, "import", *files, "--chunk-rows", 100, "--block-mb", block,
                         "--ids-column", "doc_id", "--json"))
    from bigalign.commands.ingest import import_vectors

    report = import_vectors(files, str(tmp_path / "s"), ids_column="doc_id",
                            chunk_rows=100, block_bytes=100 * 8 * 4)
    assert (est["regions"], est["unit_tasks"]) == (report.units_total, report.tasks)
    assert est["ids"] == "string" and est["files"] == 3 and est["format"] == "parquet"
    assert est["bytes_written"] == 3000 * (8 * 4 + 16)
