"""Transforms built from transforms: compose and invert (``bigalign compose|invert``).

A :class:`~bigalign.transform.Transform` is the affine map

    T(x) = (normalize(x) - source_mean) * scale @ rotation + target_mean

- :func:`compose` (T1 then T2): ``compose(t1, t2)(x) == t2(t1(x))``. The result is again a
  Transform: rotation Q1 Q2, scale s1 s2, source_mean mu1, target_mean
  (nu1 - mu2) s2 Q2 + nu2 = T2(nu1) -- the form (x - mean) * scale @ rotation + mean holds
  any affine map whose matrix is scale * rotation.
- :func:`invert`: the map back, target -> source: rotation Q^T, scale 1/s, the means
  swapped. Exact when dA == dB; a left inverse (exact on T's image, a projection elsewhere)
  when dA < dB; refused as lossy when T keeps fewer dims than the source has (dA > dB) or
  normalises its input, unless ``allow_lossy``.

Writing a transform as plain arrays for serving stacks is :mod:`bigalign.commands.map_export`.

Why functions in a module rather than methods of Transform: these are operations *between*
artifacts, with policy (model stamps, lossy flags, provenance, output safety) that the
artifact itself should not carry. The in-memory part (checks, maths, what the result records)
sits beside the artefact in :mod:`bigalign.transform`, which ``Transform.inverse()`` and
``Transform.then()`` use; this module adds reading inputs and writing outputs.

Model stamps: ``metadata["source_model"]`` / ``metadata["target_model"]``, when present,
are carried: compose(A->B, B->C) is A->C (refused when T1's target model differs from T2's
source model, unless ``allow_model_mismatch``), invert swaps them, export records them.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Union

from ..errors import DamagedOutputError, InputError
from ..storage.job import refuse_damaged
from ..storage.locations import check_disjoint
from ..storage.outputs import TRANSFORM_KINDS, check_replaceable
from ..transform import Transform, check_composable, check_invertible, composed, inverted

__all__ = ["compose", "invert", "digest", "load_transform", "TransformLike"]

log = logging.getLogger("bigalign")

TransformLike = Union[Transform, str, "os.PathLike[str]"]


# ---- small helpers ------------------------------------------------------------------

def digest(t: Transform) -> str:
    """:meth:`Transform.digest` (what the map computes)."""
    return t.digest()


def load_transform(t: TransformLike, storage_options) -> tuple[Transform, Optional[str]]:
    if isinstance(t, Transform):
        return t, None
    path = os.fspath(t) if isinstance(t, os.PathLike) else str(t)
    return Transform.load(path, storage_options=storage_options), path


# ---- compose --------------------------------------------------------------------------

def compose(first: TransformLike, second: TransformLike, *, output=None,
            overwrite: bool = False, allow_model_mismatch: bool = False,
            storage_options: Optional[dict] = None) -> Transform:
    """T1 then T2 as one Transform: ``compose(t1, t2).transform(x) == t2(t1(x))``.

    first : (dA -> dB) transform or a path to one; second : (dB -> dC). Returns (dA -> dC):
    rotation Q1 Q2 (dA, dC) float64, scale s1 s2, source_mean mu1, target_mean
    (nu1 - mu2) s2 Q2 + nu2 (= T2(nu1), the image of the first source mean; it equals nu2
    when both fits saw the same mean of the middle model), normalize as T1's.

    Refused (InputError): dims that do not chain; T2 fitted with normalize=True (it would
    renormalise T1's output: not an affine step, so not one Transform); T1's target model
    differing from T2's source model (both recorded), unless ``allow_model_mismatch``.
    Q1 Q2 is orthonormal (rows or columns) when dims rise or fall monotonically
    (dA <= dB <= dC or dA >= dB >= dC); otherwise (e.g. dA < dB > dC) it is checked and,
    when not, metadata says ``orthonormal: false`` -- the map is still exactly T2 after T1,
    but not an isometry. The inputs' statistics are dropped (they describe neither fit);
    metadata records both inputs (path, digest, dims, models) under ``composed_of``.
    ``output``: save there (a new Zarr group; ``overwrite`` replaces a bigalign transform
    of other inputs; a rerun with the same inputs is a no-op)."""
    so = storage_options
    t1, p1 = load_transform(first, so)
    t2, p2 = load_transform(second, so)
    if output is not None:
        check_disjoint({"first transform": p1, "second transform": p2}, {"output": output}, so)
    mismatch = check_composable(t1, t2, allow_model_mismatch=allow_model_mismatch)
    fingerprint = {"inputs": [digest(t1), digest(t2)]}
    if output is not None:
        done = _existing_transform(output, "compose", fingerprint, overwrite, so)
        if done is not None:
            return done
    result = composed(t1, t2, mismatch, (p1, p2), fingerprint)
    if output is not None:
        _save(result, output, overwrite, so)
    return result


# ---- invert ---------------------------------------------------------------------------

def invert(t: TransformLike, *, allow_lossy: bool = False, output=None,
           overwrite: bool = False, storage_options: Optional[dict] = None) -> Transform:
    """The map back, target -> source: ``inverse(y) = (y - target_mean) Q^T / s +
    source_mean`` (the Moore-Penrose pseudo-inverse ``pinv(Q) / s`` when Q is not
    orthonormal, e.g. a composed dA < dB > dC map), as a (dB -> dA) Transform with
    normalize=False and the model stamps swapped.

    - dA == dB: exact (invert(T)(T(x)) == x).
    - dA < dB: left inverse: exact for vectors T produced; any other target vector is first
      projected onto the dA-dim subspace T maps onto. Allowed; metadata says so.
    - dA > dB (T lost dims) or T fitted with normalize=True (T drops the norm): not an
      inverse; refused (InputError, saying why) unless ``allow_lossy``.

    metadata["inverse"] = {kind, lossy, meaning, rank, orthonormal}; metadata["inverse_of"]
    records the input. The forward fit's statistics are kept, swapped (they are the same
    pairs seen from the other side), except for a normalize=True fit."""
    so = storage_options
    t, path = load_transform(t, so)
    if output is not None:
        check_disjoint({"transform": path}, {"output": output}, so)
    info = check_invertible(t, allow_lossy=allow_lossy)
    fingerprint = {"input": digest(t)}
    if output is not None:
        done = _existing_transform(output, "invert", fingerprint, overwrite, so)
        if done is not None:
            return done
    result = inverted(t, info, path, fingerprint)
    if output is not None:
        _save(result, output, overwrite, so)
    return result


def _existing_transform(output, operation: str, fingerprint: dict, overwrite: bool,
                        so) -> Optional[Transform]:
    """The finished transform at ``output`` when it is this very job (a no-op rerun);
    None when ``output`` may be written; InputError otherwise."""
    node = check_replaceable(output, "output", so, kinds=TRANSFORM_KINDS)
    if node.kind == "absent":
        return None
    if node.kind == "transform":
        stored = ((node.attrs.get("metadata") or {}).get("job") or {}).get("fingerprint")
        if stored == dict(fingerprint, operation=operation):
            try:
                t = Transform.load(output, storage_options=so)
            except DamagedOutputError as e:  # never a no-op: refused, or written again
                refuse_damaged(output, e.lost, overwrite)
                return None
            log.warning("%s is already complete with the same inputs: nothing to do", output)
            return t
    if not overwrite:
        what = {"transform": "a bigalign transform made from other inputs",
                "partial-transform": "an unfinished bigalign transform"}[node.kind]
        raise InputError(f"output {str(output)!r} already exists ({what}); pass --overwrite "
                         "to replace it")
    return None


def _save(t: Transform, output, overwrite: bool, so) -> None:
    t.save(output, overwrite=overwrite, storage_options=so)
