"""Where the work runs: in-process threads by default, a LocalCluster of worker processes,
or an existing dask.distributed scheduler (dask-jobqueue, Kubernetes, ...).

BLAS threads: OpenBLAS's own threads on top of Dask's threads collapse throughput (3-5x
slower, measured), so the in-process default pins BLAS to one thread per Dask thread with
threadpoolctl. dask.distributed's nanny already starts workers with OPENBLAS_NUM_THREADS=1
(config ``distributed.nanny.pre-spawn-environ``).

Retries: only transient errors are retried, inside the task that met them. Reads and
writes of chunks retry in :mod:`bigalign.stores`; any other transient error of a task (a
checkpoint write to an object store that blinked, say: :func:`bigalign.errors.is_transient`)
re-runs the task a few times (:func:`run_task`, every task is idempotent). The graph goes to
dask.distributed with ``retries=0``: its retries re-run a task whatever it raised, so a NaN row
or a corrupt chunk would be read three times before the error reached the user. A worker that
dies is not an error of the task: the scheduler reschedules its tasks regardless of
``retries`` (up to ``distributed.scheduler.allowed-failures`` deaths per task).

Progress goes to stderr: a bar on a terminal, and where stderr is a file or a pipe (batch
logs) one line per 10% of the tasks or per PROGRESS_INTERVAL seconds, never ``\\r``.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from typing import Optional

import dask
from dask.callbacks import Callback

__all__ = ["session", "Session", "run_task"]

#: seconds between progress lines when stderr is not a terminal (at least one per 10%)
PROGRESS_INTERVAL = 10.0


def run_task(func, *args):
    """Run one task, re-running it when it raises a transient error that nothing below
    retried (bigalign's own errors, transient ones included, are final: their retries are
    done). Deterministic errors propagate at once, unchanged."""
    from .errors import BigalignError, is_transient
    from .stores import RETRIES, RETRY_BACKOFF

    for attempt in range(RETRIES + 1):
        try:
            return func(*args)
        except Exception as e:
            if attempt == RETRIES or isinstance(e, BigalignError) or not is_transient(e):
                raise
            time.sleep(RETRY_BACKOFF * 2**attempt)


def _guarded(graph: dict) -> dict:
    """The graph with every task ``(func, *args)`` run through :func:`run_task`."""
    return {k: (run_task, *v) if type(v) is tuple and v and callable(v[0]) else v
            for k, v in graph.items()}


class Session:
    """A way to run a Dask graph: ``client`` is None for the in-process threaded scheduler."""

    def __init__(self, client=None, threads: Optional[int] = None, progress: bool = False):
        self.client = client
        self.threads = threads
        self.progress = progress

    def get(self, graph: dict, key):
        """Compute ``key`` of a raw task graph; exceptions of tasks propagate unchanged."""
        graph = _guarded(graph)
        if self.client is not None:
            future = self.client.get(graph, key, sync=False, retries=0)
            if self.progress:
                _distributed_progress(future, Reporter())
            return future.result()
        from threadpoolctl import threadpool_limits

        with contextlib.ExitStack() as stack:
            stack.enter_context(threadpool_limits(limits=1))
            if self.progress:
                stack.enter_context(_ThreadedProgress(Reporter()))
            try:
                return dask.threaded.get(graph, key, num_workers=self.threads)
            finally:
                from .engine import release_buffers
                release_buffers()


class Reporter:
    """Writes progress to ``stream`` (default stderr): a ``\\r`` bar on a terminal; else
    plain lines, one per 10% of the tasks or per ``interval`` seconds, whichever comes first
    (log files of batch jobs stay readable). Write errors are ignored: a closed stderr
    must not fail a run."""

    def __init__(self, stream=None, tty: Optional[bool] = None,
                 interval: Optional[float] = None, width: int = 40):
        self.stream = stream if stream is not None else sys.stderr
        if tty is None:
            try:
                tty = self.stream.isatty()
            except (AttributeError, ValueError):
                tty = False
        self.tty = tty
        self.interval = PROGRESS_INTERVAL if interval is None else interval
        self.width = width
        self.started = time.monotonic()
        self._last_line = self.started
        self._last_tenth = -1
        self._last_done = None
        self._drawn = False
        self._lock = threading.Lock()

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except (OSError, ValueError):
            pass

    def update(self, done: int, total: int, final: bool = False) -> None:
        """Report ``done`` of ``total`` tasks (``final``: the run ended)."""
        with self._lock:
            now = time.monotonic()
            elapsed = now - self.started
            frac = done / total if total else 1.0
            if self.tty:
                if not final and now - self._last_line < 0.1 and done != total:
                    return
                self._last_line = now
                bar = "#" * int(self.width * frac)
                self._write(f"\r[{bar:<{self.width}}] | {int(100 * frac):3d}% | {done} of "
                            f"{total} tasks | {_duration(elapsed)}" + ("\n" if final else ""))
                self._drawn = not final
                return
            tenth = int(10 * frac)
            due = now - self._last_line >= self.interval
            if not (final or tenth > self._last_tenth or due):
                return
            if final and self._last_done == done and done == total:
                return  # the 100% line is already there
            self._last_tenth, self._last_line, self._last_done = tenth, now, done
            eta = ""
            if 0 < done < total and elapsed >= 1:
                eta = f", about {_duration(elapsed * (total - done) / done)} left"
            state = " (stopped)" if final and done < total else ""
            self._write(f"bigalign: progress {int(100 * frac)}% ({done} of {total} tasks) "
                        f"after {_duration(elapsed)}{eta}{state}\n")

    def close(self) -> None:
        """End a bar left open (an error or interrupt stopped the run)."""
        with self._lock:
            if self.tty and self._drawn:
                self._write("\n")
                self._drawn = False


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds}s"
    m, s = divmod(seconds, 60)
    if m < 60:
        return f"{m}m{s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m"


class _ThreadedProgress(Callback):
    """Progress of the threaded scheduler: a polling thread reads the scheduler's state
    (as dask.diagnostics.ProgressBar does) so that lines keep coming while tasks run."""

    def __init__(self, reporter: Reporter, poll: float = 0.5):
        super().__init__()
        self.reporter = reporter
        self.poll = poll
        self._state = None
        self._stop = threading.Event()
        self._thread = None

    def _start(self, dsk):
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bigalign-progress")
        self._thread.start()

    def _pretask(self, key, dsk, state):
        self._state = state

    def _posttask(self, key, result, dsk, state, worker_id):
        self._state = state
        done, total = self._counts()
        self.reporter.update(done, total)

    def _counts(self):
        s = self._state
        if not s:
            return 0, 0
        done = len(s["finished"])
        return done, done + sum(len(s[k]) for k in ("ready", "waiting", "running"))

    def _run(self):
        while not self._stop.wait(self.poll):
            done, total = self._counts()
            if total:
                self.reporter.update(done, total)

    def _finish(self, dsk, state, errored):
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._state = state
        done, total = self._counts()
        if total:
            self.reporter.update(done, total, final=True)
        self.reporter.close()


def _distributed_progress(future, reporter: Reporter) -> None:
    """Report the progress of ``future`` and everything it depends on, as the scheduler
    sees it (distributed's own text bar writes ``\\r`` updates to stdout)."""
    from distributed.diagnostics.progressbar import TextProgressBar

    class _Bar(TextProgressBar):
        def _draw_bar(self, remaining, all, **kwargs):
            reporter.update(all - remaining, all)

        def _draw_stop(self, remaining=0, all=0, status=None, **kwargs):
            reporter.update(all - remaining, all, final=True)

    try:
        _Bar([future], scheduler=future.client.scheduler.address, interval="500ms")
    finally:
        reporter.close()


@contextlib.contextmanager
def session(scheduler: Optional[str] = None, workers: Optional[int] = None,
            memory_limit: Optional[str] = None, threads: Optional[int] = None,
            progress: bool = False):
    """Yield a Session.

    scheduler : address of a running dask.distributed scheduler (``tcp://host:8786``) or a
        path to its scheduler file; the cluster's workers do the work.
    workers : start a LocalCluster of this many worker processes (one thread each), each
        limited to ``memory_limit`` (e.g. "4GiB").
    neither : threads in this process (``threads``, default: one per core).
    """
    if scheduler and workers:
        raise ValueError("give either a scheduler address or a number of workers, not both")
    if scheduler:
        from distributed import Client

        kw = {"scheduler_file": scheduler} if scheduler.endswith(".json") else {"address": scheduler}
        with Client(**kw) as client:
            yield Session(client, progress=progress)
    elif workers:
        from distributed import Client, LocalCluster

        with LocalCluster(n_workers=int(workers), threads_per_worker=1, processes=True,
                          memory_limit=memory_limit or "auto", dashboard_address=":0",
                          host="127.0.0.1") as cluster, Client(cluster) as client:
            yield Session(client, progress=progress)
    else:
        yield Session(None, threads=threads, progress=progress)
