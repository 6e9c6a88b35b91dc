"""The Transform artifact: what a fit produces and an apply uses.

A Transform maps a source row x (dA,) to the target space (dB,):

    y = (normalize(x) - source_mean) * scale @ rotation + target_mean

with ``normalize`` the optional row L2-normalisation the fit used. It is saved as a small
Zarr group: arrays ``rotation`` (dA, dB), ``source_mean`` (dA,), ``target_mean`` (dB,),
``singular_values`` and JSON attributes ``bigalign`` = {format, options, metadata}.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from .errors import DamagedOutputError, InputError, is_transient
from .maths.stats import Moments
from .maths.mapping import map_rows

from .storage.outputs import TRANSFORM_FORMAT as FORMAT  # noqa: E402
from .storage.locations import options_for  # noqa: E402

__all__ = ["Transform", "FORMAT"]


@dataclass
class Transform:
    """A fitted alignment (scikit-learn style: learned attributes are plain fields).

    rotation : (dA, dB) float64, orthonormal rows (dA <= dB) or columns (dA > dB).
    source_mean : (dA,) float64, zeros unless the fit centred.
    target_mean : (dB,) float64, zeros unless the fit centred.
    scale : float, 1.0 unless a similarity scale was fitted.
    options : the fit options (center, normalize, scale, reflection, rows, ...).
    metadata : n_pairs, dims, singular values summary, residuals, discrepancy, version, ...
    statistics : the training set's sufficient statistics (bigalign.maths.stats.Moments, float64,
        d x d matrices), saved with the transform so baselines and diagnostics need no
        second pass over the data; None for a transform built by hand.
    """

    rotation: np.ndarray
    source_mean: np.ndarray
    target_mean: np.ndarray
    scale: float = 1.0
    options: dict = field(default_factory=dict)
    metadata: dict = field(default_factory=dict)
    singular_values: Optional[np.ndarray] = None
    statistics: Optional[Moments] = None  # the fit's d x d sums: baselines, re-solves

    @property
    def dims(self) -> tuple[int, int]:
        return self.rotation.shape

    @property
    def normalize(self) -> bool:
        return bool(self.options.get("normalize", False))

    def matrix(self, dtype=np.float32) -> np.ndarray:
        """scale * rotation in the compute dtype for output ``dtype``."""
        work = np.float64 if np.dtype(dtype) == np.float64 else np.float32
        return (self.scale * self.rotation).astype(work)

    def transform(self, x, *, dtype=None, renormalize: bool = False,
                  target_centred: bool = False) -> np.ndarray:
        """Map an in-memory block (n, dA) or a single row (dA,) exactly as ``apply`` does.

        ``target_centred`` leaves out ``+ target_mean``: the result lives in the target's
        centred space (search it among native target vectors minus ``target_mean``)."""
        x = np.asarray(x)
        if x.dtype.kind not in "fiu":  # complex, bool, object, strings: not vectors
            raise InputError(f"expected real-valued rows (float or integer), got dtype "
                             f"{x.dtype}")
        single = x.ndim == 1
        x2 = x[None, :] if single else x
        if x2.ndim != 2 or x2.shape[1] != self.dims[0]:
            raise InputError(f"expected rows of dimension {self.dims[0]}, got shape "
                             f"{x.shape}")
        if dtype is None:
            dtype = np.float64 if x.dtype == np.float64 else np.float32
        try:
            ok = np.dtype(dtype) in (np.float16, np.float32, np.float64)
        except TypeError:
            ok = False
        if not ok:  # an integer dtype would truncate every mapped value (to 0, mostly)
            raise InputError(f"dtype must be float16, float32 or float64, got {dtype!r}")
        y = map_rows(x2, self.matrix(dtype), self.source_mean,
                     self.output_mean(target_centred), normalize=self.normalize,
                     renormalize=renormalize, dtype=dtype)
        return y[0] if single else y

    __call__ = transform

    def digest(self) -> str:
        """SHA-256 of what the map computes: rotation and means (float64 bytes), scale,
        normalize. Identifies a transform in apply fingerprints and registry records."""
        import hashlib

        h = hashlib.sha256()
        for a in (self.rotation, self.source_mean, self.target_mean):
            h.update(np.ascontiguousarray(a, dtype=np.float64).tobytes())
        h.update(repr((self.scale, self.normalize)).encode())
        return h.hexdigest()

    def output_mean(self, target_centred: bool = False) -> np.ndarray:
        """What is added after the rotation: target_mean, or zeros in the centred space."""
        return np.zeros_like(self.target_mean) if target_centred else self.target_mean

    def inverse(self, *, allow_lossy: bool = False) -> "Transform":
        """The map back from target to source space (see :func:`bigalign.algebra.invert`):
        exact when dA == dB; for dA < dB a left inverse (exact on this map's image, a
        projection onto it elsewhere); for dA > dB or normalize=True refused as lossy unless
        ``allow_lossy``. Model stamps are swapped."""
        from .algebra import invert

        return invert(self, allow_lossy=allow_lossy)

    def then(self, other: "Transform", *, allow_model_mismatch: bool = False) -> "Transform":
        """This map followed by ``other`` (a Transform, or a path to one), as one Transform
        (see :func:`bigalign.algebra.compose`): ``self.then(other)(x) == other(self(x))``."""
        from .algebra import compose

        if not isinstance(other, Transform):
            other = Transform.load(os.fspath(other) if isinstance(other, os.PathLike)
                                   else str(other))
        return compose(self, other, allow_model_mismatch=allow_model_mismatch)

    # ---- storage ------------------------------------------------------------------
    def save(self, path, *, overwrite: bool = False, storage_options: Optional[dict] = None) -> None:
        """Write as a Zarr group at a local path or fsspec URL."""
        import zarr

        from .storage.outputs import TRANSFORM_KINDS, check_replaceable

        check_replaceable(path, "transform output", storage_options,  # never a user's node
                          kinds=TRANSFORM_KINDS)
        statistics = self.statistics  # read (if lazy) before a save over its own source
        try:
            group = zarr.open_group(path, mode="w" if overwrite else "w-",
                                    storage_options=options_for(path, storage_options))
        except (FileExistsError, zarr.errors.ContainsGroupError,
                zarr.errors.ContainsArrayError):
            raise InputError(f"transform output {str(path)!r} already exists (a transform); "
                             "pass overwrite=True (--overwrite) to replace it") from None
        # first, so a save cut short is recognisably bigalign's (and not loadable)
        group.attrs["bigalign"] = {"format": FORMAT, "state": "writing"}
        for name in ("rotation", "source_mean", "target_mean", "singular_values"):
            value = getattr(self, name)
            if value is not None:  # every chunk stored, zeros too: a missing one is damage
                group.create_array(name, data=np.asarray(value, dtype=np.float64),
                                   compressors=_checksummed(),
                                   config={"write_empty_chunks": True})
        if statistics is not None:
            stats = group.create_group("statistics")
            for name, value in statistics.to_arrays().items():
                stats.create_array(name, data=np.asarray(value, dtype=np.float64)
                                   if name != "n" else np.asarray(value),
                                   compressors=_checksummed())
        # the attribute goes last: a group without it is an unfinished save. ``sha256``
        # (the digest) lets load find a chunk lost since (Zarr would read it as zeros)
        group.attrs["bigalign"] = _jsonable({
            "format": FORMAT, "scale": self.scale, "options": self.options,
            "metadata": self.metadata, "sha256": self.digest()})

    @classmethod
    def load(cls, path, *, storage_options: Optional[dict] = None) -> "Transform":
        """Read a Transform saved with :meth:`save`. Anything else at ``path`` (nothing, a
        plain Zarr array such as embeddings or an apply output, a foreign group, an
        unfinished save) raises InputError saying what is there. A transform whose rotation
        or means no longer match the SHA-256 recorded when it was saved (a chunk deleted:
        Zarr reads it as zeros; or changed) raises DamagedOutputError (its ``lost`` says
        what); transforms saved before the digest was recorded are not checked.

        ``path`` may also be a registry (:mod:`bigalign.storage.registry`): its current version is
        loaded, and ``metadata["registry"]`` says which. The training statistics
        (``statistics``: d x d matrices, ~400 MB at d = 4096) are read only when first
        accessed; mapping vectors never needs them."""
        import zarr

        registry = None
        if isinstance(path, (str, os.PathLike)):  # a registry stands for its current version
            from .storage.registry_read import resolve_transform
            path, registry = resolve_transform(os.fspath(path), storage_options)
        so = options_for(path, storage_options)  # a bad storage option: named, not wrapped
        try:
            group = zarr.open_group(path, mode="r", storage_options=so)
        except Exception as e:
            if is_transient(e):
                raise  # storage did not answer: not the user's mistake (exit code 75)
            raise InputError(_not_a_transform(path, storage_options, e)) from e
        attrs = group.attrs.get("bigalign")
        if not isinstance(attrs, dict) or attrs.get("format") != FORMAT or \
                attrs.get("state") == "writing":
            raise InputError(f"{path!r} is not a complete bigalign transform "
                             f"(missing or unknown 'bigalign' attribute)")
        try:
            arrays = {k: np.asarray(group[k][...]) for k in
                      ("rotation", "source_mean", "target_mean", "singular_values") if k in group}
            statistics = None
            if "statistics" in group:
                statistics = _LazyStatistics(os.fspath(path), storage_options) \
                    if isinstance(path, (str, os.PathLike)) else _read_statistics(group)
        except Exception as e:
            if is_transient(e):
                raise
            if isinstance(e, json.JSONDecodeError):  # a member's truncated zarr.json
                raise InputError(_not_a_transform(path, storage_options, e)) from e
            raise InputError(f"{path!r}: unreadable bigalign transform "
                             f"({type(e).__name__}: {e})") from e
        missing = [k for k in ("rotation", "source_mean", "target_mean") if k not in arrays]
        if missing:
            raise InputError(f"{path!r}: bigalign transform without {', '.join(missing)}")
        metadata = attrs.get("metadata", {})
        if registry is not None:
            metadata = dict(metadata, registry=registry)
        t = cls(arrays["rotation"], arrays["source_mean"], arrays["target_mean"],
                float(attrs["scale"]), attrs.get("options", {}), metadata,
                arrays.get("singular_values"), statistics)
        if attrs.get("sha256") is not None and t.digest() != attrs["sha256"]:
            lost = ("its rotation and means do not match the SHA-256 recorded when it was "
                    f"saved ({_unstored(group)})")
            error = DamagedOutputError(f"{path!r}: damaged bigalign transform: {lost}. Write "
                                       "it again (rerun the fit with --overwrite) or restore "
                                       "it.")
            error.lost = lost
            raise error
        return t


# ---- lazily loaded training statistics ------------------------------------------------
# ``Transform.statistics`` is a dataclass field whose value may be a _LazyStatistics: the
# property below reads the arrays on first access (and keeps them). Query-time users of
# Transform.load never pay for the d x d matrices; evaluate, baselines and save do.

class _LazyStatistics:
    """Reads the ``statistics`` group of a saved transform when called (picklable)."""

    def __init__(self, path: str, storage_options: Optional[dict]):
        self.path, self.storage_options = path, storage_options

    def __call__(self) -> Moments:
        import zarr

        try:
            return _read_statistics(zarr.open_group(
                self.path, mode="r", storage_options=options_for(self.path, self.storage_options)))
        except Exception as e:
            if is_transient(e):
                raise
            raise InputError(f"{self.path!r}: cannot read the transform's training statistics "
                             f"({type(e).__name__}: {e})") from e


def _read_statistics(group) -> Moments:
    stats = group["statistics"]
    return Moments.from_arrays({k: stats[k][...] for k in stats.array_keys()})


def _get_statistics(self) -> Optional[Moments]:
    value = self.__dict__.get("_statistics")
    if isinstance(value, _LazyStatistics):
        value = self.__dict__["_statistics"] = value()
    return value


def _set_statistics(self, value) -> None:
    self.__dict__["_statistics"] = value


def _del_statistics(self) -> None:  # back to the default: none
    self.__dict__["_statistics"] = None


Transform.statistics = property(_get_statistics, _set_statistics, _del_statistics, doc=(
    "The training set's sufficient statistics (bigalign.maths.stats.Moments), or None; read from "
    "storage on first access for a loaded transform."))


def _unstored(group) -> str:
    """Which chunks of a transform's rotation and means are not stored (``save`` stores
    every chunk), for the message about a damaged one: one listing of the group."""
    from .storage.stores import list_objects

    try:
        listed = {rel for rel, _, _ in list_objects(group)[1]}
        node = str(getattr(group, "path", "") or "").strip("/")
        gone, total = [], 0
        for name in ("rotation", "source_mean", "target_mean"):
            arr = group[name]
            for coords in np.ndindex(*arr.cdata_shape):
                key = f"{name}/{arr.metadata.encode_chunk_key(coords)}"
                total += 1
                if key not in listed and f"{node}/{key}" not in listed:
                    gone.append(key)
    except Exception as e:  # the check above already failed: say what can be said
        if is_transient(e):
            raise
        return "changed in place"
    return (f"{len(gone)} of {total} chunks not stored, first: {gone[0]}" if gone else
            "every chunk is stored: changed in place")


def _not_a_transform(path, storage_options, error: Exception) -> str:
    """What is at ``path`` instead of a transform, for the error message."""
    import zarr

    from .storage.stores import damaged_metadata

    damaged = damaged_metadata(repr(str(path)), path, storage_options, error)
    if damaged is not None:  # a truncated zarr.json
        return str(damaged)
    try:
        arr = zarr.open_array(path, mode="r", storage_options=options_for(path, storage_options))
    except Exception:
        if isinstance(error, FileNotFoundError):  # zarr's "no group here" is one too
            return f"no transform at {path!r} (no Zarr group there)"
        return f"{path!r} is not a bigalign transform ({type(error).__name__}: {error})"
    shape = "(" + ", ".join(str(n) for n in arr.shape) + ")"
    return (f"{path!r} is a Zarr array of shape {shape}, not a bigalign transform (a "
            "transform is the Zarr group written by 'bigalign fit')")


def _jsonable(obj: Any) -> Any:
    """Plain JSON types (numpy scalars and arrays become floats and lists)."""
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _checksummed():
    """A transform's arrays carry Zarr's crc32c codec, as every array bigalign writes
    (:func:`bigalign.storage.stores._compressors`): a damaged chunk fails on load."""
    from .storage.stores import _compressors
    return _compressors("none")
