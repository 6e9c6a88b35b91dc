"""Lance input (``DATASET.lance``, a folder): one fixed-size-list (or list) column of numbers
per row (the vectors) and optionally an id column of integers or strings, read with
``pylance`` (the optional extra ``bigalign[lance]``).

* **Probe**: the dataset's manifest only (``lance.dataset``: the latest version, which every
  later read of this import opens again, so a dataset that gains a version mid-import is
  read as it was; the version is the input's stamp in the job fingerprint, so a resume after
  a write to the dataset is refused): rows, the rows of each fragment, the Arrow schema and
  its metadata (the model stamp ``bigalign export --format lance`` writes under
  ``bigalign``, as for Parquet).
* **Rows**: Lance files are randomly addressable, so any row can start a task
  (:meth:`Reader.restart_points` is None) and a slice is read fragment by fragment
  (``LanceFragment.to_table(offset=, limit=)``), validated like Parquet's (null vectors,
  null values, ragged list vectors, null ids), errors naming the dataset and the row.

A dataset is a folder, so this reader sets :attr:`Reader.directory`: a glob such as
``corpora/*.lance`` matches dataset folders.
"""

from __future__ import annotations

import json
from typing import Optional

import numpy as np

from ...errors import InputError
from .base import Location, Reader, SourceFile, exported_mapped, register

__all__ = ["LanceReader", "lance_module", "lance_storage_options"]


def lance_module():
    """``import lance``, or an InputError saying how to install it. Lance's own log
    defaults to errors only here (``LANCE_LOG``, read when it is first imported): each
    fragment written before the commit would otherwise warn that the dataset does not
    exist yet, which is the point."""
    import os

    os.environ.setdefault("LANCE_LOG", "error")
    try:
        import lance
    except ImportError:
        raise InputError("Lance datasets need pylance: pip install 'bigalign[lance]' (or "
                         "pip install pylance)") from None
    return lance


def lance_storage_options(url: str, so: Optional[dict]) -> Optional[dict]:
    """Storage options for Lance's object-store client, from fsspec-style ones (S3 keys
    translated as for polars, which uses the same Rust ``object_store`` keys); None for
    local paths."""
    if not so or "://" not in url or url.startswith("file://"):
        return None
    from .parquet import _polars_options

    out = {k: str(v) for k, v in (_polars_options(url, so) or {}).items()}
    if out.get("aws_allow_http"):
        out.setdefault("allow_http", out["aws_allow_http"])
    return out


def _open(url: str, version: Optional[int], so: Optional[dict], name: str):
    lance = lance_module()
    try:
        return lance.dataset(url, version=version,
                             storage_options=lance_storage_options(url, so))
    except (ValueError, OSError) as e:
        raise InputError(f"{name}: not a readable Lance dataset ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:300]})") from None


def _numeric(t) -> Optional[np.dtype]:
    import pyarrow as pa

    if pa.types.is_floating(t) or pa.types.is_integer(t):
        return np.dtype(t.to_pandas_dtype())
    return None


def _is_list(t) -> bool:
    import pyarrow as pa

    return pa.types.is_fixed_size_list(t) or pa.types.is_list(t) or \
        pa.types.is_large_list(t)


def _exported_model(metadata) -> Optional[str]:
    raw = (metadata or {}).get(b"bigalign")
    try:
        model = json.loads(raw).get("model") if raw else None
    except (ValueError, AttributeError):
        return None
    return model if isinstance(model, str) and model else None


@register
class LanceReader(Reader):
    format = "lance"
    extensions = (".lance",)
    columns = True
    directory = True

    def probe(self, at: Location, *, vector_column: Optional[str] = None,
              ids_column: Optional[str] = None) -> SourceFile:
        from dataclasses import replace

        so = dict(getattr(at.fs, "storage_options", {}) or {})
        ds = _open(at.url, None, so, at.name)
        schema = ds.schema
        found = _check_columns(at.name, schema, vector_column, ids_column)
        fragments = tuple(int(fr.count_rows()) for fr in ds.get_fragments())
        rows = int(sum(fragments))
        if found["dim"] is None:  # a variable-length list: the first row says d
            found["dim"] = _first_dim(ds, found["vector_column"], at.name) if rows else 0
        at = replace(at, stamp=f"version {ds.version}")
        return at.source(self, rows=rows, row_groups=fragments, version=int(ds.version),
                         model=_exported_model(schema.metadata),
                         mapped=exported_mapped((schema.metadata or {}).get(b"bigalign")),
                         **found)

    def read(self, f: SourceFile, start: int, stop: int,
             storage_options: Optional[dict] = None) -> tuple:
        ds = _open(f.url, f.version, storage_options, f.name)
        fragments = ds.get_fragments()
        if tuple(int(fr.count_rows()) for fr in fragments) != tuple(f.row_groups or ()):
            raise InputError(f"{f.name}: version {f.version} no longer has the fragments it "
                             "had when probed (the dataset was compacted or rewritten?)")
        values, ids, first = [], [], 0
        columns = [f.vector_column] + ([f.ids_column] if f.ids_column else [])
        for fr, n in zip(fragments, f.row_groups):
            a, b = max(start, first), min(stop, first + n)
            if a < b:
                table = fr.to_table(columns=columns, offset=a - first, limit=b - a)
                if table.num_rows != b - a:
                    raise InputError(f"{f.name}: rows {a}:{b} read {table.num_rows} rows "
                                     "(the dataset changed?)")
                v, i = _arrays(f, table, a)
                values.append(v)
                ids.append(i)
            first += n
            if first >= stop:
                break
        if not values:
            return np.empty((0, f.dim), f.dtype), None if not f.ids_column else np.empty(0)
        return (values[0] if len(values) == 1 else np.concatenate(values),
                None if not f.ids_column else
                ids[0] if len(ids) == 1 else np.concatenate(ids))


def _check_columns(name: str, schema, vector_column: Optional[str],
                   ids_column: Optional[str]) -> dict:
    """dtype, dim (None for a variable-length list), vector and id columns and the kind of
    ids of a dataset of Arrow ``schema``, checked against the columns asked for."""
    import pyarrow as pa

    names = schema.names
    if vector_column is None:
        lists = [c for c in names if _is_list(schema.field(c).type) and
                 _numeric(schema.field(c).type.value_type) is not None]
        if len(lists) != 1:
            raise InputError(f"{name}: {'no' if not lists else 'several'} list-of-number "
                             f"columns ({', '.join(lists) or 'columns: ' + ', '.join(names)});"
                             " name the vectors with --vector-column")
        vector_column = lists[0]
    if vector_column not in names:
        raise InputError(f"{name}: no column {vector_column!r} (columns: {', '.join(names)})")
    vtype = schema.field(vector_column).type
    if not _is_list(vtype) or _numeric(vtype.value_type) is None:
        raise InputError(f"{name}: column {vector_column!r} is {vtype}, not a list of "
                         "numbers (one vector per row)")
    dim = int(vtype.list_size) if pa.types.is_fixed_size_list(vtype) else None
    if dim == 0:
        raise InputError(f"{name}: column {vector_column!r} holds vectors of dimension 0")
    ids_kind = None
    if ids_column is not None:
        if ids_column not in names:
            raise InputError(f"{name}: no id column {ids_column!r} (columns: "
                             f"{', '.join(names)})")
        itype = schema.field(ids_column).type
        if pa.types.is_integer(itype):
            ids_kind = "int64"
        elif pa.types.is_string(itype) or pa.types.is_large_string(itype) or \
                pa.types.is_string_view(itype):
            ids_kind = "string"
        else:
            raise InputError(f"{name}: id column {ids_column!r} is {itype}; ids must be "
                             "integers or strings")
    return dict(dim=dim, dtype=_numeric(vtype.value_type).str, vector_column=vector_column,
                ids_column=ids_column, ids_kind=ids_kind)


def _first_dim(ds, column: str, name: str) -> int:
    first = ds.to_table(columns=[column], limit=1).column(column)[0]
    if not first.is_valid:
        raise InputError(f"{name} row 0: the vector in column {column!r} is null")
    if len(first) == 0:
        raise InputError(f"{name} row 0: the vector in column {column!r} is empty")
    return len(first)


def _arrays(f: SourceFile, table, start: int) -> tuple:
    """(vectors (n, dim) of f.dtype, ids (n,) or None) of ``table`` holding rows
    [start, start + n) of ``f``, validated: no null or ragged vectors, no null values or
    ids."""
    import pyarrow as pa
    import pyarrow.compute as pc

    n, col = table.num_rows, f.vector_column
    vec = table.column(col).combine_chunks()
    if vec.null_count:
        row = start + int(np.flatnonzero(vec.is_null().to_numpy(zero_copy_only=False))[0])
        raise InputError(f"{f.name} row {row}: the vector in column {col!r} is null")
    if not pa.types.is_fixed_size_list(vec.type):
        lengths = pc.list_value_length(vec).to_numpy(zero_copy_only=False)
        wrong = np.flatnonzero(lengths != f.dim)
        if wrong.size:
            i = int(wrong[0])
            raise InputError(f"{f.name} row {start + i}: the vector in column {col!r} has "
                             f"{lengths[i]} values, expected {f.dim} (ragged vectors)")
    flat = vec.flatten()
    if flat.null_count:
        i = int(np.flatnonzero(flat.is_null().to_numpy(zero_copy_only=False))[0])
        raise InputError(f"{f.name} row {start + i // f.dim}: the vector in column {col!r} "
                         f"holds a null (value {i % f.dim})")
    values = flat.to_numpy(zero_copy_only=False).reshape(n, f.dim)
    ids = None
    if f.ids_column:
        s = table.column(f.ids_column).combine_chunks()
        if s.null_count:
            row = start + int(np.flatnonzero(s.is_null().to_numpy(zero_copy_only=False))[0])
            raise InputError(f"{f.name} row {row}: the id in column {f.ids_column!r} is null")
        if f.ids_kind == "int64":
            try:
                ids = s.cast(pa.int64()).to_numpy(zero_copy_only=False)
            except pa.ArrowInvalid:
                raise InputError(f"{f.name}: ids in column {f.ids_column!r} rows "
                                 f"{start}:{start + n} do not fit in int64") from None
        else:
            ids = s.cast(pa.string()).to_numpy(zero_copy_only=False)
    return values, ids
