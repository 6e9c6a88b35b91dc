"""A Lance export's dataset folder: what is there, what is bigalign's, and the folder as the
region job writes it (:class:`LanceTarget`, :mod:`bigalign.storage.output_job`).

    DATASET.lance/data/*.lance                Lance data files, one fragment per task
    DATASET.lance/_bigalign/fragment-N.json   each task's fragment metadata (Lance's JSON,
                                              ``FragmentMetadata.to_json``), written after
                                              its data: the task's "file"
    DATASET.lance/_versions/, _transactions/  Lance's manifest of the dataset: written once,
                                              by the commit at the end
    DATASET.lance/_bigalign_export.json       bigalign's manifest: written first with
                                              "complete": false, rewritten last

Until the commit (``lance.LanceDataset.commit`` of one ``LanceOperation.Overwrite`` listing
every task's fragment, in row order) the folder has no ``_versions``: ``lance.dataset`` and
LanceDB refuse it ("dataset not found"), so an interrupted export is never readable, let
alone as a complete dataset. The commit is the one step that makes the rows visible, all at
once; bigalign's manifest, rewritten with "complete": true, follows it.

bigalign deletes only what it wrote: the folder is an export's when its manifest is there and
every other name in it is one of Lance's (``data``, ``_versions``, ``_transactions``,
``_indices``, ``_deletions``, ``_refs``) or ``_bigalign``. An index that LanceDB built on
the finished dataset (``_indices``, a later version) is therefore removed with the rest by an
``--overwrite`` export, never by anything else.
"""

from __future__ import annotations

import json
from typing import Optional

from ..errors import InputError, TransientError

__all__ = ["FORMAT", "MANIFEST", "SIDECARS", "fragment_name", "export_manifest",
           "check_folder", "export_damage", "LanceTarget", "lance_schema"]

FORMAT = "bigalign.lance-export/1"
#: bigalign's manifest in the dataset folder (Lance reads only its own folders).
MANIFEST = "_bigalign_export.json"
#: The folder of the tasks' fragment metadata.
SIDECARS = "_bigalign"
#: What Lance itself writes in a dataset folder.
LANCE_NAMES = frozenset({"data", "_versions", "_transactions", "_indices", "_deletions",
                         "_refs"})


def fragment_name(index: int, files: int) -> str:
    """The metadata file of task ``index`` of ``files``: ``fragment-00000.json``."""
    width = max(5, len(str(max(files - 1, 0))))
    return f"fragment-{index:0{width}d}.json"


def lance_schema(ids_column: str, ids: str, vector_column: str, dtype: str, dim: int,
                 metadata: Optional[dict] = None):
    """The Arrow schema of an export: ``ids_column`` (int64 or string), ``vector_column``
    (a fixed-size list of ``dim`` values of ``dtype``: float16/32/64), and ``metadata``
    as the schema's ``bigalign`` key (JSON)."""
    import pyarrow as pa

    value = {"float16": pa.float16(), "float32": pa.float32(), "float64": pa.float64()}[dtype]
    return pa.schema([pa.field(ids_column, pa.int64() if ids == "int64" else pa.string()),
                      pa.field(vector_column, pa.list_(value, dim))],
                     metadata=None if metadata is None else
                     {"bigalign": json.dumps(metadata, sort_keys=True)})


def _folder(url, so):
    from .job import Job

    return Job(str(url), so)


def export_manifest(url, storage_options: Optional[dict] = None) -> Optional[dict]:
    """bigalign's manifest of a Lance export at ``url``, or None (storage that does not
    answer raises TransientError)."""
    try:
        folder = _folder(url, storage_options)
        raw = folder.get_file(folder._path(MANIFEST))
        manifest = json.loads(raw) if raw is not None else None
    except TransientError:
        raise
    except Exception:
        return None
    return manifest if isinstance(manifest, dict) and manifest.get("format") == FORMAT \
        else None


def _ours(name: str) -> bool:
    return name in LANCE_NAMES or name in (MANIFEST, SIDECARS) or \
        name.startswith(MANIFEST + ".tmp-")


def check_folder(url, storage_options: Optional[dict] = None) -> Optional[dict]:
    """What is at the output ``url``: None when nothing (or an empty folder), the manifest
    when it is a Lance export bigalign wrote; InputError for anything else (a file, a Lance
    dataset bigalign did not write, a folder with other files), whatever the flags."""
    folder = _folder(url, storage_options)
    if folder.fs.isfile(folder.root):
        raise InputError(f"output {str(url)!r} is a file; a Lance dataset is a folder. "
                         "Choose another location.")
    names = folder.list_names()
    if not names or all(n.startswith(MANIFEST + ".tmp-") for n in names):
        return None
    manifest = export_manifest(url, storage_options)
    foreign = sorted(n for n in names if not _ours(n))
    if manifest is None or foreign:
        listed = ", ".join((foreign or names)[:5])
        why = "" if manifest is not None else f"; it has no {MANIFEST}: not a bigalign export"
        raise InputError(
            f"output {str(url)!r} holds files bigalign did not write ({listed}{why}): "
            "bigalign deletes only what it wrote, even with --overwrite. Remove them "
            "yourself or choose another location.")
    return manifest


def _data_files(folder) -> dict[str, int]:
    """name -> size of the Lance data files (``data/``), one listing."""
    from .stores import retrying

    def ls():
        try:
            entries = folder.fs.ls(folder._path("data"), detail=True)
        except FileNotFoundError:
            return {}
        return {e["name"].rstrip("/").rsplit("/", 1)[-1]: int(e.get("size") or 0)
                for e in entries}
    return retrying(f"cannot list {folder.url!r}/data", ls)


def _sidecar_files(record: dict) -> list[tuple[str, int]]:
    """(data file, bytes) of every fragment a task's record lists."""
    return [(d["path"], int(d.get("file_size_bytes") or 0))
            for f in record.get("fragments", []) for d in f.get("files", [])]


def export_damage(url, manifest: dict, storage_options: Optional[dict] = None) -> Optional[str]:
    """What a finished Lance export lost: a data file its manifest lists missing or of
    another size, or no committed version; None when all is there."""
    folder = _folder(url, storage_options)
    present = _data_files(folder)
    bad = [f"data/{name}, missing" if name not in present else
           f"data/{name}, {present[name]:,} bytes where {size:,} were written"
           for f in manifest.get("files", []) if isinstance(f, dict)
           for name, size in f.get("data", [])
           if name not in present or (size and present[name] != size)]
    if not folder.list_names("_versions"):
        bad.insert(0, "_versions, missing (the dataset was never committed)")
    if not bad:
        return None
    return f"{len(bad)} of its files are missing or changed (first: {bad[0]})"


class LanceTarget:
    """A Lance export folder as the region job writes it: a region is a task's fragment
    (its data files and ``_bigalign/fragment-N.json``); completing is the Lance commit of
    every fragment, then bigalign's manifest with ``complete``. The handle is the folder."""

    noun = "fragments"

    def __init__(self, output, so, head: dict):
        self.url, self.storage_options, self.head = str(output).rstrip("/"), so, head
        self.names: dict = {}
        self.rows: dict = {}
        self.records: dict = {}

    def plan_files(self, expected: dict) -> None:
        self.rows = dict(expected)
        self.names = {i: fragment_name(i, len(expected)) for i in expected}

    def of_run(self, run_id: str):
        current = check_folder(self.url, self.storage_options)  # under the lease
        if current is not None and current.get("run_id") == run_id and \
                not current.get("complete"):
            return _folder(self.url, self.storage_options)
        return None

    def create(self, run_id: str):
        folder = _folder(self.url, self.storage_options)
        check_folder(self.url, self.storage_options)  # never clear a foreign folder
        for name in folder.list_names():
            if name != MANIFEST and _ours(name):
                path = folder._path(name)
                if folder.fs.isdir(path):
                    folder.fs.rm(path, recursive=True)
                else:
                    folder.remove_file(path)
        self._write_manifest(folder, dict(self.head, run_id=run_id, files=self._files()))
        return folder

    def owner(self):
        return (export_manifest(self.url, self.storage_options) or {}).get("run_id")

    def _write_manifest(self, folder, manifest: dict) -> None:
        folder.put_file(folder._path(MANIFEST), json.dumps(manifest, indent=1).encode())

    def _files(self) -> list[dict]:
        return [dict({"name": self.names[i], "rows": list(self.rows[i])},
                     **({"data": _sidecar_files(self.records[i])} if i in self.records
                        else {}))
                for i in sorted(self.names)]

    def _read_records(self, folder, regions) -> dict:
        run_id = (export_manifest(self.url, self.storage_options) or {}).get("run_id")
        out = {}
        present = set(folder.list_names(SIDECARS))
        for i in regions:
            if self.names[i] not in present:
                continue
            raw = folder.get_file(folder._path(SIDECARS, self.names[i]))
            try:
                record = json.loads(raw)
            except (TypeError, ValueError):
                continue
            if record.get("run_id") == run_id and record.get("rows") == list(self.rows[i]):
                out[i] = record
        return out

    def check(self, folder, regions: dict) -> set:
        """Regions whose fragment record or data files are missing or of another size;
        removes the data files no record of the plan lists (what killed writers left)."""
        records = self._read_records(folder, self.names)
        present = _data_files(folder)
        listed = {name for r in records.values() for name, _ in _sidecar_files(r)}
        for name in present:
            if name not in listed:
                folder.remove_file(folder._path("data", name))
        lost = {i for i in regions if i not in records or any(
            name not in present or (size and present[name] != size)
            for name, size in _sidecar_files(records[i]))}
        self.records = {i: r for i, r in records.items() if i not in lost}
        return lost

    def complete(self, folder, record: dict) -> None:
        """Commit every fragment as the dataset's one version (unless this run's commit
        is already there: a run killed after it), then rewrite the manifest, last."""
        from ..storage.formats.lance import lance_module, lance_storage_options

        lance = lance_module()
        run_id = record["job"]["run_id"]
        fragments = [lance.FragmentMetadata.from_json(json.dumps(f))
                     for i in sorted(self.names) for f in self.records[i]["fragments"]]
        h = self.head
        schema = lance_schema(h["ids_column"], h["ids"], h["vector_column"], h["dtype"],
                              h["dim"], _dataset_metadata(h, run_id))
        so = lance_storage_options(self.url, self.storage_options)
        version = _committed_version(lance, self.url, so, run_id)
        if version is None:
            ds = lance.LanceDataset.commit(self.url, lance.LanceOperation.Overwrite(
                schema, fragments), storage_options=so)
            version = int(ds.version)
        from .. import faults

        faults.point("export.committed")  # committed, the manifest not yet rewritten
        self._write_manifest(folder, dict(self.head, run_id=run_id, files=self._files(),
                                          lance_version=version, **record))


def _dataset_metadata(head: dict, run_id: str) -> dict:
    """The schema's ``bigalign`` metadata: what a reader needs to know where the vectors
    came from (the model stamp and the mapped vectors' record, which ``bigalign import``
    reads back, the source, its provenance, the rows, the run)."""
    return {"format": FORMAT, "run_id": run_id, "model": head.get("model"),
            "source": head.get("source"), "rows": head.get("rows"),
            "provenance": head.get("provenance") or {}, "mapped": head.get("mapped")}


def _committed_version(lance, url: str, so, run_id: str) -> Optional[int]:
    """The version of the dataset at ``url`` when this run committed it already, else
    None (no dataset yet)."""
    try:
        ds = lance.dataset(url, storage_options=so)
    except (ValueError, OSError):
        return None
    raw = (ds.schema.metadata or {}).get(b"bigalign")
    try:
        theirs = json.loads(raw).get("run_id") if raw else None
    except ValueError:
        theirs = None
    return int(ds.version) if theirs == run_id else None
