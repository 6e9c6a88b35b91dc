"""Transforms made from transforms, in memory: compose (T1 then T2) and invert.

What :meth:`bigalign.Transform.then` and :meth:`bigalign.Transform.inverse` do, and what
``bigalign compose|invert`` (:mod:`bigalign.commands.transforms`, which adds loading and
writing outputs) call: the checks that refuse a derived map that would not mean what it
says, the maths (:mod:`bigalign.maths.affine`), and what the result records (model stamps,
provenance of its inputs, a job fingerprint). Each operation comes in two steps, the check
(``check_composable``, ``check_invertible``) and the build (``composed``, ``inverted``), so
that a command can find a finished output between them without computing anything.

This module sits beside the artefact and does not import it (``transform.py`` imports this
one): results are built with the class of the input (``type(t)(...)``).
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Optional

import numpy as np

from .errors import InputError
from .execution.pairing import fitted_pairing
from .maths.affine import (ORTHONORMAL_TOL, compose_affine, inverse_rotation,
                           orthonormality_error, rank as rotation_rank)
from .maths.stats import Moments

if TYPE_CHECKING:
    from .transform import Transform

__all__ = ["compose", "invert", "check_composable", "composed", "check_invertible",
           "inverted", "inverse_kind", "models", "check_finite", "provenance", "stamp",
           "show"]

log = logging.getLogger("bigalign")


# ---- small helpers ------------------------------------------------------------------

def models(t: "Transform") -> tuple:
    """The model stamps (source_model, target_model); None where not recorded."""
    m = t.metadata or {}
    return m.get("source_model"), m.get("target_model")


def check_finite(t: "Transform", what: str) -> None:
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


def provenance(t: "Transform", path: Optional[str]) -> dict:
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

def check_composable(t1: "Transform", t2: "Transform", *,
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


def composed(t1: "Transform", t2: "Transform", mismatch: Optional[dict] = None,
             paths: tuple = (None, None), fingerprint: Optional[dict] = None) -> "Transform":
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
    return type(t1)(rotation, t1.source_mean.astype(np.float64).copy(), target_mean, scale,
                    options, stamp(meta, "compose", fingerprint))


def compose(t1: "Transform", t2: "Transform", *,
            allow_model_mismatch: bool = False) -> "Transform":
    """:func:`check_composable` then :func:`composed` (``Transform.then``)."""
    mismatch = check_composable(t1, t2, allow_model_mismatch=allow_model_mismatch)
    return composed(t1, t2, mismatch)


# ---- invert ---------------------------------------------------------------------------

def inverse_kind(t: "Transform") -> dict:
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
    return {"kind": kind, "lossy": lossy, "meaning": meaning, "rank": rank,
            "orthonormal": orthonormal}


def check_invertible(t: "Transform", *, allow_lossy: bool = False) -> dict:
    """Refuse (InputError) inverting a ``t`` that is not finite, or has no inverse (it lost
    dims or normalises its input) unless ``allow_lossy``. Returns :func:`inverse_kind`."""
    check_finite(t, "transform")
    info = inverse_kind(t)
    if info["lossy"] and not allow_lossy:
        raise InputError("this transform has no inverse: " + "; and ".join(info["lossy"]) +
                         ". Pass --allow-lossy to write the "
                         f"{info['kind']} anyway")
    return info


def inverted(t: "Transform", info: dict, path: Optional[str] = None,
             fingerprint: Optional[dict] = None) -> "Transform":
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
    result = type(t)(rotation, t.target_mean.astype(np.float64).copy(),
                     t.source_mean.astype(np.float64).copy(), 1.0 / t.scale, options,
                     stamp(meta, "invert", fingerprint), t.singular_values, swapped)
    if info["lossy"]:
        log.warning("writing a %s, not an inverse: %s", info["kind"], "; ".join(info["lossy"]))
    return result


def invert(t: "Transform", *, allow_lossy: bool = False) -> "Transform":
    """:func:`check_invertible` then :func:`inverted` (``Transform.inverse``)."""
    return inverted(t, check_invertible(t, allow_lossy=allow_lossy))
