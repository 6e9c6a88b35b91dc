"""The embedding store: a Zarr group holding a corpus of vectors and, optionally, their ids
and the name of the model that embedded them. Pure storage: no Dask, no planning.

::

    STORE/                      Zarr 3 group
      embeddings                (N, d) float16/32/64, chunks (chunk_rows, d): whole rows
                                (in shards of (shard_rows, d) when given); NaN fill, every
                                chunk stored (write_empty_chunks)
      ids                       (N,) int64 or variable-length UTF-8 string (zarr 3's
                                "string" data type, vlen-utf8 codec), chunks of the
                                embeddings' shard (or chunk) rows, so a writer of whole
                                shards writes whole id chunks too; optional: without it,
                                row numbers are the ids
    attributes
      bigalign = {"kind": "embedding-store", "format": "bigalign.embedding-store/1",
                  "made_by": "import" | "apply" (absent in stores of older imports),
                  "complete": false | true, "run_id": ..., "rows": N, "dim": d,
                  "ids": "int64" | "string" | null, "job": {...} once complete}
      model    = "intfloat/e5-base-v2" (or absent)

``bigalign import`` writes stores; so does ``bigalign apply`` when its source is a store
(``made_by: "apply"``: the mapped vectors, the source's ids, the transform's target model).
A store is *complete* only when ``bigalign.complete`` is true: the writer sets it last,
after verifying that every region was written. A bare (N, d) Zarr array is a store too
(no ids, no model): :func:`open_store` accepts both, so code that reads corpora works on
either. Commands that take an array (fit, apply) take ``STORE/embeddings``.

Why these choices (measured on this machine, zarr 3.1.6): variable-length strings write
1M ids in 0.14-0.24 s and read back in 0.13 s as numpy ``StringDType``; fixed-length
UTF-32 is no faster, wastes space on long ids and zarr warns that it is not yet a stable
Zarr 3 data type. Embeddings stay uncompressed by default, as apply's outputs (zstd halves
write speed for ~1.05-1.1x on float vectors).
"""

from __future__ import annotations

import json
import os
from typing import Any, Optional

import numpy as np

from ..errors import InputError
from .locations import options_for

__all__ = ["create_store", "open_store", "store_parts", "open_for_writing", "store_attrs",
           "is_store", "ids_kind_of", "as_ids", "STORE_FORMAT", "KIND", "ID_KINDS"]

STORE_FORMAT = "bigalign.embedding-store/1"
KIND = "embedding-store"
ID_KINDS = ("int64", "string")


def _ids_dtype(kind: str):
    if kind == "int64":
        return np.dtype(np.int64), -1
    if kind == "string":
        return str, ""
    raise InputError(f"ids kind must be one of {ID_KINDS} or None, got {kind!r}")


def ids_kind_of(dtype) -> str:
    """The store ids kind ("int64" or "string") that ids of numpy ``dtype`` are kept as:
    integers -> int64, text (str, numpy StringDType, bytes, object) -> string; anything
    else raises InputError (the rule of pairing by id)."""
    kind = np.dtype(dtype).kind
    if kind in "iu":
        return "int64"
    if kind in "TUSO":
        return "string"
    raise InputError(f"ids of dtype {dtype} are neither integers nor strings")


def as_ids(values: np.ndarray, kind: str) -> np.ndarray:
    """``values`` (n,) as ids of ``kind`` for writing: int64 (an unsigned id past int64's
    range raises InputError rather than wrapping round) or str (bytes decoded as UTF-8)."""
    values = np.asarray(values)
    if kind == "int64":
        if values.dtype.kind == "u" and values.size and \
                values.max() > np.iinfo(np.int64).max:
            raise InputError(f"id {int(values.max())} does not fit in int64")
        return values.astype(np.int64, copy=False)
    if values.dtype.kind == "S":
        return np.char.decode(values, "utf-8")
    return values if values.dtype.kind in "TU" else values.astype(str)


def create_store(url: str, *, rows: int, dim: int, dtype, chunk_rows: int,
                 ids_kind: Optional[str] = None, model: Optional[str] = None,
                 attributes: Optional[dict] = None, compression: str = "none",
                 storage_options: Optional[dict] = None, shard_rows: Optional[int] = None):
    """Create (replacing whatever is at ``url``; the caller checks it may) an empty store.

    ``attributes`` are merged into the ``bigalign`` attribute (``complete`` is false until
    the writer says otherwise). Returns the open group (mode r+); its arrays are created
    with ``write_empty_chunks=True`` so a written chunk always exists, NaN-filled so an
    unwritten region reads as NaN, not as plausible zeros; ids fill with -1 or "".
    ``shard_rows``: embeddings in shards of that many rows (a multiple of ``chunk_rows``);
    ids are then chunked by whole shards (a writer of a shard owns its ids' chunk).
    """
    import zarr

    from .stores import _compressors  # one place for the codec choices

    if rows <= 0 or dim <= 0 or chunk_rows <= 0:
        raise InputError(f"a store needs rows, dim and chunk_rows > 0, got {rows}, {dim}, "
                         f"{chunk_rows}")
    bigalign = {"kind": KIND, "format": STORE_FORMAT, "complete": False, "rows": int(rows),
                "dim": int(dim), "ids": ids_kind, **(attributes or {})}
    attrs: dict[str, Any] = {"bigalign": bigalign}
    if model is not None:
        attrs["model"] = str(model)
    group = zarr.open_group(url, mode="w", storage_options=options_for(url, storage_options),
                            attributes=attrs)
    config = {"write_empty_chunks": True}
    group.create_array("embeddings", shape=(rows, dim), chunks=(chunk_rows, dim),
                       shards=(shard_rows, dim) if shard_rows else None,
                       dtype=np.dtype(dtype), fill_value=np.nan,
                       compressors=_compressors(compression), config=config)
    if ids_kind is not None:
        ids_dtype, fill = _ids_dtype(ids_kind)
        group.create_array("ids", shape=(rows,), chunks=(shard_rows or chunk_rows,),
                           dtype=ids_dtype, fill_value=fill, compressors=_compressors("none"),
                           config=config)
    return group


def store_attrs(url, storage_options: Optional[dict] = None) -> Optional[dict]:
    """The ``bigalign`` attribute of the store at ``url``, or None when there is none."""
    import zarr

    try:
        group = zarr.open_group(url, mode="r", storage_options=options_for(url, storage_options))
    except Exception:
        return None
    attrs = group.attrs.get("bigalign")
    return dict(attrs) if isinstance(attrs, dict) and attrs.get("kind") == KIND else None


def open_store(url, *, storage_options: Optional[dict] = None, mode: str = "r",
               allow_incomplete: bool = False):
    """Open a corpus: ``(embeddings, ids, model)``.

    ``url``: an embedding store (group) or a bare (N, d) Zarr array. ``embeddings`` is the
    (N, d) zarr.Array; ``ids`` the (N,) zarr.Array of ids, or None (row numbers are the
    ids); ``model`` the model name, or None. An incomplete store (an import in flight or
    killed) raises InputError unless ``allow_incomplete``.
    """
    import zarr

    try:
        node = zarr.open(url, mode=mode, storage_options=options_for(url, storage_options))
    except FileNotFoundError as e:
        raise InputError(f"no embedding store or array at {str(url)!r}") from e
    except Exception as e:
        raise InputError(f"{str(url)!r} is not a readable Zarr store or array ({e})") from e
    if isinstance(node, zarr.Array):
        if node.ndim != 2:
            raise InputError(f"{str(url)!r}: expected a 2-D (rows, dim) array, got shape "
                             f"{node.shape}")
        return node, None, None
    attrs = node.attrs.get("bigalign")
    ours = isinstance(attrs, dict) and attrs.get("kind") == KIND
    if not ours and "embeddings" not in node.array_keys():
        raise InputError(f"{str(url)!r} is a Zarr group but not an embedding store (no "
                         "'embeddings' array)")
    if ours and not attrs.get("complete") and not allow_incomplete:
        raise InputError(f"embedding store {str(url)!r} is incomplete (its "
                         f"{attrs.get('made_by') or 'import'} was interrupted or is running); "
                         "rerun that command to finish it")
    embeddings = node["embeddings"]
    ids = node["ids"] if "ids" in node.array_keys() else None
    if ids is not None and ids.shape != (embeddings.shape[0],):
        raise InputError(f"embedding store {str(url)!r}: ids have shape {ids.shape} for "
                         f"{embeddings.shape[0]} rows")
    return embeddings, ids, node.attrs.get("model")


def open_for_writing(url, *, storage_options: Optional[dict] = None):
    """``(group, embeddings, ids or None)`` of an existing store, opened r+ with
    ``write_empty_chunks=True`` (a config of the open handle, not stored with the array)."""
    import zarr

    group = zarr.open_group(url, mode="r+", storage_options=options_for(url, storage_options))
    config = {"write_empty_chunks": True}
    arrays = set(group.array_keys())
    so = options_for(url, storage_options)
    embeddings = zarr.open_array(url, path="embeddings", mode="r+", config=config,
                                 storage_options=so)
    ids = zarr.open_array(url, path="ids", mode="r+", config=config,
                          storage_options=so) if "ids" in arrays else None
    return group, embeddings, ids


def _store_group(url, storage_options: Optional[dict] = None):
    """The open (read-only) group at ``url`` when it is an embedding store (a Zarr group
    holding ``embeddings``: bigalign's or a user's), else None."""
    import zarr

    if not isinstance(url, (str, os.PathLike)):
        return None
    so = options_for(url, storage_options)  # a bad storage option: named, not swallowed
    try:
        group = zarr.open_group(str(url), mode="r", storage_options=so)
        return group if "embeddings" in group else None
    except Exception as e:  # a truncated zarr.json (the group's, or its members'): say so
        from .stores import damaged_metadata

        damaged = damaged_metadata(repr(str(url)), url, storage_options, e)
        if damaged is not None:
            raise damaged from e
        return None


def is_store(url, storage_options: Optional[dict] = None) -> bool:
    """Whether ``url`` is an embedding store (a group holding ``embeddings``), as opposed to
    a bare array (or an open zarr.Array): what :func:`store_parts` unpacks."""
    return _store_group(url, storage_options) is not None


def store_parts(url, storage_options: Optional[dict] = None):
    """An input as (embeddings, ids, model): for an embedding store (a Zarr group holding
    ``embeddings`` and optionally ``ids`` and a ``model`` attribute), the URL of its
    embeddings array, its ids array (or None) and its model stamp (or None); for anything
    else (a bare array, an open zarr.Array) the input itself, None, None. An unfinished
    store of bigalign's (an import or apply interrupted or running) raises InputError."""
    group = _store_group(url, storage_options)
    if group is None:
        return url, None, None
    meta = group.attrs.get("bigalign")
    if isinstance(meta, dict) and meta.get("kind") == KIND and not meta.get("complete"):
        raise InputError(f"{str(url)!r} is an unfinished embedding store (its "
                         f"{meta.get('made_by') or 'import or apply'} was interrupted or is "
                         "still running): rerun that command to finish it first")
    model = group.attrs.get("model")
    try:
        ids = group["ids"] if "ids" in group else None
    except json.JSONDecodeError as e:
        from .stores import damaged_metadata

        raise damaged_metadata(repr(str(url)), url, storage_options, e) from e
    return f"{str(url).rstrip('/')}/embeddings", ids, str(model) if model else None
