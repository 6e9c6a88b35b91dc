"""The registry: numbered, immutable versions of a transform and a ``current`` pointer.

A query service loads whatever is current (``Transform.load(REG)``); ``bigalign realign``
publishes new versions; an operator lists, inspects, rolls back and collects old versions.
Layout at ``REG`` (a local folder or any fsspec URL)::

    registry.json                  {"format": "bigalign.registry/1", "created": ...}
    versions/v0001/transform/      the Transform (a Zarr group), written first
    versions/v0001/record.json     what made it: run id, time, inputs, models, gate figures,
                                   bigalign version, the transform's SHA-256 and the record's
                                   own (see "Integrity"). Written after the transform, by a
                                   conditional create: a version exists iff its record does,
                                   and a record is never rewritten
    current/000000000004.json      pointer generations; the newest names the current version
    runs/<run id>/                 progress and verdicts of realign runs (bigalign.commands.realign)
    .lock/lease/...                the registry lock: a checkpoint lease (bigalign.storage.lease)
    .realign/lease/...             the realign lease: one realign run at a time
                                   (:meth:`Registry.realign_lock`)

**The current pointer** is a sequence of small files, each created with the job protocol's
conditional create (:meth:`bigalign.storage.job.Job.put_file` with ``create=True``: a hard link
of a complete temporary file on local disks, ``If-None-Match: *`` on S3), exactly like a
lease generation. Moving the pointer creates generation g+1; readers take the newest. So a
reader sees the old version or the new one, never a half-written pointer, and two writers
can never both create generation g+1. Old generations are kept: they are the history
(``publish`` / ``rollback``, by which run, when), and they let a resumed realign see that it
already moved the pointer.

**Writers** (realign's version write and publish, ``rollback``, ``gc``) hold the registry
lock, a lease of :class:`bigalign.storage.job.Job` at ``REG/.lock``, only for those short
steps, so one runs and the others are refused (exit 2, naming the holder) or wait
(``lock(wait=...)``). Every write checks the lease first (fencing), as fit and apply do.
Readers take no lock. A realign run's long steps (fit, evaluation, corpus apply) hold only
the *realign lease* at ``REG/.realign`` (one realign per registry) and their own run's job,
so a rollback or gc is never refused for the length of a realign.

**Integrity.** :meth:`write_version` records the transform's SHA-256 (``transform_sha256``,
:meth:`bigalign.Transform.digest`, also stored in the transform's own attributes) and the
SHA-256 of the record's canonical JSON (``record_sha256``: sorted keys, no spaces, every key
but itself). :meth:`verify` compares them with what is stored: a hand-edited record, a
transform swapped into the version (or, ``deep``, one whose arrays no longer match its
digest), or a mapped corpus written by another transform makes the version *damaged*;
``registry show`` and ``list`` say DAMAGED (exit 3) and :meth:`set_current` (publish,
rollback) refuses to make it current (exit 2). Records written before these digests are
*unverified*, not damaged.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import socket
import time
from datetime import datetime, timezone
from typing import Iterator, Optional

from .job import Job
from .lease import LeaseHeldError
from ..errors import CheckpointError, DamagedOutputError, InputError
# the reading half, and the names this module has always had
from .registry_read import (FORMAT, POINTER_FORMAT, RECORD_FORMAT, _VERSION,  # noqa: F401
                            RegistryReader, is_registry, resolve_transform,
                            version_name, version_number)

log = logging.getLogger("bigalign")

__all__ = ["Registry", "is_registry", "resolve_transform", "FORMAT"]

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def record_digest(record: dict) -> str:
    """SHA-256 (hex) of a version record's canonical JSON: every key but ``record_sha256``,
    keys sorted, no spaces, as the record reads back from its file (what
    :meth:`Registry.write_version` stores as ``record_sha256``)."""
    body = {k: v for k, v in record.items() if k != "record_sha256"}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class Registry(RegistryReader):
    """The registry at ``url`` (local path or fsspec URL). Reading methods take no lock
    (:class:`~bigalign.storage.registry_read.RegistryReader`); writing ones take the
    :meth:`lock`'s Job and check its lease before every write."""

    def create(self, lock: Job) -> None:
        """Make ``url`` a registry (idempotent). Refuses a location holding anything else:
        bigalign writes only where it owns the place."""
        if self.exists():
            return
        names = [n for n in self.files.list_names() if n not in (".lock", ".realign", "runs")]
        if names:
            raise InputError(f"{self.url!r} is not empty and not a bigalign registry (it holds "
                             f"{', '.join(sorted(names)[:5])}); choose a new location for "
                             "the registry")
        lock.check_fence()
        try:
            self.files.put_file(self._path("registry.json"), json.dumps(
                {"format": FORMAT, "created": _now()}).encode(), create=True)
        except FileExistsError:
            pass

    def load(self, version: Optional[str] = None):
        """The Transform of ``version`` (default: the current one); training statistics are
        read when first accessed."""
        from ..transform import Transform

        version = version or self.require_current()
        self.record(version)
        t = Transform.load(self.transform_url(version), storage_options=self.storage_options)
        t.metadata = dict(t.metadata, registry={"url": self.url, "version": version})
        return t

    # ---- writing (under the lock) -----------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, what: str = "change", *, wait: float = 0.0) -> Iterator[Job]:
        """Hold the registry lock (a checkpoint lease at ``REG/.lock``) and yield its Job,
        whose :meth:`~bigalign.storage.job.Job.check_fence` guards every write. Held
        for short steps only (a version write, a pointer move, a gc). Another holder alive:
        keep trying for ``wait`` seconds, then LeaseHeldError (a CheckpointError, exit 2)
        naming it."""
        job = Job(f"{self.url}/.lock", self.storage_options)
        deadline = time.monotonic() + max(float(wait), 0.0)
        while True:
            try:
                lease = job.lease()
                lease.__enter__()
                break
            except LeaseHeldError as e:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise LeaseHeldError(
                        f"registry {self.url!r} is in use: another realign's publish, a "
                        f"rollback or a gc holds it, so this {what} is refused. {e}") from None
                time.sleep(min(0.5, left))  # holders keep it for seconds
        try:
            yield job
        finally:
            lease.__exit__(None, None, None)

    @contextlib.contextmanager
    def realign_lock(self, run_id: str) -> Iterator[Job]:
        """Hold the realign lease (``REG/.realign``) for a whole realign run: one realign
        per registry, so two started together end with one winner. It does not exclude
        rollback, gc or readers: writes to the registry itself take :meth:`lock` as well.
        Another realign alive: LeaseHeldError (exit 2) naming it."""
        job = Job(f"{self.url}/.realign", self.storage_options)
        try:
            lease = job.lease()
            lease.__enter__()
        except LeaseHeldError as e:
            raise LeaseHeldError(f"registry {self.url!r} is in use: another realign runs on "
                                 f"it, so realign run {run_id!r} is refused. {e}") from None
        try:
            yield job
        finally:
            lease.__exit__(None, None, None)

    def next_version(self) -> str:
        """The number after every version folder (complete or not) and every version a
        pointer ever named: numbers are not reused."""
        numbers = [version_number(v) for v in self._version_dirs()]
        numbers += [version_number(p["version"]) for p in self.history()
                    if _VERSION.match(str(p.get("version")))]
        return version_name(max(numbers, default=0) + 1)

    def write_version(self, lock: Job, version: str, transform, record: dict) -> None:
        """Write ``transform`` and then its ``record`` as ``version`` (fenced by ``lock``).
        A version whose record exists is immutable: rewriting it is refused, except that a
        call for the same run id finds it done and returns (a resumed publish). The record
        gets ``transform_sha256`` (``transform.digest()``; a different one given in
        ``record`` is refused) and ``record_sha256`` (:func:`record_digest`)."""
        existing = self.record(version, missing_ok=True)
        if existing is not None:
            if existing.get("run_id") == record.get("run_id"):
                return
            raise CheckpointError(f"{self.url}: version {version} already exists (run "
                                  f"{existing.get('run_id')}); versions are immutable")
        digest = transform.digest()
        if record.get("transform_sha256") not in (None, digest):
            raise CheckpointError(f"{self.url}: the record for {version} names transform "
                                  f"sha256 {record['transform_sha256']}, the transform given "
                                  f"is {digest}")
        lock.check_fence()
        # a folder without a record is an unfinished publish: the transform is rewritten
        transform.save(self.transform_url(version), overwrite=True,
                       storage_options=self.storage_options)
        stored = self._stored_digest(version)
        if stored != digest:
            raise CheckpointError(f"{self.url}: the transform written as {version} reads back "
                                  f"with sha256 {stored}, not {digest}: another writer?")
        record = dict(record, format=RECORD_FORMAT, version=version, transform_sha256=digest)
        record.pop("record_sha256", None)
        record = json.loads(json.dumps(record, default=str))  # as it will read back
        record["record_sha256"] = record_digest(record)
        lock.check_fence()
        try:
            self.files.put_file(self._path("versions", version, "record.json"),
                            json.dumps(record, indent=1).encode(), create=True)
        except FileExistsError:
            raise CheckpointError(f"{self.url}: version {version} was written by someone "
                                  "else at the same moment") from None

    def set_current(self, lock: Job, version: str, *, action: str,
                    run_id: Optional[str] = None, **extra) -> dict:
        """Make ``version`` current: create pointer generation g+1 (fenced, conditional
        create). Returns the pointer record. A damaged version (:meth:`verify`, deep) is
        refused: DamagedOutputError (exit 2) naming what disagrees."""
        self.require_intact(version, action=action)
        gens = self._generations()
        generation = (gens[-1] if gens else 0) + 1
        previous = self.current()
        pointer = {"format": POINTER_FORMAT, "generation": generation, "version": version,
                   "previous": previous, "action": action, "run_id": run_id, "time": _now(),
                   "host": socket.gethostname(), **extra}
        lock.check_fence()
        try:
            self.files.put_file(self._path("current", f"{generation:012d}.json"),
                            json.dumps(pointer, indent=1).encode(), create=True)
        except FileExistsError:
            raise CheckpointError(f"{self.url}: the current pointer moved at the same moment "
                                  f"(generation {generation} exists): this run lost the "
                                  "registry lock") from None
        log.info("%s: current version is now %s (%s)", self.url, version,
                 f"was {previous}" if previous else "the first version")
        return pointer

    def published_by(self, run_id: str, version: str) -> Optional[dict]:
        """The pointer generation with which run ``run_id`` made ``version`` current, if any
        (a resumed realign does not move the pointer twice, even after a rollback)."""
        for p in self.history():
            if p.get("run_id") == run_id and p.get("version") == version and \
                    p.get("action") == "publish":
                return p
        return None

    def rollback(self, to: Optional[str] = None) -> dict:
        """Make an earlier version current (default: the newest version older than the
        current one; ``to``: any existing version). Returns {"from", "to", "changed"}."""
        self.check()
        with self.lock("rollback") as lock:
            current = self.require_current()
            if to is None:
                older = [v for v in self.versions() if version_number(v) < version_number(current)]
                if not older:
                    raise InputError(f"{self.url}: no version older than the current {current} "
                                     "to roll back to")
                to = older[-1]
            self.record(to)
            if to == current:
                return {"from": current, "to": to, "changed": False}
            self.set_current(lock, to, action="rollback")
            return {"from": current, "to": to, "changed": True}

    def gc(self, keep: int, *, dry_run: bool = False, mapped: bool = False) -> dict:
        """Delete complete versions other than the ``keep`` newest and the current one.
        Returns {"kept": [...], "deleted": [...], "incomplete": [...], "current", "dry_run",
        "mapped": [...]}: incomplete version folders (a publish cut short; its realign rerun
        finishes it) are left alone. ``mapped`` lists the corpus each deleted version's
        record names (:meth:`mapped_corpus`), and with ``mapped=True`` those bigalign wrote
        with that version's transform are deleted too, before the version's record (a gc
        cut short and rerun still finds them); anything else there is never touched."""
        if keep < 1:
            raise InputError(f"--keep must be at least 1, got {keep}")
        self.check()
        with self.lock("gc") as lock:
            versions = self.versions()
            current = self.current()
            kept = set(versions[-keep:]) | ({current} if current else set())
            doomed = [v for v in versions if v not in kept]
            incomplete = [v for v in self._version_dirs() if v not in versions]
            corpora = [c for c in (self.mapped_corpus(v) for v in doomed) if c is not None]
            for c in corpora:
                c["deleted"] = bool(mapped and c["ours"] and not dry_run)
            if not dry_run:
                for v in doomed:
                    for c in corpora:
                        if c["version"] == v and c["deleted"]:
                            lock.check_fence()
                            self._remove_output(c["output"])
                    self._delete_version(lock, v)
            return {"kept": [v for v in versions if v in kept], "deleted": doomed,
                    "incomplete": incomplete, "current": current, "dry_run": dry_run,
                    "mapped": corpora}

    def mapped_corpus(self, version: str) -> Optional[dict]:
        """The corpus ``version``'s record says realign mapped with it ({version, output,
        ours, why, bytes}), or None when it names none. ``ours`` only when ``output`` is a
        complete bigalign apply output (a bare array or embedding store written by apply)
        whose recorded transform digest is the one this version's record names; else
        ``why`` says what it is instead (absent, unfinished, not an apply output, mapped by
        another transform). ``bytes``: its size when ours (one listing of it)."""
        from .outputs import inspect

        record = self.record(version)
        output = (record.get("mapped_corpus") or {}).get("output")
        if not output:
            return None
        want = record.get("transform_sha256")
        node = inspect(output, self.storage_options)
        why = None
        if node.kind == "absent":
            why = "absent"
        elif node.kind not in ("apply-output", "apply-store"):
            why = f"not a bigalign apply output ({node.kind})"
        elif not want or node.attrs.get("transform") != want:
            why = (f"mapped by another transform (sha256 {node.attrs.get('transform')}, "
                   f"{version}'s record: {want})")
        elif not node.complete:
            why = "unfinished (an apply may still be writing it)"
        size = None
        if why is None:
            import fsspec

            fs, path = fsspec.core.url_to_fs(output, **(self.storage_options or {}))
            size = fs.du(path.rstrip("/"))
        return {"version": version, "output": output, "ours": why is None, "why": why,
                "bytes": size}

    def _remove_output(self, url: str) -> None:
        """Delete the apply output at ``url`` (checked ours by :meth:`mapped_corpus`)."""
        import fsspec

        fs, path = fsspec.core.url_to_fs(url, **(self.storage_options or {}))
        fs.rm(path.rstrip("/"), recursive=True)
        log.info("%s: deleted mapped corpus %s", self.url, url)

    def _delete_version(self, lock: Job, version: str) -> None:
        """Remove the record first (the version then no longer exists for readers), then
        the transform group; files bigalign did not write are left, with their folder."""
        from .outputs import inspect

        lock.check_fence()
        self.files.remove_file(self._path("versions", version, "record.json"))
        url = self.transform_url(version)
        if inspect(url, self.storage_options).kind in ("transform", "partial-transform"):
            lock.check_fence()
            self.files.fs.rm(self._path("versions", version, "transform"), recursive=True)
        with contextlib.suppress(OSError, NotImplementedError):
            if not self.files.list_names(f"versions/{version}"):
                self.files.fs.rmdir(self._path("versions", version))
        log.info("%s: deleted version %s", self.url, version)

    # ---- integrity ----------------------------------------------------------------------------
    def _stored_digest(self, version: str) -> Optional[str]:
        """The SHA-256 recorded in the attributes of ``version``'s stored transform, or None
        (none recorded, or no complete transform there)."""
        from .outputs import inspect

        node = inspect(self.transform_url(version), self.storage_options)
        return node.attrs.get("sha256") if node.kind == "transform" else None

    def verify(self, version: str, *, deep: bool = False) -> dict:
        """Check ``version`` against the digests its record carries. Returns {"state": "ok" |
        "unverified" | "damaged", "problems": [what disagrees, in words], "notes": [why it is
        unverified], "mapped_corpus": None | {"output", "state"}}.

        Always (a few small reads): the record's ``record_sha256`` against its content (a
        hand edit), its ``transform_sha256`` against the digest in the stored transform's
        attributes (another transform put there, or none), and a mapped corpus the record
        names, when present, against that digest. ``deep`` also reads the transform's arrays
        and checks them against their digest (a changed or lost chunk): d x d float64."""
        record = self.record(version)
        problems, notes = [], []
        if record.get("record_sha256") is None:
            notes.append("its record was written before records carried their own digest")
        elif record_digest(record) != record["record_sha256"]:
            problems.append(f"versions/{version}/record.json was changed after it was written "
                            "(its content no longer matches its record_sha256)")
        want = record.get("transform_sha256")
        from .outputs import inspect

        node = inspect(self.transform_url(version), self.storage_options)
        stored = node.attrs.get("sha256") if node.kind == "transform" else None
        where = f"versions/{version}/transform"
        if node.kind != "transform":
            problems.append(f"{where} is not a complete bigalign transform ({node.kind})")
        elif want is None:
            notes.append("its record names no transform digest")
        elif stored != want:
            problems.append(f"{where} is not the transform its record names (record: sha256 "
                            f"{want}; stored transform: {stored or 'no digest'})")
        elif deep:
            try:
                self.load(version)
            except DamagedOutputError as e:
                problems.append(f"{where}: {e.lost or e}")
        mapped = None
        output = (record.get("mapped_corpus") or {}).get("output")
        if output:
            out = inspect(output, self.storage_options)
            state = ("absent" if out.kind == "absent" else "complete" if out.complete else
                     "incomplete" if out.ours else "foreign")
            mapped = {"output": output, "state": state}
            if out.ours and want and out.attrs.get("transform") not in (None, want):
                problems.append(f"the mapped corpus {output!r} was mapped by another transform "
                                f"(sha256 {out.attrs.get('transform')}, record: {want})")
        state = "damaged" if problems else "unverified" if notes else "ok"
        return {"state": state, "problems": problems, "notes": notes, "mapped_corpus": mapped}

    def require_intact(self, version: str, *, action: str = "publish") -> dict:
        """:meth:`verify` (deep) or DamagedOutputError (an InputError: exit 2) naming what
        disagrees: a damaged version is never made current."""
        check = self.verify(version, deep=True)
        if check["state"] == "damaged":
            lost = "; ".join(check["problems"])
            error = DamagedOutputError(f"{self.url}: version {version} is DAMAGED ({lost}); "
                                       f"refused to make it current ({action})")
            error.lost = lost
            raise error
        return check

    # ---- realign runs -------------------------------------------------------------------------
    def verdict(self, run_id: str) -> Optional[dict]:
        """The final verdict of realign run ``run_id``, or None while it is not finished."""
        return self._json("runs", run_id, "verdict.json")

    def describe(self) -> dict:
        """Everything ``registry list`` shows: versions with their records and their
        ``integrity`` (:meth:`verify`, not deep), the current one, the pointer history."""
        self.check()
        versions = self.versions()
        return {"registry": self.url, "current": self.current(),
                "versions": [dict(self.record(v), version=v, integrity=self.verify(v))
                             for v in versions],
                "history": self.history()}
