"""The apply kernel: map a block of source rows with a fitted map. One function for every
backend (Transform.transform, the streaming apply, evaluation, and the GPU apply in
bigalign.execution.gpu with CuPy arrays), written against the array API
(:mod:`bigalign.maths.arrays`), and one output-cast check (:func:`check_cast`)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..errors import NonFiniteError
from .arrays import dtype_in, namespace, native, np_dtype
from .stats import check_finite, normalize_rows

__all__ = ["map_rows", "check_cast"]


def map_rows(x, matrix, source_mean, target_mean, *, normalize: bool = False,
             renormalize: bool = False, dtype=np.float32, start: int = 0,
             inplace: bool = False, out=None, flags: Optional[list] = None):
    """The apply kernel, shared by Transform.transform, the streaming apply and the GPU.

    x : (n, dA) float16/32/64 block. ``matrix`` : (dA, dB) = scale * rotation, already in the
    compute dtype (float64 for float64 output, else float32); ``source_mean`` (dA,),
    ``target_mean`` (dB,): any float dtype. All four in one namespace (NumPy, or CuPy on a
    device). Returns (n, dB) in ``dtype``, in that namespace.
    ``inplace``: x may be overwritten (the engine's read buffer); ``out``: an (n, dB) buffer
    of the compute dtype for the product (NumPy/CuPy).

    Checks: NaN/Inf in the mapped rows (or, with ``normalize``, a source row that cannot be
    normalised), then, for a narrower output ``dtype``, the cast (float16 ends at 65504;
    :func:`check_cast`). ``flags`` None: the first failure raises NonFiniteError naming the
    row (``start`` is the block's global offset). ``flags`` a list (a device, which must not
    wait): each check appends a 0-d bool (True: failed) and the result is returned anyway;
    the caller reads the flags after synchronising and maps the block again on the host to
    name the row.
    """
    xp = namespace(x, matrix)
    nat = native(xp)
    work = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    wk = dtype_in(xp, work)
    if normalize:
        x = normalize_rows(x, work, start, "source", flags)
        inplace = True
    elif x.dtype != wk:
        x = xp.astype(x, wk)
        inplace = True
    if inplace and nat is not None:
        xc = nat.subtract(x, xp.astype(source_mean, wk), out=x)
    else:
        xc = x - xp.astype(source_mean, wk)
    y = nat.matmul(xc, matrix, out=out) if nat is not None else xc @ matrix
    y += xp.astype(target_mean, wk)
    # on the host in y's dtype (a quarter of the time; an overflowing float32 sum is
    # resolved by looking at the rows); deferred, in float64, which cannot overflow
    colsum = xp.sum(y, axis=0) if flags is None else xp.sum(y, axis=0, dtype=xp.float64)
    check_finite(colsum, y, start, "source", flags)
    if renormalize:
        norms = xp.linalg.vector_norm(y, axis=1, keepdims=True)
        y /= xp.clip(norms, min=float(np.finfo(work).tiny))
    with np.errstate(over="ignore"):  # checked below, with a clearer message
        result = xp.astype(y, dtype_in(xp, dtype), copy=False)
    if np.dtype(dtype).itemsize < np.dtype(work).itemsize:
        check_cast(result, y, start, flags)
    return result


def check_cast(result, y, start: int, flags: Optional[list] = None) -> None:
    """The output-cast check: ``result`` (n, dB), ``y`` cast to a narrower float (float16:
    largest 65504), must be finite, or NonFiniteError names the first row the cast turned
    into Inf. ``y`` is finite (checked before the cast), so a finite float32 column sum of
    ``result`` proves the cast clean at one cheap pass; otherwise look at the rows.
    ``flags``: as :func:`map_rows` (append the 0-d bool "not clean" instead of raising)."""
    xp = namespace(result, y)
    clean = xp.all(xp.isfinite(xp.sum(result, axis=0, dtype=xp.float32)))
    if flags is not None:
        flags.append(~clean)
        return
    if bool(clean):
        return
    bad = xp.nonzero(~xp.all(xp.isfinite(result), axis=1))[0]
    i = int(bad[0]) if bad.shape[0] else 0
    info = np.finfo(np_dtype(result.dtype))
    raise NonFiniteError(
        f"source row {start + i} maps to values up to {float(xp.max(xp.abs(y[i, ...]))):.6g}, "
        f"beyond the {np_dtype(result.dtype)} range (largest {float(info.max):g}): "
        f"{bad.shape[0]} rows of block rows {start}:{start + result.shape[0]} would be "
        f"written as Inf. Write float32 (--dtype float32), or L2-normalise the output "
        f"(--renormalize)")
