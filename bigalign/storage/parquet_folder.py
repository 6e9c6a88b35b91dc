"""A Parquet export's folder: what is there, what is bigalign's, and the folder as the
region job writes it (:class:`ExportTarget`, :mod:`bigalign.storage.output_job`).

    DIR/_in_progress/part-00000.parquet   where each task writes its file, rows in order
    DIR/part-00000.parquet                the same files, moved here by the last step
    DIR/_SUCCESS                          empty, written once every part is in DIR
    DIR/_bigalign_export.json             the manifest: written first with "complete":
                                          false, rewritten last

**An interrupted export does not look complete** (the Spark/Hadoop convention, both halves):
until the last step no part is in DIR itself, so ``DIR/*.parquet`` matches nothing and a
pyarrow or Spark dataset of DIR is empty (both skip names starting with ``_`` or ``.``,
``_in_progress`` included); the last step moves every part into DIR, then writes
``_SUCCESS``, then the manifest with "complete": true. A loader that must be safe even
during those moves (a kill between two of them leaves some parts in DIR) waits for
``_SUCCESS`` or the manifest's "complete", as Spark's readers of Hadoop output do. A rerun
after a kill in the middle of the moves finds each part in one place or the other, and
finishes the moves.

bigalign deletes only what it wrote: a folder is an export's when its manifest is there and
every other name in it is a part the manifest lists (or a temporary file of one), in DIR or
in ``_in_progress``, or ``_SUCCESS``.
"""

from __future__ import annotations

import json
import re
import uuid
from typing import Optional

from ..errors import InputError, TransientError

__all__ = ["FORMAT", "MANIFEST", "IN_PROGRESS", "SUCCESS", "part_name", "export_manifest",
           "check_folder", "export_damage", "ExportTarget", "COMPRESSIONS", "BAD_ROWS"]

#: --compression choices of a Parquet export and polars' names for them. snappy (the
#: default) writes as fast as none and every Parquet reader has it; zstd is ~9% smaller on
#: float vectors and ~1.4x slower to write (measured: 200k x 384 float32 with string ids).
#: Here, not in commands.parquet_export, so that the command line's parser needs no numpy.
COMPRESSIONS = {"snappy": "snappy", "zstd": "zstd", "none": "uncompressed"}
#: --bad-rows choices of a vector export (Parquet and Lance).
BAD_ROWS = ("fail", "skip")

FORMAT = "bigalign.parquet-export/1"
#: The manifest's name in the output folder (a leading "_": loaders skip it).
MANIFEST = "_bigalign_export.json"
#: The folder the tasks write their parts in until the last step moves them into DIR.
IN_PROGRESS = "_in_progress"
#: The empty marker written once every part is in DIR (Spark/Hadoop's name).
SUCCESS = "_SUCCESS"


# ==== names (pure) ===========================================================================

def part_name(index: int, files: int) -> str:
    """File ``index`` of ``files``: ``part-00000.parquet``, five digits or as many as the
    last index needs, so that lexicographic order (globs, ``bigalign import``) is row
    order."""
    width = max(5, len(str(max(files - 1, 0))))
    return f"part-{index:0{width}d}.parquet"


def _temp_name(name: str) -> str:
    """Where a part is written before its rename (local folders only): a leading dot, so
    readers of the folder never see it."""
    return f".{name}.tmp-{uuid.uuid4().hex}"


def _owned(name: str, parts: set) -> bool:
    """Is ``name`` a file an export whose manifest lists ``parts`` wrote: the manifest, a
    part, or a temporary file of either."""
    if name in (MANIFEST, SUCCESS, IN_PROGRESS) or name in parts or \
            name.startswith((MANIFEST + ".tmp-", SUCCESS + ".tmp-")):
        return True
    return name.startswith(".") and ".tmp-" in name and name[1:].split(".tmp-")[0] in parts


def _parts_of(manifest: Optional[dict]) -> set:
    """The part files a manifest lists: only names of the form ``part-N.parquet`` count, so
    a damaged or hand-edited manifest cannot make bigalign delete anything else (another
    name, or a path such as ``../x``)."""
    return {f["name"] for f in (manifest or {}).get("files", [])
            if isinstance(f, dict) and isinstance(f.get("name"), str)
            and re.fullmatch(r"part-[0-9]+\.parquet", f["name"])}


# ==== the output folder: what is there, and what is ours ======================================

def _folder(url, so):
    """Job's file helpers (retried; files written whole) at the output folder."""
    from .job import Job

    return Job(str(url), so)


def export_manifest(url, storage_options: Optional[dict] = None) -> Optional[dict]:
    """The manifest of a bigalign Parquet export at ``url``, or None when there is none
    (or it is not one). Storage that does not answer raises (TransientError): "nothing
    there" would be a lie."""
    try:
        folder = _folder(url, storage_options)
        raw = folder.get_file(folder._path(MANIFEST))
        manifest = json.loads(raw) if raw is not None else None
    except TransientError:
        raise
    except Exception:  # not a folder, not readable, not JSON: not an export
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT \
        else None


def check_folder(url, storage_options: Optional[dict] = None) -> Optional[dict]:
    """What is at the output ``url``: None when nothing (or an empty folder), the manifest
    when it is an export bigalign wrote holding only files it lists; InputError for
    anything else (a file, a folder with other files), whatever the flags."""
    folder = _folder(url, storage_options)
    fs, root = folder.fs, folder.root
    if fs.isfile(root):
        raise InputError(f"output {str(url)!r} is a file; a Parquet export is a folder of "
                         "files. Choose another location.")
    names = folder.list_names()
    if not names:
        return None
    manifest = export_manifest(url, storage_options)
    parts = _parts_of(manifest)
    foreign = sorted(n for n in names if not _owned(n, parts))
    if IN_PROGRESS in names:
        foreign += sorted(f"{IN_PROGRESS}/{n}" for n in folder.list_names(IN_PROGRESS)
                          if n == IN_PROGRESS or not _owned(n, parts) or n == SUCCESS)
    if manifest is None and all(_owned(n, parts) for n in names):
        return None  # only the temporary file of a first manifest cut short
    if foreign:
        listed = ", ".join(foreign[:5]) + (", ..." if len(foreign) > 5 else "")
        why = "" if manifest is not None else f"; it has no {MANIFEST}: not a bigalign export"
        raise InputError(
            f"output {str(url)!r} holds files bigalign did not write ({listed}{why}): "
            "bigalign deletes only what it wrote, even with --overwrite. Remove them "
            "yourself or choose another location.")
    return manifest


def _clear_folder(folder, manifest: Optional[dict], job) -> None:
    """Remove the parts ``manifest`` lists and temporary files (fenced), keeping the
    manifest: until a new one replaces it, the folder stays recognisably bigalign's."""
    parts = _parts_of(manifest)
    for name in folder.list_names():  # _SUCCESS first: the folder stops looking complete
        if name == SUCCESS:
            folder.remove_file(folder._path(name))
    for name in folder.list_names(IN_PROGRESS):
        if _owned(name, parts):
            if job is not None:
                job.check_fence()
            folder.remove_file(folder._path(IN_PROGRESS, name))
    for name in folder.list_names():
        if name not in (MANIFEST, IN_PROGRESS) and _owned(name, parts):
            if job is not None:
                job.check_fence()
            folder.remove_file(folder._path(name))


def _write_manifest(folder, manifest: dict, job) -> None:
    if job is not None:
        job.check_fence()
    folder.put_file(folder._path(MANIFEST), json.dumps(manifest, indent=1).encode())


def _listing(folder, sub: str = "") -> dict[str, int]:
    """name -> size of the files in the output folder (or its folder ``sub``): one
    listing."""
    from .stores import retrying

    where = folder._path(sub) if sub else folder.root

    def ls():
        try:
            try:
                entries = folder.fs.ls(where, detail=True, refresh=True)
            except TypeError:  # file systems without a listing cache
                entries = folder.fs.ls(where, detail=True)
        except FileNotFoundError:
            return {}
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
                for e in entries if e.get("type") != "directory"}
    return retrying(f"cannot list {folder.url!r}", ls)


def _move(folder, name: str) -> None:
    """Move part ``name`` from ``_in_progress`` into the folder (a rename on local disks;
    a copy then a delete on object stores, where a rename is not atomic anyway)."""
    from .stores import retrying

    src, dst = folder._path(IN_PROGRESS, name), folder._path(name)
    retrying(f"cannot move {src!r} to {dst!r}", lambda: folder.fs.mv(src, dst))


def export_damage(url, manifest: dict, storage_options: Optional[dict] = None) -> Optional[str]:
    """What a finished export at ``url`` lost: ``"N of M files listed in its manifest are
    missing or changed (first: NAME, missing)"`` when a file the manifest lists is not in
    the folder or not of the size it records; None when all are there. One listing."""
    files = [f for f in manifest.get("files", []) if isinstance(f, dict)]
    present = _listing(_folder(url, storage_options))
    bad = []
    for f in files:
        name = f.get("name")
        if name not in present:
            bad.append(f"{name}, missing")
        elif f.get("bytes") is not None and present[name] != f["bytes"]:
            bad.append(f"{name}, {present[name]:,} bytes where {f['bytes']:,} were written")
    if not bad:
        return None
    return (f"{len(bad)} of {len(files)} files listed in its manifest are missing or changed "
            f"(first: {bad[0]})")


class ExportTarget:
    """A Parquet export folder as the region job writes it
    (:mod:`bigalign.storage.output_job`): a region is a part file (``names``: index ->
    name, set once the plan is known); the manifest (``head`` plus the run id and the
    files) records the writer and, rewritten last, ``complete``. The handle is the
    folder."""

    noun = "files"

    def __init__(self, output, so, head: dict):
        self.url, self.storage_options, self.head = str(output), so, head
        self.names: dict = {}
        self.rows: dict = {}
        self._present: dict = {}
        self._waiting: set = set()

    def plan_files(self, expected: dict) -> None:
        """The files of the plan: index -> rows [a, b) (``expected``), and their names."""
        self.rows = dict(expected)
        self.names = {i: part_name(i, len(expected)) for i in expected}

    def _files(self, sizes: bool = False) -> list[dict]:
        return [dict({"name": self.names[i], "rows": list(self.rows[i])},
                     **({"bytes": self._present[self.names[i]]} if sizes else {}))
                for i in sorted(self.names)]

    def of_run(self, run_id: str):
        current = check_folder(self.url, self.storage_options)  # under the lease
        if current is not None and current.get("run_id") == run_id and \
                not current.get("complete"):
            return _folder(self.url, self.storage_options)
        return None

    def create(self, run_id: str):
        folder = _folder(self.url, self.storage_options)
        _clear_folder(folder, check_folder(self.url, self.storage_options), None)
        _write_manifest(folder, dict(self.head, run_id=run_id, files=self._files()), None)
        return folder

    def owner(self):
        return (export_manifest(self.url, self.storage_options) or {}).get("run_id")

    def check(self, folder, regions: dict) -> set:
        """Regions whose file is neither in ``_in_progress`` nor (moved by a run killed
        while completing) in the folder, or is empty: two listings, which also remove the
        temporary files of killed writers."""
        parts = set(self.names.values())
        waiting = _listing(folder, IN_PROGRESS)
        for name in list(waiting):
            if name not in parts and _owned(name, parts):
                folder.remove_file(folder._path(IN_PROGRESS, name))  # killed writers'
                del waiting[name]
        moved = {n: b for n, b in _listing(folder).items() if n in parts}
        self._waiting = {n for n in parts if waiting.get(n)}
        present = self._present = dict(moved, **{n: waiting[n] for n in self._waiting})
        return {i for i in regions if not present.get(self.names[i])}

    def complete(self, folder, record: dict) -> None:
        """Move every part into the folder, then write ``_SUCCESS``, then the manifest."""
        from .. import faults

        for name in sorted(self._waiting):
            _move(folder, name)
            faults.point("export.file-moved")
        try:  # now empty (local disks have folders; object stores do not)
            folder.fs.rmdir(folder._path(IN_PROGRESS))
        except (OSError, NotImplementedError):
            pass
        folder.put_file(folder._path(SUCCESS), b"")
        _write_manifest(folder, dict(self.head, run_id=record["job"]["run_id"],
                                     files=self._files(sizes=True), **record), None)
