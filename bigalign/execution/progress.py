"""Progress of a run, to stderr: a bar on a terminal, and where stderr is a file or a pipe
(batch logs) one line per 10% of the tasks or per PROGRESS_INTERVAL seconds, never ``\\r``.
The threaded scheduler is watched by a Dask callback (:class:`_ThreadedProgress`), a
dask.distributed run by the scheduler's own progress stream (:func:`_distributed_progress`);
both report to one :class:`Reporter`.
"""

from __future__ import annotations

import sys
import threading
import time
from typing import Optional

from dask.callbacks import Callback

#: seconds between progress lines when stderr is not a terminal (at least one per 10%)
PROGRESS_INTERVAL = 10.0


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


def _distributed_progress(future, reporter: Reporter, data_keys: int = 0) -> None:
    """Report the progress of ``future`` and everything it depends on, as the scheduler
    sees it (distributed's own text bar writes ``\\r`` updates to stdout). ``data_keys``:
    keys of the graph that hold data, not tasks (the scheduler counts them, the threaded
    scheduler and the run's first log line do not): left out, so every count agrees."""
    from distributed.diagnostics.progressbar import TextProgressBar

    def counts(remaining, all):
        total = max(all - data_keys, 0)
        return min(max(all - remaining - data_keys, 0), total), total

    class _Bar(TextProgressBar):
        def _draw_bar(self, remaining, all, **kwargs):
            reporter.update(*counts(remaining, all))

        def _draw_stop(self, remaining=0, all=0, status=None, **kwargs):
            reporter.update(*counts(remaining, all), final=True)

    try:
        _Bar([future], scheduler=future.client.scheduler.address, interval="500ms")
    finally:
        reporter.close()
