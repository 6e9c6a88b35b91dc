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
"""

from __future__ import annotations

import contextlib
import sys
import time
from typing import Optional

import dask

__all__ = ["session", "Session", "run_task"]


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
                from distributed import progress
                progress(future)
                print(file=sys.stderr)
            return future.result()
        from threadpoolctl import threadpool_limits

        with contextlib.ExitStack() as stack:
            stack.enter_context(threadpool_limits(limits=1))
            if self.progress:
                from dask.diagnostics import ProgressBar
                stack.enter_context(ProgressBar(out=sys.stderr, dt=0.5))
            try:
                return dask.threaded.get(graph, key, num_workers=self.threads)
            finally:
                from .engine import release_buffers
                release_buffers()


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
