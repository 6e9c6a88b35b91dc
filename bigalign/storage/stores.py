"""Opening, validating, reading and creating Zarr arrays (local paths and fsspec URLs).

Everything that touches Zarr for embedding data lives here, so the engine sees numpy blocks
and clear errors. Reads are whole-chunk aligned by the planner (inner chunks of a sharded
array: a read of part of a shard fetches only those chunks and the shard's index), writes
whole chunks, or whole shards of a sharded output.

Missing chunks: Zarr reads a chunk that is not stored as the fill value, silently. They are
found twice, with public APIs only: up front, from the one listing of each input's objects
that its content witness takes anyway (no second listing; the keys are matched against the
chunk grid through the array metadata's ``encode_chunk_key``), and while streaming, by
:func:`read_rows`: a chunk that reads entirely as the fill value (its first row is checked,
then the whole chunk) is an error naming its rows. The streaming check costs one row
comparison per chunk, catches what a stale object-store listing missed, and also finds an
inner chunk absent from a stored shard, which no listing shows. The same listing check
(:func:`unstored_chunks`) tells whether a finished output still holds every chunk it was
written with (:func:`bigalign.storage.outputs.chunks_damage`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import zarr
from zarr.core.buffer.cpu import NDBuffer

from ..errors import ChunkReadError, InputError, TransientChunkReadError, TransientError, is_transient
from .locations import options_for

__all__ = ["open_embeddings", "EmbeddingArray", "ArrayRows", "validate_pair", "create_output",
           "read_rows", "write_rows", "parse_rows", "unstored_chunks", "describe_unstored",
           "stored_chunk_bytes",
           "COMPRESSIONS"]

FLOAT_DTYPES = (np.float16, np.float32, np.float64)

from ..planning.plan import COMPRESSIONS  # noqa: E402  (the one list of choices)

#: Transient I/O errors (connections, timeouts, OS errors other than a wrong path or
#: permission: :func:`bigalign.errors.is_transient`) are retried this many times, sleeping
#: RETRY_BACKOFF * 2**attempt seconds between tries; decode errors are not retried.
RETRIES = 3
RETRY_BACKOFF = 0.5


@dataclass(frozen=True)
class EmbeddingArray:
    """A validated (N, d) float Zarr array and where it came from.

    ``row_step`` is the rows of one stored object (the shard when sharded, else the chunk):
    the unit of reads and writes."""

    array: Any  # zarr.Array
    url: str
    side: str
    #: check, while reading, that no whole chunk reads as the fill value (not stored)
    check_chunks: bool = field(default=False, compare=False)
    #: the content witness, taken with the up-front missing-chunk check's listing
    witness: Optional[dict] = field(default=None, compare=False, repr=False)

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.array.shape)

    @property
    def rows(self) -> int:
        return self.shape[0]

    @property
    def dim(self) -> int:
        return self.shape[1]

    @property
    def dtype(self) -> np.dtype:
        """The dtype of rows as read: native byte order (a Zarr v2 ``>f4`` array reads as
        float32; Zarr converts while reading, also into a native ``out`` buffer)."""
        return self.stored_dtype.newbyteorder("=")

    @property
    def stored_dtype(self) -> np.dtype:
        """The dtype as stored, byte order included (``>f4`` for big-endian Zarr v2)."""
        return np.dtype(self.array.dtype)

    @property
    def row_step(self) -> int:
        shards = getattr(self.array, "shards", None)
        return int((shards or self.array.chunks)[0])

    @property
    def read_step(self) -> int:
        """Rows of one chunk (the inner chunk when sharded): the unit of reads."""
        return int(self.array.chunks[0])

    @property
    def shard_rows(self) -> Optional[int]:
        """Rows of one shard, or None when the array is not sharded."""
        shards = getattr(self.array, "shards", None)
        return int(shards[0]) if shards else None

    @property
    def row_bytes(self) -> int:
        return self.dim * self.dtype.itemsize

    def fingerprint(self) -> dict:
        """What identifies this input for resume checks: URL, shape, chunking, dtype, and a
        hash of the stored array metadata."""
        meta = self.array.metadata.to_dict()
        blob = json.dumps(meta, sort_keys=True, default=str).encode()
        return {"url": self.url, "shape": list(self.shape), "chunks": list(self.array.chunks),
                "shards": list(self.array.shards) if getattr(self.array, "shards", None) else None,
                "dtype": str(self.dtype), "zarr_format": int(self.array.metadata.zarr_format),
                "metadata_sha256": hashlib.sha256(blob).hexdigest(),
                "content": self.witness or content_witness(self.array)}


def content_witness(arr, listing: Optional[list] = None) -> dict:
    """A witness of an array's stored content, from one listing of its objects: their
    number, total bytes, and a SHA-256 of every (key, size, stamp), where the stamp is the
    object's ETag on object stores or its modification time on file systems. Re-writing
    any chunk in place (a re-embedded input with the same shape) changes it; reading
    doesn't. ``kind`` says what the stamp is; for stores fsspec cannot list (in-memory
    stores), the keys and sizes of the objects are hashed ("keys+sizes").
    ``listing``: that listing (:func:`list_objects`), when the caller has it already."""
    kind, entries = listing if listing is not None else list_objects(arr)
    h, count, total = hashlib.sha256(), 0, 0
    for rel, size, stamp in entries:
        h.update((f"{rel}\0{size}\0{stamp}\n" if kind != "keys+sizes" else
                  f"{rel}\0{size}\n").encode())
        count, total = count + 1, total + size
    return {"kind": kind, "objects": count, "bytes": total, "sha256": h.hexdigest()}


def list_objects(arr) -> tuple[str, list]:
    """One listing of an array's stored objects: (kind, [(key relative to the array, size,
    stamp)] sorted by key); ``kind`` is "etag", "mtime" or "keys+sizes" (stamp None)."""
    fs, root = _fs_and_root(arr)
    out = []
    if fs is not None:
        try:
            if getattr(fs, "asynchronous", False):  # zarr's FsspecStore holds an async fs
                from zarr.core.sync import sync
                listing = sync(fs._find(root, detail=True))
            else:
                listing = fs.find(root, detail=True)
        except FileNotFoundError:
            listing = {}
        kind = "mtime"
        for name in sorted(listing):
            info = listing[name]
            size = int(info.get("size") or 0)
            stamp = info.get("ETag") or info.get("etag")
            if stamp is not None:
                kind = "etag"
            else:
                stamp = info.get("mtime") or info.get("LastModified") or info.get("created")
            rel = name[len(root):].lstrip("/") if name.startswith(root) else name
            out.append((rel, size, stamp))
        return kind, out
    from zarr.core.sync import sync

    async def keys():
        return sorted([k async for k in arr.store.list_prefix(arr.path)])

    for key in sync(keys()):
        out.append((key, sync(arr.store.getsize(key)), None))
    return "keys+sizes", out


def _fs_and_root(arr):
    """(fsspec filesystem, path of the array's node) for local and fsspec stores, else
    (None, None)."""
    store = getattr(arr, "store", None)
    node = str(getattr(arr, "path", "") or "").strip("/")
    if hasattr(store, "fs") and hasattr(store, "path"):  # zarr FsspecStore
        root = str(store.path).rstrip("/")
        return store.fs, f"{root}/{node}" if node else root
    if hasattr(store, "root") and type(store).__name__ == "LocalStore":
        import os
        from fsspec.implementations.local import LocalFileSystem
        root = os.path.abspath(str(store.root)).rstrip("/")  # fs.find answers absolute paths
        return LocalFileSystem(), f"{root}/{node}" if node else root
    return None, None


class ArrayRows:
    """An in-memory (rows, dim) numpy array with the attributes of a
    :class:`bigalign.storage.stores.EmbeddingArray` that reading needs, so that
    :func:`bigalign.storage.stores.read_rows` and the planner serve both (a numpy "chunk" is a row).
    """

    def __init__(self, array: np.ndarray, side: str):
        if array.ndim != 2 or array.shape[0] == 0 or array.shape[1] == 0:
            raise InputError(f"{side}: expected a non-empty 2-D (rows, dim) array, "
                             f"got shape {array.shape}")
        self.array, self.side, self.url = array, side, f"<{side} array>"
        self.rows, self.dim = array.shape
        self.dtype = array.dtype
        self.row_step = 1
        self.row_bytes = self.dim * array.dtype.itemsize


def open_embeddings(source, *, side: str = "source", storage_options: Optional[dict] = None,
                    check_chunks: bool = True) -> EmbeddingArray:
    """Open and validate an embedding array: a path or fsspec URL (Zarr v2 or v3), or an
    already open zarr.Array (or an in-memory input already adapted,
    :mod:`bigalign.storage.in_memory`). Raises InputError saying what is wrong and where."""
    if isinstance(source, EmbeddingArray):
        return source
    if hasattr(source, "shape") and hasattr(source, "chunks") and hasattr(source, "metadata"):
        arr, url = source, str(source.store_path)
    elif not isinstance(source, (str, os.PathLike)):  # a numpy array, a list, ...
        raise InputError(f"{side}: a {type(source).__module__}.{type(source).__name__}"
                         + (f" of shape {tuple(source.shape)}" if hasattr(source, "shape")
                            else "") + " is not an input here: give a path or URL of a Zarr "
                         "array or embedding store, or an open zarr.Array (in memory: "
                         "zarr.array(x, chunks=(rows, dim)))")
    else:
        url = str(source)
        so = options_for(url, storage_options)  # a bad storage option: named, not wrapped
        try:
            arr = _retrying(f"{side} {url!r}: cannot open it",
                            lambda: zarr.open_array(url, mode="r", storage_options=so),
                            transient_only=True)
        except TransientError:
            raise
        except FileNotFoundError as e:
            raise InputError(f"{side} {url!r}: no such Zarr array (path not found)") from e
        except Exception as e:  # zarr raises several kinds for "not an array"
            if isinstance(e, ImportError):
                raise InputError(f"{side} {url!r}: cannot open this URL ({e})") from e
            damaged = damaged_metadata(f"{side} {url!r}", url, storage_options, e)
            if damaged is not None:
                raise damaged from e
            kind = _node_kind(url, storage_options)
            what = f"a Zarr {kind}, not an array" if kind else f"not a readable Zarr array ({e})"
            raise InputError(f"{side} {url!r}: {what}") from e
    emb = EmbeddingArray(arr, url, side, check_chunks=check_chunks)
    if arr.ndim != 2:
        raise InputError(f"{side} {url!r}: expected a 2-D (rows, dim) array, got shape {emb.shape}")
    if emb.dtype not in [np.dtype(t) for t in FLOAT_DTYPES]:  # any byte order
        raise InputError(f"{side} {url!r}: dtype {emb.stored_dtype} is not float16, float32 "
                         "or float64")
    if emb.rows == 0 or emb.dim == 0:
        raise InputError(f"{side} {url!r}: empty array, shape {emb.shape}")
    if arr.chunks[1] != emb.dim:
        raise InputError(f"{side} {url!r}: chunks {arr.chunks} split the embedding dimension; "
                         f"bigalign needs whole rows per chunk (chunks=(rows, {emb.dim}))")
    if check_chunks:
        listing = list_objects(arr)
        _check_no_missing(emb, listing[1])
        emb = EmbeddingArray(arr, url, side, check_chunks=True,
                             witness=content_witness(arr, listing))
    return emb


#: Zarr metadata files (v3, then v2)
_METADATA_FILES = ("zarr.json", ".zarray", ".zgroup", ".zattrs")


def damaged_metadata(what: str, url, storage_options, error: BaseException) -> Optional[InputError]:
    """When ``error`` is a JSON decoding error (Zarr read a truncated or damaged
    ``zarr.json``), an InputError saying so and naming the file: the metadata of the node at
    ``url`` or of one of its direct members (an embedding store's ``embeddings``, a
    transform's ``rotation``), found by reading those few small files; ``what`` starts the
    message (e.g. "source '/data/a.zarr'"). None for any other error."""
    if not isinstance(error, json.JSONDecodeError):
        return None
    bad = None
    try:
        import fsspec

        fs, root = fsspec.core.url_to_fs(str(url), **(options_for(url, storage_options) or {}))
        root = root.rstrip("/")
        candidates = [f"{root}/{n}" for n in _METADATA_FILES] + sorted(
            p for n in _METADATA_FILES for p in fs.glob(f"{root}/*/{n}"))
        for path in candidates:
            try:
                json.loads(fs.cat_file(path))
            except FileNotFoundError:
                continue
            except ValueError:
                bad = f"{str(url).rstrip('/')}{path[len(root):]}"
                break
    except Exception:  # noqa: BLE001 - naming the file is a courtesy; the error stands
        pass
    where = repr(bad) if bad else f"a zarr.json under {str(url)!r}"
    return InputError(f"{what}: the Zarr metadata {where} is not valid JSON ({error}); the "
                      "file is truncated or damaged")


def _node_kind(url, storage_options) -> Optional[str]:
    try:
        zarr.open_group(url, mode="r", storage_options=options_for(url, storage_options))
        return "group"
    except Exception:
        return None


def _key_pattern(arr) -> tuple[str, str]:
    """(prefix, suffix) around the row index in the store key of a chunk (a shard when
    sharded) of a whole-row array (2-D, or 1-D ids), from the metadata's public
    ``encode_chunk_key``: ``c/12/0`` -> ("c/", "/0"); Zarr v2 ``12.0`` -> ("", ".0")."""
    sentinel = 987654321
    key = arr.metadata.encode_chunk_key((sentinel,) + (0,) * (arr.ndim - 1))
    pre, _, post = key.partition(str(sentinel))
    return pre, post


def stored_chunk_bytes(arr) -> Optional[int]:
    """The exact size in bytes of every stored chunk of ``arr`` when its codecs make it
    fixed (an unsharded array of a fixed-size dtype whose bytes-to-bytes codecs are at most
    ``crc32c``: rows x dim x itemsize, plus 4), else None (compressed, sharded or variable-
    length chunks: only their existence and a non-zero size can be checked from a listing).
    Zarr 3 stores edge chunks whole, so the last chunk has the same size."""
    meta = arr.metadata
    if getattr(arr, "shards", None) or getattr(meta, "zarr_format", 3) != 3:
        return None
    try:
        itemsize = np.dtype(arr.dtype).itemsize
        if np.dtype(arr.dtype).kind not in "fiub":
            return None
        names = [c["name"] if isinstance(c, dict) else c
                 for c in meta.to_dict().get("codecs", [])]
    except Exception:
        return None
    if not names or names[0] != "bytes" or any(n != "crc32c" for n in names[1:]):
        return None
    return int(np.prod(arr.chunks)) * itemsize + 4 * (len(names) - 1)


def unstored_chunks(arr, entries: Optional[list] = None, *,
                    sizes: bool = False) -> Optional[tuple[np.ndarray, int, int]]:
    """Which row chunks (shards when sharded) of a whole-row array (N, d) or (N,) have no
    stored object: (their indices, how many the grid has, rows per chunk), from ``entries``
    (:func:`list_objects`; one listing is taken when not given). None when the key encoding
    does not hold the row index in decimal (nothing can be said). Memory: one byte per chunk
    of the grid, whatever the key count. Finds a chunk (shard) file that is gone, not an
    inner chunk missing from a stored shard.

    ``sizes``: also count as unstored a chunk whose stored size is wrong: empty, or (where
    :func:`stored_chunk_bytes` knows it) not exactly the size its codecs give: a chunk
    truncated by storage damage. Same listing, no reads."""
    if entries is None:
        entries = list_objects(arr)[1]
    shards = getattr(arr, "shards", None)
    step = int((shards or arr.chunks)[0])  # keys are per shard when sharded
    rows = int(arr.shape[0])
    total = math.ceil(rows / step)
    present = np.zeros(total, dtype=bool)
    node = str(getattr(arr, "path", "") or "").strip("/")
    try:
        pre, post = _key_pattern(arr)
    except Exception:  # an encoding without the index in decimal
        return None
    exact = stored_chunk_bytes(arr) if sizes else None
    for rel, size, _ in entries:
        if node and rel.startswith(node + "/"):  # keys listed by the store, not the fs
            rel = rel[len(node) + 1:]
        if rel.startswith(pre) and rel.endswith(post):
            middle = rel[len(pre):len(rel) - len(post)] if post else rel[len(pre):]
            if middle.isdigit() and int(middle) < total:
                if sizes and (not size or (exact is not None and size != exact)):
                    continue
                present[int(middle)] = True
    return np.flatnonzero(~present), total, step


def describe_unstored(arr, what: str, entries: Optional[list] = None) -> Optional[str]:
    """``"N of T chunks of WHAT are not stored or truncated (first: rows a:b, key K)"`` for
    an array every chunk of which should be stored whole (written by bigalign with
    ``write_empty_chunks=True``), or None when all are (or nothing can be said). One
    listing (:func:`unstored_chunks` with ``sizes``)."""
    found = unstored_chunks(arr, entries, sizes=True)
    if found is None or not found[0].size:
        return None
    missing, total, step = found
    first = int(missing[0])
    unit = "shards" if getattr(arr, "shards", None) else "chunks"
    key = arr.metadata.encode_chunk_key((first,) + (0,) * (arr.ndim - 1))
    a = first * step
    return (f"{missing.size} of {total} {unit} of {what} are not stored or truncated "
            f"(first: rows {a}:{min(a + step, int(arr.shape[0]))}, {key})")


def _check_no_missing(emb: EmbeddingArray, entries: list) -> None:
    """Zarr reads a chunk that is not stored as its fill value, silently. Embeddings never
    legitimately have an all-fill chunk, so a missing one is an error, found up front from
    ``entries`` (:func:`list_objects`: the one listing the content witness uses too)."""
    arr = emb.array
    found = unstored_chunks(arr, entries)
    if found is None:
        return
    missing, total, step = found
    if missing.size:
        first = int(missing[0]) * step
        raise InputError(
            f"{emb.side} {emb.url!r}: {missing.size} of {total} chunks are not stored "
            f"(first missing: rows {first}:{min(first + step, emb.rows)}); Zarr would read them "
            f"as the fill value {arr.fill_value!r}. Re-create the missing chunks or pass "
            f"--allow-missing-chunks if that is intended.")


def _fill_rows(x: np.ndarray, fill) -> np.ndarray:
    """Which rows of ``x`` are entirely the fill value (NaN-aware)."""
    if fill is None:
        fill = 0
    fill = np.asarray(fill)
    if np.issubdtype(fill.dtype, np.floating) and np.isnan(fill):
        return np.isnan(x).all(axis=1)
    return (x == fill.astype(x.dtype)).all(axis=1)


def _check_read(emb: EmbeddingArray, start: int, x: np.ndarray) -> None:
    """The streaming missing-chunk check of rows [start, start + len(x)) just read: the
    first row read of each chunk is compared with the fill value, and only when it is all
    fill, the chunk's rows in this read; a chunk whose rows all read as the fill value
    raises InputError naming it. One row comparison per chunk."""
    step = emb.read_step
    stop = start + len(x)
    first = (start // step + 1) * step
    rows = np.array([start] + list(range(first, stop, step))) - start
    suspects = rows[_fill_rows(x[rows], emb.array.fill_value)]
    for r in suspects:
        a = start + int(r)
        c0 = a // step * step
        b = min(c0 + step, emb.rows)
        if a > c0 and a != start:
            continue
        if _fill_rows(x[a - start:min(b, stop) - start], emb.array.fill_value).all():
            where = f"rows {c0}:{b}"
            shard = emb.shard_rows
            inner = f" (an inner chunk of the shard at rows {c0 // shard * shard}:" \
                    f"{min(c0 // shard * shard + shard, emb.rows)})" if shard else ""
            raise InputError(
                f"{emb.side} {emb.url!r}: the chunk at {where}{inner} reads entirely as the "
                f"fill value {emb.array.fill_value!r}: it is not stored (deleted after the "
                "listing, or missing from its shard) or was stored as the fill value. "
                "Re-create it, or pass --allow-missing-chunks if that is intended.")


def parse_rows(rows, n: int) -> tuple[int, int]:
    """Row range from None, (start, stop) or 'START:STOP' (either side may be empty;
    negative values count from the end, like Python slices). Must be non-empty and inside
    the array: a bound past its ``n`` rows is an error, not silently clipped (a typo in a
    training split must not fit on fewer rows than asked for)."""
    if rows is None:
        return 0, n
    text = rows if isinstance(rows, str) else ":".join("" if r is None else str(r) for r in rows)
    if isinstance(rows, str):
        parts = rows.split(":")
        if len(parts) != 2:
            raise InputError(f"--rows {rows!r}: expected START:STOP, e.g. 0:100000")
        try:
            rows = tuple(int(p.replace("_", "")) if p.strip() else None for p in parts)
        except ValueError:
            raise InputError(f"--rows {rows!r}: START and STOP must be integers") from None
    if len(rows) != 2:
        raise InputError(f"row range {rows!r}: expected (start, stop)")
    bounds = []
    for name, value, default in (("start", rows[0], 0), ("stop", rows[1], n)):
        if value is None:
            bounds.append(default)
            continue
        value = int(value)
        absolute = value + n if value < 0 else value
        if not 0 <= absolute <= n:
            raise InputError(f"row range {text}: {name} {value} is outside the array's {n:,} "
                             f"rows (valid: -{n} to {n}; negative values count from the end)")
        bounds.append(absolute)
    start, stop = bounds
    if stop <= start:
        raise InputError(f"row range {text} is empty for an array of {n:,} rows")
    return start, stop


def validate_pair(source: EmbeddingArray, target: EmbeddingArray) -> None:
    """Paired arrays must have the same number of rows."""
    if source.rows != target.rows:
        raise InputError(f"source has {source.rows} rows but target has {target.rows}: "
                         "row i of source is paired with row i of target, so they must match")


def _retrying(what: str, fn, *, transient_only: bool = False):
    """Call ``fn``, retrying transient errors (:func:`bigalign.errors.is_transient`) with
    exponential backoff. A transient error that outlasts the retries raises
    :class:`TransientChunkReadError` (both a ChunkReadError and a TransientError: exit code
    75, a scheduler should retry); a wrong path or permission raises ChunkReadError (exit 2),
    as does any other error (a corrupt chunk: codec errors, wrong sizes) unless
    ``transient_only``, which re-raises it unchanged for the caller to explain."""
    retries, backoff = RETRIES, RETRY_BACKOFF
    for attempt in range(retries + 1):
        try:
            return fn()
        except Exception as e:
            if is_transient(e):
                if attempt < retries:
                    time.sleep(backoff * 2**attempt)
                    continue
                raise TransientChunkReadError(
                    f"{what} (after {attempt + 1} tries): {type(e).__name__}: {e}") from e
            if transient_only:
                raise
            # a wrong path or permission (retrying cannot help), or a corrupt chunk
            raise ChunkReadError(f"{what}: {type(e).__name__}: {e}") from e


#: The retry policy of every storage call (data and progress files alike).
retrying = _retrying


def _native(x) -> np.ndarray:
    """``x`` as numpy in native byte order (big-endian Zarr v2 rows would slow the GEMMs
    and differ in dtype from the engine's buffers)."""
    x = np.asarray(x)
    return x if x.dtype.isnative else x.astype(x.dtype.newbyteorder("="))


def read_rows(emb: EmbeddingArray, start: int, stop: int,
              out: Optional[np.ndarray] = None) -> np.ndarray:
    """Rows [start, stop) as numpy; transient I/O errors retried with exponential backoff,
    a persistent or decode error raised as ChunkReadError naming the array and rows.

    ``out``: a C-contiguous (stop - start, dim) buffer of the array's dtype to read into.
    Reused by the engine across blocks, it reads ~1.5x faster than fresh arrays (no page
    faults on new 32 MB allocations)."""
    what = f"cannot read {emb.side} rows {start}:{stop} of {emb.url!r}"
    if out is None or not hasattr(emb.array, "get_basic_selection"):
        x = _retrying(what, lambda: _native(emb.array[start:stop]))
    else:
        def into():
            emb.array.get_basic_selection(slice(start, stop),
                                          out=NDBuffer.from_numpy_array(out))
            return out

        x = _retrying(what, into)
    if getattr(emb, "check_chunks", False) and len(x):
        _check_read(emb, start, x)
    return x


def write_rows(arr, start: int, values: np.ndarray, *, url: str = "") -> None:
    """Write whole chunks [start, start + len(values)) of an output array, with retries."""
    stop = start + len(values)

    def put():
        arr[start:stop] = values

    _retrying(f"cannot write output rows {start}:{stop} of {url!r}", put)


def _compressors(compression: str, checksum: bool = True):
    """The bytes-to-bytes codecs of an array bigalign writes: the compressor ``compression``
    names (none, lz4, zstd), then, with ``checksum``, Zarr's ``crc32c`` codec: every stored
    chunk ends in the CRC-32C of its bytes, so a chunk damaged or truncated after it was
    written fails on read (``Stored and computed checksum do not match``, a ChunkReadError
    naming its rows) instead of being mapped or exported as garbage. Cost: 4 bytes a chunk
    and one CRC pass over each chunk written and read (measured in benchmarks/README.md).
    Arrays written without it (inputs of users, older outputs) read as before."""
    codecs = []
    if compression == "lz4":
        from zarr.codecs import BloscCodec
        codecs.append(BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"))
    elif compression == "zstd":
        from zarr.codecs import ZstdCodec
        codecs.append(ZstdCodec(level=3))
    elif compression not in (None, "none"):
        raise InputError(f"unknown compression {compression!r}; choose from {COMPRESSIONS}")
    if checksum:
        from zarr.codecs import Crc32cCodec
        codecs.append(Crc32cCodec())
    return codecs or None


def create_output(url: str, *, rows: int, dim: int, chunk_rows: int, dtype,
                  compression: str = "none", attributes: Optional[dict] = None,
                  overwrite: bool = False, storage_options: Optional[dict] = None,
                  shard_rows: Optional[int] = None):
    """Create an empty (rows, dim) output array from a template: whole-row chunks of
    ``chunk_rows`` (in shards of ``shard_rows`` when given: each written whole by one
    task), ``write_empty_chunks=True`` so every written chunk is stored (existence
    is never taken as proof of completion, but a written chunk should exist), NaN fill so an
    unwritten region reads as NaN rather than plausible zeros."""
    try:
        return zarr.create_array(
            url, shape=(rows, dim), chunks=(chunk_rows, dim), dtype=np.dtype(dtype),
            shards=(shard_rows, dim) if shard_rows else None,
            compressors=_compressors(compression), fill_value=np.nan,
            attributes=attributes or {}, overwrite=overwrite,
            config={"write_empty_chunks": True},
            storage_options=options_for(url, storage_options))
    except zarr.errors.ContainsArrayError as e:
        raise InputError(f"output {url!r} already exists (pass --overwrite to "
                         "replace it)") from e
    except zarr.errors.ContainsGroupError as e:
        raise InputError(f"output {url!r} already exists as a Zarr group") from e
