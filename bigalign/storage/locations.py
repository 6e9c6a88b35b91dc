"""Where things are: canonical locations, so that an output can never alias an input.

The same folder has many spellings: ``./a.zarr``, ``a.zarr/``, ``/data/../data/a.zarr``, a
symlink to it, ``file:///data/a.zarr``; an S3 key can be written ``s3://b/k``,
``s3a://b/k/`` or ``s3://b//k``. bigalign compares locations after resolving every spelling
to one canonical form, a :class:`Location` (protocol + real absolute path on local disks,
protocol + bucket/key on object stores), and refuses to start a run whose output or
checkpoint overlaps (equals, contains or lies inside) one of its inputs.

Pure functions over strings plus ``os.path.realpath``; no Zarr, no Dask.
"""

from __future__ import annotations

import os
import posixpath
import re
from dataclasses import dataclass
from typing import Mapping, Optional

from ..errors import InputError

__all__ = ["Location", "canonical", "canonical_url", "check_disjoint"]

#: Protocol aliases that name the same storage.
_ALIASES = {"local": "file", "s3a": "s3", "gcs": "gs", "abfs": "az", "abfss": "az"}


@dataclass(frozen=True)
class Location:
    """A canonical storage location: ``protocol`` ("file", "s3", "memory", ...) and
    ``path`` (absolute, no trailing slash, symlinks resolved on local disks; bucket/key on
    object stores)."""

    protocol: str
    path: str

    def contains(self, other: "Location") -> bool:
        """True when ``other`` is this location or lies inside it."""
        if self.protocol != other.protocol:
            return False
        if self.path in ("", "/"):
            return True
        return other.path == self.path or other.path.startswith(self.path + "/")

    def overlaps(self, other: "Location") -> bool:
        return self.contains(other) or other.contains(self)

    def __str__(self) -> str:
        return f"{self.protocol}://{self.path}"


def options_for(url, storage_options: Optional[dict]) -> Optional[dict]:
    """The fsspec ``storage_options`` to open ``url`` with: all of them for a URL of a
    remote file system (``s3://``, ``gs://``, ...), None for a local path. One set of
    options serves every path of a run (a local transform, an S3 corpus), and Zarr refuses
    options a local path cannot use."""
    if not storage_options or not isinstance(url, (str, os.PathLike)):
        return storage_options
    from fsspec.utils import get_protocol

    protocol = get_protocol(os.fspath(url))
    if protocol in ("file", "local"):
        return None
    if "::" not in os.fspath(url):
        check_storage_options(protocol, storage_options)
    return storage_options


#: (protocol, options) already checked by :func:`check_storage_options`
_CHECKED: set = set()


def check_storage_options(protocol: str, storage_options: dict) -> None:
    """Refuse (InputError naming it) a storage option that the ``protocol`` file system
    does not take: fsspec passes options on to the backend's constructor, and s3fs on to
    aiobotocore's session and client, which reject an unknown one only at the first
    request, where the TypeError read as "not a bigalign transform". The file system is
    built (and, for S3, its session and client, which makes no request) once per protocol
    and options; any other error there is left for the real operation to report."""
    import json

    key = (protocol, json.dumps(storage_options, sort_keys=True, default=repr))
    if key in _CHECKED:
        return
    try:
        import fsspec

        fs = fsspec.filesystem(protocol, **storage_options)
        if protocol in ("s3", "s3a") and callable(getattr(fs, "connect", None)):
            fs.connect()
    except TypeError as e:
        match = re.search(r"unexpected keyword argument '([^']+)'", str(e))
        bad = match.group(1) if match else None
        if bad in storage_options:
            raise InputError(f"--storage-option {bad}: not an option of the {protocol} "
                             f"filesystem ({type(e).__name__}: {e})") from None
        top = next((k for k, v in storage_options.items()
                    if isinstance(v, dict) and bad is not None and bad in json.dumps(v)), None)
        if top is not None:
            raise InputError(f"--storage-option {top}: {bad!r} is not an option there "
                             f"({type(e).__name__}: {e})") from None
    except Exception:  # noqa: BLE001 - not ours to judge here: the operation will say
        pass
    _CHECKED.add(key)


def canonical(url, storage_options: Optional[dict] = None) -> Location:
    """The canonical :class:`Location` of a path, fsspec URL, or open zarr.Array / Store.

    Local paths are made absolute with every symlink resolved (``os.path.realpath`` also
    resolves the existing part of a path that does not exist yet). Chained URLs
    (``simplecache::s3://...``) resolve to their last, storage, part."""
    url = _url_of(url)
    if "::" in url:
        url = url.rsplit("::", 1)[-1]
    match = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://(.*)$", url)
    if match is None or match.group(1).lower() in ("file", "local"):
        path = match.group(2) if match else url
        path = os.path.realpath(os.path.expanduser(path))
        return Location("file", path.rstrip("/") or "/")
    protocol = match.group(1).lower()
    protocol = _ALIASES.get(protocol, protocol)
    path = posixpath.normpath("/" + match.group(2)).lstrip("/")
    return Location(protocol, "" if path == "." else path)


def canonical_url(url, storage_options: Optional[dict] = None) -> str:
    """:func:`canonical` as one string: the real absolute path for local paths, and
    ``protocol://path`` for other fsspec URLs (what a transform records of its inputs)."""
    loc = canonical(url, storage_options)
    return loc.path if loc.protocol == "file" else str(loc)


def _url_of(obj) -> str:
    """The URL of a string, os.PathLike, zarr.Array (its store path) or zarr Store."""
    if isinstance(obj, (str, os.PathLike)):
        return os.fspath(obj)
    store_path = getattr(obj, "store_path", None)
    if store_path is not None:
        return str(store_path)
    return str(obj)


def check_disjoint(inputs: Mapping[str, object], outputs: Mapping[str, object],
                   storage_options: Optional[dict] = None) -> None:
    """Refuse outputs that overlap an input or each other.

    ``inputs`` / ``outputs``: name (as the user knows it, e.g. "source", "--checkpoint")
    -> location (path, URL or zarr object); None values are skipped. Raises InputError
    naming both sides and the canonical location they share."""
    ins = {k: canonical(v, storage_options) for k, v in inputs.items() if v is not None}
    outs = {k: canonical(v, storage_options) for k, v in outputs.items() if v is not None}
    for out_name, out in outs.items():
        for in_name, loc in ins.items():
            if out.overlaps(loc):
                raise InputError(
                    f"{out_name} {_show(outputs[out_name])} and {in_name} "
                    f"{_show(inputs[in_name])} are the same or nested locations ({out} / "
                    f"{loc}): bigalign never writes over its inputs. Choose another "
                    f"{out_name}.")
    names = list(outs)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            if outs[a].overlaps(outs[b]):
                raise InputError(f"{a} {_show(outputs[a])} and {b} {_show(outputs[b])} are "
                                 f"the same or nested locations ({outs[a]} / {outs[b]})")


def _show(obj) -> str:
    return repr(_url_of(obj))
