"""The reader interface for input formats, the registry by extension, and what every reader
shares: :class:`SourceFile` (one probed input), :class:`Location` (one input before probing),
finding the inputs (:func:`expand_inputs`) and dispatching to a file's reader (:func:`probe`,
:func:`read_slice`, :func:`iter_rows`, :func:`restart_points`).

A format is one :class:`Reader` subclass in a module of its own, registered with
:func:`register` (its extensions); ``bigalign import`` (:mod:`bigalign.commands.ingest`)
only ever calls the functions here. See docs/formats.md ("Adding an input format").
"""

from __future__ import annotations

import glob as _glob
import os
from dataclasses import dataclass
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from ...errors import InputError

__all__ = ["SourceFile", "Location", "Reader", "register", "reader_for", "reader_of",
           "format_of", "FORMATS", "expand_inputs", "probe", "read_slice", "iter_rows",
           "restart_points", "fixed_rows", "exported_mapped"]

#: File extensions (lower case, with the dot) and the format they mean, filled by
#: :func:`register`.
FORMATS: dict[str, str] = {}

#: Format name -> its reader (an instance: readers hold no state of their own).
READERS: dict[str, "Reader"] = {}


@dataclass(frozen=True)
class SourceFile:
    """One input file as probed (metadata only; picklable: import tasks receive it).

    Every format: ``name`` (as the user spelled it or the glob matched it), ``url`` (what is
    opened: an absolute local path or an fsspec URL), ``local``, ``format`` (its reader's
    :attr:`Reader.format`), ``rows``, ``dim``, ``dtype`` (numpy ``dtype.str`` of the stored
    values), ``size`` and ``stamp`` (mtime or ETag), ``ids_kind`` ("int64", "string" or None:
    no ids) and ``model`` (the model the file's own metadata names, or None). Format-specific:
    ``offset``/``order`` (npy, fvecs: byte where rows start, C or F order);
    ``vector_column`` / ``ids_column`` / ``row_groups`` (Parquet: rows of each row group, from
    the footer; None when unknown; Lance: rows of each fragment) and ``version`` (Lance: the
    dataset version probed, which every read opens; ``stamp`` names it too); ``mapped``
    (Parquet, Lance: the record of mapped vectors that ``bigalign export`` wrote, as
    canonical JSON text, :mod:`bigalign.storage.provenance`; None for native vectors)."""

    name: str
    url: str
    local: bool
    format: str
    rows: int
    dim: int
    dtype: str
    size: int
    stamp: Optional[str]
    offset: int = 0
    order: str = "C"
    vector_column: Optional[str] = None
    ids_column: Optional[str] = None
    ids_kind: Optional[str] = None
    row_groups: Optional[tuple] = None
    model: Optional[str] = None
    version: Optional[int] = None
    mapped: Optional[str] = None

    def fingerprint(self, index: int) -> dict:
        """What an import's job fingerprint holds of this file (a resume must match it)."""
        return {"position": index, "format": self.format, "size": self.size,
                "stamp": self.stamp, "rows": self.rows, "dim": self.dim, "dtype": self.dtype,
                "vector_column": self.vector_column, "ids_column": self.ids_column}


def exported_mapped(raw) -> Optional[str]:
    """The record of mapped vectors (``mapped``) in the ``bigalign`` metadata ``raw`` (JSON
    text or bytes) that ``bigalign export`` writes, as canonical JSON text (sorted keys),
    or None (native vectors, not bigalign's, not JSON)."""
    import json

    try:
        record = json.loads(raw).get("mapped") if raw else None
    except (ValueError, TypeError, AttributeError):
        return None
    return json.dumps(record, sort_keys=True) if isinstance(record, dict) else None


@dataclass(frozen=True)
class Location:
    """One input before probing: ``name`` (as given), ``url`` (absolute path or fsspec URL),
    the fsspec filesystem ``fs`` and ``path`` in it, ``local``, and ``size`` (bytes) and
    ``stamp`` (mtime or ETag) from one ``fs.info``."""

    name: str
    url: str
    fs: Any
    path: str
    local: bool
    size: int
    stamp: Optional[str]

    def source(self, reader: "Reader", **found) -> SourceFile:
        """The :class:`SourceFile` of this location read by ``reader``: ``found`` holds what
        its probe found (rows, dim, dtype and any format-specific fields)."""
        return SourceFile(name=self.name, url=self.url, local=self.local,
                          format=reader.format, size=self.size, stamp=self.stamp, **found)


class Reader:
    """One input format. Subclass it in a module of its own and decorate it with
    :func:`register`; :mod:`bigalign.storage.formats` imports the module.

    A reader is stateless: what it learns of a file goes into the :class:`SourceFile` its
    :meth:`probe` returns, which import tasks (possibly on other machines) hand back to
    :meth:`read` / :meth:`batches`. Errors are :class:`bigalign.errors.InputError` naming the
    file (and the row, 0-based, where one is at fault)."""

    #: the format's name, stored in ``SourceFile.format`` and in import fingerprints: never
    #: rename it (a resume compares it)
    format: str = ""
    #: file name endings (lower case, with the dot) that mean this format
    extensions: tuple = ()
    #: whether files have named columns (``--vector-column`` / ``--ids-column`` apply)
    columns: bool = False
    #: whether one input is a folder (a Lance dataset is a folder of data files and
    #: versions): globs then match folders, and a folder with this extension is accepted
    directory: bool = False

    def probe(self, at: Location, *, vector_column: Optional[str] = None,
              ids_column: Optional[str] = None) -> SourceFile:
        """Read the file's metadata only (never its vectors): rows, dimension, value dtype,
        ids; check everything that can be checked without the vectors (errors name the
        file). ``at.source(self, rows=..., dim=..., dtype=...)`` builds the result."""
        raise NotImplementedError

    def read(self, f: SourceFile, start: int, stop: int,
             storage_options: Optional[dict] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
        """Rows [start, stop) of ``f``: ``(vectors (n, dim) in f.dtype, ids (n,) or None)``,
        validated (dimension, nulls, headers; finiteness is checked by the writer)."""
        raise NotImplementedError

    def batches(self, f: SourceFile, start: int, stop: int, batch_rows: int,
                storage_options: Optional[dict] = None) -> Iterator[tuple]:
        """Rows [start, stop) in order as ``(file row, vectors, ids or None)`` batches of
        at most about ``batch_rows`` rows. Default: one :meth:`read` per batch (right for
        directly addressable formats; a format that must decode from a restart point
        streams instead)."""
        for a in range(start, stop, batch_rows):
            b = min(stop, a + batch_rows)
            values, ids = self.read(f, a, b, storage_options)
            yield a, values, ids

    def restart_points(self, f: SourceFile) -> Optional[tuple]:
        """Where reads of ``f`` start cheaply, for the plan's units
        (:meth:`bigalign.planning.import_plan.ImportPlan.units`): None when any row can be read
        directly; else the rows of each block that a read decodes from its start (Parquet's
        row groups; ``()``: unknown, the whole file is one)."""
        return None


def register(cls: type) -> type:
    """Class decorator: make ``cls`` (a :class:`Reader`) the reader of its format and
    extensions. An extension or format registered twice is a bug."""
    reader = cls()
    if not reader.format or not reader.extensions:
        raise TypeError(f"{cls.__name__} needs a format and extensions")
    for ext in reader.extensions:
        ext = ext.lower()
        if FORMATS.get(ext, reader.format) != reader.format:
            raise TypeError(f"extension {ext} is already {FORMATS[ext]!r}")
        FORMATS[ext] = reader.format
    READERS[reader.format] = reader
    return cls


def format_of(name: str) -> Optional[str]:
    """The format a file name's extension means, or None."""
    lower = name.lower().rstrip("/")
    for ext, fmt in FORMATS.items():
        if lower.endswith(ext):
            return fmt
    return None


def reader_for(name: str) -> Optional[Reader]:
    """The reader of a file name (by extension), or None."""
    fmt = format_of(name)
    return None if fmt is None else READERS[fmt]


def reader_of(f: SourceFile) -> Reader:
    """The reader of a probed file."""
    return READERS[f.format]


def _is_input(fs, path: str, local: bool) -> bool:
    """Can ``path`` (a glob's match) be one input: a file, or a folder of a format whose
    inputs are folders (:attr:`Reader.directory`)."""
    reader = reader_for(path)
    if reader is None:
        return False
    if reader.directory:
        return os.path.isdir(path) if local else fs.isdir(path)
    return os.path.isfile(path) if local else fs.isfile(path)


def _extensions() -> str:
    exts = list(FORMATS)
    return ", ".join(exts[:-1]) + " or " + exts[-1] if len(exts) > 1 else "".join(exts)


def _has_magic(text: str) -> bool:
    return any(c in text for c in "*?[")


def expand_inputs(inputs: Sequence, storage_options: Optional[dict] = None) -> list[tuple]:
    """``(name, url, fs, path, local)`` of every input file, in the order given; a glob
    expands to its matching files of a known format (:data:`FORMATS`) in lexicographic
    order. Raises InputError for a missing file, an empty glob, a folder, an unknown
    extension or a file named twice."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]
    out, seen = [], {}
    for spec in inputs:
        spec = os.fspath(spec)
        fs, path = fsspec.core.url_to_fs(spec, **(storage_options or {}))
        local = isinstance(fs, LocalFileSystem)
        if _has_magic(spec):
            found = _glob.glob(os.path.expanduser(path)) if local else fs.glob(path)
            matches = sorted(p.rstrip("/") for p in found if _is_input(fs, p.rstrip("/"),
                                                                        local))
            if not matches:
                raise InputError(f"input {spec!r} matches no {_extensions()} file")
            names = [(p if local else fs.unstrip_protocol(p), p) for p in matches]
        else:
            if not fs.exists(path):
                raise InputError(f"input {spec!r}: no such file")
            reader = reader_for(spec)
            if fs.isdir(path) and not (reader is not None and reader.directory):
                raise InputError(f"input {spec!r} is a folder; name its files or a glob "
                                 f"such as '{spec.rstrip('/')}/*.parquet'")
            if format_of(spec) is None:
                raise InputError(f"input {spec!r}: unknown format; bigalign imports "
                                 f"{', '.join(FORMATS)} files (by extension)")
            names = [(spec, path)]
        for name, p in names:
            url = os.path.abspath(os.path.expanduser(p)) if local else fs.unstrip_protocol(p)
            if url in seen:
                raise InputError(f"input {name!r} is given twice ({seen[url]!r} and "
                                 f"{name!r}): its rows would be imported twice")
            seen[url] = name
            out.append((name, url, fs, p, local))
    if not out:
        raise InputError("no inputs given")
    return out


def _stamp(fs, path) -> tuple[int, Optional[str]]:
    info = fs.info(path)
    stamp = info.get("ETag") or info.get("etag") or info.get("mtime") or \
        info.get("LastModified") or info.get("created")
    return int(info.get("size") or 0), None if stamp is None else str(stamp)


def probe(name: str, url: str, fs, path: str, local: bool, *,
          vector_column: Optional[str] = None, ids_column: Optional[str] = None) -> SourceFile:
    """Read one file's metadata (never its vectors) with the reader of its extension, and
    check what can be checked."""
    reader = reader_for(name) or reader_for(url)
    if reader is None:
        raise InputError(f"input {name!r}: unknown format; bigalign imports "
                         f"{', '.join(FORMATS)} files (by extension)")
    if ids_column is not None and not reader.columns:
        raise InputError(f"{name}: --ids-column applies to Parquet inputs; a .{reader.format} "
                         "file has no columns (use --row-ids for row-number ids)")
    size, stamp = _stamp(fs, path)
    return reader.probe(Location(name, url, fs, path, local, size, stamp),
                        vector_column=vector_column, ids_column=ids_column)


def read_slice(f: SourceFile, start: int, stop: int,
               storage_options: Optional[dict] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Rows [start, stop) of ``f`` (:meth:`Reader.read`)."""
    return reader_of(f).read(f, start, stop, storage_options)


def iter_rows(f: SourceFile, start: int, stop: int, batch_rows: int,
              storage_options: Optional[dict] = None) -> Iterator[tuple]:
    """Rows [start, stop) of ``f`` as ``(file row, vectors, ids or None)`` batches of at most
    about ``batch_rows`` rows (:meth:`Reader.batches`), validated like :func:`read_slice`."""
    return reader_of(f).batches(f, start, stop, max(1, int(batch_rows)), storage_options)


def restart_points(f: SourceFile) -> Optional[tuple]:
    """:meth:`Reader.restart_points` of ``f``."""
    return reader_of(f).restart_points(f)


# ---- shared by readers of fixed-size rows ---------------------------------------------------

def numeric(dtype: np.dtype) -> bool:
    """True for a plain integer or float dtype (no structured or string types)."""
    return dtype.kind in "fiu" and dtype.fields is None


def fixed_rows(f: SourceFile, start: int, stop: int, row_bytes: int, so) -> np.ndarray:
    """Bytes (uint8) of rows [start, stop) of a file of ``row_bytes``-byte rows from byte
    ``f.offset``: a memory map of just those rows (local) or one ranged read (fsspec)."""
    begin, end = f.offset + start * row_bytes, f.offset + stop * row_bytes
    if f.local:
        return np.memmap(f.url, dtype=np.uint8, mode="r", offset=begin, shape=(end - begin,))
    import fsspec

    from ..stores import retrying

    fs, path = fsspec.core.url_to_fs(f.url, **(so or {}))
    data = retrying(f"cannot read rows {start}:{stop} of {f.name!r}",
                    lambda: fs.cat_file(path, start=begin, end=end))
    if len(data) != end - begin:
        raise InputError(f"{f.name}: rows {start}:{stop} are cut short (the file shrank?)")
    return np.frombuffer(data, dtype=np.uint8)
