"""The checkpointed job: what is done, recorded in storage so that a rerun skips it, and who
may write.

Every command that streams (fit, apply, and the commands built on them) runs as a
:class:`Job` at a checkpoint URL (a local path or any fsspec URL)::

    manifest.json          format, kind, run id, fingerprint of inputs and options, plan
    lease/000000000007.json  the lease: generation 7 is held by the run whose token it names
    units/000000012_RUN_START_STOP_N.npz
                           fit: merged float64 statistics of unit 12 (rows START:STOP, N
                           pairs) of run RUN, also stamped inside the file
    done/000000012_RUN_START_STOP_B
                           apply: marker of region 12 (rows START:STOP, B bad rows) of run
                           RUN, written after the region's data; its JSON body lists the
                           bad rows

**Names carry the stamps.** Resume, verification and ``status`` decide what is done from
*one listing* of ``units/`` or ``done/`` (pages of 1000 names on object stores), never one
read per file: at 10^5 markers one GET each would take longer than the listing by three
orders of magnitude. A file is written whole under its final name, so a name that is
listed vouches for its run, its rows and (units) its pair count exactly as the stamps inside
it do; the contents are read only where they are needed: a unit's statistics when a resumed
fit merges them (checked against the name; a mismatch recomputes the unit), and a marker's
list of bad rows when its name says it has some. Markers stay one per region (a group
marker written when a whole group is done would lose the group on a kill); the planner
bounds their number instead (:mod:`bigalign.planning.plan`). Files named the older way (no stamps in
the name) are never trusted, and are removed with the rest.

The protocol:

* **Run id.** A job's manifest names its run id; every unit, marker and the output's
  attributes carry it (in their names and inside). On resume only files of the manifest's
  run, with the row range and count the plan expects, are trusted; anything else is ignored
  and recomputed.
* **Lease.** One writer per output. The lease lives at the output's job home
  (:func:`lease_home`: ``OUTPUT.checkpoint/lease/``) whatever ``--checkpoint`` names, so
  two runs writing one output exclude each other even with two checkpoints, or none.
  Taking it is a conditional create of the next lease generation (``O_EXCL``-style hard
  link on local disks; ``If-None-Match: *`` on S3), so two starters cannot both win. Other
  fsspec backends are not known to create conditionally: there the lease is taken by
  check-then-write, with a warning, and two starters at the same moment can both win
  (:func:`conditional_create`). The generation is
  the run's *fencing token*: before every durable write (unit, marker, manifest, the
  output's completion, the final clean-up) the writer checks that the newest generation is
  still its own, and a run that lost its lease stops with :class:`LeaseLostError`.
  A holder is alive while its lease is fresh (renewed in the background), except that a
  holder on this very machine (same host, boot and pid namespace) whose process is gone is
  dead at once.
* **Owned files only.** A checkpoint folder is used only when every name in it is this
  job's (:meth:`Job.check_location`: a bigalign manifest, units and markers stamped with
  its run id, lease records); :meth:`Job.clear` removes those names and nothing else,
  and removes the folder only when it is then empty. A folder that holds other files and no
  manifest is refused as a checkpoint location.

Files are written whole (a temporary name then a rename on local disks; one PUT on object
stores), so a file that exists is complete. The limit of fencing without storage-side
conditions on the data itself: a writer paused *between* its check and its write (for longer
than the lease's lifetime) can still land that one write; the README says so.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import socket
import threading
import time
import uuid
import warnings
from typing import Optional

import fsspec
from fsspec.implementations.local import LocalFileSystem
import numpy as np

from ..errors import CheckpointError, DamagedOutputError, InputError
from ..maths.stats import Moments

log = logging.getLogger("bigalign")

FORMAT = "bigalign.checkpoint/2"
LEASE_FORMAT = "bigalign.lease/1"

#: Names a checkpoint folder may hold: what :meth:`Job.clear` removes.
OWN_NAMES = ("manifest.json", "lease", "units", "done")

__all__ = ["Job", "Lease", "LeaseHeldError", "LeaseLostError", "checkpointed", "clear_finished",
           "lease_home", "default_checkpoint",
           "finished_or_refuse", "refuse_damaged", "describe_changes", "FORMAT"]


#: ``done/`` marker names: index, run id, rows and count of bad rows.
_MARKER = re.compile(r"(\d{9,})_([0-9A-Za-z-]+)_(\d+)_(\d+)_(\d+)")
#: ``units/`` names: index, run id, rows and pair count.
_UNIT = re.compile(r"(\d{9,})_([0-9A-Za-z-]+)_(\d+)_(\d+)_(\d+)\.npz")


def _parse(pattern, name: str) -> Optional[tuple]:
    """(index, run id, start, stop, count) from a stamped file name, or None."""
    m = pattern.fullmatch(name)
    if m is None:
        return None
    return int(m[1]), m[2], int(m[3]), int(m[4]), int(m[5])


def _marker_name(index: int, run_id: str, start: int, stop: int, bad: int) -> str:
    return f"{index:09d}_{run_id}_{start}_{stop}_{bad}"


def _unit_name(index: int, run_id: str, start: int, stop: int, n: int) -> str:
    return f"{index:09d}_{run_id}_{start}_{stop}_{n}.npz"


def _mtime(info: dict) -> float:
    """Modification time (seconds since the epoch) of a listing entry: ``mtime`` on file
    systems, ``LastModified`` on object stores; 0 when neither is there."""
    t = info.get("mtime", info.get("LastModified", info.get("last_modified")))
    if t is None:
        return 0.0
    if hasattr(t, "timestamp"):
        return float(t.timestamp())
    try:
        return float(t)
    except (TypeError, ValueError):
        return 0.0


class LeaseHeldError(CheckpointError):
    """Another live run holds this job's lease (or took it at the same moment): refused."""


class LeaseLostError(CheckpointError):
    """This run no longer holds its job's lease (another run took it): it must stop."""


def describe_changes(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Human-readable differences between two fingerprints (nested dicts)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        name = f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            out += describe_changes(a, b, name + ".")
        elif a != b:
            out.append(f"{name}: {_short(a)} -> {_short(b)}")
    return out


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _retrying(what: str, fn):
    from .stores import retrying  # storage helpers live in stores; imported late (no cycle)
    return retrying(what, fn)


class Job:
    """One checkpointed job at ``url``. Safe to pickle to workers: the run id and the
    fencing token travel with it, so a task on any worker can check the lease before it
    writes."""

    def __init__(self, url: str, storage_options: Optional[dict] = None, *,
                 run_id: Optional[str] = None, token: Optional[tuple] = None,
                 lease_url: Optional[str] = None, progress: bool = True):
        self.url = str(url).rstrip("/")
        self.storage_options = storage_options or {}
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        self.run_id = run_id
        self.token = token  # (generation, owner) while this process holds the lease
        #: where the lease lives: the *output's* job home (:func:`lease_home`), so that two
        #: runs naming two checkpoints for one output still exclude each other; by default
        #: this folder
        self.lease_url = str(lease_url).rstrip("/") if lease_url else self.url
        #: False: a run without recorded progress (``checkpoint=False``): the lease and the
        #: fence only; no manifest, units or markers are written or read
        self.progress = progress
        self.home = self if self.lease_url == self.url else \
            Job(self.lease_url, self.storage_options)

    def __reduce__(self):
        return (_rebuild, (self.url, self.storage_options, self.run_id, self.token,
                           self.lease_url, self.progress))

    # ---- raw file helpers (every call retried like data reads and writes) ----------
    def _path(self, *parts: str) -> str:
        return "/".join([self.root, *parts])

    def _local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def put_file(self, path: str, data: bytes, *, create: bool = False) -> None:
        """Write a whole file. ``create``: only if absent (FileExistsError otherwise),
        atomically: no other writer can create it too, and no reader sees it partial."""
        def put():
            parent = path.rsplit("/", 1)[0]
            self.fs.makedirs(parent, exist_ok=True)
            if self._local():
                # no fsync: the data these files vouch for is not fsynced either (Zarr does
                # not); a marker more durable than its data would be worse than none
                tmp = f"{path}.tmp-{uuid.uuid4().hex}"
                with open(tmp, "wb") as f:
                    f.write(data)
                try:
                    if create:
                        os.link(tmp, path)  # fails if path exists: an exclusive create
                    else:
                        os.replace(tmp, path)
                finally:
                    if os.path.exists(tmp):
                        os.unlink(tmp)
            elif create and not conditional_create(self.fs):
                # no conditional create here: check, then write. Two starters within the
                # same moment can both pass the check (README, "Crash safety": limits)
                _warn_no_conditional_create(self.fs)
                if self.fs.exists(path):
                    raise FileExistsError(path)
                self.fs.pipe_file(path, data)
            else:
                self.fs.pipe_file(path, data, mode="create" if create else "overwrite")
            return True

        def put_once():  # an existing file is an answer, not an error to retry
            try:
                return put()
            except Exception as e:
                if isinstance(e, FileExistsError) or _precondition_failed(e):
                    return False
                raise

        if not _retrying(f"cannot write {path!r}", put_once):
            raise FileExistsError(path)

    def get_file(self, path: str) -> Optional[bytes]:
        def get():
            try:
                return self.fs.cat_file(path)
            except FileNotFoundError:
                return None
        return _retrying(f"cannot read {path!r}", get)

    def list_names(self, sub: str = "") -> list[str]:
        def ls():
            try:
                try:
                    names = self.fs.ls(self._path(sub) if sub else self.root, detail=False,
                                       refresh=True)
                except TypeError:
                    names = self.fs.ls(self._path(sub) if sub else self.root, detail=False)
            except FileNotFoundError:
                return []
            return [n.rstrip("/").rsplit("/", 1)[-1] for n in names]
        return _retrying(f"cannot list {self.url!r}", ls)

    def _list_detail(self, sub: str) -> dict[str, dict]:
        """One listing of ``sub`` with details: name -> info (size, mtime/LastModified)."""
        def ls():
            path = self._path(sub)
            try:
                try:
                    entries = self.fs.ls(path, detail=True, refresh=True)
                except TypeError:
                    entries = self.fs.ls(path, detail=True)
            except FileNotFoundError:
                return {}
            return {e["name"].rstrip("/").rsplit("/", 1)[-1]: e for e in entries}
        return _retrying(f"cannot list {self.url!r}", ls)

    def remove_file(self, path: str) -> None:
        def rm():
            try:
                self.fs.rm_file(path)
            except FileNotFoundError:
                pass
        _retrying(f"cannot remove {path!r}", rm)

    # ---- where ----------------------------------------------------------------------
    def exists(self) -> bool:
        return self.get_file(self._path("manifest.json")) is not None

    def check_location(self) -> None:
        """Refuse a checkpoint location that holds anything this job did not write (a
        shared folder, a bucket prefix with other data, a user's files whose names merely
        look like bigalign's): bigalign deletes only what it wrote. What is this job's:
        a ``manifest.json`` that is a bigalign manifest; in ``units/`` and ``done/`` only
        files stamped (by name) with that manifest's run id; in ``lease/`` only lease
        records; and the temporary files of each. Everything else is foreign, and one
        foreign name refuses the folder before anything in it is touched."""
        foreign = self.foreign_names()
        if foreign:
            raise CheckpointError(
                f"checkpoint {self.url!r} holds files bigalign did not write "
                f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); bigalign "
                "deletes only what it wrote, so it will not use this folder. Point "
                "--checkpoint at a new or empty location.")

    def foreign_names(self) -> list[str]:
        """Names in this folder that are not this job's (:meth:`check_location`): one
        listing per sub-folder, and a read of the manifest and of each lease record."""
        names = self.list_names()
        foreign = sorted(n for n in names if n not in OWN_NAMES and
                         not _temp_of(n, "manifest.json"))
        runs: set = set()
        if "manifest.json" in names:
            try:
                manifest = self.manifest()
            except CheckpointError:
                manifest = None
            if not _is_manifest(manifest):
                foreign.append("manifest.json")
            else:
                runs.add(manifest["run_id"])
        for sub, pattern in (("units", _UNIT), ("done", _MARKER)):
            if sub in names:
                foreign += [f"{sub}/{n}" for n in self.list_names(sub)
                            if not _stamped_by(pattern, n, runs)]
        if "lease" in names:
            foreign += [f"lease/{n}" for n in self.list_names("lease")
                        if not self._is_lease_file(n)]
        return foreign

    def _is_lease_file(self, name: str) -> bool:
        """A lease record (``lease/NNNNNNNNNNNN.json`` holding a JSON object with an
        ``owner``), or the temporary file of one."""
        base = name.split(".tmp-")[0]
        if not re.fullmatch(r"\d{12}\.json", base):
            return False
        if base != name:
            return True  # a temporary file of a record cut short
        raw = self.get_file(self._path("lease", name))
        try:
            record = json.loads(raw) if raw else None
        except ValueError:
            return False
        return isinstance(record, dict) and "owner" in record

    # ---- manifest -----------------------------------------------------------------
    def manifest(self) -> Optional[dict]:
        raw = self.get_file(self._path("manifest.json"))
        if raw is None:
            return None
        try:
            manifest = json.loads(raw)
        except ValueError:
            raise CheckpointError(f"{self.url}: manifest.json is not valid JSON; pass "
                                  "--restart to discard this progress") from None
        return manifest

    def begin(self, kind: str, fingerprint: dict, plan: dict, *, restart: bool = False,
              replace: bool = False, output: Optional[str] = None) -> dict:
        """Start or resume (the caller holds the lease). Returns the manifest to run:
        the stored one when resuming (its plan and run id, so a rerun with another number
        of workers keeps the same units), else a new one with a fresh run id. Refuses,
        naming what changed, when the stored fingerprint differs; ``restart`` discards the
        old progress first, ``replace`` (--overwrite) discards it when it is progress of
        other inputs or options (the same ones resume, so a retried job that always says
        --overwrite still resumes)."""
        if not self.progress:  # nothing recorded: a fresh run id, in memory only
            self.run_id = uuid.uuid4().hex
            return {"format": FORMAT, "kind": kind, "run_id": self.run_id,
                    "fingerprint": fingerprint, "plan": plan, "created": time.time()}
        old = self.manifest()
        if old is not None and (restart or (replace and (
                old.get("format") != FORMAT or old.get("kind") != kind or
                describe_changes(old.get("fingerprint", {}), fingerprint)))):
            self.clear_progress()
            old = None
        if old is not None:
            if old.get("format") != FORMAT or old.get("kind") != kind:
                raise CheckpointError(f"{self.url}: holds progress of another kind "
                                      f"({old.get('kind')!r}, {old.get('format')!r}); "
                                      "pass --restart to discard it")
            if output and old.get("output") and old["output"] != output:
                raise CheckpointError(
                    f"{self.url}: holds the progress of a run writing {old['output']!r}, not "
                    f"{output!r}; name another --checkpoint, or pass --restart to discard "
                    "that progress")
            changes = describe_changes(old["fingerprint"], fingerprint)
            if changes:
                raise CheckpointError(
                    f"{self.url}: the inputs or options changed since this progress was "
                    f"recorded, so it cannot be resumed:\n  " + "\n  ".join(changes) +
                    "\nRerun with the original inputs and options, or pass --restart "
                    "to discard the old progress.")
            self.run_id = old["run_id"]
            return old
        self.clear_progress()  # units or markers of an earlier run are never trusted
        manifest = {"format": FORMAT, "kind": kind, "run_id": uuid.uuid4().hex,
                    "fingerprint": fingerprint, "plan": plan, "created": time.time()}
        if output:
            manifest["output"] = output
        self.fenced_put(self._path("manifest.json"), json.dumps(manifest, indent=1).encode())
        self.run_id = manifest["run_id"]
        return manifest

    # ---- fencing --------------------------------------------------------------------
    def check_fence(self) -> None:
        """Raise LeaseLostError unless this run still holds the newest lease generation.
        A no-op for a job run without a lease (checkpoint=False)."""
        if self.token is None:
            return
        generation, owner = self.token
        current = Lease.newest(self.home)
        if current is None or current[0] != generation or current[1].get("owner") != owner:
            who = "nobody" if current is None else \
                f"generation {current[0]} (host {current[1].get('host')}, pid {current[1].get('pid')})"
            raise LeaseLostError(
                f"{self.url}: this run lost its lease (it held generation {generation}; now "
                f"{who}): another run took over this job, so this one stops without writing")

    def fenced_put(self, path: str, data: bytes) -> None:
        self.check_fence()
        self.put_file(path, data)

    # ---- clean-up: only what bigalign wrote --------------------------------------------
    def _clear(self, sub: str, pattern, runs: set) -> None:
        """Remove the files of ``sub`` stamped (by name) with one of ``runs``, and their
        temporary files: nothing else, whatever it is called."""
        for name in self.list_names(sub):
            if _stamped_by(pattern, name, runs):
                self.remove_file(self._path(sub, name))

    def _runs(self) -> set:
        """The run ids whose files this job may remove: its own and the stored manifest's."""
        runs = {self.run_id} if self.run_id else set()
        if self.progress:
            try:
                stored = self.manifest()
            except CheckpointError:
                stored = None
            if _is_manifest(stored):
                runs.add(stored["run_id"])
        return runs

    def clear_markers(self) -> None:
        """Remove apply's done-markers (fenced): their output is being re-created."""
        self.check_fence()
        if self.progress:
            self._clear("done", _MARKER, self._runs())

    def clear_progress(self) -> None:
        """Remove units, markers and the manifest (fenced), keeping the lease. The
        manifest goes last: until then it vouches that the stamped files are this job's."""
        self.check_fence()
        if not self.progress:
            return
        runs = self._runs()
        self._clear("units", _UNIT, runs)
        self._clear("done", _MARKER, runs)
        for name in self.list_names():
            if _temp_of(name, "manifest.json"):
                self.remove_file(self._path(name))
        self.remove_file(self._path("manifest.json"))

    def clear(self) -> None:
        """After success: remove every file of this job (progress, then the lease), then
        the folders if they are empty. Files bigalign did not write stay, and so does
        their folder."""
        self.clear_progress()
        self.home.clear_lease()
        if self.progress:
            self._remove_folders(("units", "done", "lease", ""))

    def clear_lease(self) -> None:
        """Remove this folder's lease records (the caller holds or held the lease), then
        the folder itself when nothing else is in it."""
        for name in self.list_names("lease"):
            if self._is_lease_file(name):
                self.remove_file(self._path("lease", name))
        self._remove_folders(("lease", ""))

    def _remove_folders(self, subs) -> None:
        for sub in subs:
            path = self._path(sub) if sub else self.root
            try:
                if self._local():
                    os.rmdir(path)
                elif not self.list_names(sub):
                    self.fs.rmdir(path)
            except (OSError, NotImplementedError):
                pass  # not empty (files of others), or object stores without folders

    # ---- fit units ----------------------------------------------------------------
    def _unit_path(self, index: int, start: int, stop: int, n: int) -> str:
        return self._path("units", _unit_name(index, self.run_id or "", start, stop, n))

    def save_unit(self, index: int, moments: Moments, start: int, stop: int) -> Moments:
        """Store a finished unit's statistics, stamped with the run id, row range and pair
        count (in its name and inside). Without recorded progress: the fence check only."""
        if not self.progress:
            self.check_fence()
            return moments
        buf = io.BytesIO()
        np.savez(buf, saved_at=time.time(), run_id=np.str_(self.run_id or ""),
                 rows=np.array([start, stop], dtype=np.int64), **moments.to_arrays())
        self.fenced_put(self._unit_path(index, start, stop, int(moments.n)), buf.getvalue())
        return moments

    def load_unit(self, index: int, start: int, stop: int) -> Moments:
        """The stored statistics of unit ``index`` (rows [start, stop)) of this run; raises
        CheckpointError saying why when there are none or they do not match."""
        raw = self.get_file(self._unit_path(index, start, stop, stop - start))
        if raw is None:
            problems = [p for p in (self._unit_name_problem(n, index, start, stop)
                                    for n in self.list_names("units")) if p]
            why = problems[0] if problems else "is recorded as done but missing"
            raise CheckpointError(f"{self.url}: unit {index} {why}")
        try:
            with np.load(io.BytesIO(raw)) as z:
                problem = self._unit_problem(z, start, stop)
                if problem:
                    raise CheckpointError(f"{self.url}: unit {index} {problem}; pass --restart")
                return Moments.from_arrays(z)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{self.url}: unit {index} is unreadable ({e})") from None

    def _unit_name_problem(self, name: str, index: int, start: int,
                           stop: int) -> Optional[str]:
        """Why the unit file ``name`` cannot be unit ``index`` (rows [start, stop)) of this
        run, or None; names of other units give None too (nothing to say about them)."""
        parsed = _parse(_UNIT, name)
        if parsed is None:
            if name.endswith(".npz") and name[:9].isdigit() and int(name[:9]) == index:
                return "has no run stamp in its name (written by another version)"
            return None
        i, run, a, b, n = parsed
        if i != index:
            return None
        if run != self.run_id:
            return f"belongs to run {run[:12]}, not {str(self.run_id)[:12]}"
        if [a, b] != [start, stop]:
            return f"covers rows {[a, b]}, not {[start, stop]}"
        if n != stop - start:
            return f"holds {n} pairs for {stop - start} rows"
        return None

    def _unit_problem(self, z, start: int, stop: int) -> Optional[str]:
        """Why a stored unit cannot be used for rows [start, stop) of this run, or None."""
        if "cross" not in z.files or "run_id" not in z.files or "rows" not in z.files:
            return "has no run stamp (written by another version)"
        if str(z["run_id"]) != self.run_id:
            return f"belongs to run {str(z['run_id'])[:12]}, not {str(self.run_id)[:12]}"
        if [int(v) for v in z["rows"]] != [start, stop]:
            return f"covers rows {[int(v) for v in z['rows']]}, not {[start, stop]}"
        if int(z["n"]) != stop - start:
            return f"holds {int(z['n'])} pairs for {stop - start} rows"
        return None

    def done_units(self, expected: dict[int, tuple[int, int]]) -> set[int]:
        """Units of ``expected`` (index -> (start, stop)) whose stored statistics belong to
        this run and cover exactly their rows, by their names in one listing of ``units/``
        (no file is read). Anything else (a stale file of an earlier run, a wrong range or
        pair count, an older name) is ignored with a warning and recomputed; a file whose
        contents turn out not to match its name is recomputed when the fit loads it."""
        done: set = set()
        if not self.progress:
            return done
        seen: dict[int, str] = {}
        for name in sorted(self.list_names("units")):
            parsed = _parse(_UNIT, name)
            index = parsed[0] if parsed else (int(name[:9]) if name[:9].isdigit() and
                                               name.endswith(".npz") else None)
            if index is None or index not in expected:
                continue
            problem = self._unit_name_problem(name, index, *expected[index])
            if problem is None:
                done.add(index)
            else:
                seen.setdefault(index, problem)
        for index, problem in sorted(seen.items()):
            if index not in done:
                warnings.warn(f"{self.url}: unit {index} {problem}; recomputing it")
        return done

    # ---- apply regions ------------------------------------------------------------
    def mark_done(self, index: int, start: int, stop: int, bad: Optional[list] = None) -> None:
        """Record region ``index`` (rows [start, stop)) as written; call after its data.
        ``bad``: the global numbers of rows written as NaN/zero (``--bad-rows``). Without
        recorded progress: the fence check only."""
        if not self.progress:
            self.check_fence()
            return
        bad = list(bad or [])
        info = {"run_id": self.run_id, "start": start, "stop": stop, "t": time.time(),
                "bad_rows": bad}
        name = _marker_name(index, self.run_id or "", start, stop, len(bad))
        self.fenced_put(self._path("done", name), json.dumps(info).encode())

    def _markers(self, expected: Optional[dict[int, tuple[int, int]]] = None) -> dict[int, dict]:
        """This run's markers from one listing of ``done/``: index -> {start, stop, t,
        bad_count}, only those of ``expected`` (index -> (start, stop)) with exactly those
        rows when given."""
        found: dict = {}
        if not self.progress:
            return found
        for name, entry in self._list_detail("done").items():
            parsed = _parse(_MARKER, name)
            if parsed is None or parsed[1] != self.run_id:
                continue
            index, _, start, stop, nbad = parsed
            if expected is not None and list(expected.get(index, ())) != [start, stop]:
                continue
            found[index] = {"run_id": self.run_id, "start": start, "stop": stop,
                            "t": _mtime(entry), "bad_count": nbad, "name": name}
        return found

    def region_markers(self, expected: dict[int, tuple[int, int]]) -> dict[int, dict]:
        """Markers of ``expected`` regions (index -> (start, stop)) written by this run for
        exactly those rows: index -> marker ({run_id, start, stop, t, bad_rows}). One
        listing; a marker's file is read only when its name says it holds bad rows."""
        found = self._markers(expected)
        for info in found.values():
            info["bad_rows"] = []
            if info["bad_count"]:
                try:
                    body = json.loads(self.get_file(self._path("done", info["name"])) or b"{}")
                    info["bad_rows"] = list(body.get("bad_rows", []))
                except ValueError:
                    pass
        return found

    def done_regions(self, expected: dict[int, tuple[int, int]]) -> set[int]:
        """Regions of ``expected`` with a marker of this run: one listing, no reads."""
        return set(self._markers(expected))

    # ---- progress in flight -------------------------------------------------------
    def summary(self) -> Optional[dict]:
        """Units done, rows done, rate and time left, from storage alone (any process can
        ask while a run is in flight). None when nothing is recorded here."""
        from ..planning.plan import plan_from_dict

        try:
            manifest = self.manifest()
        except CheckpointError:
            return None
        if manifest is None or manifest.get("format") != FORMAT:
            return None
        kind = manifest["kind"]
        plan = plan_from_dict(kind, manifest["plan"])
        blocks = plan.blocks()
        units = [[blocks[i] for i in unit] for unit in
                 (plan.units() if kind == "fit" else [[b.index] for b in blocks])]
        start, stop = blocks[0].start, blocks[-1].stop
        self.run_id = manifest["run_id"]
        expected = {i: (u[0].start, u[-1].stop) for i, u in enumerate(units)}
        if kind == "fit":  # one listing: names carry run, rows and pairs; times its dates
            listing = self._list_detail("units")
            done, times = set(), []
            for name, entry in listing.items():
                parsed = _parse(_UNIT, name)
                if parsed and parsed[0] in expected and \
                        self._unit_name_problem(name, parsed[0], *expected[parsed[0]]) is None:
                    done.add(parsed[0])
                    times.append(_mtime(entry))
        else:
            markers = self._markers(expected)
            done = set(markers)
            times = [m["t"] for m in markers.values()]
        rows_done = sum(b.rows for i in done for b in units[i])
        out = {"kind": kind, "run_id": manifest["run_id"], "units_done": len(done),
               "units_total": len(units), "rows_done": rows_done, "rows_total": stop - start,
               "started": manifest.get("created"), "rows_per_second": None,
               "eta_seconds": None}
        if times and max(times) > out["started"]:
            rate = rows_done / (max(times) - out["started"])
            out["rows_per_second"] = rate
            out["eta_seconds"] = (out["rows_total"] - rows_done) / rate if rate > 0 else None
        newest = Lease.newest(self.home)
        out["running"] = newest is not None and Lease.alive(newest[1])
        return out

    # ---- lease --------------------------------------------------------------------
    def lease(self, ttl: float = 120.0) -> "Lease":
        return Lease(self, ttl)


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


def _temp_of(name: str, base: str) -> bool:
    """Is ``name`` the temporary file of ``base`` (``BASE.tmp-HEX``, :meth:`Job.put_file`)?"""
    return name.startswith(base + ".tmp-") and \
        re.fullmatch(r"[0-9a-f]+", name[len(base) + 5:]) is not None


def _stamped_by(pattern, name: str, runs: set) -> bool:
    """Is ``name`` (or the file it is the temporary of) a unit or marker file name of
    ``pattern`` stamped with one of the run ids ``runs``?"""
    base = name.split(".tmp-")[0]
    if base != name and not _temp_of(name, base):
        return False
    parsed = _parse(pattern, base)
    return parsed is not None and parsed[1] in runs


def _is_manifest(manifest) -> bool:
    """A bigalign checkpoint manifest (any format version): a JSON object naming its kind
    and run id under a ``bigalign.checkpoint/`` format."""
    return isinstance(manifest, dict) and \
        str(manifest.get("format", "")).startswith("bigalign.checkpoint/") and \
        isinstance(manifest.get("run_id"), str) and "kind" in manifest


def _rebuild(url, storage_options, run_id, token, lease_url=None, progress=True):
    return Job(url, storage_options, run_id=run_id, token=token, lease_url=lease_url,
               progress=progress)


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

    def __init__(self, job: Job, ttl: float):
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
    def newest(job: Job) -> Optional[tuple[int, dict]]:
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
        if holder.get("machine") == _machine():
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
            stat = _proc_stat(pid)
            if stat is not None and stat[0] in ("Z", "X"):
                return False
            started = holder.get("pid_started")
            if started is not None and stat is not None and stat[1] != started:
                return False
        return True

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


def default_checkpoint(output) -> str:
    """Progress of a run writing ``output`` is kept next to it: ``OUTPUT.checkpoint``."""
    return str(output).rstrip("/") + ".checkpoint"


def lease_home(output) -> str:
    """Where the lease of the job writing ``output`` lives: the output's default checkpoint
    folder (:func:`default_checkpoint`), whatever ``--checkpoint`` names, so that the output
    is the unit of exclusion: two runs naming two checkpoints (or none) for one output
    cannot both hold it."""
    return default_checkpoint(output)


@contextlib.contextmanager
def checkpointed(url: Optional[str], kind: str, fingerprint: dict, plan: dict, *,
                 storage_options: Optional[dict] = None, restart: bool = False,
                 replace: bool = False, keep: bool = False,
                 lease_url: Optional[str] = None, output: Optional[str] = None):
    """The one job protocol every streaming command runs in.

    Checks the locations (anything bigalign did not write is refused), takes the lease at
    ``lease_url`` (the output's job home, :func:`lease_home`; default: ``url``), begins or
    resumes (:meth:`Job.begin`) and yields ``(job, manifest)``. The body runs the work,
    verifies it and writes its completion mark (fenced); when the body returns, the job's
    files are removed (``keep``: left in place) *before* the lease is released, so a
    clean-up can never touch a later run's files. With ``url`` None progress is not
    recorded: the job takes the lease and fences every write all the same, but writes no
    manifest, units or markers, and its run id is made up in memory. With neither ``url``
    nor ``lease_url`` there is nothing to lease: ``job`` is None. ``output``: the canonical
    location of what the job writes, recorded in its manifest: a checkpoint holding the
    progress of another output is refused (not resumed into this one)."""
    if url is None and lease_url is None:
        yield None, {"kind": kind, "run_id": uuid.uuid4().hex, "fingerprint": fingerprint,
                     "plan": plan}
        return
    job = Job(url or lease_url, storage_options, lease_url=lease_url,
              progress=url is not None)
    job.check_location()
    if job.home is not job:
        job.home.check_location()
    with job.lease():
        manifest = job.begin(kind, fingerprint, plan, restart=restart, replace=replace,
                             output=output)
        yield job, manifest
        if not keep:
            job.clear()
        elif job.home is not job:
            job.home.clear_lease()


def clear_finished(url: Optional[str], run_id: Optional[str],
                   storage_options: Optional[dict] = None,
                   lease_url: Optional[str] = None) -> bool:
    """Remove the checkpoint a run killed after its completion mark left behind, when it
    belongs to that run (``run_id``), under the output's lease (``lease_url``). Returns
    True when something was removed."""
    if url is None or run_id is None:
        return False
    job = Job(url, storage_options, lease_url=lease_url)
    try:
        manifest = job.manifest()
    except CheckpointError:
        return False
    if manifest is None or manifest.get("run_id") != run_id:
        return False
    with job.lease():
        if (job.manifest() or {}).get("run_id") != run_id:
            return False
        job.clear()
    return True


def refuse_damaged(output, lost: str, overwrite: bool) -> None:
    """A finished output that lost ``lost`` (a file, a chunk) is no no-op: raise
    DamagedOutputError saying so, or with --overwrite say that it is written again."""
    if not overwrite:
        raise DamagedOutputError(f"output {str(output)!r} is marked complete but is damaged: "
                                 f"{lost}. Rerun with --overwrite to write it again.")
    log.warning("%s is marked complete but is damaged (%s): writing it again", output, lost)


def finished_or_refuse(node, fingerprint: dict, output, overwrite: bool, restart: bool,
                        checkpoint, storage_options, damage=None) -> bool:
    """For a complete output: True when it is this very job, finished (same fingerprint,
    and neither --overwrite nor --restart asks for a new run) -- its leftover checkpoint is
    removed; raise InputError naming what changed when it is another job and --overwrite
    is not given; False when a new run may replace it.

    ``damage``: called before a no-op is granted, it says what the finished output lost
    (a file, a chunk) or None. A damaged output is never called done: it raises
    DamagedOutputError (exit 2) naming what is missing, or with --overwrite returns False
    (a new run writes it again)."""
    stored = node.attrs.get("job") or (node.attrs.get("metadata") or {}).get("job") or {}
    same = stored.get("fingerprint") == fingerprint
    if same and not restart:
        lost = damage() if damage is not None else None
        if lost:
            refuse_damaged(output, lost, overwrite)
            return False
        if clear_finished(checkpoint, stored.get("run_id"), storage_options,
                          lease_home(output)):
            log.warning("removed the leftover checkpoint %s of the finished run", checkpoint)
        return True
    if overwrite or (same and restart):
        return False
    if stored.get("fingerprint") is None:
        why = "it records no fingerprint to compare (written by an older bigalign)"
    else:
        why = "it was made from other inputs or options:\n  " + "\n  ".join(
            describe_changes(stored["fingerprint"], fingerprint))
    raise InputError(f"output {str(output)!r} already exists and is complete, but {why}\n"
                     "Pass --overwrite to replace it.")
