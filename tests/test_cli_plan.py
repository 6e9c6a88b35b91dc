"""``bigalign plan fit|apply``: the dry run from shapes and from real inputs (metadata only),
text and JSON, and its numbers equal to the plan a real run makes."""

from __future__ import annotations

import json

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


@pytest.mark.parametrize("kind", ["fit", "apply"])
def test_plan_from_shapes_at_scale(capsys, kind):
    est = json.loads(run(capsys, kind, "--rows", "1e10", "--dims", "1024", "--workers", "100",
                         "--threads-per-worker", "8", "--json"))
    assert est["rows"] == 10**10 and est["tasks"] <= 200_000
    assert est["memory"]["per_worker"] < 8 * 2**30 and est["time"]["cores"] == 800
    if kind == "fit":
        assert est["checkpoint"]["units"] <= 1024
        assert est["checkpoint"]["fraction_of_input"] <= 0.02
    else:
        assert est["checkpoint"]["markers"] == est["region_tasks"]
        assert est["requests"]["verify_list_pages"] <= 200
    text = run(capsys, kind, "--rows", "10_000_000_000", "--dims", "1024,768")
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
