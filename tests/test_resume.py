"""Crash safety: SIGKILL the CLI at chosen and at random moments, rerun the same command,
and get the same result as an uninterrupted run (rotation bit-for-bit, output bytes equal).
Plus fault injection, refusal of changed inputs and of concurrent runs, and a worker killed
under dask.distributed."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading

import numpy as np
import pytest
import zarr

import bigalign
from bigalign.storage import stores
from bigalign.errors import ChunkReadError
from conftest import imported_store, main_cli, planted, write_zarr

ROWS, DIM, CHUNK = 40_000, 32, 500
# 0.1 MB blocks -> 80 blocks of 500 rows in 8 checkpoint units of 10 blocks (a unit's
# 25 KB of statistics stays under 2% of the 1.25 MB it reads): many kill points
SMALL = ["--block-mb", "0.1", "-q"]


def cli(*argv, faults=None, check=None, **kw):
    """``bigalign ARGV``: in this process (conftest.main_cli), or with ``faults`` (SIGKILL at
    a fault point) in a real process. ``check``: the expected exit code."""
    if not faults:
        return main_cli(*argv, check=check, **kw)
    env = dict(os.environ)
    env.pop("BIGALIGN_FAULTS", None)
    if faults:
        env["BIGALIGN_FAULTS"] = faults
    p = subprocess.run([sys.executable, "-m", "bigalign.cli", *map(str, argv)], env=env,
                       capture_output=True, text=True, timeout=300, **kw)
    if check is not None:
        assert p.returncode == check, (p.returncode, p.stdout, p.stderr)
    return p


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    a, b, _ = planted(ROWS, DIM, noise=0.1, offset_a=2.0, seed=21)
    s, t = write_zarr(tmp / "a.zarr", a, CHUNK), write_zarr(tmp / "b.zarr", b, CHUNK)
    cli("fit", s, t, "-o", tmp / "ref.t", "--center", *SMALL, check=0)
    cli("apply", tmp / "ref.t", s, "-o", tmp / "ref.zarr", *SMALL, check=0)
    return s, t, tmp, bigalign.Transform.load(str(tmp / "ref.t")), \
        zarr.open_array(str(tmp / "ref.zarr"))[:]


def units_on_disk(path):
    d = f"{path}.checkpoint/units"
    # a unit being written when the process died leaves only a temporary file
    return len([n for n in os.listdir(d) if n.endswith(".npz")]) if os.path.isdir(d) else 0


@pytest.mark.parametrize("fault", [
    "kill:fit.block@3",          # during the reduce, before any unit is stored
    "kill:fit.unit-saved@1",
    "kill:fit.unit-saved@5",     # during the reduce, more than half the units stored
    "kill:fit.solved@1",         # after the solve, before the transform is saved
    "kill:fit.saved@1",          # transform saved, checkpoint not yet removed
])
def test_fit_killed_then_rerun_gives_the_same_rotation(data, tmp_path, fault):
    s, t, _, ref, _ = data
    out = tmp_path / "t"
    killed = cli("fit", s, t, "-o", out, "--center", *SMALL, faults=fault)
    assert killed.returncode == -signal.SIGKILL
    stored = units_on_disk(out)
    if fault != "kill:fit.saved@1":
        with pytest.raises(bigalign.InputError):
            bigalign.Transform.load(str(out))  # nothing that looks finished
        again = cli("fit", s, t, "-o", out, "--center", *SMALL, check=0)
        if stored:
            assert f"resuming: {stored} of 8 units done" in again.stderr
    else:  # the saved transform is complete: a rerun is a no-op that exits 0
        assert os.path.exists(f"{out}.checkpoint")
        again = cli("fit", s, t, "-o", out, "--center", *SMALL, check=0)
        assert "already complete with the same inputs and options" in again.stderr
        assert "removed the leftover checkpoint" in again.stderr
    got = bigalign.Transform.load(str(out))
    assert np.array_equal(got.rotation, ref.rotation)
    assert np.array_equal(got.source_mean, ref.source_mean)
    run = got.metadata["run"]
    if fault.startswith("kill:fit.unit-saved"):
        # counting work: only the missing units' blocks were computed
        assert run["units_resumed"] == stored
        assert run["units"] == 8 and run["tasks"] == 80 - 10 * stored
    assert not os.path.exists(f"{out}.checkpoint")  # cleaned after success


@pytest.mark.parametrize("fault", [
    "kill:apply.region-written@1",   # data of a region stored, marker not yet
    "kill:apply.region-written@7",
    "kill:apply.region-done@4",
    "kill:apply.before-complete@1",  # every region done, completion mark not yet
])
def test_apply_killed_then_rerun_gives_the_same_bytes(data, tmp_path, fault):
    s, _, tmp, _, ref_out = data
    out = tmp_path / "o.zarr"
    killed = cli("apply", tmp / "ref.t", s, "-o", out, *SMALL, faults=fault)
    assert killed.returncode == -signal.SIGKILL
    assert bigalign.output_status(str(out))["complete"] is False
    info = cli("info", out)
    assert info.returncode == 3 and "INCOMPLETE" in info.stdout
    status = cli("status", out, "--json")
    assert status.returncode == 3 and json.loads(status.stdout)["kind"] == "apply"
    again = cli("apply", tmp / "ref.t", s, "-o", out, *SMALL[:-1], check=0)  # not -q
    assert "resuming:" in again.stderr
    # nothing left to write: no rate ("nan rows/s" before)
    assert "nan" not in again.stdout and again.stdout.startswith("wrote "), again.stdout
    if fault == "kill:apply.before-complete@1":
        assert "wrote 0 rows" in again.stdout and "rows/s" not in again.stdout
        assert re.search(r"s \((\d+) of \1 regions were already done\); marked complete",
                         again.stdout), again.stdout
    arr = zarr.open_array(str(out))
    assert arr.attrs["bigalign"]["complete"] is True
    assert np.array_equal(arr[:], ref_out)
    assert cli("info", out).returncode == 0


@pytest.fixture(scope="module")
def store_data(tmp_path_factory):
    """An imported store with string ids (8000 x 16, chunks of 250), a transform, and the
    store an uninterrupted apply of rows 100:7900 writes (the reference)."""
    tmp = tmp_path_factory.mktemp("resume-store")
    a, b, _ = planted(8000, 16, noise=0.1, offset_a=2.0, seed=22)
    ids = np.array([f"item-{i * 7919 % 8000}" for i in range(8000)])
    s = imported_store(tmp / "a.store", a, ids, model="old", chunk_rows=250)
    t = imported_store(tmp / "b.store", b, ids, model="new", chunk_rows=250)
    cli("fit", s, t, "-o", tmp / "ref.t", "--center", *SMALL, check=0)
    argv = ["apply", tmp / "ref.t", s, "--rows", "100:7900", "--block-mb", "0.02", "-q"]
    cli(*argv, "-o", tmp / "ref.store", check=0)
    ref = zarr.open_group(str(tmp / "ref.store"))
    return argv, ref["embeddings"][:], ref["ids"][:], ids


@pytest.mark.parametrize("fault", [
    "kill:apply.begun@1",            # manifest written, store not yet created
    "kill:apply.region-written@2",   # vectors and ids of a region stored, marker not yet
    "kill:apply.region-done@5",
    "kill:apply.before-complete@1",  # every region done, completion mark not yet
])
def test_apply_of_a_store_killed_then_rerun_gives_the_same_store(store_data, tmp_path, fault):
    from bigalign.storage.embedding_store import open_store, store_parts
    argv, ref_emb, ref_ids, ids = store_data
    out = tmp_path / "o.store"
    killed = cli(*argv, "-o", out, faults=fault)
    assert killed.returncode == -signal.SIGKILL
    if fault != "kill:apply.begun@1":
        assert bigalign.output_status(str(out))["complete"] is False
        for read in (open_store, store_parts):  # never mistaken for a finished store
            with pytest.raises(bigalign.InputError, match="incomplete|unfinished"):
                read(str(out))
        info = cli("info", out)
        assert info.returncode == 3 and "INCOMPLETE (rerun the apply" in info.stdout
        assert json.loads(cli("status", out, "--json").stdout)["kind"] == "apply"
    again = cli(*argv, "-o", out, check=0)
    assert ("resuming:" in again.stderr) == (fault != "kill:apply.begun@1")
    emb, got_ids, model = open_store(str(out))
    assert np.array_equal(emb[:], ref_emb) and got_ids[:].tolist() == ref_ids.tolist()
    assert got_ids[:].tolist() == ids[100:7900].tolist() and model == "new"
    assert cli("info", out).returncode == 0
    assert not os.path.exists(f"{out}.checkpoint")
    mtime = os.path.getmtime(out / "zarr.json")  # a rerun of the finished job: a no-op
    r = cli(*argv, "-o", out, check=0)
    assert "nothing to do" in r.stderr and os.path.getmtime(out / "zarr.json") == mtime


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_killed_at_a_random_moment(data, tmp_path, seed):
    """SIGKILL at a seeded random moment of the fit and of the apply, rerun, compare. The
    moment is a fault point reached the K-th time (a block or unit of the fit, a region of
    the apply), not a wall-clock instant: the kill lands mid-run however loaded the
    machine is, which the test checks (before, a kill after a sleep could find the run
    finished and the rerun a no-op)."""
    s, t, tmp, ref, ref_out = data
    rng = np.random.default_rng(seed)
    fit_at = [f"fit.block@{rng.integers(1, 81)}", f"fit.unit-saved@{rng.integers(1, 9)}"]
    apply_at = [f"apply.region-written@{rng.integers(1, 81)}",
                f"apply.region-done@{rng.integers(1, 81)}"]
    for argv, point, finished in (
            (["fit", s, t, "-o", tmp_path / "t", "--center", *SMALL], fit_at[rng.integers(2)],
             lambda: os.path.exists(tmp_path / "t" / "zarr.json")),
            (["apply", tmp / "ref.t", s, "-o", tmp_path / "o.zarr", *SMALL],
             apply_at[rng.integers(2)],
             lambda: bigalign.output_status(str(tmp_path / "o.zarr"))["complete"])):
        cli(*argv, faults=f"kill:{point}", check=-signal.SIGKILL)
        assert not finished(), point  # killed mid-run
        cli(*argv, check=0)
        assert finished()
    assert np.array_equal(bigalign.Transform.load(str(tmp_path / "t")).rotation, ref.rotation)
    assert np.array_equal(zarr.open_array(str(tmp_path / "o.zarr"))[:], ref_out)


def test_changed_inputs_refused_then_restart(data, tmp_path):
    s, t, _, ref, _ = data
    out = tmp_path / "t"
    cli("fit", s, t, "-o", out, "--center", *SMALL, faults="kill:fit.unit-saved@3",
        check=-signal.SIGKILL)
    b = zarr.open_array(t)[:]
    t2 = write_zarr(tmp_path / "b2.zarr", b, 1000)  # same data, other chunking
    r = cli("fit", s, t2, "-o", out, "--center", *SMALL, check=2)
    assert "changed" in r.stderr and "target.url" in r.stderr and "target.chunks" in r.stderr
    r = cli("fit", s, t, "-o", out, "--center", "--normalize", *SMALL, check=2)
    assert "options.normalize: False -> True" in r.stderr
    cli("fit", s, t2, "-o", out, "--center", "--restart", *SMALL, check=0)
    # other chunking, other float32 block sums: the same rotation to float32 round-off
    np.testing.assert_allclose(bigalign.Transform.load(str(out)).rotation, ref.rotation,
                               atol=1e-6)


def test_concurrent_run_refused(data, tmp_path):
    s, t, _, _, _ = data
    out = tmp_path / "t"
    from bigalign.storage.job import Job
    with Job(f"{out}.checkpoint").lease(ttl=60):
        r = cli("fit", s, t, "-o", out, *SMALL, check=2)
    assert "another bigalign run holds this job" in r.stderr and f"pid {os.getpid()}" in r.stderr
    cli("fit", s, t, "-o", out, *SMALL, check=0)  # free once the first is gone


class Flaky:
    """A zarr array whose reads fail ``fails`` times (OSError) before succeeding, or
    always for the rows in ``bad``."""

    def __init__(self, arr, fails=0, bad=None):
        self._arr, self.fails, self.bad, self.calls = arr, fails, bad, 0
        self._lock = threading.Lock()

    def __getattr__(self, name):
        return getattr(self._arr, name)

    def _maybe_fail(self, sel):
        with self._lock:
            self.calls += 1
            if self.fails > 0:
                self.fails -= 1
                raise OSError("injected transient read error")
        if self.bad is not None and sel.start <= self.bad < sel.stop:
            raise OSError("injected persistent read error")

    def __getitem__(self, sel):
        self._maybe_fail(sel)
        return self._arr[sel]

    def get_basic_selection(self, sel, **kw):
        self._maybe_fail(sel)
        return self._arr.get_basic_selection(sel, **kw)


def test_transient_read_errors_are_retried(data, monkeypatch, tmp_path):
    s, t, _, ref, _ = data
    monkeypatch.setattr(stores, "RETRY_BACKOFF", 0.001)
    src = Flaky(zarr.open_array(s), fails=3)
    got = bigalign.fit(src, t, center=True, block_bytes=int(0.1 * 2**20))
    assert src.fails == 0 and src.calls == 80 + 3  # 80 reads, 3 of them retried
    assert np.array_equal(got.rotation, ref.rotation)


def test_persistent_read_error_names_the_chunk(data, monkeypatch, tmp_path):
    s, t, tmp, _, _ = data
    monkeypatch.setattr(stores, "RETRY_BACKOFF", 0.001)
    with pytest.raises(ChunkReadError, match=r"source rows 12000:12500 .*after 4 tries"):
        bigalign.fit(Flaky(zarr.open_array(s), bad=12345), t, output=str(tmp_path / "t"),
                     block_bytes=int(0.1 * 2**20))
    assert not (tmp_path / "t").exists()
    with pytest.raises(ChunkReadError, match=r"source rows 12000:12500"):
        bigalign.apply(str(tmp / "ref.t"), Flaky(zarr.open_array(s), bad=12345),
                       str(tmp_path / "o.zarr"), block_bytes=int(0.1 * 2**20))
    assert bigalign.output_status(str(tmp_path / "o.zarr"))["complete"] is False


def test_corrupt_chunk_cli_exit_2(tmp_path):
    a, b, _ = planted(1000, 4)
    s, t = write_zarr(tmp_path / "a.zarr", a, 100), write_zarr(tmp_path / "b.zarr", b, 100)
    (tmp_path / "b.zarr" / "c" / "4" / "0").write_bytes(b"\x00" * 7)
    r = cli("fit", s, t, "-o", tmp_path / "t", "-q", check=2)
    assert "cannot read target rows 400:500" in r.stderr


@pytest.mark.slow
def test_worker_killed_mid_fit(data, tmp_path):
    """One of two workers is SIGKILLed at its second block (a fault point armed in that
    worker alone; the nanny restarts it without it): the scheduler reruns its tasks and the
    fit gives the same rotation. Before, the kill came after a 2 s sleep and could land
    after the fit had finished."""
    distributed = pytest.importorskip("distributed")
    s, t, _, ref, _ = data
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address=":0") as cluster, \
            distributed.Client(cluster) as client:
        pids = client.run(os.getpid)
        victim = sorted(pids)[0]
        client.run(lambda: os.environ.__setitem__("BIGALIGN_FAULTS", "kill:fit.block@2"),
                   workers=[victim])  # a lambda runs there; os.environ's method would not
        got = bigalign.fit(s, t, center=True, scheduler=cluster.scheduler_address,
                           output=str(tmp_path / "t"), block_bytes=int(0.1 * 2**20))
        assert pids[victim] not in client.run(os.getpid).values()  # the kill landed
    assert np.array_equal(got.rotation, ref.rotation)
