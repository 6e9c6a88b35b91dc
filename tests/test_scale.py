"""Scale features end to end on small data: sharded inputs read by inner chunk and a sharded
output that mirrors them, regions streamed write by write, the missing-chunk checks (up
front from one listing, and while streaming), a resumed unit whose file turns out unusable,
and BLAS pinned per task only."""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest
import zarr

import bigalign
import bigalign.storage.job
from bigalign.errors import InputError
from bigalign.storage.stores import open_embeddings, read_rows
from conftest import planted, write_zarr


def sharded(path, data, chunk, shard, **kw):
    zarr.create_array(str(path), data=np.asarray(data), chunks=(chunk, data.shape[1]),
                      shards=(shard, data.shape[1]), compressors=None, overwrite=True, **kw)
    return str(path)


def test_sharded_inputs_and_a_mirrored_sharded_output(tmp_path):
    """Fit and apply of sharded inputs equal those of the same data unsharded (bit for bit
    with equal plans); the output mirrors the source's inner chunks and shards."""
    a, b, q = planted(6000, 16, noise=0.05, offset_a=1.0, seed=3)
    s = sharded(tmp_path / "a.zarr", a, 100, 1000)
    t = sharded(tmp_path / "b.zarr", b, 100, 1000)
    src = open_embeddings(s)
    assert (src.row_step, src.read_step, src.shard_rows) == (1000, 100, 1000)
    fit = bigalign.fit(s, t, center=True, block_bytes=100 * 16 * 8)
    np.testing.assert_allclose(fit.rotation, q, atol=1e-2)
    out = str(tmp_path / "o.zarr")
    rep = bigalign.apply(fit, s, out, block_bytes=100 * 16 * 8)
    arr = zarr.open_array(out)
    assert arr.chunks == (100, 16) and arr.shards == (1000, 16)
    assert rep.rows == 6000 and arr.attrs["bigalign"]["complete"]
    np.testing.assert_allclose(arr[:], fit.transform(a), rtol=1e-5, atol=1e-5)
    # an unsharded copy of the source gives the same rows
    plain = write_zarr(tmp_path / "p.zarr", a, 100)
    bigalign.apply(fit, plain, str(tmp_path / "p-out.zarr"), block_bytes=100 * 16 * 8)
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "p-out.zarr"))[:], arr[:])


def test_regions_stream_writes_and_resume(tmp_path, monkeypatch):
    """A small task budget makes regions of many writes; a run stopped by a failing region
    resumes, rewrites only the regions without a marker, and gives the same bytes."""
    from bigalign.execution import engine
    from bigalign.planning import plan as plan_mod
    a, b, _ = planted(40_000, 8, seed=4)
    s, t = write_zarr(tmp_path / "a.zarr", a, 100), write_zarr(tmp_path / "b.zarr", b, 100)
    fit = bigalign.fit(s, t, center=True)
    kw = dict(block_bytes=100 * 8 * 8, threads=1)
    ref = str(tmp_path / "ref.zarr")
    bigalign.apply(fit, s, ref, **kw)
    monkeypatch.setattr(plan_mod, "max_tasks", lambda rows: 30)
    original = engine.region_task

    def failing(*args):
        if args[5] == 12:  # region 12
            raise RuntimeError("region 12 fails")
        return original(*args)

    monkeypatch.setattr(engine, "region_task", failing)
    out = str(tmp_path / "o.zarr")
    with pytest.raises(RuntimeError, match="region 12 fails"):
        bigalign.apply(fit, s, out, **kw)
    monkeypatch.setattr(engine, "region_task", original)
    r = bigalign.apply(fit, s, out, **kw)
    assert 16 <= r.units_total <= 30 and 0 < r.units_resumed < r.units_total
    assert r.rows < 40_000  # only what was not done
    np.testing.assert_array_equal(zarr.open_array(out)[:], zarr.open_array(ref)[:])
    assert not os.path.exists(bigalign.storage.job.default_checkpoint(out))


def test_missing_chunks_found_up_front_and_while_streaming(tmp_path):
    a = np.ones((1000, 4), np.float32)
    p = write_zarr(tmp_path / "m.zarr", a, 100)
    e = open_embeddings(p)  # all stored
    assert e.witness["objects"] == 11  # 10 chunks + zarr.json, from the same listing
    assert e.fingerprint()["content"] == e.witness
    shutil.rmtree(tmp_path / "m.zarr" / "c" / "3")  # deleted after the check
    with pytest.raises(InputError, match=r"chunk at rows 300:400 reads entirely as the fill"):
        read_rows(e, 250, 450)
    with pytest.raises(InputError, match=r"1 of 10 chunks are not stored \(first missing: "
                                         r"rows 300:400\)"):
        open_embeddings(p)
    assert read_rows(open_embeddings(p, check_chunks=False), 300, 400).sum() == 0  # allowed


def test_inner_chunk_missing_from_a_stored_shard(tmp_path):
    """No listing shows an inner chunk missing from a shard (write_empty_chunks=False
    leaves it out when it equals the fill): the streaming check names it."""
    data = np.ones((400, 4), np.float32)
    data[100:200] = 0.0  # an all-fill inner chunk: not stored in its shard
    p = sharded(tmp_path / "s.zarr", data, 50, 200, fill_value=0.0)
    e = open_embeddings(p)
    with pytest.raises(InputError, match=r"rows 100:150 \(an inner chunk of the shard at "
                                         r"rows 0:200\)"):
        read_rows(e, 0, 200)
    a, b, _ = planted(400, 4, seed=5)
    t = write_zarr(tmp_path / "t.zarr", b, 50)
    with pytest.raises(InputError, match="reads entirely as the fill value"):
        bigalign.fit(p, t)


def test_resumed_unit_that_cannot_be_loaded_is_recomputed_to_the_same_bits(tmp_path):
    a, b, _ = planted(6000, 8, noise=0.1, offset_a=2.0, seed=6)
    s, t = write_zarr(tmp_path / "a.zarr", a, 100), write_zarr(tmp_path / "b.zarr", b, 100)
    kw = dict(center=True, block_bytes=100 * 8 * 8)
    ref = bigalign.fit(s, t, **kw)
    out = str(tmp_path / "t")
    bigalign.fit(s, t, output=out, keep_checkpoint=True, **kw)
    units = os.path.join(bigalign.storage.job.default_checkpoint(out), "units")
    names = sorted(os.listdir(units))
    assert len(names) > 2
    with open(os.path.join(units, names[1]), "wb") as f:
        f.write(b"not an npz")  # right name, unusable contents
    shutil.rmtree(out)
    with pytest.warns(UserWarning, match="unit 1 is unreadable.*recomputing unit 1"):
        again = bigalign.fit(s, t, output=out, **kw)
    assert again.metadata["run"]["units_resumed"] == len(names)
    np.testing.assert_array_equal(again.rotation, ref.rotation)


def test_blas_is_pinned_per_task_only():
    """Inside a task BLAS has one thread; outside (a library user's own threads, between
    runs) the process's setting is untouched; overlapping tasks restore it only when the
    last one leaves."""
    from threadpoolctl import threadpool_info
    from bigalign.execution.cluster import blas_pinned, run_task

    def blas_threads():
        return [i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"]

    before = blas_threads()
    assert run_task(blas_threads) == [1] * len(before)
    assert blas_threads() == before
    with blas_pinned():
        with blas_pinned():
            assert blas_threads() == [1] * len(before)
        assert blas_threads() == [1] * len(before)  # the outer task still runs
    assert blas_threads() == before
