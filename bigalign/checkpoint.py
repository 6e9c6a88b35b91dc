"""Durable progress: what is done, recorded in storage so that a rerun skips it.

Layout under a checkpoint URL (a local path or any fsspec URL)::

    manifest.json        format, kind (fit/apply), fingerprint of inputs and options, plan
    lock.json            lease: owner, host, pid, expiry (renewed while the run is alive)
    units/000000012.npz  fit: merged float64 statistics of unit 12, written when it finishes
    done/000000012       apply: marker written after region 12's data is stored

Every file is written whole (a temporary name then a rename on local disks; a single PUT on
object stores), so a file that exists is complete. The Dask scheduler keeps no state across a
crash; this does.
"""

from __future__ import annotations

import io
import json
import os
import socket
import threading
import time
import uuid
import warnings
from typing import Optional

import fsspec
from fsspec.implementations.local import LocalFileSystem
import numpy as np

from .errors import CheckpointError
from .stats import Moments

FORMAT = "bigalign.checkpoint/1"

__all__ = ["Progress", "describe_changes", "FORMAT"]


def describe_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two fingerprints (nested dicts)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += describe_changes(a, b, name + ".")
        elif a != b:
            out.append(f"{name}: {a!r} -> {b!r}")
    return out


class Progress:
    """Progress of one fit or apply at ``url``. Safe to pickle to workers."""

    def __init__(self, url: str, storage_options: Optional[dict] = None):
        self.url = str(url).rstrip("/")
        self.storage_options = storage_options or {}
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)

    def __reduce__(self):
        return (Progress, (self.url, self.storage_options))

    # ---- raw file helpers ---------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _put(self, path: str, data: bytes) -> None:
        parent = path.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        if isinstance(self.fs, LocalFileSystem):
            # whole or absent after a process kill: write aside, then rename. No fsync: the
            # data these files vouch for is not fsynced either (Zarr does not), and a marker
            # more durable than its data would be worse than none (see README).
            tmp = f"{path}.tmp-{uuid.uuid4().hex}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, path)
        else:
            self.fs.pipe_file(path, data)

    def _get(self, path: str) -> Optional[bytes]:
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            return None

    def _list(self, sub: str) -> list[str]:
        try:
            names = self.fs.ls(self._path(sub), detail=False, refresh=True)
        except FileNotFoundError:
            return []
        except TypeError:
            names = self.fs.ls(self._path(sub), detail=False)
        return [n.rsplit("/", 1)[-1] for n in names]

    def exists(self) -> bool:
        return self._get(self._path("manifest.json")) is not None

    # ---- manifest -----------------------------------------------------------------
    def manifest(self) -> Optional[dict]:
        raw = self._get(self._path("manifest.json"))
        return None if raw is None else json.loads(raw)

    def begin(self, kind: str, fingerprint: dict, plan: dict, *, restart: bool = False) -> dict:
        """Start or resume: returns the plan to use (the stored one when resuming, so a
        rerun with another number of workers keeps the same units). Refuses, naming what
        changed, when the stored fingerprint differs; ``restart`` discards old progress."""
        old = self.manifest()
        if old is not None and restart:
            self.clear(keep_lock=True)
            old = None
        if old is not None:
            if old.get("format") != FORMAT or old.get("kind") != kind:
                raise CheckpointError(f"{self.url}: holds progress of another kind "
                                      f"({old.get('kind')!r}, {old.get('format')!r}); "
                                      "pass restart=True / --restart to discard it")
            changes = describe_changes(old["fingerprint"], fingerprint)
            if changes:
                raise CheckpointError(
                    f"{self.url}: the inputs or options changed since this progress was "
                    f"recorded, so it cannot be resumed:\n  " + "\n  ".join(changes) +
                    "\nRerun with the original inputs and options, or pass --restart "
                    "(restart=True) to discard the old progress.")
            return old["plan"]
        manifest = {"format": FORMAT, "kind": kind, "fingerprint": fingerprint, "plan": plan,
                    "created": time.time()}
        self._put(self._path("manifest.json"), json.dumps(manifest, indent=1).encode())
        return plan

    def clear(self, keep_lock: bool = False) -> None:
        """Remove recorded progress (after success, or on --restart)."""
        for sub in ("units", "done"):
            try:
                self.fs.rm(self._path(sub), recursive=True)
            except FileNotFoundError:
                pass
        for name in ("manifest.json",) + (() if keep_lock else ("lock.json",)):
            try:
                self.fs.rm_file(self._path(name))
            except FileNotFoundError:
                pass
        if not keep_lock:
            try:
                self.fs.rm(self.root, recursive=True)
            except (FileNotFoundError, OSError):
                pass

    # ---- fit units ----------------------------------------------------------------
    def save_unit(self, index: int, moments: Moments) -> Moments:
        buf = io.BytesIO()
        np.savez(buf, saved_at=time.time(), **moments.to_arrays())
        self._put(self._path("units", f"{index:09d}.npz"), buf.getvalue())
        return moments

    def load_unit(self, index: int) -> Moments:
        raw = self._get(self._path("units", f"{index:09d}.npz"))
        if raw is None:
            raise CheckpointError(f"{self.url}: unit {index} is recorded as done but missing")
        with np.load(io.BytesIO(raw)) as z:
            return Moments.from_arrays(z)

    def _unit_indices(self) -> set[int]:
        return {int(n[:-4]) for n in self._list("units")
                if n.endswith(".npz") and n[:-4].isdigit()}

    def done_units(self) -> set[int]:
        """Units whose statistics are stored with an intact zip directory (an unreadable file
        is dropped with a warning and recomputed). Only the directory is read here; the
        arrays are read by the merge task that needs them."""
        done = set()
        for index in sorted(self._unit_indices()):
            try:
                with self.fs.open(self._path("units", f"{index:09d}.npz"), "rb") as f, \
                        np.load(f) as z:
                    if "cross" not in z.files:
                        raise ValueError("no 'cross' member")
            except Exception as e:
                warnings.warn(f"{self.url}: unit {index} is unreadable ({e}); recomputing it")
                continue
            done.add(index)
        return done

    # ---- apply regions ------------------------------------------------------------
    def mark_done(self, index: int, info: dict) -> None:
        self._put(self._path("done", f"{index:09d}"), json.dumps(info).encode())

    def done_regions(self) -> set[int]:
        return {int(n) for n in self._list("done") if n.isdigit()}

    # ---- progress in flight -------------------------------------------------------
    def summary(self) -> Optional[dict]:
        """Units done, rows done, rate and time left, from storage alone (any process can
        ask while a run is in flight). None when nothing is recorded here."""
        from .plan import group, plan_blocks

        manifest = self.manifest()
        if manifest is None:
            return None
        fp, plan, kind = manifest["fingerprint"], manifest["plan"], manifest["kind"]
        start, stop = fp["rows"] if kind == "fit" else (0, fp["source"]["shape"][0])
        blocks = plan_blocks(start, stop, plan["step"], plan["rows_per_block"])
        units = [[blocks[i] for i in unit]
                 for unit in group(len(blocks), plan.get("blocks_per_unit", 1))]
        times, rows_done = [], 0
        if kind == "fit":
            done = self._unit_indices()
            for i in done:  # npz members load lazily: only the timestamp is read
                with self.fs.open(self._path("units", f"{i:09d}.npz"), "rb") as f, \
                        np.load(f) as z:
                    times.append(float(z["saved_at"]) if "saved_at" in z.files else 0.0)
        else:
            done = self.done_regions()
            for i in done:
                info = json.loads(self._get(self._path("done", f"{i:09d}")) or b"{}")
                times.append(float(info.get("t", 0.0)))
        rows_done = sum(b.rows for i in done if i < len(units) for b in units[i])
        out = {"kind": kind, "units_done": len(done), "units_total": len(units),
               "rows_done": rows_done, "rows_total": stop - start,
               "started": manifest.get("created"), "rows_per_second": None,
               "eta_seconds": None}
        if times and max(times) > out["started"]:
            rate = rows_done / (max(times) - out["started"])
            out["rows_per_second"] = rate
            out["eta_seconds"] = (out["rows_total"] - rows_done) / rate if rate > 0 else None
        raw = self._get(self._path("lock.json"))
        out["running"] = bool(raw) and Lease._alive(json.loads(raw))
        return out

    # ---- lease --------------------------------------------------------------------
    def lease(self, ttl: float = 120.0) -> "Lease":
        return Lease(self, ttl)


def _process_start(pid: int):
    """Start time of a process in clock ticks since boot (Linux), or None elsewhere: with
    the pid it identifies a process even when pids are reused."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[19])
    except (OSError, ValueError, IndexError):
        return None


class Lease:
    """A lock on a checkpoint held by one run, renewed in the background while it lives.

    A second run refuses while the lease is fresh. A crashed owner stops renewing: its lease
    expires after ``ttl`` seconds (at once when it ran on this host and its process is
    gone), and the next run takes over."""

    def __init__(self, progress: Progress, ttl: float):
        self.progress = progress
        self.ttl = ttl
        self.owner = uuid.uuid4().hex
        self.path = progress._path("lock.json")
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def _record(self) -> dict:
        now = time.time()
        return {"owner": self.owner, "host": socket.gethostname(), "pid": os.getpid(),
                "pid_started": _process_start(os.getpid()), "renewed": now,
                "expires": now + self.ttl}

    def _holder(self) -> Optional[dict]:
        raw = self.progress._get(self.path)
        try:
            return None if raw is None else json.loads(raw)
        except ValueError:
            return None

    @staticmethod
    def _alive(holder: dict) -> bool:
        """A holder is alive while its lease is fresh, unless it ran on this host and its
        process is gone: no such pid, or a pid reused by another process (its start time
        differs: a restarted container reuses hostnames and pids, even our own)."""
        if holder.get("expires", 0) < time.time():
            return False
        if holder.get("host") == socket.gethostname():
            try:
                pid = int(holder["pid"])
            except (KeyError, TypeError, ValueError):
                return True
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                return False
            except PermissionError:
                pass
            started = holder.get("pid_started")
            if started is not None and _process_start(pid) not in (None, started):
                return False
        return True

    def __enter__(self) -> "Lease":
        holder = self._holder()
        if holder is not None and holder.get("owner") != self.owner and self._alive(holder):
            raise CheckpointError(
                f"{self.progress.url}: another bigalign run holds this job (host "
                f"{holder.get('host')}, pid {holder.get('pid')}, lease renewed "
                f"{time.time() - holder.get('renewed', 0):.0f}s ago). Wait for it to finish; if "
                f"it died, its lease expires within {self.ttl:.0f}s of its last renewal.")
        self.progress._put(self.path, json.dumps(self._record()).encode())
        time.sleep(0.05)  # two starters racing: the last writer wins, the other sees it
        holder = self._holder()
        if holder is None or holder.get("owner") != self.owner:
            raise CheckpointError(f"{self.progress.url}: another bigalign run took this job "
                                  "at the same moment")
        self._thread = threading.Thread(target=self._renew, daemon=True,
                                        name="bigalign-lease")
        self._thread.start()
        return self

    def _renew(self) -> None:
        while not self._stop.wait(self.ttl / 4):
            try:
                self.progress._put(self.path, json.dumps(self._record()).encode())
            except Exception:  # a missed renewal is retried on the next tick
                pass

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        holder = self._holder()
        if holder is not None and holder.get("owner") == self.owner:
            try:
                self.progress.fs.rm_file(self.path)
            except FileNotFoundError:
                pass
