"""Real clusters: ``dask scheduler`` and ``dask worker`` processes started from the command
line on 127.0.0.1 (a scheduler file, as dask-jobqueue and HPC launchers use), and fit and
apply through ``--scheduler-file`` and ``DASK_SCHEDULER_ADDRESS``, bit for bit equal to the
embedded (in-process) run: with a worker that has a nanny and one without (whose BLAS is not
pinned by any environment: bigalign pins it per task), and with a worker SIGKILLed in the
middle of an apply and a new one started in its place. Every process is torn down with
timeouts, whatever a test does."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

import bigalign
import bigalign.storage.job
from conftest import planted, write_zarr

distributed = pytest.importorskip("distributed")
pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
#: widens the window of the kill test: each region sleeps after its data, before its marker
DELAY = "delay:apply.region-written@0.1"


def _env(**extra) -> dict:
    """This interpreter's environment for a Dask process: bigalign importable from this
    checkout, no BLAS thread settings (a worker without nanny must really be unpinned), no
    scheduler address or faults unless given."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(REPO / "tests"),
                                         env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS",
              "BIGALIGN_FAULTS", "DASK_SCHEDULER_ADDRESS"):
        env.pop(k, None)
    env.update(extra)
    return env


class Cluster:
    """A scheduler started with ``dask scheduler --scheduler-file`` and the workers that
    tests add; :meth:`close` ends them all (SIGTERM, then SIGKILL after 10 s)."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        self.file = str(tmp / "scheduler.json")
        self.procs: list[subprocess.Popen] = []
        self.sched = self._start(["scheduler", "--host", "127.0.0.1", "--port", "0",
                                  "--scheduler-file", self.file, "--no-dashboard"], "scheduler")
        deadline = time.time() + 60
        while time.time() < deadline:
            try:
                self.address = json.loads(Path(self.file).read_text())["address"]
                break
            except (OSError, ValueError, KeyError):
                time.sleep(0.2)
        else:
            raise RuntimeError("dask scheduler did not write its scheduler file")
        self.client = distributed.Client(self.address, timeout="30s")

    def _start(self, args, name, env=None) -> subprocess.Popen:
        log = open(self.tmp / f"{name}-{len(self.procs)}.log", "wb")
        p = subprocess.Popen([sys.executable, "-m", "dask", *args], env=env or _env(),
                             stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def add_worker(self, *extra, env=None) -> subprocess.Popen:
        """Start ``dask worker --scheduler-file F --nthreads 1`` (plus ``extra``); wait until
        the scheduler sees one more worker."""
        before = len(self.client.scheduler_info()["workers"])
        p = self._start(["worker", "--scheduler-file", self.file, "--nthreads", "1",
                         "--host", "127.0.0.1", "--no-dashboard", *extra], "worker",
                        env or _env(BIGALIGN_FAULTS=DELAY))
        self.wait_workers(before + 1)
        return p

    def wait_workers(self, n: int, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while len(self.client.scheduler_info()["workers"]) != n:
            if time.time() > deadline:
                raise RuntimeError(f"expected {n} workers, scheduler has "
                                   f"{len(self.client.scheduler_info()['workers'])}")
            time.sleep(0.1)

    def stop(self, p: subprocess.Popen, sig=signal.SIGTERM) -> None:
        """Signal ``p``'s whole process group (a nanny and its worker), wait for it."""
        with _suppress():
            os.killpg(p.pid, sig)
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            with _suppress():
                os.killpg(p.pid, signal.SIGKILL)
            p.wait(timeout=10)

    def close(self) -> None:
        with _suppress():
            self.client.close(timeout=5)
        for p in reversed(self.procs):
            if p.poll() is None:
                self.stop(p)


class _suppress:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return exc[0] is not None and issubclass(exc[0], (OSError, ProcessLookupError,
                                                           TimeoutError))


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        c.nanny = c.add_worker()  # with a nanny (it sets OPENBLAS_NUM_THREADS=1 itself)
        c.bare = c.add_worker("--no-nanny")  # without: BLAS unpinned unless bigalign pins
        yield c
    finally:
        c.close()


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """Inputs big enough that OpenBLAS would use several threads for a block's GEMMs, and
    the embedded run's results."""
    tmp = tmp_path_factory.mktemp("cluster-data")
    a, b, _ = planted(24_000, 96, noise=0.1, offset_a=2.0, offset_b=-1.0, seed=31)
    s, t = write_zarr(tmp / "a.zarr", a, 500), write_zarr(tmp / "b.zarr", b, 500)
    kw = dict(center=True, block_bytes=1000 * 96 * 8)
    ref = bigalign.fit(s, t, threads=2, **kw)
    ref.save(str(tmp / "ref.t"))
    bigalign.apply(str(tmp / "ref.t"), s, str(tmp / "ref.zarr"), threads=2,
                   block_bytes=kw["block_bytes"])
    return s, t, tmp, kw, ref, zarr.open_array(str(tmp / "ref.zarr"))[:]


def _same(t, ref):
    for name in ("rotation", "source_mean", "target_mean"):
        np.testing.assert_array_equal(getattr(t, name), getattr(ref, name), err_msg=name)
    assert t.scale == ref.scale


def test_cli_through_scheduler_file_and_env_address(cluster, data, monkeypatch, tmp_path):
    """``fit --scheduler-file F`` and ``apply`` with DASK_SCHEDULER_ADDRESS set (no flag),
    on a worker with a nanny and one without: the embedded run's bits."""
    import dask
    from bigalign.cli import main
    s, t, _, kw, ref, ref_out = data
    block = str(kw["block_bytes"] / 2**20)
    assert main(["fit", s, t, "-o", str(tmp_path / "t"), "--center", "--block-mb", block,
                 "--scheduler-file", cluster.file, "-q"]) == 0
    fitted = bigalign.Transform.load(str(tmp_path / "t"))
    _same(fitted, ref)
    assert fitted.metadata["run"]["tasks"] > 2
    monkeypatch.setenv("DASK_SCHEDULER_ADDRESS", cluster.address)
    dask.config.refresh()
    try:
        from bigalign.execution.cluster import scheduler_from_config
        assert scheduler_from_config() == cluster.address
        assert main(["apply", str(tmp_path / "t"), s, "-o", str(tmp_path / "o.zarr"),
                     "--block-mb", block, "-q"]) == 0
    finally:
        monkeypatch.delenv("DASK_SCHEDULER_ADDRESS")
        dask.config.refresh()
    out = zarr.open_array(str(tmp_path / "o.zarr"))
    assert out.attrs["bigalign"]["complete"]
    np.testing.assert_array_equal(out[:], ref_out)
    # no worker keeps its per-thread buffers after the run
    from bigalign.execution import engine
    held = cluster.client.run(lambda: sum(len(p) for p in engine._buffers.values()))
    assert len(held) == 2 and set(held.values()) == {0}


def test_worker_without_nanny_pins_blas_per_task(cluster, data, tmp_path):
    """On ``dask worker --no-nanny`` nothing pins BLAS (no nanny environment): outside
    tasks the worker keeps its own setting, inside bigalign's tasks it has one thread, and
    a fit run there alone equals the embedded one bit for bit."""
    from threadpoolctl import threadpool_info
    from bigalign.execution.cluster import run_task

    def blas_threads():
        return max([i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"],
                   default=1)

    bare = [w for w, info in cluster.client.scheduler_info()["workers"].items()
            if info.get("nanny") is None]
    assert len(bare) == 1
    outside = cluster.client.run(blas_threads, workers=bare)[bare[0]]
    if (os.cpu_count() or 1) > 1:
        assert outside > 1  # really unpinned there
    assert cluster.client.submit(run_task, blas_threads, workers=bare, pure=False).result() == 1
    assert cluster.client.run(blas_threads, workers=bare)[bare[0]] == outside  # restored
    # the worker with a nanny leaves: the fit runs on the unpinned worker only
    cluster.stop(cluster.nanny)
    cluster.wait_workers(1)
    s, t, _, kw, ref, _ = data
    _same(bigalign.fit(s, t, scheduler=cluster.file, **kw), ref)


def test_worker_killed_mid_apply_and_replaced(cluster, data, tmp_path):
    """SIGKILL a worker while regions are being written (each sleeps after its data), start
    a new one: the scheduler re-runs the lost tasks there, and the output equals the
    embedded run's bytes, verified region by region before ``complete``."""
    s, t, tmp, kw, _, ref_out = data
    out = str(tmp_path / "o.zarr")
    done_dir = Path(bigalign.storage.job.default_checkpoint(out)) / "done"
    result: dict = {}

    def run():
        try:
            result["report"] = bigalign.apply(str(tmp / "ref.t"), s, out,
                                              scheduler=cluster.file,
                                              block_bytes=kw["block_bytes"])
        except BaseException as e:  # reported below
            result["error"] = e

    if len(cluster.client.scheduler_info()["workers"]) < 2:
        cluster.add_worker()
    th = threading.Thread(target=run)
    th.start()
    deadline = time.time() + 60
    while time.time() < deadline and th.is_alive():
        if done_dir.is_dir() and len(os.listdir(done_dir)) >= 3:
            break
        time.sleep(0.05)
    assert th.is_alive(), result
    cluster.stop(cluster.bare, signal.SIGKILL)  # mid-apply, no goodbye
    replacement = cluster.add_worker("--no-nanny")
    th.join(timeout=120)
    assert not th.is_alive() and "error" not in result, result
    rep = result["report"]
    assert rep.rows == rep.rows_total == len(ref_out)
    arr = zarr.open_array(out)
    assert arr.attrs["bigalign"]["complete"]
    np.testing.assert_array_equal(arr[:], ref_out)
    assert replacement.poll() is None


# --- a lost scheduler, lost workers, an unreachable scheduler: exit code 75, rerun resumes ---

#: each region sleeps after its data, before its marker: the kill lands mid-run
SLOW = "delay:apply.region-written@0.4"


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    """A transform, its input (24 chunks of 250 rows: 24 region tasks at --block-mb 0.015)
    and the bytes an uninterrupted in-process apply writes."""
    tmp = tmp_path_factory.mktemp("lost-data")
    a, b, _ = planted(6000, 16, noise=0.05, offset_a=1.0, seed=41)
    s, t = write_zarr(tmp / "a.zarr", a, 250), write_zarr(tmp / "b.zarr", b, 250)
    bigalign.fit(s, t, center=True).save(str(tmp / "t"))
    # the same blocks as the runs below (--block-mb 0.015): a BLAS may round a GEMM of 250
    # rows and one of 6,000 differently (OpenBLAS's small-matrix kernels do), so bytes
    # are compared between runs of the same plan
    bigalign.apply(str(tmp / "t"), s, str(tmp / "ref.zarr"), block_bytes=int(0.015 * 2**20))
    return str(tmp / "t"), s, zarr.open_array(str(tmp / "ref.zarr"))[:]


def _apply_cli(small, out, scheduler, *extra, stderr=None) -> subprocess.Popen:
    transform, source, _ = small
    return subprocess.Popen(
        [sys.executable, "-m", "bigalign.cli", "apply", transform, source, "-o", str(out),
         "--scheduler", scheduler, "--block-mb", "0.015", *extra],
        env=_env(), stdout=subprocess.DEVNULL, stderr=stderr or subprocess.PIPE)


def _wait_first_marker(out, proc) -> None:
    """Until the run has stored its first region (a done-marker): it has demonstrably
    started on the cluster."""
    done = Path(bigalign.storage.job.default_checkpoint(str(out))) / "done"
    deadline = time.time() + 120
    while not (done.is_dir() and os.listdir(done)):
        assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else proc.returncode
        assert time.time() < deadline, "the apply stored no region within 120 s"
        time.sleep(0.05)


def _resumed_to_reference(small, out, scheduler) -> str:
    """Rerun the same apply on ``scheduler``: exit 0, resumed, the reference bytes."""
    proc = _apply_cli(small, out, scheduler)
    _, err = proc.communicate(timeout=300)
    err = err.decode()
    assert proc.returncode == 0, err
    assert "resuming" in err, err
    arr = zarr.open_array(str(out))
    assert arr.attrs["bigalign"]["complete"]
    np.testing.assert_array_equal(arr[:], small[2])
    return err


def test_scheduler_killed_mid_apply_exits_75_and_rerun_resumes(small, tmp_path):
    """SIGKILL the scheduler once the apply has stored a region: exit 75 with one line
    naming the lost scheduler (it was exit 1 with distributed's FutureCancelledError
    traceback, which a Kubernetes podFailurePolicy takes for a bug); a rerun on a new
    scheduler resumes and writes the uninterrupted run's bytes."""
    out = tmp_path / "o.zarr"
    (tmp_path / "c1").mkdir()
    (tmp_path / "c2").mkdir()
    first = Cluster(tmp_path / "c1")
    try:
        first.add_worker(env=_env(BIGALIGN_FAULTS=SLOW))
        proc = _apply_cli(small, out, first.file)
        _wait_first_marker(out, proc)
        first.stop(first.sched, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
    finally:
        first.close()
    err = err.decode()
    assert proc.returncode == 75, err
    assert "Traceback" not in err and "FutureCancelledError" not in err, err
    assert f"the Dask scheduler at {first.address}" in err and "was lost" in err, err
    assert not zarr.open_array(str(out)).attrs["bigalign"].get("complete")  # killed mid-run
    second = Cluster(tmp_path / "c2")
    try:
        second.add_worker(env=_env())
        _resumed_to_reference(small, out, second.file)
    finally:
        second.close()


def _sleep_then(seconds, value):
    time.sleep(seconds)
    return value


def test_all_workers_lost_mid_apply_exits_75_after_the_stall_timeout(small, tmp_path):
    """SIGKILL the only worker once the apply has stored a region: the run stopped waiting
    for ever (printing the same progress line); now, after --stall-timeout seconds with no
    worker, it exits 75 naming the scheduler, its tasks cancelled on the scheduler. A task
    that runs longer than the stall timeout on a live worker does not trip it. With a
    worker back, the rerun resumes to the uninterrupted run's bytes."""
    from bigalign.execution.cluster import Session

    out = tmp_path / "o.zarr"
    c = Cluster(tmp_path)
    try:
        worker = c.add_worker(env=_env(BIGALIGN_FAULTS=SLOW))
        # a long healthy task is not a stall: the watchdog counts workers, not finished tasks
        assert Session(c.client, stall_timeout=0.5).get(
            {"long": (_sleep_then, 2.0, 7)}, "long") == 7
        proc = _apply_cli(small, out, c.file, "--stall-timeout", "3", "-q")
        _wait_first_marker(out, proc)
        c.stop(worker, signal.SIGKILL)
        _, err = proc.communicate(timeout=120)
        err = err.decode()
        assert proc.returncode == 75, err
        assert "Traceback" not in err, err
        assert f"workers lost: the Dask scheduler at {c.address}" in err, err
        assert "had no worker for 3 s" in err, err
        assert not zarr.open_array(str(out)).attrs["bigalign"].get("complete")
        # the run's tasks are gone from the scheduler (cancelled, its client closed)
        left = c.client.run_on_scheduler(lambda dask_scheduler: len(dask_scheduler.tasks))
        assert left == 0
        c.add_worker(env=_env())
        _resumed_to_reference(small, out, c.file)
    finally:
        c.close()


def test_unreachable_scheduler_exits_75_with_one_line(small, tmp_path):
    """A scheduler address nobody listens on (distributed's connect timeout, shortened
    here) and a scheduler file that never appears (waited for up to the stall timeout;
    it was waited for for ever): exit 75, one line naming the scheduler."""
    import socket

    with socket.socket() as sock:  # a free port: bound, then closed
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = _env(DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT="2s")
    transform, source, _ = small
    for scheduler, says in [(f"tcp://127.0.0.1:{port}", "cannot reach the Dask scheduler at "
                                                        f"tcp://127.0.0.1:{port}"),
                            (str(tmp_path / "none.json"), "no Dask scheduler wrote its "
                                                          "scheduler file")]:
        proc = subprocess.run(
            [sys.executable, "-m", "bigalign.cli", "apply", transform, source, "-o",
             str(tmp_path / "o.zarr"), "--scheduler", scheduler, "--stall-timeout", "1"],
            env=env, capture_output=True, timeout=120)
        err = proc.stderr.decode()
        assert proc.returncode == 75, err
        assert says in err and "Traceback" not in err, err


def test_distributed_errors_of_a_lost_cluster_map_to_exit_75():
    """The one mapping of distributed's lost-cluster errors (execution.cluster): a lost
    scheduler (FutureCancelledError, CommClosedError, a closed client) and a task whose
    workers kept dying (KilledWorker) are ClusterLostError, exit 75 with the scheduler named;
    a task's own error is left as it is."""
    from distributed import KilledWorker
    from distributed.client import ClosedClientError, FutureCancelledError
    from distributed.comm.core import CommClosedError

    from bigalign.errors import ClusterLostError, NonFiniteError, exit_code
    from bigalign.execution.cluster import _cluster_lost

    where = "tcp://10.0.0.1:8786"
    for e in (FutureCancelledError("apply-3", "scheduler-connection-lost"),
              CommClosedError("in <TCP>: ConnectionRefusedError"), ClosedClientError()):
        lost = _cluster_lost(e, where)
        assert isinstance(lost, ClusterLostError) and exit_code(lost) == 75
        assert f"the Dask scheduler at {where} was lost" in str(lost)
    assert "scheduler-connection-lost" in str(_cluster_lost(
        FutureCancelledError("k", "scheduler-connection-lost"), where))
    killed = _cluster_lost(KilledWorker("apply-region-7", None, 3), where)
    assert isinstance(killed, ClusterLostError) and exit_code(killed) == 75
    assert "'apply-region-7'" in str(killed) and "4 workers" in str(killed)
    assert _cluster_lost(NonFiniteError("row 5"), where) is None
    assert _cluster_lost(ValueError("x"), where) is None


def test_stall_timeout_setting(monkeypatch):
    """--stall-timeout (stall_timeout_set) over BIGALIGN_STALL_TIMEOUT over 300 s; 0 waits
    for ever (None); a bad value is refused naming where it came from (exit 2)."""
    from bigalign.errors import InputError, exit_code
    from bigalign.execution.cluster import stall_timeout, stall_timeout_set

    monkeypatch.delenv("BIGALIGN_STALL_TIMEOUT", raising=False)
    assert stall_timeout() == 300
    monkeypatch.setenv("BIGALIGN_STALL_TIMEOUT", "12.5")
    assert stall_timeout() == 12.5
    with stall_timeout_set(4):
        assert stall_timeout() == 4 and stall_timeout(7) == 7
    with stall_timeout_set(0):
        assert stall_timeout() is None
    assert stall_timeout() == 12.5
    monkeypatch.setenv("BIGALIGN_STALL_TIMEOUT", "soon")
    with pytest.raises(InputError, match="BIGALIGN_STALL_TIMEOUT must be a number") as e:
        stall_timeout()
    assert exit_code(e.value) == 2
    with pytest.raises(InputError, match="stall_timeout"):
        stall_timeout(-1)


def test_task_whose_workers_keep_dying_exits_75(small, tmp_path):
    """Every worker that runs a region dies there (SIGKILL at the region-written point; the
    nanny starts a new one): after distributed.scheduler.allowed-failures + 1 deaths the
    scheduler gives up on the task (KilledWorker, a traceback and exit 1 before). bigalign
    cannot tell an out-of-memory kill from pre-empted nodes and the work done is kept:
    exit 75 with one line naming the task and what to check."""
    out = tmp_path / "o.zarr"
    c = Cluster(tmp_path)
    try:
        c.add_worker(env=_env(BIGALIGN_FAULTS="kill:apply.region-written@1"))
        proc = _apply_cli(small, out, c.file, "-q")
        _, err = proc.communicate(timeout=240)
    finally:
        c.close()
    err = err.decode()
    assert proc.returncode == 75, err
    assert "Traceback" not in err and "KilledWorker" not in err, err
    assert "workers lost: every worker that ran task" in err and c.address in err, err


def test_ctrl_c_with_local_workers_is_quiet_and_resumes(small, tmp_path):
    """A terminal's Ctrl-C (SIGINT to the whole process group) during ``apply --workers 2``:
    exit 130 with bigalign's one line, none of the workers' KeyboardInterrupt tracebacks or
    distributed's CancelledError warnings (the workers ignore SIGINT; the client closes
    them); the rerun resumes to the reference bytes. The progress lines count the tasks
    the first line names."""
    transform, source, ref = small
    out = tmp_path / "o.zarr"
    argv = [sys.executable, "-m", "bigalign.cli", "apply", transform, source, "-o", str(out),
            "--workers", "2", "--block-mb", "0.015"]
    proc = subprocess.Popen(argv, env=_env(BIGALIGN_FAULTS=SLOW), stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, start_new_session=True)
    _wait_first_marker(out, proc)
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=300)
    err = err.decode()
    assert proc.returncode == 130, err
    assert "interrupted; rerun the same command to resume" in err
    assert "Traceback" not in err and "CancelledError" not in err, err
    done = subprocess.run(argv, env=_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    np.testing.assert_array_equal(zarr.open_array(str(out))[:], ref)
    import re
    first = re.search(r"in (\d+) tasks", done.stderr)
    totals = set(re.findall(r"of (\d+) tasks", done.stderr))
    assert first and totals == {first.group(1)}, done.stderr
