"""The lease of a job: one writer per output, and the liveness of its holder.

The lease lives at the output's job home (:func:`bigalign.storage.job.lease_home`:
``OUTPUT.checkpoint/lease/``) whatever ``--checkpoint`` names::

    lease/000000000007.json  the lease: generation 7 is held by the run whose token it names

Taking it is a conditional create of the next lease generation (``O_EXCL``-style hard link
on local disks; ``If-None-Match: *`` on S3), so two starters cannot both win. Other fsspec
backends are not known to create conditionally: there the lease is taken by
check-then-write, with a warning, and two starters at the same moment can both win
(:func:`conditional_create`). The generation is the run's *fencing token*
(:meth:`bigalign.storage.job.Job.check_fence`). A holder is alive while its lease is fresh
(renewed in the background), except that a holder on this very machine (same host, boot and
pid namespace) whose process is gone is dead at once (:meth:`Lease.alive`).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from typing import Optional, Protocol

from fsspec.implementations.local import LocalFileSystem

from ..errors import CheckpointError


class LeasedJob(Protocol):
    """What a lease needs of the job whose writes it fences (:class:`bigalign.storage.job.Job`):
    its lease folder (``home``, a job of the same kind), file helpers there, its fence and
    its fencing token. A protocol, so that the lease does not import the job."""

    url: str
    token: Optional[tuple]
    home: "LeasedJob"

    def _path(self, *parts: str) -> str: ...
    def get_file(self, path: str) -> Optional[bytes]: ...
    def put_file(self, path: str, data: bytes, *, create: bool = False) -> None: ...
    def list_names(self, sub: str = "") -> list: ...
    def remove_file(self, path: str) -> None: ...
    def check_fence(self) -> None: ...


log = logging.getLogger("bigalign")

LEASE_FORMAT = "bigalign.lease/1"

__all__ = ["Lease", "LeaseHeldError", "LeaseLostError", "conditional_create", "process_gone",
           "CONDITIONAL_PROTOCOLS", "LEASE_FORMAT"]


def process_gone(record) -> bool:
    """Whether a record of a process (``machine``, ``pid``, ``pid_started``: a lease holder,
    the owner of a scratch folder) names a process of this machine (same host, boot and pid
    namespace: :func:`_machine`) that is gone: no such pid, an exited process not yet reaped
    (a zombie) or a pid since reused (another start time). A record of another machine, or
    one that cannot be read, is never "gone": it is not this machine's to judge."""
    if not isinstance(record, dict) or record.get("machine") != _machine():
        return False
    try:
        pid = int(record["pid"])
    except (KeyError, TypeError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        pass
    stat = _proc_stat(pid)
    if stat is None:
        return False
    started = record.get("pid_started")
    return stat[0] in ("Z", "X") or (started is not None and stat[1] != started)


class LeaseHeldError(CheckpointError):
    """Another live run holds this job's lease (or took it at the same moment): refused."""


class LeaseLostError(CheckpointError):
    """This run no longer holds its job's lease (another run took it): it must stop."""


#: fsspec protocols whose ``pipe_file(mode="create")`` is an atomic conditional create
#: (S3's ``If-None-Match: *`` through s3fs); local files use a hard link instead.
CONDITIONAL_PROTOCOLS = ("s3", "s3a")
_warned_protocols: set = set()


def _protocol(fs) -> str:
    p = fs.protocol
    return p[0] if isinstance(p, (tuple, list)) else str(p)


def conditional_create(fs) -> bool:
    """Does ``fs`` create a file only-if-absent atomically (so that of two runs taking a
    lease at the same moment exactly one wins)? Local files (a hard link) and S3 do; other
    fsspec backends (GCS, Azure, in-memory, ...) are not known to, whatever ``mode="create"``
    they accept."""
    return isinstance(fs, LocalFileSystem) or _protocol(fs) in CONDITIONAL_PROTOCOLS


def _warn_no_conditional_create(fs) -> None:
    """Say once per protocol that leases there are taken by check-then-write."""
    protocol = _protocol(fs)
    if protocol not in _warned_protocols:
        _warned_protocols.add(protocol)
        log.warning("storage %r offers bigalign no conditional create: a lease there is "
                    "taken by check-then-write, so two runs started at the same moment on "
                    "one output can both start (see the README's crash-safety limits); "
                    "start one run per output", protocol)


def _precondition_failed(e: BaseException) -> bool:
    """An object store's answer to a conditional create of an existing key (HTTP 412)."""
    while e is not None:
        text = f"{type(e).__name__} {e}"
        if "PreconditionFailed" in text or "412" in text:
            return True
        e = e.__cause__ or e.__context__
    return False


def _process_start(pid: int):
    """Start time of a process in clock ticks since boot (Linux), or None elsewhere: with
    the pid it identifies a process even when pids are reused."""
    stat = _proc_stat(pid)
    return None if stat is None else stat[1]


def _proc_stat(pid: int):
    """(state, start time in clock ticks) of a process from /proc (Linux), or None. State
    "Z" (zombie) or "X" (dead) is a process that has exited but not yet been reaped by its
    parent (a container whose init does not reap keeps such pids for good)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[0].decode(), int(fields[19])
    except (OSError, ValueError, IndexError):
        return None


def _machine() -> str:
    """This host's identity for pid checks: hostname, boot id and pid namespace. Two
    containers sharing a hostname (host networking) but not a pid namespace differ here,
    so neither declares the other dead because its pid is invisible."""
    parts = [socket.gethostname()]
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            parts.append(f.read().strip())
        parts.append(os.readlink("/proc/self/ns/pid"))
    except OSError:
        pass
    return "|".join(parts)


class Lease:
    """The lease of one job: the run holding the newest generation file under ``lease/``.

    Taking it creates generation g+1 with a conditional create (only one starter can), and
    only when generation g's holder is dead, gone or released. While held, a background
    thread renews it every ttl/4 (after checking no newer generation exists; a run that
    finds one has lost the lease and its next fenced write raises)."""

    def __init__(self, job: LeasedJob, ttl: float):
        self.run = job        # the job whose writes this lease fences
        self.job = job.home   # where the lease files live (the output's job home)
        self.ttl = ttl
        self.owner = uuid.uuid4().hex
        self.generation: Optional[int] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _file(self, generation: int) -> str:
        return self.job._path("lease", f"{generation:012d}.json")

    def _record(self, released: bool = False) -> bytes:
        now = time.time()
        return json.dumps({"format": LEASE_FORMAT, "checkpoint": self.run.url,
                           "owner": self.owner, "generation": self.generation,
                           "host": socket.gethostname(), "machine": _machine(),
                           "pid": os.getpid(), "pid_started": _process_start(os.getpid()),
                           "renewed": now, "expires": now + self.ttl,
                           "released": released}).encode()

    @staticmethod
    def newest(job: LeasedJob) -> Optional[tuple[int, dict]]:
        """(generation, record) of the newest lease file, or None. An unreadable record
        reads as {} (a dead holder)."""
        gens = [int(n[:-5]) for n in job.list_names("lease")
                if n.endswith(".json") and n[:-5].isdigit()]
        if not gens:
            return None
        g = max(gens)
        raw = job.get_file(job._path("lease", f"{g:012d}.json"))
        try:
            return g, (json.loads(raw) if raw else {})
        except ValueError:
            return g, {}

    @staticmethod
    def alive(holder: dict) -> bool:
        """A holder is alive while its lease is fresh and not released, unless it ran on
        this machine (same host, boot and pid namespace) and its process is gone: no such
        pid, an exited process not yet reaped (a zombie), or a pid reused by another
        process (its start time differs)."""
        if not holder or holder.get("released") or holder.get("expires", 0) < time.time():
            return False
        return not process_gone(holder)

    def __enter__(self) -> "Lease":
        newest = self.newest(self.job)
        if newest is not None and self.alive(newest[1]):
            holder = newest[1]
            raise LeaseHeldError(
                f"{self.job.url}: another bigalign run holds this job (host "
                f"{holder.get('host')}, pid {holder.get('pid')}, lease renewed "
                f"{time.time() - holder.get('renewed', 0):.0f}s ago). Wait for it to finish; if "
                f"it died, its lease expires within {self.ttl:.0f}s of its last renewal.")
        self.generation = (newest[0] if newest else 0) + 1
        try:
            self.job.put_file(self._file(self.generation), self._record(), create=True)
        except FileExistsError:
            raise LeaseHeldError(f"{self.job.url}: another bigalign run took this job at "
                                  "the same moment") from None
        self.run.token = self.job.token = (self.generation, self.owner)
        for name in self.job.list_names("lease"):  # older generations: dead holders' files
            if name.endswith(".json") and name[:-5].isdigit() and int(name[:-5]) < self.generation:
                self.job.remove_file(self.job._path("lease", name))
        self._thread = threading.Thread(target=self._renew, daemon=True, name="bigalign-lease")
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self.run.check_fence()
                self.job.put_file(self._file(self.generation), self._record())
            except LeaseLostError:
                return  # the next fenced write of the run raises
            except Exception:  # a missed renewal is retried on the next tick
                pass

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            newest = self.newest(self.job)
            if newest is not None and newest[0] == self.generation and \
                    newest[1].get("owner") == self.owner:
                # released, not deleted: a lower generation must never become newest again
                self.job.put_file(self._file(self.generation), self._record(released=True))
        except Exception:
            pass  # the lease then lapses by itself
        self.run.token = self.job.token = None
