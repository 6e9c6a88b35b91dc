"""Where the work runs: in-process threads by default, a LocalCluster of worker processes,
or an existing dask.distributed scheduler (dask-jobqueue, Kubernetes, ...).

BLAS threads: OpenBLAS's own threads on top of Dask's threads collapse throughput (3-5x
slower, measured), and a GEMM split over another number of BLAS threads can round
differently (a fit on ``dask worker --no-nanny`` differed from the in-process one by 6e-9).
So every task runs with BLAS pinned to one thread (:func:`blas_pinned`, in
:func:`run_task`), whatever runs it: the in-process threads, a LocalCluster, a worker with a
nanny (which sets OPENBLAS_NUM_THREADS=1 itself) or without one. The pin is held only while
bigalign tasks run, not for the whole run: see :func:`blas_pinned` for what that means to
other threads of the same process.

Per-thread buffers (:func:`bigalign.execution.engine.buffer`) are released at the end of every run, in
this process and, on a cluster, on every worker (long-lived workers would keep them).

Which cluster: ``scheduler`` is an address (``tcp://host:8786``) or a scheduler file (the
JSON that ``dask scheduler --scheduler-file`` writes); with neither ``scheduler`` nor
``workers``, the scheduler named by Dask's configuration (``DASK_SCHEDULER_ADDRESS``, or
``scheduler-address`` in a Dask config file) is used when set, as ``distributed.Client()``
does; otherwise threads in this process.

Retries: only transient errors are retried, inside the task that met them. Reads and
writes of chunks retry in :mod:`bigalign.storage.stores`; any other transient error of a task (a
checkpoint write to an object store that blinked, say: :func:`bigalign.errors.is_transient`)
re-runs the task a few times (:func:`run_task`, every task is idempotent). The graph goes to
dask.distributed with ``retries=0``: its retries re-run a task whatever it raised, so a NaN row
or a corrupt chunk would be read three times before the error reached the user. A worker that
dies is not an error of the task: the scheduler reschedules its tasks regardless of
``retries`` (up to ``distributed.scheduler.allowed-failures`` deaths per task).

Progress goes to stderr (:mod:`bigalign.execution.progress`).

A cluster that goes away ends the run with :class:`bigalign.errors.ClusterLostError` (exit
code 75; what finished is kept and a rerun resumes), never with distributed's own errors:
a scheduler that cannot be reached at the start (distributed's connect timeout,
``distributed.comm.timeouts.connect``, 30 s by default) or whose scheduler file does not
appear within the stall timeout; a scheduler lost mid-run (the client's futures are
cancelled with ``FutureCancelledError``, its comms closed: ``CommClosedError``); a task
whose workers kept dying (``KilledWorker``: bigalign cannot tell an out-of-memory kill from
a pre-empted node, and work done is kept, so a rerun, perhaps with more memory per worker,
is the remedy); and the stall watchdog (:class:`_Watchdog`): a scheduler that has had no
worker, or has not answered, for the whole stall timeout (:func:`stall_timeout`: default
``DEFAULT_STALL_TIMEOUT`` s, ``BIGALIGN_STALL_TIMEOUT`` or ``--stall-timeout``; 0 waits
forever). The rule counts workers, not finished tasks, so a long task never trips it, nor
does a run queued behind other clients' work on a shared cluster; it counts from the start
of each graph, so workers that take longer than that to arrive (a batch queue) need a longer
stall timeout. The threaded scheduler in this process has no workers to lose and no
watchdog.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os
import re
import threading
import time
from typing import Optional

import dask

from .graph import task_count
from .progress import Reporter, _ThreadedProgress, _distributed_progress

__all__ = ["session", "Session", "run_task", "blas_pinned", "scheduler_from_config",
           "client_arguments", "stall_timeout", "stall_timeout_set", "DEFAULT_STALL_TIMEOUT",
           "STALL_ENV"]

log = logging.getLogger("bigalign")

#: seconds a run on dask.distributed waits with no worker (or no answer from the scheduler)
#: before it stops with exit code 75 (:func:`stall_timeout`)
DEFAULT_STALL_TIMEOUT = 300.0
#: environment variable that sets the stall timeout (seconds; 0 waits forever)
STALL_ENV = "BIGALIGN_STALL_TIMEOUT"
_stall_override: contextvars.ContextVar = contextvars.ContextVar("bigalign_stall_timeout",
                                                                 default=None)


def _seconds(value, name: str) -> float:
    """``value`` as a number of seconds >= 0, else InputError naming ``name``."""
    from ..errors import InputError

    try:
        seconds = float(value)
    except (TypeError, ValueError):
        seconds = float("nan")
    if not (seconds >= 0 and seconds != float("inf")):
        raise InputError(f"{name} must be a number of seconds >= 0 (0: wait forever), got "
                         f"{value!r}")
    return seconds


def stall_timeout(value: Optional[float] = None) -> Optional[float]:
    """The stall timeout in seconds, or None for none (0 given: wait forever): ``value``
    when given, else the one set by :func:`stall_timeout_set` (the CLI's
    ``--stall-timeout``), else ``BIGALIGN_STALL_TIMEOUT``, else DEFAULT_STALL_TIMEOUT. A
    negative or non-numeric value raises InputError naming where it came from."""
    if value is not None:
        seconds = _seconds(value, "stall_timeout")
    elif _stall_override.get() is not None:
        seconds = _seconds(_stall_override.get(), "--stall-timeout")
    elif os.environ.get(STALL_ENV, "").strip():
        seconds = _seconds(os.environ[STALL_ENV].strip(), STALL_ENV)
    else:
        seconds = DEFAULT_STALL_TIMEOUT
    return seconds or None


@contextlib.contextmanager
def stall_timeout_set(value: Optional[float]):
    """Within the body, :func:`stall_timeout` defaults to ``value`` (seconds; None: leave
    the default as it is). The CLI's ``--stall-timeout``."""
    token = _stall_override.set(value) if value is not None else None
    try:
        yield
    finally:
        if token is not None:
            _stall_override.reset(token)


_pin_lock = threading.Lock()
_pin_count = 0
_pin_saved: list = []  # (setter, previous thread count) while pinned
_pin_libs = None  # [(get, set)] per BLAS library loaded in this process


def _blas_libraries() -> list:
    """(get, set) of the thread count of every BLAS library loaded in this process, found
    once by threadpoolctl. OpenBLAS's own setter is called directly: threadpoolctl 3.8 lets
    only the first thread that set an OpenBLAS (pthreads) limit set it again and silently
    ignores the others, which in a pool of Dask threads left tasks unpinned. SciPy's BLAS
    (the fit's rank-1 updates call it) is loaded first, so that a process which had not
    imported SciPy yet does not leave that second library unpinned."""
    import scipy.linalg.blas  # noqa: F401  (loads SciPy's OpenBLAS before the scan)
    from threadpoolctl import ThreadpoolController

    out = []
    for lib in ThreadpoolController().lib_controllers:
        if lib.user_api != "blas":
            continue
        setter = None
        if lib.internal_api == "openblas":
            for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                         "openblas_set_num_threads64_", "openblas_set_num_threads"):
                setter = getattr(lib.dynlib, name, None)
                if setter is not None:
                    break
        out.append((lib.get_num_threads, setter or lib.set_num_threads))
    return out


@contextlib.contextmanager
def blas_pinned():
    """BLAS limited to one thread while the body runs.

    The BLAS thread count is process state (OpenBLAS keeps one number per process, even
    behind its ``..._local`` setter; MKL's global setting likewise), so the pin is counted:
    the first task to enter sets one thread, the last to leave restores what was there
    before. While any bigalign task runs in a process, every other thread of that process
    (a library user's own numpy work, say) also gets one BLAS thread; between runs, and
    after them, their setting is back as it was. Entering costs microseconds (the library
    scan is done once per process)."""
    global _pin_count, _pin_libs
    with _pin_lock:
        if _pin_count == 0:
            try:
                if _pin_libs is None:
                    _pin_libs = _blas_libraries()
                for get, set_ in _pin_libs:
                    before = get()
                    if before != 1:
                        set_(1)
                        _pin_saved.append((set_, before))
            except Exception:  # no threadpoolctl support here: run unpinned
                pass
        _pin_count += 1
    try:
        yield
    finally:
        with _pin_lock:
            _pin_count -= 1
            if _pin_count == 0:
                while _pin_saved:
                    set_, before = _pin_saved.pop()
                    try:
                        set_(before)
                    except Exception:
                        pass


def run_task(func, *args):
    """Run one task with BLAS pinned to one thread (:func:`blas_pinned`), re-running it
    when it raises a transient error that nothing below retried (bigalign's own errors,
    transient ones included, are final: their retries are done). Deterministic errors
    propagate at once, unchanged."""
    from ..errors import BigalignError, is_transient
    from ..storage.stores import RETRIES, RETRY_BACKOFF

    for attempt in range(RETRIES + 1):
        try:
            with blas_pinned():
                return func(*args)
        except Exception as e:
            if attempt == RETRIES or isinstance(e, BigalignError) or not is_transient(e):
                raise
            time.sleep(RETRY_BACKOFF * 2**attempt)


def _release_everywhere(client) -> None:
    """Free the per-thread buffers of every worker (and this process's) after a run; a
    worker that is gone or slow to answer is skipped (its buffers go with it)."""
    from .engine import release_buffers

    release_buffers()
    try:
        client.run(release_buffers, on_error="ignore")
    except Exception:
        pass


def _guarded(graph: dict) -> dict:
    """The graph with every task ``(func, *args)`` run through :func:`run_task`."""
    return {k: (run_task, *v) if type(v) is tuple and v and callable(v[0]) else v
            for k, v in graph.items()}


class Session:
    """A way to run a Dask graph: ``client`` is None for the in-process threaded scheduler.
    ``stall_timeout``: seconds without a worker before a distributed run stops (None: the
    default of :func:`stall_timeout`); ``where``: the scheduler as the user named it (for
    messages)."""

    def __init__(self, client=None, threads: Optional[int] = None, progress: bool = False,
                 stall_timeout: Optional[float] = None, where: Optional[str] = None):
        self.client = client
        self.threads = threads
        self.progress = progress
        self.stall_timeout = stall_timeout
        self.where = where

    def get(self, graph: dict, key):
        """Compute ``key`` of a raw task graph; exceptions of tasks propagate unchanged. On
        dask.distributed, a lost scheduler, a task whose workers kept dying and a scheduler
        without workers for the stall timeout raise ClusterLostError (exit code 75); the
        run's tasks are cancelled when it stops while the scheduler is there."""
        graph = _guarded(graph)
        if self.client is not None:
            return self._distributed(graph, key)
        with contextlib.ExitStack() as stack:
            if self.progress:
                stack.enter_context(_ThreadedProgress(Reporter()))
            try:
                return dask.threaded.get(graph, key, num_workers=self.threads)
            finally:
                from .engine import release_buffers
                release_buffers()

    def _distributed(self, graph: dict, key):
        limit = stall_timeout(self.stall_timeout)
        where = _scheduler_name(self.client, self.where)
        future = watchdog = None
        lost = False
        try:
            future = self.client.get(graph, key, sync=False, retries=0)
            if limit:
                watchdog = _Watchdog(self.client, future, limit, where)
            if self.progress:
                _distributed_progress(future, Reporter(), len(graph) - task_count(graph))
            return future.result()
        except Exception as e:
            error = watchdog.error if watchdog is not None else None
            error = error or _cluster_lost(e, where)
            if error is None:
                raise
            from distributed import KilledWorker
            # the scheduler itself is gone (not stalled, not a task's dying workers): asking
            # it anything more would wait for distributed's connect timeout in vain
            lost = not (watchdog is not None and watchdog.error is not None) and \
                not isinstance(e, KilledWorker)
            raise error from e
        finally:
            if watchdog is not None:
                watchdog.stop()
            if future is not None and not lost and not future.done():
                with contextlib.suppress(Exception):  # stopped (interrupt): the scheduler
                    future.cancel()                    # need not run the rest
            if not lost:  # a lost scheduler would be waited for (connect timeout) in vain
                _release_everywhere(self.client)


def _scheduler_name(client, named: Optional[str]) -> str:
    """The scheduler's address, and how the user named it when that differs (a file)."""
    try:
        address = client.scheduler.address
    except Exception:
        address = None
    if address and named and str(named) != address:
        return f"{address} ({named})"
    return str(address or named or "?")


def _cluster_lost(e: BaseException, where: str):
    """ClusterLostError for distributed's errors of a lost cluster (see module doc), None
    for anything else (a task's own error propagates unchanged)."""
    import concurrent.futures

    from distributed import KilledWorker
    from distributed.client import ClosedClientError
    from distributed.comm.core import CommClosedError

    from ..errors import ClusterLostError

    if isinstance(e, KilledWorker):
        task, tries = e.args[0] if e.args else "?", None
        with contextlib.suppress(Exception):
            tries = int(e.allowed_failures) + 1
        last = getattr(getattr(e, "last_worker", None), "address", None)
        return ClusterLostError(
            f"workers lost: every worker that ran task {task!r} died"
            f"{f' ({tries} workers' if tries else ''}"
            f"{f', the last {last}' if last else ''}{')' if tries else ''}, on the Dask "
            f"scheduler at {where}. Out of memory? See the workers' logs; give them more "
            "memory or pass a smaller --block-mb. Finished work is kept: rerun to resume")
    if isinstance(e, (concurrent.futures.CancelledError, CommClosedError, ClosedClientError)):
        why = getattr(e, "reason", None) or type(e).__name__
        return ClusterLostError(f"the Dask scheduler at {where} was lost ({why}); finished "
                                "work is kept: rerun to resume")
    return None


class _Watchdog:
    """Stops a distributed run that cannot progress: polls the scheduler's worker count
    every ``limit``/10 s (0.2 to 5 s) in a thread, and when the scheduler has had no worker,
    or has not answered, at every poll for ``limit`` seconds, sets :attr:`error` (a
    ClusterLostError) and cancels ``future`` (so the scheduler drops the run's tasks, and
    the caller's wait ends)."""

    def __init__(self, client, future, limit: float, where: str):
        self.client, self.future, self.limit, self.where = client, future, limit, where
        self.error = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="bigalign-watchdog")
        self._thread.start()

    def _workers(self) -> Optional[int]:
        """The scheduler's number of workers, or None when it did not answer."""
        try:
            info = self.client.sync(self.client.scheduler.identity, n_workers=0,
                                    callback_timeout=max(self.limit, 5.0))
            return int(info["n_workers"])
        except Exception:
            return None

    def _run(self) -> None:
        poll = min(max(self.limit / 10, 0.2), 5.0)
        since = time.monotonic()  # when the scheduler was last seen with a worker
        while not self._stop.wait(poll):
            n = self._workers()
            if n:
                since = time.monotonic()
                continue
            if time.monotonic() - since < self.limit or self.future.done():
                continue
            from ..errors import ClusterLostError

            state = "had no worker" if n is not None else "did not answer"
            self.error = ClusterLostError(
                f"workers lost: the Dask scheduler at {self.where} {state} for "
                f"{self.limit:g} s (the stall timeout: --stall-timeout or {STALL_ENV}); the "
                "run was stopped and its tasks cancelled. Finished work is kept: start "
                "workers and rerun to resume")
            with contextlib.suppress(Exception):
                self.future.cancel(reason="bigalign-stall-timeout", msg=str(self.error))
            return

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)


_ADDRESS = re.compile(r"[\w.\-]+:\d+|\[[0-9a-fA-F:]+\]:\d+")


def client_arguments(scheduler: str) -> dict:
    """``distributed.Client`` arguments for ``scheduler``: an address (``tcp://...``,
    ``tls://...``, any ``PROTOCOL://``, or a bare ``host:port``) or else a scheduler file
    (the JSON that ``dask scheduler --scheduler-file`` writes; it may not exist yet, while
    the scheduler starts: the client waits for it)."""
    text = str(scheduler)
    if "://" in text or (_ADDRESS.fullmatch(text) and not os.path.exists(text)):
        return {"address": text}
    return {"scheduler_file": text}


def scheduler_from_config() -> Optional[str]:
    """The scheduler Dask's configuration names (``DASK_SCHEDULER_ADDRESS`` or
    ``scheduler-address``), as ``distributed.Client()`` would use it, or None."""
    value = dask.config.get("scheduler-address", None)
    return str(value) if value else None


def _silence_shutdown(saved: dict) -> None:
    """Raise distributed's loggers to CRITICAL (their levels saved in ``saved``) while the
    LocalCluster bigalign started shuts down: the scheduler logs its own tasks cancelled at
    close as ERROR tracebacks (e.g. the progress bar's ``feed``, ``CancelledError``), after
    the work succeeded or was interrupted. Errors of the work itself are raised, not logged
    here, and happen before this."""
    for name in ["distributed", *(n for n in logging.root.manager.loggerDict
                                  if n.startswith("distributed."))]:
        logger = logging.getLogger(name)
        saved[name] = logger.level
        logger.setLevel(logging.CRITICAL)


@contextlib.contextmanager
def _workers_ignore_sigint():
    """Start local worker processes with SIGINT ignored: a Ctrl-C in a terminal goes to the
    whole process group, and workers that received it printed distributed's
    KeyboardInterrupt / CancelledError tracebacks while bigalign was already shutting them
    down. A child inherits an ignored SIGINT (and Python then installs no KeyboardInterrupt
    handler), so only this process sees Ctrl-C; it closes the cluster, which stops them.
    Outside the main thread (no signal handlers there) nothing changes."""
    import signal
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, before)


def _restore_levels(saved: dict) -> None:
    for name, level in saved.items():
        logging.getLogger(name).setLevel(level)


def _wait_for_file(path: str, limit: Optional[float]) -> None:
    """Wait until the scheduler file ``path`` exists (a scheduler still starting writes it),
    at most ``limit`` seconds (None: for ever); then ClusterLostError."""
    from ..errors import ClusterLostError

    deadline = None if limit is None else time.monotonic() + limit
    if not os.path.exists(path):
        log.info("waiting for the Dask scheduler file %s", path)
    while not os.path.exists(path):
        if deadline is not None and time.monotonic() > deadline:
            raise ClusterLostError(f"no Dask scheduler wrote its scheduler file {path!r} "
                                   f"within {limit:g} s (the stall timeout: --stall-timeout or "
                                   f"{STALL_ENV}); check the path, start the scheduler and "
                                   "rerun")
        time.sleep(0.2)


@contextlib.contextmanager
def session(scheduler: Optional[str] = None, workers: Optional[int] = None,
            memory_limit: Optional[str] = None, threads: Optional[int] = None,
            progress: bool = False, stall: Optional[float] = None):
    """Yield a Session.

    scheduler : address of a running dask.distributed scheduler (``tcp://host:8786``) or a
        path to its scheduler file (:func:`client_arguments`); the cluster's workers do
        the work.
    workers : start a LocalCluster of this many worker processes (one thread each), each
        limited to ``memory_limit`` (e.g. "4GiB").
    neither : the scheduler of Dask's configuration (``DASK_SCHEDULER_ADDRESS``) when one is
        set, else threads in this process (``threads``, default: one per core).
    stall : the stall timeout in seconds of a run on a cluster (:func:`stall_timeout`;
        None: ``--stall-timeout``, ``BIGALIGN_STALL_TIMEOUT`` or the default). A scheduler
        that cannot be reached raises ClusterLostError (exit code 75).
    """
    if scheduler and workers:
        raise ValueError("give either a scheduler address or a number of workers, not both")
    if not scheduler and not workers:
        scheduler = scheduler_from_config()
        if scheduler:
            log.info("using the Dask scheduler %s (DASK_SCHEDULER_ADDRESS / "
                     "scheduler-address)", scheduler)
    if scheduler:
        from distributed import Client

        from ..errors import ClusterLostError

        args = client_arguments(scheduler)
        if "scheduler_file" in args:
            _wait_for_file(args["scheduler_file"], stall_timeout(stall))
        try:
            client = Client(**args)
        except OSError as e:  # distributed's connect timeout, refused, unknown host
            raise ClusterLostError(f"cannot reach the Dask scheduler at {scheduler} ({e}); "
                                   "rerun when it is up") from e
        quiet: dict = {}
        try:
            yield Session(client, progress=progress, stall_timeout=stall, where=scheduler)
        except ClusterLostError:
            _silence_shutdown(quiet)  # closing logs the client's failed reconnects as ERRORs
            raise
        finally:
            try:
                client.close()
            finally:
                _restore_levels(quiet)
    elif workers:
        from distributed import Client, LocalCluster

        quiet: dict = {}
        with contextlib.ExitStack() as stack:
            stack.callback(_restore_levels, quiet)           # last: after the cluster closed
            with _workers_ignore_sigint():
                cluster = stack.enter_context(LocalCluster(
                    n_workers=int(workers), threads_per_worker=1, processes=True,
                    memory_limit=memory_limit or "auto", dashboard_address=":0",
                    host="127.0.0.1", silence_logs=logging.ERROR))  # no CancelledError
                # warnings from tasks that a Ctrl-C or a failed gate cancels: bigalign says
                # what happened, and the rerun resumes
            client = stack.enter_context(Client(cluster))  # closed before the cluster
            stack.callback(_silence_shutdown, quiet)       # first: once the work is over
            yield Session(client, progress=progress, stall_timeout=stall)
    else:
        yield Session(None, threads=threads, progress=progress)
