"""Writing a transform as plain arrays (``bigalign export TRANSFORM``), for serving stacks
that read them with plain numpy (or any language), no bigalign installed.

:func:`export`: the matrix M = scale * rotation and the two means of both directions,
forward (old -> new: documents) and, where it exists, the inverse (new -> old: queries for a
dual-read; :func:`bigalign.commands.compose.invert`), as ``.npz``, ``.json`` or
``.safetensors`` (written by hand, no dependency). Vectors are exported as Parquet by
:mod:`bigalign.commands.parquet_export`.
"""

from __future__ import annotations

import json
import logging
import os
import struct
import tempfile
import uuid
from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from ..errors import InputError
from ..storage.locations import check_disjoint
from ..storage.outputs import check_replaceable
from ..transform import (Transform, check_finite as _check_finite, models,
                         provenance as _provenance, show as _show, stamp as _stamp)
from .compose import TransformLike, digest, invert, load_transform

__all__ = ["export", "export_metadata", "ExportResult", "EXPORT_FORMAT", "FORMATS",
           "NUMPY_SNIPPET", "JSON_SNIPPET", "SAFETENSORS_SNIPPET", "SNIPPETS"]

log = logging.getLogger("bigalign")

EXPORT_FORMAT = "bigalign.export/1"
#: Formats of :func:`export` and the file suffix each is recognised by.
FORMATS = {"npz": ".npz", "json": ".json", "safetensors": ".safetensors"}
_ALIASES = {"npy": "npz"}
#: Output suffixes that name a format: the formats' own, and ".npy" for the npz archive (the
#: alias npy; ``np.load`` reads the archive whatever its name).
_SUFFIXES = {**{ext: name for name, ext in FORMATS.items()}, ".npy": "npz"}
#: JSON exports above this many (estimated) bytes get a warning
JSON_WARN_BYTES = 64 * 2**20

# The numpy lines that reproduce Transform.transform from an export. They are printed by
# `bigalign export`, shown in docs/transforms.md, and run verbatim by the tests; ``x`` is an
# (n, dA) array (or one (dA,) row) of the source model.
NUMPY_SNIPPET = '''\
import numpy as np

t = np.load("old2new.npz")   # written by: bigalign export old2new.transform -o old2new.npz
d = "forward"                # "forward": old -> new (documents); "inverse": new -> old (queries)
if t[f"{d}_normalize"]: x = x / np.linalg.norm(x, axis=-1, keepdims=True)
y = (x - t[f"{d}_source_mean"]) @ t[f"{d}_matrix"] + t[f"{d}_target_mean"]
# y = y / np.linalg.norm(y, axis=-1, keepdims=True)   # optional, as apply --renormalize
'''

JSON_SNIPPET = '''\
import json
import numpy as np

with open("old2new.json") as f:
    t = json.load(f)["forward"]      # or ["inverse"]: new -> old
if t["normalize"]: x = x / np.linalg.norm(x, axis=-1, keepdims=True)
y = (x - np.array(t["source_mean"])) @ np.array(t["matrix"]) + np.array(t["target_mean"])
'''

SAFETENSORS_SNIPPET = '''\
import numpy as np
from safetensors.numpy import load_file

t = load_file("old2new.safetensors")
d = "forward"                # "forward": old -> new (documents); "inverse": new -> old (queries)
if t[f"{d}.normalize"]: x = x / np.linalg.norm(x, axis=-1, keepdims=True)
y = (x - t[f"{d}.source_mean"]) @ t[f"{d}.matrix"] + t[f"{d}.target_mean"]
'''

SNIPPETS = {"npz": (NUMPY_SNIPPET, "old2new.npz"), "json": (JSON_SNIPPET, "old2new.json"),
            "safetensors": (SAFETENSORS_SNIPPET, "old2new.safetensors")}


# ---- export ---------------------------------------------------------------------------

@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote: ``path``, ``format``, ``bytes``, ``dims`` (dA, dB),
    ``inverse`` (its kind, or None), ``inverse_omitted`` (why there is none), and
    ``nothing_to_do`` (an identical export was already there)."""

    path: str
    format: str
    bytes: int
    dims: tuple
    dtype: str
    inverse: Optional[str]
    inverse_omitted: Optional[str]
    nothing_to_do: bool = False
    metadata: Optional[dict] = None


def _format_of(fmt: Optional[str], path) -> str:
    suffix = os.path.splitext(str(path).rstrip("/"))[1].lower()
    if fmt is None:
        if suffix in _SUFFIXES:
            return _SUFFIXES[suffix]
        raise InputError(f"cannot tell the export format from {str(path)!r}: pass --format "
                         "npz|json|safetensors or end the name in .npz (or .npy: the same npz "
                         "archive), .json or .safetensors")
    fmt = _ALIASES.get(str(fmt).lower(), str(fmt).lower())
    if fmt not in FORMATS:
        raise InputError(f"unknown export format {fmt!r}: expected npz (alias npy), json "
                         "or safetensors")
    if suffix in _SUFFIXES and _SUFFIXES[suffix] != fmt:
        raise InputError(f"output {str(path)!r} ends in {suffix} but the format is {fmt}: "
                         f"name it *{FORMATS[fmt]} or drop --format")
    return fmt


def _direction(t: Transform, dtype) -> dict:
    """The arrays of one direction: matrix = scale * rotation (dA, dB), the means, the
    normalize flag -- exactly what Transform.transform uses (matrix in float64, then cast)."""
    return {"matrix": np.ascontiguousarray((t.scale * t.rotation).astype(dtype)),
            "source_mean": np.asarray(t.source_mean, dtype=np.float64).astype(dtype),
            "target_mean": np.asarray(t.target_mean, dtype=np.float64).astype(dtype),
            "normalize": np.array(bool(t.normalize))}


def export(transform: TransformLike, path, format: Optional[str] = None, *,
           dtype: str = "float64", inverse: bool = True, allow_lossy: bool = False,
           overwrite: bool = False, storage_options: Optional[dict] = None) -> ExportResult:
    """Write ``transform`` as plain arrays for serving stacks without bigalign.

    path : a local path or fsspec URL; format : "npz" (alias "npy"), "json" or
    "safetensors" (default: from the suffix; ".npy" gets the npz archive). Each file holds
    the *forward* direction (source -> target, old -> new: for documents) and, unless
    ``inverse=False``, the *inverse* (target -> source, new -> old: for queries in a
    dual-read) where one exists (see :func:`invert`; lossy pseudo-inverses only with
    ``allow_lossy``; otherwise the file says why it has none). Per direction: ``matrix`` = scale * rotation (d_in, d_out),
    ``source_mean`` (d_in,), ``target_mean`` (d_out,) in ``dtype`` (float64 default, or
    float32), and ``normalize`` (bool): ``y = (normalize(x) - source_mean) @ matrix +
    target_mean`` is Transform.transform (see NUMPY_SNIPPET).

    Layouts (names per direction ``forward`` / ``inverse``):

    - npz: arrays ``{direction}_{matrix,source_mean,target_mean,normalize}``, plus
      ``format`` (the string "bigalign.export/1") and ``metadata`` (a JSON string); no
      pickles (``np.load`` with its default allow_pickle=False reads it).
    - json: ``{"format", "version": 1, "metadata": {...}, "forward": {"normalize",
      "dims", "source_mean", "target_mean", "matrix": [[row], ...]}, "inverse": {...} or
      null}``; floats printed with round-trip precision. Large: ~20 bytes a number.
    - safetensors: tensors ``{direction}.{matrix,source_mean,target_mean}`` (F64 or F32)
      and ``{direction}.normalize`` (BOOL, shape []), ``__metadata__`` = {format, version,
      source_model, target_model, bigalign (the metadata as JSON)}.

    The file is written under a temporary name and renamed into place, so a crash never
    leaves a half-written file under ``path``. An existing file is replaced only if it is a
    bigalign export and ``overwrite``; an identical export (same transform and options) is a
    no-op; anything else there is refused."""
    so = storage_options
    t, tpath = load_transform(transform, so)
    fmt = _format_of(format, path)
    if str(dtype) not in ("float32", "float64"):
        raise InputError(f"export dtype {dtype!r}: a transform exports in float32 or float64 "
                         "(float16 is for vectors exported as Parquet, not for a transform)")
    dtype = str(dtype)
    if tpath is not None:
        check_disjoint({"transform": tpath}, {"output": path}, so)
    _check_finite(t, "transform")
    fingerprint = {"operation": "export", "transform": digest(t), "format": fmt,
                   "dtype": dtype, "inverse": bool(inverse), "allow_lossy": bool(allow_lossy)}
    existing = _existing_export(path, fingerprint, overwrite, so)
    if existing is not None:
        inv = existing.get("inverse") or {}
        return ExportResult(str(path), fmt, existing.get("bytes", 0), tuple(t.dims), dtype,
                            inv.get("kind"), inv.get("omitted"), True, existing)
    inv_t, omitted = None, None
    if inverse:
        try:
            inv_t = invert(t, allow_lossy=allow_lossy)
        except InputError as e:
            omitted = str(e)
    else:
        omitted = "not requested (--no-inverse)"
    meta = _export_metadata(t, tpath, inv_t, omitted, dtype, fingerprint)
    d_a, d_b = t.dims
    directions = {"forward": _direction(t, dtype)}
    if inv_t is not None:
        directions["inverse"] = _direction(inv_t, dtype)
    if fmt == "json":
        size = sum(d["matrix"].size + d["source_mean"].size + d["target_mean"].size
                   for d in directions.values()) * (24 if dtype == "float64" else 20)
        if size > JSON_WARN_BYTES:
            log.warning("the JSON export will be about %.0f MB (%d x %d, %d direction(s)); "
                        "npz or safetensors holds the same in %.0f MB and loads far faster",
                        size / 2**20, d_a, d_b, len(directions),
                        sum(d["matrix"].nbytes for d in directions.values()) / 2**20)
    writer = {"npz": _write_npz, "json": _write_json, "safetensors": _write_safetensors}[fmt]
    nbytes = _publish(path, lambda f: writer(f, meta, directions), so)
    return ExportResult(str(path), fmt, nbytes, (d_a, d_b), dtype,
                        None if inv_t is None else meta["inverse"]["kind"], omitted, False, meta)


def _export_metadata(t: Transform, tpath: Optional[str], inv_t: Optional[Transform],
                     omitted: Optional[str], dtype: str, fingerprint: dict) -> dict:
    """The ``metadata`` an export file carries (JSON-able): dims, dtype, models, what each
    direction computes, the inverse's kind (or why there is none), provenance, the job stamp."""
    d_a, d_b = t.dims
    source_model, target_model = models(t)
    inv_info = {"omitted": omitted} if inv_t is None else \
        {k: v for k, v in inv_t.metadata["inverse"].items() if k != "orthonormal"}
    meta = {"format": EXPORT_FORMAT, "dims": [d_a, d_b], "dtype": dtype,
            "scale": t.scale, "normalize": t.normalize,
            "source_model": source_model, "target_model": target_model,
            "forward": f"source -> target ({d_a} -> {d_b}"
                       + (f", {_show(source_model)} -> {_show(target_model)}"
                          if source_model is not None or target_model is not None else "")
                       + "): y = (normalize(x) - source_mean) @ matrix + target_mean",
            "inverse": inv_info, "transform": _provenance(t, tpath),
            "transform_options": t.options}
    return _jsonable(_stamp(meta, "export", {k: v for k, v in fingerprint.items()
                                             if k != "operation"}))


def _jsonable(obj):
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist")
                                 else str(o)))


# ---- writers: each writes one whole file to a binary file object ----------------------

def _write_npz(f, meta: dict, directions: dict) -> None:
    arrays = {"format": np.array(EXPORT_FORMAT), "metadata": np.array(json.dumps(meta))}
    for name, d in directions.items():
        for key, value in d.items():
            arrays[f"{name}_{key}"] = value
    np.savez(f, **arrays)


_JSON_HEAD = ('{"format": "%s", "version": 1,\n' % EXPORT_FORMAT).encode()
_JSON_META = b'"metadata": '


def _write_json(f, meta: dict, directions: dict) -> None:
    """One direction after the other, a matrix row a line, so that writing needs no more
    memory than the arrays; line 2 holds the metadata (read back without parsing the rest)."""
    f.write(_JSON_HEAD)
    f.write(_JSON_META + json.dumps(meta, allow_nan=False).encode() + b",\n")
    for i, name in enumerate(("forward", "inverse")):
        d = directions.get(name)
        f.write(f'"{name}": '.encode())
        if d is None:
            f.write(b"null")
        else:
            m = d["matrix"]
            dump = lambda a: json.dumps(a.tolist(), allow_nan=False)  # noqa: E731
            f.write(f'{{"normalize": {json.dumps(bool(d["normalize"]))}, "dims": '
                    f'[{m.shape[0]}, {m.shape[1]}],\n"source_mean": {dump(d["source_mean"])},'
                    f'\n"target_mean": {dump(d["target_mean"])},\n"matrix": ['.encode())
            for r in range(m.shape[0]):
                f.write(("\n" if r == 0 else ",\n").encode() + dump(m[r]).encode())
            f.write(b"]}")
        f.write(b",\n" if i == 0 else b"}\n")


_ST_DTYPES = {np.dtype("float64"): "F64", np.dtype("float32"): "F32", np.dtype("bool"): "BOOL"}


def _write_safetensors(f, meta: dict, directions: dict) -> None:
    """The safetensors layout (https://github.com/huggingface/safetensors): an 8-byte
    little-endian header length N, N bytes of JSON header (padded with spaces to a multiple
    of 8, so the data starts 8-byte aligned), then the tensors' raw little-endian C-order
    bytes, back to back; each header entry {dtype, shape, data_offsets: [begin, end)}
    relative to the data start. Floats first and the 1-byte flags last, so every float
    tensor stays aligned."""
    tensors = [(f"{name}.{key}", d[key]) for name, d in directions.items()
               for key in ("matrix", "source_mean", "target_mean")]
    tensors += [(f"{name}.normalize", d["normalize"]) for name, d in directions.items()]
    header: dict = {"__metadata__": {
        "format": EXPORT_FORMAT, "version": "1", "bigalign": json.dumps(meta),
        **{k: (v if isinstance(v, str) else json.dumps(v))
           for k in ("source_model", "target_model") if (v := meta.get(k)) is not None}}}
    offset = 0
    for name, a in tensors:
        header[name] = {"dtype": _ST_DTYPES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + a.nbytes]}
        offset += a.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)
    for _, a in tensors:
        f.write(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes())


# ---- reading an export's metadata back (is a file ours?) -------------------------------

def export_metadata(path, storage_options: Optional[dict] = None) -> Optional[dict]:
    """The metadata of a bigalign export at ``path`` (any of the three formats), or None
    when the file is not one (or cannot be read). Reads the header only; adds ``bytes``."""
    import fsspec

    try:
        fs, p = fsspec.core.url_to_fs(str(path), **(storage_options or {}))
        with fs.open(p, "rb") as f:
            for reader in (_npz_meta, _json_meta, _safetensors_meta):
                f.seek(0)
                try:
                    meta = reader(f)
                except Exception:
                    meta = None
                if isinstance(meta, dict) and meta.get("format") == EXPORT_FORMAT:
                    return dict(meta, bytes=fs.size(p))
    except Exception:
        return None
    return None


def _npz_meta(f) -> Optional[dict]:
    if f.read(2) != b"PK":
        return None
    f.seek(0)
    with np.load(f, allow_pickle=False) as z:
        if "format" in z.files and str(z["format"][()]) == EXPORT_FORMAT:
            return json.loads(str(z["metadata"][()]))
    return None


def _json_meta(f) -> Optional[dict]:
    if f.read(len(_JSON_HEAD)) != _JSON_HEAD:
        return None
    line = f.readline()
    if not line.startswith(_JSON_META):
        return None
    return json.loads(line[len(_JSON_META):].rstrip().rstrip(b","))


def _safetensors_meta(f) -> Optional[dict]:
    (n,) = struct.unpack("<Q", f.read(8))
    if n > 100 * 2**20:
        return None
    md = json.loads(f.read(n)).get("__metadata__") or {}
    return json.loads(md["bigalign"]) if md.get("format") == EXPORT_FORMAT else None


def _existing_export(path, fingerprint: dict, overwrite: bool, so) -> Optional[dict]:
    """Metadata of an identical export already at ``path`` (a no-op), else None when the
    path may be written; InputError for a foreign file, a folder, or another export
    without ``overwrite``."""
    import fsspec

    fs, p = fsspec.core.url_to_fs(str(path), **(so or {}))
    if not fs.exists(p):
        return None
    if fs.isdir(p):
        node = check_replaceable(path, "export output", so, kinds=())  # foreign: raises
        raise InputError(f"export output {str(path)!r} is a folder"
                         + (f" (a bigalign {node.kind})" if node.ours else "") +
                         ": an export is one file; choose another name")
    meta = export_metadata(path, so)
    if meta is None:
        raise InputError(
            f"export output {str(path)!r} already exists and was not written by bigalign "
            "export: bigalign deletes only what it wrote, even with --overwrite. Remove it "
            "yourself or choose another name.")
    stored = (meta.get("job") or {}).get("fingerprint")
    if stored == fingerprint:
        log.warning("%s is already an export of the same transform with the same options: "
                    "nothing to do", path)
        return meta
    if not overwrite:
        raise InputError(f"export output {str(path)!r} already exists (a bigalign export of "
                         "another transform or with other options); pass --overwrite "
                         "to replace it")
    return None


def _publish(path, write: Callable, so) -> int:
    """Write a whole file atomically: into a temporary file (in the target folder on a
    local disk, flushed and fsynced), then renamed over ``path`` (os.replace); elsewhere
    uploaded under a temporary name and moved into place (an object store publishes an
    object only when its upload completes). Returns its size in bytes."""
    import fsspec
    from fsspec.implementations.local import LocalFileSystem

    fs, p = fsspec.core.url_to_fs(str(path), **(so or {}))
    local = isinstance(fs, LocalFileSystem)
    name = os.path.basename(p.rstrip("/"))
    folder = os.path.dirname(p) if local else None
    if local and folder:
        os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".bigalign-tmp", dir=folder)
    remote_tmp = None
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        size = os.path.getsize(tmp)
        if local:
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would hide it from a server
            os.replace(tmp, p)
            _fsync_dir(folder)
        else:
            remote_tmp = f"{p}.{uuid.uuid4().hex[:12]}.bigalign-tmp"
            fs.put_file(tmp, remote_tmp)
            fs.mv(remote_tmp, p)
            remote_tmp = None
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if remote_tmp is not None:
            try:
                fs.rm(remote_tmp)
            except Exception:  # best effort: the temporary name never looks finished
                pass
    return size


def _fsync_dir(folder) -> None:
    try:
        fd = os.open(folder or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
