"""``bigalign import``: vectors from .npy, .fvecs and Parquet files into an embedding store
(:mod:`bigalign.storage.embedding_store`), out of core, in parallel on Dask, resumable.

    >>> from bigalign.commands.ingest import import_vectors
    >>> import_vectors(["shards/part-*.parquet"], "corpus.store", ids_column="doc_id",
    ...                model="intfloat/e5-base-v2")

How it works, in the house style (a plan + a job + a graph):

* **Inputs** are expanded in the order given (a glob expands to its matches in lexicographic
  order) and *probed* up front, reading metadata only: each file's format (by extension),
  rows, dimension and value dtype, the Parquet vector and id columns, and its size and
  modification time or ETag. Everything that can be checked without reading the vectors is
  checked here (missing files, unknown formats, 1-D or non-numeric arrays, a wrong .fvecs
  header or a size that is not a whole number of rows, missing columns, mixed dimensions or
  id types across files), each error naming the file.
* **The plan** (:class:`ImportPlan`, pure) puts the files end to end as global rows, cuts
  the rows into *regions* of whole output chunks, and lists for each region the slices of
  the one, two or more files that cover it. Files rarely end on chunk boundaries, so a
  region may read the tail of one file and the head of the next; no two regions ever
  write the same chunk. Consecutive regions are grouped into *units*, one task each: a
  Parquet read that starts inside a row group decodes that row group from its start, so
  a unit runs on until a row group (or file) starts close to a region boundary, and each
  row group is decoded about once; .npy/.fvecs rows are read directly, so there every
  region is a unit.
* **The job** is :func:`bigalign.storage.job.checkpointed`, exactly as for apply: the
  fingerprint holds every input file (path, size, mtime/ETag, rows, format) and the
  options; a region's marker is written after its data; the store is marked complete only
  after every region is verified done. A rerun after a crash writes the missing regions; a
  rerun of a finished import is a no-op; changed inputs are refused, naming what changed.
* **The graph** has one task per unit: stream the unit's file spans once, in batches of
  about a region; fill one region buffer at a time, validate (right dimension, no nulls,
  numbers, finite), cast to the store's dtype, write the region's embeddings (and ids)
  chunks and mark it done. Memory per task: one region plus the batch in hand (and, for
  Parquet, what polars holds while decoding a row group). Any error names the file and
  the row in it (0-based).

Readers: .npy through ``np.memmap`` at the array's data offset (local files: memory-mapped,
so files larger than RAM work; remote ones: byte ranges through fsspec); .fvecs likewise
(each row is an int32 dimension followed by that many float32); Parquet through polars,
one ``scan_parquet(...).slice(offset, n).collect_batches()`` stream per file span (local
paths, or polars' own object-store client, to which S3 storage options are translated). Fault points for the crash tests:
``import.begun``, ``import.region-written`` (data stored, marker not yet),
``import.region-done``, ``import.before-complete``.
"""

from __future__ import annotations

import bisect
import glob as _glob
import json
import logging
import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Optional, Sequence, Union

import numpy as np

from ..execution import faults
from ..errors import CheckpointError, InputError, NonFiniteError
from ..planning.plan import DEFAULT_BLOCK_BYTES, MIN_BLOCKS, ApplyPlan, Block, choose_block_rows
from ..storage.output_job import ZarrTarget, classify

log = logging.getLogger("bigalign")

__all__ = ["import_vectors", "ImportPlan", "Slice", "Region", "SourceFile", "make_import_plan",
           "choose_chunk_rows", "expand_inputs", "probe", "probe_all", "read_slice",
           "iter_rows", "parquet_footer", "parquet_row_groups", "import_unit_task", "import_graph",
           "FORMATS"]

#: File extensions and the format they mean.
FORMATS = {".npy": "npy", ".fvecs": "fvecs", ".parquet": "parquet", ".pq": "parquet"}

#: Default bytes per output chunk: chunks of 16-64 MB read and write fastest (plan.py).
TARGET_CHUNK_BYTES = 32 * 2**20

STORE_DTYPES = ("float16", "float32", "float64")

#: A new task may start inside a Parquet row group when the rows it decodes for nothing (the
#: row group's rows before it) are at most this fraction of the previous task's rows or of
#: the row group (and at most one region): see :meth:`ImportPlan.units`.
UNIT_WASTE = 0.5


# ==== the plan (pure: no I/O) ==============================================================

@dataclass(frozen=True)
class Slice:
    """Rows [file_start, file_stop) of input file ``file`` (its index in the plan), which
    land on store rows [start, start + file_stop - file_start)."""

    file: int
    file_start: int
    file_stop: int
    start: int

    @property
    def rows(self) -> int:
        return self.file_stop - self.file_start


@dataclass(frozen=True)
class Region:
    """Store rows [start, stop) (whole output chunks) written by one task, read from
    ``slices`` in order."""

    index: int
    start: int
    stop: int
    slices: tuple

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ImportPlan:
    """Input files end to end (``file_rows``: rows of each, in order) cut into ``regions``
    (an :class:`~bigalign.planning.plan.ApplyPlan`: rows [0, N) in regions of whole output chunks of
    ``regions.step`` rows). The job's manifest stores ``asdict(regions)`` (so ``bigalign
    status`` reads it like an apply's); the file rows are in the job's fingerprint, which a
    resume must match.

    ``row_groups``: for each file, the rows of its row groups (Parquet), or None where any
    row can be read directly (.npy, .fvecs). They decide the *units*, runs of consecutive
    regions that one task streams through (see :meth:`units`); they change how work is
    grouped, never what is written."""

    file_rows: tuple
    regions: ApplyPlan
    row_groups: tuple = ()

    @property
    def rows(self) -> int:
        return self.regions.rows

    @property
    def chunk_rows(self) -> int:
        return self.regions.step

    def offsets(self) -> list[int]:
        """Store row of each file's first row (and the total at the end)."""
        out = [0]
        for n in self.file_rows:
            out.append(out[-1] + int(n))
        return out

    def blocks(self) -> list[Block]:
        return self.regions.blocks()

    def region_rows(self) -> dict[int, tuple[int, int]]:
        return self.regions.region_rows()

    def region_list(self) -> list[Region]:
        """Every region with the file slices that cover it (empty files are skipped)."""
        offsets = self.offsets()
        out = []
        for b in self.blocks():
            slices, row = [], b.start
            f = bisect.bisect_right(offsets, row) - 1
            while row < b.stop:
                while offsets[f + 1] <= row:  # skip files that end here (and empty ones)
                    f += 1
                take = min(b.stop, offsets[f + 1]) - row
                slices.append(Slice(f, row - offsets[f], row - offsets[f] + take, row))
                row += take
            out.append(Region(b.index, b.start, b.stop, tuple(slices)))
        return out

    def restart_cost(self, row: int) -> tuple[int, int]:
        """``(rows decoded for nothing, rows of the row group)`` when a read starts at store
        row ``row``: a Parquet read starting inside a row group decodes it from its start.
        ``(0, 0)`` for files read directly; the cost is 0 at file and row-group starts."""
        if row >= self.rows:
            return 0, 0
        f, i = self.locate(row)
        groups = self.row_groups[f] if f < len(self.row_groups) else None
        if groups is None:
            return 0, 0
        if not groups:  # unknown: the whole file is one row group
            return i, self.file_rows[f]
        begin = 0
        for g in groups:
            if i < begin + g:
                return i - begin, g
            begin += g
        return 0, 0

    def units(self, waste: Optional[float] = None) -> list[list[int]]:
        """Consecutive regions grouped into units, one task each.

        A task starting at a region that begins inside a Parquet row group decodes that
        row group from its start for nothing (:meth:`restart_cost`). A new unit starts at
        a region when that costs at most one region's rows, at most ``waste`` (50 %) of the
        larger of the current unit and the row group, and less than the current unit's
        rows (a unit that began in the same row group streams on for free); otherwise the
        region joins the current unit, whose task streams on. So every region is a unit
        for .npy/.fvecs and small row groups; with one large row group per file a unit is
        about a file, and with huge row groups about a row group: each row group is decoded
        about once, and no task decodes more than a region for nothing. (Units group work;
        they never change what is written, so they may change between versions.)"""
        waste = UNIT_WASTE if waste is None else waste
        blocks = self.blocks()
        if waste == math.inf:  # no grouping: a task per region (benchmarks compare it)
            return [[b.index] for b in blocks]
        per = self.regions.rows_per_block
        units = [[blocks[0].index]]
        for b in blocks[1:]:
            cost, group = self.restart_cost(b.start)
            rows = b.start - blocks[units[-1][0]].start
            if cost <= per and cost <= waste * max(rows, group) and (cost < rows or not cost):
                units.append([b.index])
            else:
                units[-1].append(b.index)
        return units

    def locate(self, row: int) -> tuple[int, int]:
        """(file index, row in that file) of store row ``row``."""
        offsets = self.offsets()
        f = bisect.bisect_right(offsets, row) - 1
        while self.file_rows[f] == 0:
            f += 1
        return f, row - offsets[f]


def choose_chunk_rows(dim: int, itemsize: int, rows: int,
                      target: int = TARGET_CHUNK_BYTES) -> int:
    """Rows per output chunk: about ``target`` bytes (32 MiB: inside the 16-64 MB that read
    and write fastest), a multiple of 1024 rows when that many fit, never more than
    ``rows``."""
    per = max(1, target // max(dim * itemsize, 1))
    if per >= 1024:
        per = per // 1024 * 1024
    return int(max(1, min(per, rows)))


def make_import_plan(file_rows: Sequence[int], row_bytes: int, chunk_rows: int,
                     block_bytes: int = DEFAULT_BLOCK_BYTES,
                     row_groups: Sequence = ()) -> ImportPlan:
    """Plan an import of files of ``file_rows`` rows (in order): regions of whole chunks of
    ``chunk_rows`` holding about ``block_bytes`` of output (``row_bytes`` a row), at least
    :data:`~bigalign.planning.plan.MIN_BLOCKS` regions when there are enough chunks; ``row_groups``
    as :class:`ImportPlan` says (default: every file read directly)."""
    total = int(sum(file_rows))
    if total <= 0:
        raise InputError("the inputs hold no rows")
    if chunk_rows <= 0:
        raise InputError(f"chunk rows must be positive, got {chunk_rows}")
    per = choose_block_rows(total, chunk_rows, row_bytes, block_bytes, MIN_BLOCKS)
    groups = tuple(None if g is None else tuple(int(n) for n in g) for g in row_groups)
    return ImportPlan(tuple(int(n) for n in file_rows), ApplyPlan(total, chunk_rows, per),
                      groups)


# ==== inputs: expanding, probing, reading ====================================================

@dataclass(frozen=True)
class SourceFile:
    """One input file as probed: ``name`` (as the user spelled or the glob matched it),
    ``url`` (what is opened: an absolute local path or an fsspec URL), ``format``, ``rows``,
    ``dim``, ``dtype`` (of the stored values), ``size`` and ``stamp`` (mtime or ETag);
    ``offset``/``order`` (npy, fvecs: where rows start, C or F order); ``vector_column`` /
    ``ids_column`` / ``ids_kind`` / ``row_groups`` (Parquet: rows of each row group, from the
    footer; None when unknown) / ``model`` (Parquet written by ``bigalign export``: the
    model its ``bigalign`` metadata names)."""

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

    def fingerprint(self, index: int) -> dict:
        return {"position": index, "format": self.format, "size": self.size,
                "stamp": self.stamp, "rows": self.rows, "dim": self.dim, "dtype": self.dtype,
                "vector_column": self.vector_column, "ids_column": self.ids_column}


def _has_magic(text: str) -> bool:
    return any(c in text for c in "*?[")


def _format_of(name: str) -> Optional[str]:
    lower = name.lower().rstrip("/")
    for ext, fmt in FORMATS.items():
        if lower.endswith(ext):
            return fmt
    return None


def expand_inputs(inputs: Sequence, storage_options: Optional[dict] = None) -> list[tuple]:
    """``(name, url, fs, path, local)`` of every input file, in the order given; a glob
    expands to its matching files of a known format (.npy, .fvecs, .parquet, .pq) in
    lexicographic order. Raises InputError for a missing file, an empty glob, a folder, an
    unknown extension or a file named twice."""
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
            if local:
                matches = sorted(p for p in _glob.glob(os.path.expanduser(path))
                                 if os.path.isfile(p))
            else:
                matches = sorted(p for p in fs.glob(path) if fs.isfile(p))
            matches = [p for p in matches if _format_of(p)]
            if not matches:
                raise InputError(f"input {spec!r} matches no .npy, .fvecs or .parquet file")
            names = [(p if local else fs.unstrip_protocol(p), p) for p in matches]
        else:
            if not fs.exists(path):
                raise InputError(f"input {spec!r}: no such file")
            if fs.isdir(path):
                raise InputError(f"input {spec!r} is a folder; name its files or a glob "
                                 f"such as '{spec.rstrip('/')}/*.parquet'")
            if _format_of(spec) is None:
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


def _numeric(dtype: np.dtype) -> bool:
    return dtype.kind in "fiu" and dtype.fields is None


def probe(name: str, url: str, fs, path: str, local: bool, *,
          vector_column: Optional[str] = None, ids_column: Optional[str] = None) -> SourceFile:
    """Read one file's metadata (never its vectors) and check what can be checked."""
    fmt = _format_of(name) or _format_of(url)
    size, stamp = _stamp(fs, path)
    common = dict(name=name, url=url, local=local, format=fmt, size=size, stamp=stamp)
    if fmt in ("npy", "fvecs") and ids_column is not None:
        raise InputError(f"{name}: --ids-column applies to Parquet inputs; a .{fmt} file "
                         "has no columns (use --row-ids for row-number ids)")
    if fmt == "npy":
        return SourceFile(**common, **_probe_npy(name, fs, path, size))
    if fmt == "fvecs":
        return SourceFile(**common, **_probe_fvecs(name, fs, path, size))
    footer = parquet_footer(fs, path, size)
    found = _probe_parquet(name, url, local, vector_column, ids_column,
                           _storage_options_of(fs), footer)
    groups = None if footer is None else footer["row_groups"]
    if groups is not None and sum(groups) != found["rows"]:
        groups = None
    return SourceFile(**common, **found, row_groups=groups, model=_exported_model(footer))


def _exported_model(footer: Optional[dict]) -> Optional[str]:
    """The model a Parquet file written by ``bigalign export`` names in its ``bigalign``
    key-value metadata, or None."""
    raw = (footer or {}).get("metadata", {}).get("bigalign")
    try:
        model = json.loads(raw).get("model") if raw else None
    except (ValueError, AttributeError):
        return None
    return model if isinstance(model, str) and model else None


def files_model(files) -> Optional[str]:
    """The model stamp every input names (files written by ``bigalign export``), or None
    when some name none or they disagree."""
    models = {f.model for f in files if f.rows}
    return models.pop() if len(models) == 1 and None not in models else None


def _probe_npy(name, fs, path, size=None) -> dict:
    from numpy.lib import format as npf

    with fs.open(path, "rb") as f:
        try:
            version = npf.read_magic(f)
            reader = npf.read_array_header_1_0 if version == (1, 0) else \
                npf.read_array_header_2_0
            shape, fortran, dtype = reader(f) if version in ((1, 0), (2, 0)) else \
                npf._read_array_header(f, version)
        except Exception as e:
            raise InputError(f"{name}: not a readable .npy file ({e})") from None
        offset = f.tell()
    if len(shape) != 2:
        raise InputError(f"{name}: expected a 2-D (rows, dim) array, got shape {shape}")
    if not _numeric(dtype):
        raise InputError(f"{name}: dtype {dtype} is not numeric; vectors must be floats "
                         "(or integers)")
    if shape[1] == 0:
        raise InputError(f"{name}: vectors of dimension 0 (shape {shape})")
    need = offset + int(shape[0]) * int(shape[1]) * dtype.itemsize
    if size and size < need:  # refused before an output or checkpoint exists (0: unknown)
        whole = max(size - offset, 0) // (int(shape[1]) * dtype.itemsize)
        raise InputError(f"{name}: truncated .npy file: its header says shape {shape} of "
                         f"{dtype}, {need:,} bytes with the header, but the file has "
                         f"{size:,} bytes ({whole:,} whole rows)")
    return dict(rows=int(shape[0]), dim=int(shape[1]), dtype=dtype.str, offset=offset,
                order="F" if fortran else "C")


def _probe_fvecs(name, fs, path, size) -> dict:
    if size == 0:
        return dict(rows=0, dim=0, dtype="<f4", offset=0)
    with fs.open(path, "rb") as f:
        head = f.read(4)
    dim = int(np.frombuffer(head, "<i4")[0]) if len(head) == 4 else -1
    if not 0 < dim <= 1 << 20:
        raise InputError(f"{name}: not an .fvecs file (row 0 header says the vector has "
                         f"{dim} values)")
    row_bytes = 4 * (dim + 1)
    if size % row_bytes:
        raise InputError(f"{name}: {size} bytes is not a whole number of rows of {row_bytes} "
                         f"bytes (an int32 header and {dim} float32, as row 0 says): the "
                         "file is truncated or its rows have different dimensions")
    return dict(rows=size // row_bytes, dim=dim, dtype="<f4", offset=0)


#: polars' object-store keys for the s3fs options bigalign's other commands take.
_S3_KEYS = {"key": "aws_access_key_id", "secret": "aws_secret_access_key",
            "token": "aws_session_token", "endpoint_url": "aws_endpoint_url",
            "region_name": "aws_region", "region": "aws_region"}


def _storage_options_of(fs) -> dict:
    return dict(getattr(fs, "storage_options", {}) or {})


def _polars_options(url: str, so: dict) -> Optional[dict]:
    """Storage options for polars' own object-store client, from fsspec-style ones: S3
    keys are translated (key/secret/token/endpoint_url/region, client_kwargs' endpoint and
    region, anon), ``aws_*`` keys pass through; other protocols get the options as given."""
    if not so:
        return None
    if not url.startswith(("s3://", "s3a://")):
        return dict(so)
    out = {}
    items = dict(so)
    items.update((k, v) for k, v in (so.get("client_kwargs") or {}).items())
    for k, v in items.items():
        if k in _S3_KEYS and v is not None:
            out[_S3_KEYS[k]] = str(v)
        elif k.startswith("aws_"):
            out[k] = str(v)
        elif k == "anon" and v:
            out["aws_skip_signature"] = "true"
    if str(out.get("aws_endpoint_url", "")).startswith("http://"):
        out.setdefault("aws_allow_http", "true")
    return out


def _scan(url: str, local: bool, so: dict):
    import polars as pl

    src = url if local else url.replace("s3a://", "s3://", 1)
    return pl.scan_parquet(src, storage_options=None if local else _polars_options(url, so),
                           glob=False)


def _np_dtype(pl_dtype) -> Optional[np.dtype]:
    """The numpy dtype of a polars numeric dtype, or None when it is not a number."""
    import polars as pl

    if not (pl_dtype.is_float() or pl_dtype.is_integer()):
        return None
    return np.dtype(pl.Series([], dtype=pl_dtype).to_numpy().dtype)


def _probe_parquet(name, url, local, vector_column, ids_column, so,
                   footer: Optional[dict] = None) -> dict:
    import polars as pl

    try:
        lazy = _scan(url, local, so)
        schema = lazy.collect_schema()
        rows = int(lazy.select(pl.len()).collect().item())
    except Exception as e:
        raise InputError(f"{name}: not a readable Parquet file ({type(e).__name__}: {e})") \
            from None
    vectors = [c for c, t in schema.items() if isinstance(t, (pl.List, pl.Array))]
    if vector_column is None:
        numeric = [c for c in vectors if _np_dtype(schema[c].inner) is not None]
        if len(numeric) != 1:
            raise InputError(
                f"{name}: {'no' if not numeric else 'several'} list-of-number columns "
                f"({', '.join(numeric) or 'columns: ' + ', '.join(schema)}); name the vectors "
                "with --vector-column")
        vector_column = numeric[0]
    if vector_column not in schema:
        raise InputError(f"{name}: no column {vector_column!r} (columns: "
                         f"{', '.join(schema)})")
    vtype = schema[vector_column]
    if not isinstance(vtype, (pl.List, pl.Array)):
        raise InputError(f"{name}: column {vector_column!r} is {vtype}, not a list or array "
                         "of numbers (one vector per row)")
    inner = _np_dtype(vtype.inner)
    if inner is None:
        raise InputError(f"{name}: column {vector_column!r} holds {vtype}: its values are "
                         "not numbers (in every row, from row 0)")
    if isinstance(vtype, pl.Array):
        if len(vtype.shape) != 1:
            raise InputError(f"{name}: column {vector_column!r} is {vtype}, not one vector "
                             "per row")
        dim = int(vtype.size)
    elif rows and _dim_from_footer(footer, vector_column):
        dim = _dim_from_footer(footer, vector_column)
    elif rows:  # reading one row decodes its column chunk: ~40% of reading the file
        first = lazy.head(1).select(pl.col(vector_column).list.len()).collect().item()
        if first is None:
            raise InputError(f"{name} row 0: the vector in column {vector_column!r} is null")
        dim = int(first)
    else:
        dim = 0
    if rows and dim == 0:
        raise InputError(f"{name} row 0: the vector in column {vector_column!r} is empty")
    ids_kind = None
    if ids_column is not None:
        if ids_column not in schema:
            raise InputError(f"{name}: no id column {ids_column!r} (columns: "
                             f"{', '.join(schema)})")
        itype = schema[ids_column]
        if itype.is_integer():
            ids_kind = "int64"
        elif itype in (pl.String, pl.Categorical) or isinstance(itype, (pl.Categorical,
                                                                            pl.Enum)):
            ids_kind = "string"
        else:
            raise InputError(f"{name}: id column {ids_column!r} is {itype}; ids must be "
                             "integers or strings")
    return dict(rows=rows, dim=dim, dtype=inner.str, vector_column=vector_column,
                ids_column=ids_column, ids_kind=ids_kind)


def probe_all(expanded: list[tuple], *, vector_column=None, ids_column=None,
              threads: int = 16) -> list[SourceFile]:
    """Probe every file (metadata only; in parallel: object stores answer slowly) and check
    that they agree: one dimension, one kind of ids."""
    def one(item):
        name, url, fs, path, local = item
        return probe(name, url, fs, path, local, vector_column=vector_column,
                     ids_column=ids_column)

    if len(expanded) == 1:
        files = [one(expanded[0])]
    else:
        with ThreadPoolExecutor(max_workers=min(threads, len(expanded))) as pool:
            files = list(pool.map(one, expanded))
    filled = [f for f in files if f.rows > 0]
    if not filled:
        raise InputError("the inputs hold no rows" + (f" ({files[0].name} is empty)"
                                                      if len(files) == 1 else ""))
    first = filled[0]
    for f in filled[1:]:
        if f.dim != first.dim:
            raise InputError(f"{f.name}: vectors of dimension {f.dim}, but {first.name} has "
                             f"{first.dim}: every input must have the same dimension")
        if f.ids_kind != first.ids_kind:
            raise InputError(f"{f.name}: ids are {f.ids_kind} but {first.name} has "
                             f"{first.ids_kind} ids: all files need the same id type")
    return files


def read_slice(f: SourceFile, start: int, stop: int,
               storage_options: Optional[dict] = None) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Rows [start, stop) of file ``f``: ``(vectors (n, dim) in the file's dtype, ids (n,)
    or None)``, validated (dimension, nulls, .fvecs headers); errors name the file and the
    row. Local .npy/.fvecs are memory-mapped (only these rows are paged in)."""
    if f.format == "parquet":
        return _read_parquet(f, start, stop, storage_options or {})
    if f.format == "npy":
        row_bytes = f.dim * np.dtype(f.dtype).itemsize
        if f.order == "F":  # column-major: rows are strided, memmap the whole array
            mm = np.memmap(f.url, dtype=f.dtype, mode="r", offset=f.offset,
                           shape=(f.rows, f.dim), order="F")
            return np.ascontiguousarray(mm[start:stop]), None
        raw = _raw_rows(f, start, stop, row_bytes, storage_options)
        return raw.view(f.dtype).reshape(stop - start, f.dim), None
    raw = _raw_rows(f, start, stop, 4 * (f.dim + 1), storage_options)
    rows = raw.view("<i4").reshape(stop - start, f.dim + 1)
    bad = np.flatnonzero(rows[:, 0] != f.dim)
    if bad.size:
        i = int(bad[0])
        raise InputError(f"{f.name} row {start + i}: its header says {int(rows[i, 0])} "
                         f"values, but row 0 has {f.dim}: an .fvecs file holds vectors of "
                         "one dimension (or the file is corrupt)")
    return raw.view("<f4").reshape(stop - start, f.dim + 1)[:, 1:], None


def _raw_rows(f: SourceFile, start: int, stop: int, row_bytes: int, so) -> np.ndarray:
    """Bytes of rows [start, stop) of a fixed-row-size file: a memory map of just those rows
    (local) or one ranged read (fsspec)."""
    begin, end = f.offset + start * row_bytes, f.offset + stop * row_bytes
    if f.local:
        return np.memmap(f.url, dtype=np.uint8, mode="r", offset=begin, shape=(end - begin,))
    import fsspec

    from ..storage.stores import retrying

    fs, path = fsspec.core.url_to_fs(f.url, **(so or {}))
    data = retrying(f"cannot read rows {start}:{stop} of {f.name!r}",
                    lambda: fs.cat_file(path, start=begin, end=end))
    if len(data) != end - begin:
        raise InputError(f"{f.name}: rows {start}:{stop} are cut short (the file shrank?)")
    return np.frombuffer(data, dtype=np.uint8)


def _read_parquet(f: SourceFile, start: int, stop: int, so) -> tuple:
    from ..storage.stores import retrying

    df = retrying(f"cannot read rows {start}:{stop} of {f.name!r}",
                  lambda: _scan(f.url, f.local, so).slice(start, stop - start)
                  .select(_columns(f)).collect())
    if df.height != stop - start:
        raise InputError(f"{f.name}: rows {start}:{stop} read {df.height} rows (the file "
                         "changed?)")
    return _frame_arrays(f, df, start)


def _columns(f: SourceFile) -> list[str]:
    return [f.vector_column] + ([f.ids_column] if f.ids_column else [])


def _frame_arrays(f: SourceFile, df, start: int) -> tuple:
    """(vectors (n, dim), ids or None) of a frame holding rows [start, start + n) of ``f``,
    validated: no null or ragged vectors, no null values or ids."""
    import polars as pl

    n, col = df.height, f.vector_column
    s = df[col]

    def first(mask: "pl.Series") -> int:
        return start + int(mask.arg_true()[0])

    if s.null_count():
        raise InputError(f"{f.name} row {first(s.is_null())}: the vector in column "
                         f"{col!r} is null")
    if isinstance(s.dtype, pl.List):
        lengths = s.list.len()
        wrong = lengths != f.dim
        if wrong.any():
            row = first(wrong)
            raise InputError(f"{f.name} row {row}: the vector in column {col!r} has "
                             f"{lengths[row - start]} values, expected {f.dim} (ragged "
                             "vectors, or a file of another dimension)")
    flat = s.explode()
    if flat.null_count():
        i = int(flat.is_null().arg_true()[0])
        raise InputError(f"{f.name} row {start + i // f.dim}: the vector in column {col!r} "
                         f"holds a null (value {i % f.dim})")
    values = flat.to_numpy().reshape(n, f.dim)
    ids = None
    if f.ids_column:
        s = df[f.ids_column]
        if s.null_count():
            raise InputError(f"{f.name} row {first(s.is_null())}: the id in column "
                             f"{f.ids_column!r} is null")
        if f.ids_kind == "int64":
            try:
                ids = s.cast(pl.Int64, strict=True).to_numpy()
            except Exception:
                raise InputError(f"{f.name}: ids in column {f.ids_column!r} rows "
                                 f"{start}:{start + n} do not fit in int64") from None
        else:
            ids = s.cast(pl.String).to_numpy()
    return values, ids


def iter_rows(f: SourceFile, start: int, stop: int, batch_rows: int,
              storage_options: Optional[dict] = None):
    """Rows [start, stop) of ``f`` in order, as ``(file row, vectors, ids or None)`` batches
    of at most about ``batch_rows`` rows, validated like :func:`read_slice`.

    Parquet is read as *one* stream (polars' ``collect_batches``): a slice that starts
    inside a row group decodes it from its start (there is no row index inside a row group
    without a page index), so reading a span slice by slice would decode its row groups
    over and over. Polars without ``collect_batches`` falls back to one slice per batch."""
    batch_rows = max(1, int(batch_rows))
    if f.format != "parquet" or not _HAS_BATCHES:
        for a in range(start, stop, batch_rows):
            b = min(stop, a + batch_rows)
            values, ids = read_slice(f, a, b, storage_options)
            yield a, values, ids
        return
    lazy = _scan(f.url, f.local, storage_options or {}).slice(start, stop - start) \
        .select(_columns(f))
    batches = lazy.collect_batches(chunk_size=batch_rows)
    row = start
    try:
        for df in batches:
            if df.height == 0:
                continue
            if row + df.height > stop:
                raise InputError(f"{f.name}: rows {start}:{stop} read more rows than asked "
                                 "(the file changed?)")
            values, ids = _frame_arrays(f, df, row)
            yield row, values, ids
            row += df.height
    finally:  # an error or an early exit: stop the stream (older polars) or drop it
        stop_early = getattr(batches, "stop", None)
        if row < stop and stop_early is not None:
            stop_early()
        del batches
    if row != stop:
        raise InputError(f"{f.name}: rows {start}:{stop} read {row - start} rows (the file "
                         "changed?)")


def _has_batches() -> bool:
    import polars as pl

    return hasattr(pl.LazyFrame, "collect_batches")


_HAS_BATCHES = _has_batches()


# ---- Parquet footers: row group sizes ------------------------------------------------------
# polars reads no row-group metadata, and pyarrow is not a dependency; the footer is a
# Thrift (compact protocol) FileMetaData whose field 4 lists the row groups, each with its
# row count in field 3. This reader decodes the compact protocol generically.

def parquet_footer(fs, path: str, size: int) -> Optional[dict]:
    """What the footer of a Parquet file says (one or two ranged reads): ``rows``,
    ``row_groups`` (rows of each), ``values`` (top-level column -> its leaf values per
    row group, nulls included) and ``metadata`` (its key-value metadata, str -> str), or
    None when it cannot be read."""
    import struct

    try:
        tail = fs.cat_file(path, start=max(0, size - 8), end=size)
        if len(tail) != 8 or tail[4:] != b"PAR1":
            return None
        n = struct.unpack("<i", tail[:4])[0]
        if not 0 < n <= size - 12:
            return None
        footer = fs.cat_file(path, start=size - 8 - n, end=size - 8)
        meta, _ = _thrift_struct(memoryview(footer), 0)
        groups = tuple(int(rg[3]) for rg in meta.get(4, []))
        if sum(groups) != int(meta[3]):
            return None
        values: dict = {}
        for g, rg in enumerate(meta.get(4, [])):
            for chunk in rg.get(1, []):
                cm = chunk.get(3) or {}
                path_in_schema = cm.get(3) or []
                if path_in_schema and 5 in cm:
                    name = bytes(path_in_schema[0]).decode("utf-8", "replace")
                    values.setdefault(name, [0] * len(groups))[g] += int(cm[5])
        kv = {bytes(e[1]).decode("utf-8", "replace"): bytes(e.get(2, b"")).decode(
            "utf-8", "replace") for e in meta.get(5, []) if isinstance(e, dict) and 1 in e}
        return {"rows": int(meta[3]), "row_groups": groups,
                "values": {k: tuple(v) for k, v in values.items()}, "metadata": kv}
    except Exception:
        return None


def parquet_row_groups(fs, path: str, size: int) -> Optional[tuple]:
    """Rows of each row group of a Parquet file, from its footer, or None when the footer
    cannot be read (the import then treats the file as one row group: correct, only less
    parallel)."""
    footer = parquet_footer(fs, path, size)
    return None if footer is None else footer["row_groups"]


def _dim_from_footer(footer: Optional[dict], column: str) -> Optional[int]:
    """A list column's vector length when the footer proves every row group holds exactly
    rows x d values (d the same everywhere), else None. Every row is still checked while
    reading; this only spares reading a row per file to learn d up front."""
    if not footer or column not in footer["values"]:
        return None
    dims = {v // g if g and v % g == 0 else None
            for v, g in zip(footer["values"][column], footer["row_groups"]) if g}
    return dims.pop() if len(dims) == 1 and None not in dims and 0 not in dims else None


def _varint(buf, pos: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, pos
        shift += 7


def _zigzag(n: int) -> int:
    return (n >> 1) ^ -(n & 1)


def _thrift_value(buf, pos: int, t: int):
    if t in (1, 2):  # booleans live in the field header
        return t == 1, pos
    if t == 3:
        return buf[pos], pos + 1
    if t in (4, 5, 6):
        v, pos = _varint(buf, pos)
        return _zigzag(v), pos
    if t == 7:
        return None, pos + 8
    if t == 8:
        n, pos = _varint(buf, pos)
        return buf[pos:pos + n], pos + n
    if t in (9, 10):
        head = buf[pos]
        pos += 1
        n, et = head >> 4, head & 0x0F
        if n == 15:
            n, pos = _varint(buf, pos)
        out = []
        for _ in range(n):
            if et in (1, 2):  # booleans in lists take a byte each
                v, pos = buf[pos] == 1, pos + 1
            else:
                v, pos = _thrift_value(buf, pos, et)
            out.append(v)
        return out, pos
    if t == 11:
        n, pos = _varint(buf, pos)
        if n == 0:
            return {}, pos
        kv = buf[pos]
        pos += 1
        for _ in range(n):
            _key, pos = _thrift_value(buf, pos, kv >> 4)
            _val, pos = _thrift_value(buf, pos, kv & 0x0F)
        return {}, pos
    if t == 12:
        return _thrift_struct(buf, pos)
    raise ValueError(f"unknown Thrift compact type {t}")


def _thrift_struct(buf, pos: int) -> tuple[dict, int]:
    out, fid = {}, 0
    while True:
        head = buf[pos]
        pos += 1
        if head == 0:
            return out, pos
        delta, t = head >> 4, head & 0x0F
        if delta:
            fid += delta
        else:
            v, pos = _varint(buf, pos)
            fid = _zigzag(v)
        out[fid], pos = _thrift_value(buf, pos, t)


# ==== execution: one task per unit of regions ==============================================

class _RegionWriter:
    """Fills one region's rows at a time from batches of rows, in order; when a region is
    full it is validated (finite), written (embeddings, then ids) and marked done (after
    its data; both fenced). Memory: one region's buffer (reused) plus the batch in hand."""

    def __init__(self, files, regions: list, embeddings, ids, job, row_ids: bool, url: str):
        from ..execution.engine import buffer

        self.files, self.regions, self.embeddings, self.ids = files, regions, embeddings, ids
        self.job, self.row_ids, self.url = job, row_ids, url
        self.dtype = np.dtype(embeddings.dtype)
        self.dim = int(embeddings.shape[1])
        self.buffer = buffer
        self.k = -1
        self.written = 0
        self._next()

    def _next(self) -> None:
        self.k += 1
        self.filled = 0
        self.id_parts: list = []
        if self.k < len(self.regions):
            r = self.regions[self.k]
            self.out = self.buffer("import", r.rows, self.dim, self.dtype)

    def add(self, f: SourceFile, file_row: int, values: np.ndarray, found) -> None:
        """Rows [file_row, file_row + len(values)) of ``f``, which land where the current
        region is filled up to."""
        i = 0
        while i < len(values):
            r = self.regions[self.k]
            take = min(len(values) - i, r.rows - self.filled)
            dst = self.out[self.filled:self.filled + take]
            with np.errstate(over="ignore", invalid="ignore"):
                np.copyto(dst, values[i:i + take], casting="unsafe")
            bad = _first_nonfinite(dst)
            if bad is not None:
                cast = "" if np.dtype(f.dtype) == self.dtype else \
                    f" (or a value too large for {self.dtype.name})"
                raise NonFiniteError(f"{f.name} row {file_row + i + bad}: the vector holds "
                                     f"NaN or Inf{cast}; embeddings must be finite")
            if self.ids is not None:
                row = r.start + self.filled
                self.id_parts.append(np.arange(row, row + take, dtype=np.int64)
                                     if self.row_ids else found[i:i + take])
            self.filled += take
            i += take
            if self.filled == r.rows:
                self._finish(r)

    def _finish(self, r: Region) -> None:
        from ..storage.stores import write_rows

        if self.job is not None:
            self.job.check_fence()
        write_rows(self.embeddings, r.start, self.out, url=f"{self.url}/embeddings")
        if self.ids is not None:
            parts = self.id_parts
            write_rows(self.ids, r.start, np.concatenate(parts) if len(parts) > 1
                       else parts[0], url=f"{self.url}/ids")
        faults.point("import.region-written")
        if self.job is not None:
            self.job.mark_done(r.index, r.start, r.stop)
            faults.point("import.region-done")
        self.written += r.rows
        self._next()


def _spans(regions: list) -> list[tuple[int, int, int]]:
    """The file spans (file, file_start, file_stop) that the consecutive ``regions`` read,
    adjacent slices of one file merged: each span is read as one stream."""
    spans: list[list[int]] = []
    for r in regions:
        for sl in r.slices:
            if spans and spans[-1][0] == sl.file and spans[-1][2] == sl.file_start:
                spans[-1][2] = sl.file_stop
            else:
                spans.append([sl.file, sl.file_start, sl.file_stop])
    return [tuple(sp) for sp in spans]


def import_unit_task(files: tuple, regions: tuple, embeddings, ids, job, *, row_ids: bool,
                     url: str, storage_options: Optional[dict] = None) -> int:
    """Import ``regions`` (the regions of one unit not yet done, in order): stream the file
    spans of each run of consecutive regions once, writing each region as soon as it is
    full. Returns the rows written."""
    written = 0
    run: list = []
    for r in list(regions) + [None]:
        if run and (r is None or r.start != run[-1].stop):
            writer = _RegionWriter(files, run, embeddings, ids, job, row_ids, url)
            batch = max(region.rows for region in run)
            for fi, a, b in _spans(run):
                for row, values, found in iter_rows(files[fi], a, b, batch, storage_options):
                    writer.add(files[fi], row, values, found)
            if writer.k != len(run):
                raise CheckpointError(f"regions {run[0].start}:{run[-1].stop} were not "
                                      "filled: the files hold fewer rows than planned")
            written += writer.written
            run = []
        if r is not None:
            run.append(r)
    return written


def _first_nonfinite(x: np.ndarray) -> Optional[int]:
    """Index of the first row holding NaN/Inf, or None. One pass of ``isfinite`` over row
    blocks (no full-size boolean temporary)."""
    step = max(1, (1 << 22) // max(x.shape[1], 1))
    for a in range(0, len(x), step):
        ok = np.isfinite(x[a:a + step])
        if not ok.all():
            return a + int(np.flatnonzero(~ok.all(axis=1))[0])
    return None


def _count(*rows: int) -> int:
    return int(sum(rows))


def import_graph(files: tuple, plan: ImportPlan, embeddings, ids, *, done=frozenset(),
                 job=None, row_ids: bool = False, url: str = "",
                 storage_options: Optional[dict] = None, run_id: str = ""):
    """Dask graph (:func:`bigalign.execution.graph.build`): one :func:`import_unit_task` per unit
    of the plan with regions not in ``done``, summed by a fixed tree of fan-in
    COUNT_FAN_IN; the key holds the rows written. Returns (graph, key, tasks)."""
    from functools import partial

    from ..execution.graph import GraphSpec, Group, Leaf, Shared, build, token
    from ..planning.plan import COUNT_FAN_IN

    task = partial(import_unit_task, row_ids=row_ids, url=url, storage_options=storage_options)
    regions = plan.region_list()
    groups = []
    for u, unit in enumerate(plan.units()):
        todo = tuple(regions[i] for i in unit if i not in done)
        if todo:
            groups.append(Group(u, (Leaf(u, task, (Shared("files"), todo, Shared("store"),
                                                   Shared("ids"), job), label="unit"),)))
    spec = GraphSpec("import", token(asdict(plan.regions), plan.file_rows, run_id,
                                     sorted(done), row_ids),
                     {"files": files, "store": embeddings, "ids": ids}, tuple(groups),
                     _count, COUNT_FAN_IN)
    return build(spec)


# ==== the public face ========================================================================

def _restart_points(f: SourceFile) -> Optional[tuple]:
    """What the plan needs to know of where reads of ``f`` can start cheaply: None for files
    read directly, the row groups for Parquet (``()``: unknown, one row group)."""
    if f.format != "parquet":
        return None
    return f.row_groups or ()


def _store_dtype(files: list[SourceFile], dtype: Optional[str]) -> np.dtype:
    if dtype is not None:
        if str(dtype) not in STORE_DTYPES:
            raise InputError(f"--dtype must be one of {', '.join(STORE_DTYPES)}, got "
                             f"{dtype!r}")
        return np.dtype(dtype)
    kinds = {np.dtype(f.dtype).newbyteorder("=") for f in files if f.rows}
    if len(kinds) == 1 and next(iter(kinds)).name in STORE_DTYPES:
        return np.dtype(next(iter(kinds)).name)
    return np.dtype(np.float32)


def import_vectors(inputs, output: str, *, ids_column: Optional[str] = None,
                   vector_column: Optional[str] = None, row_ids: bool = False,
                   model: Optional[str] = None, chunk_rows: Optional[int] = None,
                   dtype: Optional[str] = None, overwrite: bool = False,
                   checkpoint: Union[str, bool, None] = None, restart: bool = False,
                   scheduler: Optional[str] = None, workers: Optional[int] = None,
                   memory_limit: Optional[str] = None, threads: Optional[int] = None,
                   block_bytes: int = DEFAULT_BLOCK_BYTES, progress: bool = False,
                   storage_options: Optional[dict] = None):
    """Import vectors from files into a new embedding store at ``output``.

    Parameters
    ----------
    inputs : file paths, fsspec URLs or globs (a path or a list), imported in the order
        given; a glob's matches in lexicographic order. Formats by extension: ``.npy``
        (2-D, numeric), ``.fvecs``, ``.parquet`` / ``.pq`` (a list or array column of
        numbers per row).
    output : the embedding store (a Zarr group: ``embeddings`` (N, d), ``ids`` (N,) when
        there are ids, and a ``model`` attribute).
    ids_column : Parquet column holding each row's id (integers -> int64 ids, strings ->
        string ids). Without it (and without ``row_ids``) the store has no ids array and
        row numbers are the ids.
    vector_column : Parquet column of the vectors (default: the only list/array column
        of numbers).
    row_ids : store the store's row numbers as int64 ids (any format).
    model : name of the model that embedded the vectors (the store's ``model`` attribute);
        default: the model Parquet files written by ``bigalign export`` name, when all do.
    chunk_rows : rows per stored chunk (default: about 32 MiB of vectors per chunk).
    dtype : float16/float32/float64 (default: the inputs' float dtype when they all share
        one, else float32).
    overwrite, checkpoint, restart, scheduler, workers, memory_limit, threads, block_bytes,
    progress, storage_options : as for :func:`bigalign.apply`.

    Duplicate ids are counted once the ids are written (:func:`bigalign.execution.pairing.duplicate_ids`,
    polars on Arrow columns): the count is the store's ``bigalign.duplicate_ids`` attribute,
    and a warning names an example and the remedy (``fit --duplicates first|last``). Not an
    error: a fit pairing by id decides.

    Returns a :class:`bigalign.RunReport` (``already_complete`` for a rerun of a finished
    import).
    """
    from ..storage.job import default_checkpoint
    from .runs import RunReport
    from ..storage.job import Job, finished_or_refuse
    from ..execution.cluster import session
    from ..storage.output_job import output_job
    from ..storage.locations import check_disjoint
    from ..options import Execution
    from ..storage.outputs import STORE_KINDS, check_replaceable, chunks_damage

    t0 = time.perf_counter()
    so = storage_options
    run = Execution(scheduler, workers, memory_limit, threads, block_bytes, progress)
    if ids_column is not None and row_ids:
        raise InputError("give either an id column (--ids-column) or --row-ids, not both")
    if checkpoint is not False and checkpoint is None:
        checkpoint = default_checkpoint(output)
    ckpt = checkpoint or None
    expanded = expand_inputs(inputs, so)
    check_disjoint({f"input {name}": url for name, url, *_ in expanded},
                   {"output": output, "checkpoint": ckpt}, so)
    files = probe_all(expanded, vector_column=vector_column, ids_column=ids_column)
    if model is None and files_model(files) is not None:
        model = files_model(files)
        log.info("model %r: named by the inputs' bigalign export metadata", model)
    dim = next(f.dim for f in files if f.rows)
    store_dtype = _store_dtype(files, dtype)
    total = sum(f.rows for f in files)
    if chunk_rows is not None and int(chunk_rows) <= 0:
        raise InputError(f"--chunk-rows must be positive, got {chunk_rows}")
    chunk = int(chunk_rows or choose_chunk_rows(dim, store_dtype.itemsize, total))
    ids_kind = "int64" if row_ids else next(f.ids_kind for f in files if f.rows)
    plan = make_import_plan([f.rows for f in files], dim * store_dtype.itemsize, chunk,
                            run.block_bytes, [_restart_points(f) for f in files])
    fingerprint = {
        "inputs": {f.url: f.fingerprint(i) for i, f in enumerate(files)},
        "options": {"dtype": store_dtype.name, "chunk_rows": chunk, "ids": ids_kind,
                    "ids_column": ids_column, "vector_column": vector_column,
                    "row_ids": bool(row_ids), "model": model}}
    node = check_replaceable(output, "output", so, kinds=STORE_KINDS)
    if node.kind == "embedding-store" and node.complete:
        if finished_or_refuse(node, fingerprint, output, overwrite, restart, ckpt, so,
                              damage=lambda: chunks_damage(output, so)):
            log.warning("%s is already complete with the same inputs and options: nothing "
                        "to do", output)
            return RunReport(0, time.perf_counter() - t0, 0, 0, 0, total, True)
    elif node.kind == "embedding-store" and not (overwrite or restart or
                                                 (ckpt and Job(ckpt, so).exists())):
        raise InputError(f"output {output!r} is an incomplete embedding store with no "
                         "recorded progress; pass --overwrite to write it again")
    target = _ImportTarget(output, plan, dim, store_dtype, ids_kind, model, so, {
        "made_by": "import", "inputs": [f.name for f in files[:1000]],
        "input_files": len(files)})
    with output_job(target, ckpt, "import", fingerprint, asdict(plan.regions),
                    storage_options=so, restart=restart, replace=overwrite) as job:
        plan = target.plan = ImportPlan(plan.file_rows, ApplyPlan(**job.manifest["plan"]),
                                        plan.row_groups)
        expected = plan.region_rows()
        faults.point("import.begun")
        handle, done = job.open(expected)
        group, embeddings, ids = handle
        graph, key, tasks = import_graph(tuple(files), plan, embeddings, ids, done=done,
                                         job=job.job, row_ids=row_ids, url=str(output),
                                         storage_options=so, run_id=job.run_id)
        log.info("import: %d rows x %d (%s) from %d file%s: %d regions of ~%.3g MB (chunks "
                 "of %d rows, %.3g MB) in %d tasks", plan.rows, dim, store_dtype.name,
                 len(files), "s" * (len(files) != 1), len(expected),
                 plan.regions.rows_per_block * dim * store_dtype.itemsize / 2**20,
                 plan.chunk_rows, plan.chunk_rows * dim * store_dtype.itemsize / 2**20, tasks)
        with session(**run.session_args()) as s:
            written = s.get(graph, key)
        seconds = time.perf_counter() - t0
        faults.point("import.before-complete")
        job.markers(expected)  # verify, then complete (RegionRun.finish)
        record = {}
        if ids is not None:  # row numbers (--row-ids) cannot repeat
            record["duplicate_ids"] = 0 if row_ids else _count_duplicate_ids(ids, output)
        job.finish(handle, expected, dict(
            record, complete=True, seconds=seconds,
            job={"run_id": job.run_id, "fingerprint": fingerprint},
            completed=datetime.now(timezone.utc).isoformat(timespec="seconds")))
    return RunReport(int(written), seconds, tasks, len(expected), len(done), plan.rows)


def _count_duplicate_ids(ids, output) -> int:
    """Distinct ids occurring more than once in the store's ``ids`` array
    (:func:`bigalign.execution.pairing.duplicate_ids`); a warning names one and the remedy. Not an
    error: the fit decides (``--duplicates error|first|last``)."""
    from ..execution.pairing import duplicate_ids

    t0 = time.perf_counter()
    count, example = duplicate_ids(ids)
    log.info("import: duplicate ids counted in %.2fs", time.perf_counter() - t0)
    if count:
        log.warning("%s: %d id%s occur more than once (e.g. id %r, %d times, at rows %s); a "
                    "fit pairing by id will refuse them unless told which row to keep: "
                    "--duplicates first|last", output, count, "s" * (count != 1),
                    example["id"], example["occurrences"],
                    ", ".join(str(r) for r in example["rows"]))
    return count


class _ImportTarget(ZarrTarget):
    """An imported store as the region job writes it (:mod:`bigalign.storage.output_job`):
    (``plan.rows``, ``dim``) of ``dtype`` in chunks of the plan, ids of ``ids_kind``,
    stamped with the run id, ``model`` and ``attributes``."""

    def __init__(self, output, plan, dim, dtype, ids_kind, model, so, attributes: dict):
        super().__init__(output, so)
        self.plan, self.dim, self.dtype, self.ids_kind = plan, dim, dtype, ids_kind
        self.model, self.attributes = model, attributes

    def of_run(self, run_id: str):
        return classify(f"output {self.url!r}",
                        lambda: _store_of_run(self.url, run_id, self.plan, self.dim,
                                              self.dtype, self.ids_kind,
                                              self.storage_options))

    def create(self, run_id: str):
        from ..storage.embedding_store import create_store, open_for_writing

        create_store(self.url, rows=self.plan.rows, dim=self.dim, dtype=self.dtype,
                     chunk_rows=self.plan.chunk_rows, ids_kind=self.ids_kind,
                     model=self.model, storage_options=self.storage_options,
                     attributes=dict(self.attributes, run_id=run_id))
        return open_for_writing(self.url, storage_options=self.storage_options)


def _store_of_run(output, run_id: str, plan: ImportPlan, dim: int, dtype: np.dtype,
                  ids_kind: Optional[str], so):
    """(group, embeddings, ids) of the store at ``output`` when run ``run_id`` created it
    with the planned shape, chunks, dtype and ids (a resume may write into it); None
    otherwise."""
    from ..storage.embedding_store import open_for_writing

    group, emb, ids = open_for_writing(output, storage_options=so)
    attrs = group.attrs.get("bigalign") or {}
    if attrs.get("run_id") != run_id or attrs.get("complete"):
        return None
    want_ids = {"int64": np.dtype(np.int64)}.get(ids_kind)
    if tuple(emb.shape) != (plan.rows, dim) or tuple(emb.chunks) != (plan.chunk_rows, dim) \
            or np.dtype(emb.dtype) != dtype or (ids is None) != (ids_kind is None) or \
            (ids is not None and (tuple(ids.chunks) != (plan.chunk_rows,) or
                                  (want_ids is not None and np.dtype(ids.dtype) != want_ids))):
        log.warning("the store %s does not have the shape, chunks or dtypes this run "
                    "planned: re-creating it", output)
        return None
    return group, emb, ids
