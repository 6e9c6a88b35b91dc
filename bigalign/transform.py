"""The Transform artifact: what a fit produces and an apply uses.

A Transform maps a source row x (dA,) to the target space (dB,):

    y = (normalize(x) - source_mean) * scale @ rotation + target_mean

with ``normalize`` the optional row L2-normalisation the fit used. It is saved as a small
Zarr group: arrays ``rotation`` (dA, dB), ``source_mean`` (dA,), ``target_mean`` (dB,),
``singular_values`` and JSON attributes ``bigalign`` = {format, options, metadata}.

Transforms made from transforms (``then``: compose; ``inverse``) are built at the end of
this module; ``bigalign compose|invert|export`` (:mod:`bigalign.commands.compose`, :mod:`bigalign.commands.map_export`) add
reading inputs and writing outputs.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Optional

import numpy as np

from .errors import DamagedOutputError, InputError, is_transient
from .execution.pairing import fitted_pairing
from .maths.affine import (ORTHONORMAL_TOL, compose_affine, inverse_rotation,
                           orthonormality_error, rank as rotation_rank)
from .maths.families import ORTHOGONAL
from .maths.stats import Moments
from .maths.mapping import map_rows

from .storage.outputs import TRANSFORM_FORMAT as FORMAT  # noqa: E402
from .storage.locations import options_for  # noqa: E402

__all__ = ["Transform", "FORMAT"]

log = logging.getLogger("bigalign")


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
        """The map back from target to source space (:func:`check_invertible`, :func:`inverted`):
        exact when dA == dB; for dA < dB a left inverse (exact on this map's image, a
        projection onto it elsewhere); for dA > dB or normalize=True refused as lossy unless
        ``allow_lossy``. Model stamps are swapped."""
        return inverted(self, check_invertible(self, allow_lossy=allow_lossy))

    def then(self, other: "Transform", *, allow_model_mismatch: bool = False) -> "Transform":
        """This map followed by ``other`` (a Transform, or a path to one), as one Transform
        (:func:`check_composable`, :func:`composed`): ``self.then(other)(x) == other(self(x))``."""
        if not isinstance(other, Transform):
            other = Transform.load(os.fspath(other) if isinstance(other, os.PathLike)
                                   else str(other))
        mismatch = check_composable(self, other, allow_model_mismatch=allow_model_mismatch)
        return composed(self, other, mismatch)

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
            raise InputError(_what_group_instead(path, group, attrs))
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


def _what_group_instead(path, group, attrs) -> str:
    """What the Zarr group at ``path`` is, when it is no complete transform (``attrs``: its
    ``bigalign`` attribute): an embedding store (imported, or apply's mapped vectors), an
    unfinished transform, a user's group holding embeddings, or a group bigalign did not
    write."""
    from .storage.outputs import _NAMES

    hint = " (a transform is the Zarr group written by 'bigalign fit', 'compose' or 'invert')"
    if isinstance(attrs, dict) and attrs.get("format") == FORMAT:  # state "writing"
        return (f"{path!r} is an unfinished transform (a save cut short): rerun the command "
                "that wrote it")
    if isinstance(attrs, dict) and attrs.get("kind") == "embedding-store":
        kind = "apply-store" if attrs.get("made_by") == "apply" else "embedding-store"
        name, maker = _NAMES[kind]
        return (f"{path!r} is {name} written by {maker}, not a bigalign transform: pass it "
                f"as the vectors (source, target or corpus), not as the transform{hint}")
    if "embeddings" in group:
        return (f"{path!r} is an embedding store (a group holding 'embeddings'), not a "
                f"bigalign transform{hint}")
    return (f"{path!r} is a Zarr group bigalign did not write (no 'bigalign' attribute), not a "
            f"complete bigalign transform{hint}")


def _jsonable(obj: Any) -> Any:
    """Plain JSON types (numpy scalars and arrays become floats and lists)."""
    return json.loads(json.dumps(obj, default=lambda o: o.tolist() if hasattr(o, "tolist") else str(o)))


def _checksummed():
    """A transform's arrays carry Zarr's crc32c codec, as every array bigalign writes
    (:func:`bigalign.storage.stores._compressors`): a damaged chunk fails on load."""
    from .storage.stores import _compressors
    return _compressors("none")


# ==== transforms made from transforms, in memory: compose (T1 then T2) and invert ==========
# What Transform.then / Transform.inverse do and what ``bigalign compose|invert``
# (bigalign.commands.compose, which adds reading inputs and writing outputs) call: the
# checks that refuse a derived map that would not mean what it says, the maths
# (bigalign.maths.affine), and what the result records (model stamps, provenance of its
# inputs, a job fingerprint). Each operation is two steps, the check (check_composable,
# check_invertible) and the build (composed, inverted), so that a command can find a finished
# output between them without computing anything.


def models(t: Transform) -> tuple:
    """The model stamps (source_model, target_model); None where not recorded."""
    m = t.metadata or {}
    return m.get("source_model"), m.get("target_model")


def check_finite(t: Transform, what: str) -> None:
    """InputError naming ``what`` when ``t``'s arrays hold NaN/Inf, its scale is 0 or not
    finite, or its means do not fit its rotation."""
    for name in ("rotation", "source_mean", "target_mean"):
        if not np.isfinite(np.asarray(getattr(t, name), dtype=np.float64)).all():
            raise InputError(f"{what}: its {name} holds NaN or Inf")
    if not (np.isfinite(t.scale) and t.scale != 0):
        raise InputError(f"{what}: its scale is {t.scale!r}")
    d_a, d_b = t.dims
    if t.source_mean.shape != (d_a,) or t.target_mean.shape != (d_b,):
        raise InputError(f"{what}: means of shapes {t.source_mean.shape} and "
                         f"{t.target_mean.shape} do not fit a {d_a} x {d_b} rotation")


def provenance(t: Transform, path: Optional[str]) -> dict:
    """What a derived transform records about one of its inputs."""
    m = t.metadata or {}
    source_model, target_model = models(t)
    out = {"path": path, "digest": t.digest(), "dims": list(t.dims),
           "kind": m.get("kind", "fit"), "source_model": source_model,
           "target_model": target_model, "normalize": t.normalize, "scale": t.scale,
           "n_pairs": m.get("n_pairs"), "rows": t.options.get("rows"),
           "relative_residual": m.get("relative_residual"),
           "derived_from": m.get("composed_of") or m.get("inverse_of")}
    return {k: v for k, v in out.items() if v is not None}


def stamp(meta: dict, operation: str, fingerprint: dict) -> dict:
    """``meta`` with created, bigalign_version and the job fingerprint; None values dropped."""
    from . import __version__

    meta["created"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    meta["bigalign_version"] = __version__
    meta["job"] = {"fingerprint": dict(fingerprint, operation=operation)}
    return {k: v for k, v in meta.items() if v is not None}


def show(model) -> str:
    return json.dumps(model) if not isinstance(model, str) else repr(model)


# ---- compose --------------------------------------------------------------------------

def check_composable(t1: Transform, t2: Transform, *,
                     allow_model_mismatch: bool = False) -> Optional[dict]:
    """Refuse (InputError) composing ``t1`` then ``t2`` when either is not finite, the dims
    do not chain, ``t2`` normalises its input, or T1's target model differs from T2's
    source model (both recorded) unless ``allow_model_mismatch``. Returns the allowed
    mismatch ({first_target_model, second_source_model}) or None."""
    check_finite(t1, "first transform")
    check_finite(t2, "second transform")
    (d_a, d_b), (d_b2, d_c) = t1.dims, t2.dims
    if d_b != d_b2:
        raise InputError(
            f"cannot compose: the first transform maps {d_a} -> {d_b} dims but the second "
            f"takes {d_b2}-dim input ({d_b2} -> {d_c}); the first's output must be the "
            "second's input (did you swap them? compose FIRST SECOND applies FIRST first)")
    if t2.normalize:
        raise InputError(
            "cannot compose exactly: the second transform was fitted with --normalize, so "
            "it L2-normalises its input -- the first transform's output -- which is not an "
            "affine step and cannot be folded into one transform. Apply the two in sequence, "
            "or fit the second without --normalize")
    (_, m_b1), (m_b2, _) = models(t1), models(t2)
    mismatch = None
    if m_b1 is not None and m_b2 is not None and m_b1 != m_b2:
        if not allow_model_mismatch:
            raise InputError(
                f"cannot compose: the first transform maps into model {show(m_b1)} but the "
                f"second maps from model {show(m_b2)}; pass --allow-model-mismatch "
                "if they are the same space under two names")
        mismatch = {"first_target_model": m_b1, "second_source_model": m_b2}
        log.warning("composing across different model stamps (%s, %s): allowed by "
                    "--allow-model-mismatch", show(m_b1), show(m_b2))
    elif m_b1 is None or m_b2 is None:
        log.info("the middle model is not recorded on both transforms: cannot check that "
                 "the first's target model is the second's source model")
    return mismatch


def composed(t1: Transform, t2: Transform, mismatch: Optional[dict] = None,
             paths: tuple = (None, None), fingerprint: Optional[dict] = None) -> Transform:
    """T1 then T2 as one Transform, once :func:`check_composable` passed (``mismatch`` is
    what it returned; ``paths`` where the inputs were read, for the provenance;
    ``fingerprint`` the job's, by default {"inputs": [both digests]})."""
    if fingerprint is None:
        fingerprint = {"inputs": [t1.digest(), t2.digest()]}
    (d_a, d_b), (_, d_c) = t1.dims, t2.dims
    (m_a, _), (_, m_c) = models(t1), models(t2)
    rotation, scale, target_mean = compose_affine(
        t1.rotation, t1.scale, t1.target_mean, t2.rotation, t2.scale, t2.source_mean,
        t2.target_mean)
    err = orthonormality_error(rotation)
    orthonormal = err <= ORTHONORMAL_TOL
    if not orthonormal:
        log.warning("the composed map (%d -> %d -> %d dims) is not an isometry: Q1 Q2 is not "
                    "orthonormal (max deviation %.2g); it is still exactly the second "
                    "transform after the first", d_a, d_b, d_c, err)
    o1, o2 = t1.options, t2.options
    options = {"center": bool(o1.get("center") or o2.get("center")),
               "normalize": t1.normalize,
               "scale": bool(o1.get("scale") or o2.get("scale")), "composed": True}
    meta = {"kind": "composed", "dims": [d_a, d_c], "source_model": m_a, "target_model": m_c,
            "orthonormal": orthonormal, "orthonormality_error": err,
            "composed_of": [provenance(t1, paths[0]), provenance(t2, paths[1])],
            "model_mismatch": mismatch,
            "statistics": "not kept: the inputs' training statistics describe neither fit"}
    return Transform(rotation, t1.source_mean.astype(np.float64).copy(), target_mean, scale,
                     options, stamp(meta, "compose", fingerprint))


# ---- invert ---------------------------------------------------------------------------

def inverse_kind(t: Transform) -> dict:
    """What the inverse of ``t`` is, without building it: {kind, lossy, why, meaning, rank,
    orthonormal}. kind: "exact" (dA == dB, full rank, no normalisation), "left-inverse"
    (rank dA < dB: exact on T's image), "inverse-up-to-norm" (full rank but T normalises its
    input) or "pseudo-inverse" (rank < dA: T lost dims).
    ``lossy`` lists why inverse(T(x)) != x (lost dims, a normalised input)."""
    d_a, d_b = t.dims
    err = orthonormality_error(t.rotation)
    orthonormal = err <= ORTHONORMAL_TOL
    rank = rotation_rank(t.rotation, orthonormal)
    lossy = []
    if rank < d_a:
        lossy.append(f"the transform keeps only {rank} of the source's {d_a} dims "
                     f"({d_a} -> {d_b}), so inverse(T(x)) is x projected onto those {rank} "
                     "directions (through the source mean), not x")
    if t.normalize:
        lossy.append("the transform L2-normalises its input (fitted with --normalize), so "
                      "only the direction comes back: inverse(T(x)) = x / ||x||")
    if rank == d_a and t.normalize:
        kind = "inverse-up-to-norm"
        meaning = ("inverse up to the norm: " + lossy[-1] +
                   ("" if d_a == d_b else f"; a target vector is first projected onto the "
                    f"{d_a}-dim subspace T maps onto"))
    elif rank == d_a == d_b:
        kind = "exact"
        meaning = "exact inverse: inverse(T(x)) = x and T(inverse(y)) = y"
    elif rank == d_a:
        kind = "left-inverse"
        meaning = (f"left inverse on the fitted subspace: inverse(T(x)) = x for every source "
                   f"vector; a {d_b}-dim target vector y is first projected onto the "
                   f"{d_a}-dim subspace T maps onto (its component outside it, which the "
                   f"source model cannot express, is dropped): inverse(y) = "
                   f"(y - target_mean) Q^T / s + source_mean")
    else:
        kind = "pseudo-inverse"
        meaning = ("pseudo-inverse, not an inverse: " + "; ".join(lossy[:1]) +
                   ("; T(inverse(y)) = y" if rank == d_b else ""))
    if t.normalize and kind == "pseudo-inverse":
        meaning += "; " + lossy[-1]
    family = t.options.get("family")
    if family is not None and family not in ORTHOGONAL:
        meaning += (f" (the algebraic inverse of this {family} map, not a map fitted from "
                    "target to source: a least-squares fit that way would differ, as "
                    "regressing B on A and A on B differ)")
    return {"kind": kind, "lossy": lossy, "meaning": meaning, "rank": rank,
            "orthonormal": orthonormal}


def check_invertible(t: Transform, *, allow_lossy: bool = False) -> dict:
    """Refuse (InputError) inverting a ``t`` that is not finite, or has no inverse (it lost
    dims or normalises its input) unless ``allow_lossy``. Returns :func:`inverse_kind`."""
    check_finite(t, "transform")
    info = inverse_kind(t)
    if info["lossy"] and not allow_lossy:
        raise InputError("this transform has no inverse: " + "; and ".join(info["lossy"]) +
                         ". Pass --allow-lossy to write the "
                         f"{info['kind']} anyway")
    return info


def inverted(t: Transform, info: dict, path: Optional[str] = None,
             fingerprint: Optional[dict] = None) -> Transform:
    """The map back, once :func:`check_invertible` passed (``info`` is what it returned;
    ``path`` where ``t`` was read, for the provenance; ``fingerprint`` the job's, by
    default {"input": t's digest})."""
    if fingerprint is None:
        fingerprint = {"input": t.digest()}
    d_a, d_b = t.dims
    rotation = inverse_rotation(t.rotation, info["orthonormal"])
    source_model, target_model = models(t)
    m = t.metadata or {}
    inputs = m.get("inputs")
    if isinstance(inputs, dict) and set(inputs) <= {"source", "target"}:
        inputs = {"source": inputs.get("target"), "target": inputs.get("source")}
    meta = {"kind": "inverse", "dims": [d_b, d_a], "source_model": target_model,
            "target_model": source_model, "inverse": info, "inverse_of": provenance(t, path),
            "n_pairs": m.get("n_pairs"), "rows": m.get("rows"), "inputs": inputs}
    record = fitted_pairing(m)
    if record is not None:  # the same pairs seen from the other side: evaluate rebuilds them
        meta["pairs"] = dict(m["pairs"], by="ids", duplicates=record["duplicates"],
                             sample=record["sample"], seed=record["seed"],
                             swapped=not record["swapped"])
    stats = t.statistics
    swapped = None
    if stats is not None and not t.normalize:
        swapped = Moments(stats.n, stats.mean_b, stats.mean_a, stats.cross.T.copy(),
                          stats.sq_b, stats.sq_a, stats.gram_b, stats.gram_a)
        meta["statistics"] = "the forward fit's, sides swapped (the same pairs)"
    options = dict(t.options, normalize=False, inverted=not t.options.get("inverted", False))
    result = Transform(rotation, t.target_mean.astype(np.float64).copy(),
                       t.source_mean.astype(np.float64).copy(), 1.0 / t.scale, options,
                       stamp(meta, "invert", fingerprint), t.singular_values, swapped)
    if info["lossy"]:
        log.warning("writing a %s, not an inverse: %s", info["kind"], "; ".join(info["lossy"]))
    return result
