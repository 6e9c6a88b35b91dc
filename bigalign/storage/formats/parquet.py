"""Parquet input (``.parquet``, ``.pq``): one list or fixed-size-list column of numbers per
row (the vectors) and optionally an id column of integers or strings.

* **Probe**: the footer only, through ``pyarrow.parquet.read_metadata`` (local paths; remote
  files through an fsspec file object, whose read-ahead cache fetches the footer's byte
  range, never the whole file): rows, the rows of each row group (the plan's restart
  points), the schema (converted to the polars dtypes the rows will be read as), each
  column chunk's value count (a list column's dimension when every row group holds exactly
  rows x d values; otherwise one row is read) and the key-value metadata (the model stamp
  ``bigalign export`` writes under ``bigalign``).
* **Rows**: polars, one ``scan_parquet(...).slice(offset, n).collect_batches()`` stream per
  file span (local paths, or polars' own object-store client, to which S3 storage options
  are translated). A read that starts inside a row group decodes it from its start, so
  spans are streamed rather than sliced. Every batch is validated (null or ragged vectors,
  null values, null ids, ids beyond int64), errors naming the file and the row.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import numpy as np

from ...errors import InputError
from .base import Location, Reader, SourceFile, exported_mapped, register

__all__ = ["ParquetReader", "ParquetMetadata", "parquet_metadata", "parquet_row_groups"]


# ---- metadata (pyarrow) ---------------------------------------------------------------------

@dataclass(frozen=True)
class ParquetMetadata:
    """What a Parquet footer says: ``rows``, ``row_groups`` (rows of each), ``schema``
    (top-level column -> the polars dtype polars reads it as; the pyarrow type where polars
    reads none), ``key_value`` (its key-value metadata, str -> str)."""

    rows: int
    row_groups: tuple
    schema: dict
    key_value: dict
    meta: Any = field(repr=False, compare=False, default=None)  # pyarrow FileMetaData

    def values(self, column: str) -> Optional[tuple]:
        """Leaf values (nulls included) of top-level ``column`` in each row group, when the
        column has exactly one leaf (a list of numbers, a plain column); else None."""
        if self.meta is None:
            return None
        prefix = column + "."
        leaves = [j for j in range(self.meta.num_columns)
                  if (p := self.meta.schema.column(j).path) == column or p.startswith(prefix)]
        if len(leaves) != 1:  # a struct, or dotted names that make the path ambiguous
            return None
        j = leaves[0]
        return tuple(int(self.meta.row_group(g).column(j).num_values)
                     for g in range(self.meta.num_row_groups))

    def dim(self, column: str) -> Optional[int]:
        """A list column's vector length when every row group holds exactly rows x d values
        (d the same everywhere), else None. Every row is still checked while reading; this
        only spares reading a row per file to learn d up front."""
        values = self.values(column)
        if values is None:
            return None
        dims = {v // g if g and v % g == 0 else None
                for v, g in zip(values, self.row_groups) if g}
        return dims.pop() if len(dims) == 1 and None not in dims and 0 not in dims else None


def _polars_schema(arrow_schema) -> dict:
    """Column -> polars dtype of an Arrow schema (as polars reads the file); a column polars
    cannot represent keeps its Arrow type (and is refused if it is the one asked for)."""
    import polars as pl
    import pyarrow as pa

    try:
        return dict(pl.from_arrow(arrow_schema.empty_table()).schema)
    except Exception:
        out = {}
        for f in arrow_schema:
            try:
                out[f.name] = pl.from_arrow(pa.schema([f]).empty_table()).schema[f.name]
            except Exception:
                out[f.name] = f.type
        return out


def _read_metadata(fs, path: str, local: bool, size: Optional[int] = None):
    import pyarrow.parquet as pq

    if local:
        return pq.read_metadata(path)
    try:  # the size we know spares a HEAD request (s3fs, gcsfs, http)
        fh = fs.open(path, "rb", size=size) if size else fs.open(path, "rb")
    except TypeError:
        fh = fs.open(path, "rb")
    with fh:
        return pq.read_metadata(fh)


def _unreadable(e: BaseException) -> bool:
    """True for pyarrow's own complaints about a file's bytes (ArrowException, or a bare
    OSError without errno: "Couldn't deserialize thrift"); errors of the file object
    (fsspec's: connection, permission, missing) pass through pyarrow unchanged."""
    import pyarrow as pa

    return isinstance(e, pa.ArrowException) or (type(e) is OSError and e.errno is None)


def parquet_metadata(fs, path: str, local: bool = False, size: Optional[int] = None,
                     name: Optional[str] = None) -> ParquetMetadata:
    """The footer of the Parquet file at ``path`` of fsspec filesystem ``fs`` (``local``:
    a local path, read directly), read with ``pyarrow.parquet.read_metadata``: remote files
    through an fsspec file object, whose read-ahead cache fetches the last 64 KiB (and more
    only for larger footers), never the whole file. Raises InputError naming ``name``
    (default ``path``) when it is not a Parquet file; transient storage errors are retried,
    then raised as such (exit 75)."""
    from ..stores import retrying

    name = name or path

    def read():
        try:
            return _read_metadata(fs, path, local, size)
        except Exception as e:
            if local or _unreadable(e):
                raise InputError(f"{name}: not a readable Parquet file ({type(e).__name__}: "
                                 f"{e})") from None
            raise

    meta = read() if local else retrying(f"cannot read the Parquet footer of {name!r}", read,
                                         transient_only=True)
    try:
        groups = tuple(int(meta.row_group(g).num_rows) for g in range(meta.num_row_groups))
        schema = _polars_schema(meta.schema.to_arrow_schema())
    except Exception as e:
        raise InputError(f"{name}: not a readable Parquet file ({type(e).__name__}: {e})") \
            from None
    kv = {k.decode("utf-8", "replace"): v.decode("utf-8", "replace")
          for k, v in (meta.metadata or {}).items()}
    return ParquetMetadata(int(meta.num_rows), groups, schema, kv, meta)


def parquet_row_groups(fs, path: str, local: bool = False) -> Optional[tuple]:
    """Rows of each row group of a Parquet file, from its footer, or None when the footer
    cannot be read."""
    try:
        return parquet_metadata(fs, path, local).row_groups
    except InputError:
        return None


def _exported_model(kv: dict) -> Optional[str]:
    """The model a Parquet file written by ``bigalign export`` names in its ``bigalign``
    key-value metadata, or None."""
    raw = kv.get("bigalign")
    try:
        model = json.loads(raw).get("model") if raw else None
    except (ValueError, AttributeError):
        return None
    return model if isinstance(model, str) and model else None


# ---- polars: the object-store client and dtypes ---------------------------------------------

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

    if not isinstance(pl_dtype, pl.DataType) or not (pl_dtype.is_float() or
                                                      pl_dtype.is_integer()):
        return None
    return np.dtype(pl.Series([], dtype=pl_dtype).to_numpy().dtype)


def _has_batches() -> bool:
    import polars as pl

    return hasattr(pl.LazyFrame, "collect_batches")


_HAS_BATCHES = _has_batches()


# ---- the reader -------------------------------------------------------------------------------

@register
class ParquetReader(Reader):
    format = "parquet"
    extensions = (".parquet", ".pq")
    columns = True

    def probe(self, at: Location, *, vector_column: Optional[str] = None,
              ids_column: Optional[str] = None) -> SourceFile:
        meta = parquet_metadata(at.fs, at.path, at.local, at.size, at.name)
        found = _check_columns(at, meta, vector_column, ids_column)
        groups = meta.row_groups if sum(meta.row_groups) == meta.rows else None
        return at.source(self, **found, row_groups=groups,
                         model=_exported_model(meta.key_value),
                         mapped=exported_mapped(meta.key_value.get("bigalign")))

    def read(self, f: SourceFile, start: int, stop: int,
             storage_options: Optional[dict] = None) -> tuple:
        from ..stores import retrying

        df = retrying(f"cannot read rows {start}:{stop} of {f.name!r}",
                      lambda: _scan(f.url, f.local, storage_options or {})
                      .slice(start, stop - start).select(_columns(f)).collect())
        if df.height != stop - start:
            raise InputError(f"{f.name}: rows {start}:{stop} read {df.height} rows (the file "
                             "changed?)")
        return _frame_arrays(f, df, start)

    def batches(self, f: SourceFile, start: int, stop: int, batch_rows: int,
                storage_options: Optional[dict] = None) -> Iterator[tuple]:
        """Parquet is read as *one* stream (polars' ``collect_batches``): a slice that starts
        inside a row group decodes it from its start (there is no row index inside a row
        group without a page index), so reading a span slice by slice would decode its row
        groups over and over. Polars without ``collect_batches`` falls back to one slice
        per batch."""
        if not _HAS_BATCHES:
            yield from super().batches(f, start, stop, batch_rows, storage_options)
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
                    raise InputError(f"{f.name}: rows {start}:{stop} read more rows than "
                                     "asked (the file changed?)")
                values, ids = _frame_arrays(f, df, row)
                yield row, values, ids
                row += df.height
        finally:  # an error or an early exit: stop the stream (older polars) or drop it
            stop_early = getattr(batches, "stop", None)
            if row < stop and stop_early is not None:
                stop_early()
            del batches
        if row != stop:
            raise InputError(f"{f.name}: rows {start}:{stop} read {row - start} rows (the "
                             "file changed?)")

    def restart_points(self, f: SourceFile) -> tuple:
        return f.row_groups or ()


def _check_columns(at: Location, meta: ParquetMetadata, vector_column: Optional[str],
                   ids_column: Optional[str]) -> dict:
    """rows, dim, dtype, vector and id columns and the kind of ids of a file whose footer
    is ``meta``, checked against the columns asked for (errors name the file)."""
    import polars as pl

    name, schema, rows = at.name, meta.schema, meta.rows
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
    elif rows and meta.dim(vector_column):
        dim = meta.dim(vector_column)
    elif rows:  # reading one row decodes its column chunk: ~40% of reading the file
        lazy = _scan(at.url, at.local, _storage_options_of(at.fs))
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
        if isinstance(itype, pl.DataType) and itype.is_integer():
            ids_kind = "int64"
        elif itype in (pl.String, pl.Categorical) or isinstance(itype, (pl.Categorical,
                                                                            pl.Enum)):
            ids_kind = "string"
        else:
            raise InputError(f"{name}: id column {ids_column!r} is {itype}; ids must be "
                             "integers or strings")
    return dict(rows=rows, dim=dim, dtype=inner.str, vector_column=vector_column,
                ids_column=ids_column, ids_kind=ids_kind)


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
