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

**Names carry the stamps** of units and markers, so that resume, verification and ``status``
decide what is done from one listing (:mod:`bigalign.storage.progress_files`).

The protocol:

* **Run id.** A job's manifest names its run id; every unit, marker and the output's
  attributes carry it (in their names and inside). On resume only files of the manifest's
  run, with the row range and count the plan expects, are trusted; anything else is ignored
  and recomputed.
* **Lease.** One writer per output. The lease lives at the output's job home
  (:func:`lease_home`: ``OUTPUT.checkpoint/lease/``) whatever ``--checkpoint`` names, so
  two runs writing one output exclude each other even with two checkpoints, or none
  (:mod:`bigalign.storage.lease`: how it is taken, renewed, and when its holder is dead).
  The generation is the run's *fencing token*: before every durable write (unit, marker,
  manifest, the output's completion, the final clean-up) the writer checks that the newest
  generation is still its own, and a run that lost its lease stops with
  :class:`~bigalign.storage.lease.LeaseLostError`.
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
import json
import logging
import os
import re
import time
import uuid
from typing import Optional

import fsspec
from fsspec.implementations.local import LocalFileSystem

from ..errors import CheckpointError, DamagedOutputError, InputError
from .lease import (Lease, LeaseLostError, _precondition_failed, _warn_no_conditional_create,
                    conditional_create)
from .progress_files import (_MARKER, _UNIT, ProgressFiles, _mtime, _parse, _stamped_by,
                             _temp_of)

log = logging.getLogger("bigalign")

FORMAT = "bigalign.checkpoint/2"

#: Names a checkpoint folder may hold: what :meth:`Job.clear` removes.
OWN_NAMES = ("manifest.json", "lease", "units", "done")

__all__ = ["Job", "checkpointed", "clear_finished", "lease_home", "default_checkpoint",
           "finished_or_refuse", "refuse_damaged", "describe_changes", "FORMAT"]


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


class Job(ProgressFiles):
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

def _is_manifest(manifest) -> bool:
    """A bigalign checkpoint manifest (any format version): a JSON object naming its kind
    and run id under a ``bigalign.checkpoint/`` format."""
    return isinstance(manifest, dict) and \
        str(manifest.get("format", "")).startswith("bigalign.checkpoint/") and \
        isinstance(manifest.get("run_id"), str) and "kind" in manifest


def _rebuild(url, storage_options, run_id, token, lease_url=None, progress=True):
    return Job(url, storage_options, run_id=run_id, token=token, lease_url=lease_url,
               progress=progress)


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
