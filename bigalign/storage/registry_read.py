"""Reading a registry (:mod:`bigalign.storage.registry`): where it keeps things, whether a
location holds one, its versions and records, and its current pointer.

The part of the registry that needs no Transform and takes no lock, so that
:meth:`bigalign.Transform.load` can stand a registry for its current version
(:func:`resolve_transform`) without importing the registry's writers, which save and load
Transforms (:class:`bigalign.storage.registry.Registry` builds on :class:`RegistryReader`).
"""

from __future__ import annotations

import json
import re
from typing import Optional

from .job import Job
from ..errors import BigalignError, InputError, TransientError

__all__ = ["RegistryReader", "is_registry", "resolve_transform", "version_name",
           "version_number", "FORMAT", "RECORD_FORMAT", "POINTER_FORMAT"]

FORMAT = "bigalign.registry/1"
RECORD_FORMAT = "bigalign.registry-version/1"
POINTER_FORMAT = "bigalign.registry-pointer/1"
_VERSION = re.compile(r"^v(\d{4,})$")


def version_name(number: int) -> str:
    """``v0001``-style name of version ``number`` (more digits past 9999)."""
    return f"v{number:04d}"


def version_number(name: str) -> int:
    match = _VERSION.match(str(name))
    if not match:
        raise InputError(f"{name!r} is not a version name (v0001, v0002, ...)")
    return int(match.group(1))


class RegistryReader:
    """Reading the registry at ``url`` (local path or fsspec URL); takes no lock."""

    def __init__(self, url, storage_options: Optional[dict] = None):
        self.url = str(url).rstrip("/")
        self.storage_options = storage_options or None
        # the job protocol's file helpers (retried reads, listings, atomic whole-file
        # writes, conditional creates) serve the registry's small files too
        self.files = Job(self.url, self.storage_options)

    # ---- where ------------------------------------------------------------------------
    def _path(self, *parts: str) -> str:
        return self.files._path(*parts)

    def _json(self, *parts: str) -> Optional[dict]:
        raw = self.files.get_file(self._path(*parts))
        if raw is None:
            return None
        try:
            value = json.loads(raw)
        except ValueError:
            raise InputError(f"{self.url}: {'/'.join(parts)} is not valid JSON") from None
        return value if isinstance(value, dict) else None

    def transform_url(self, version: str) -> str:
        return f"{self.url}/versions/{version}/transform"

    def run_url(self, run_id: str) -> str:
        return f"{self.url}/runs/{run_id}"

    # ---- is it one ----------------------------------------------------------------------
    def exists(self) -> bool:
        marker = self._json("registry.json")
        return bool(marker) and marker.get("format") == FORMAT

    def check(self) -> None:
        """Raise InputError unless a registry is at ``url``."""
        if not self.exists():
            raise InputError(f"no bigalign registry at {self.url!r} (no registry.json; "
                             "'bigalign realign' creates one on its first run)")

    # ---- versions ---------------------------------------------------------------------
    def _version_dirs(self) -> list[str]:
        """Names of every version folder, complete or not, oldest first."""
        return sorted((n for n in self.files.list_names("versions") if _VERSION.match(n)),
                      key=version_number)

    def versions(self) -> list[str]:
        """Complete versions (their record exists), oldest first."""
        return [v for v in self._version_dirs() if self.record(v, missing_ok=True)]

    def record(self, version: str, *, missing_ok: bool = False) -> Optional[dict]:
        """The record of ``version`` (InputError when there is none, unless missing_ok)."""
        version_number(version)
        record = self._json("versions", version, "record.json")
        if record is None and not missing_ok:
            have = ", ".join(self.versions()) or "none"
            raise InputError(f"{self.url}: no version {version} (versions: {have})")
        return record

    # ---- the current pointer ----------------------------------------------------------------
    def _generations(self) -> list[int]:
        return sorted(int(n[:-5]) for n in self.files.list_names("current")
                      if n.endswith(".json") and n[:-5].isdigit())

    def pointer(self, generation: Optional[int] = None) -> Optional[dict]:
        """The newest pointer record (or generation ``generation``), or None."""
        gens = self._generations()
        if not gens:
            return None
        g = gens[-1] if generation is None else generation
        return self._json("current", f"{g:012d}.json")

    def current(self) -> Optional[str]:
        """The current version's name, or None before the first publish."""
        pointer = self.pointer()
        return pointer.get("version") if pointer else None

    def require_current(self) -> str:
        self.check()
        current = self.current()
        if current is None:
            written = self.versions()
            raise InputError(f"registry {self.url!r} has no current version yet" + (
                f" (versions written but never made current: {', '.join(written)})"
                if written else " (nothing was published)"))
        return current

    def history(self) -> list[dict]:
        """Every pointer generation, oldest first: {generation, version, previous, action,
        run_id, time, ...}."""
        out = []
        for g in self._generations():
            p = self._json("current", f"{g:012d}.json")
            if p:
                out.append(p)
        return out


def is_registry(url, storage_options: Optional[dict] = None) -> bool:
    """True when ``url`` (a path or fsspec URL) holds a bigalign registry."""
    try:
        return RegistryReader(url, storage_options).exists()
    except TransientError:
        raise
    except (BigalignError, OSError, ValueError, ImportError):
        return False


def resolve_transform(path: str, storage_options: Optional[dict] = None):
    """``(path, None)`` for anything but a registry; for a registry, the URL of its current
    version's transform and {"url", "version"} (InputError when nothing is current)."""
    try:
        reg = RegistryReader(path, storage_options)
        if not reg.exists():
            return path, None
    except TransientError:
        raise  # storage did not answer: exit 75, not "no transform here"
    except (BigalignError, OSError, ValueError, ImportError):
        return path, None  # not a registry: Transform.load says what is there
    version = reg.require_current()
    return reg.transform_url(version), {"url": reg.url, "version": version}
