"""The apply kernel: map a block of source rows with a fitted map (numpy; the GPU
path has its own array-module version in bigalign.execution.gpu)."""

from __future__ import annotations

from typing import Optional

import numpy as np

from ..errors import NonFiniteError
from .stats import check_finite, normalize_rows

__all__ = ["map_rows"]


def map_rows(x: np.ndarray, matrix: np.ndarray, source_mean: np.ndarray,
             target_mean: np.ndarray, *, normalize: bool = False, renormalize: bool = False,
             dtype=np.float32, start: int = 0, inplace: bool = False,
             out: Optional[np.ndarray] = None) -> np.ndarray:
    """The apply kernel, shared by Transform.transform and the streaming apply.

    x : (n, dA) float16/32/64 block. ``matrix`` : (dA, dB) = scale * rotation, already in the
    compute dtype (float64 for float64 output, else float32). Returns (n, dB) in ``dtype``.
    ``inplace``: x may be overwritten (the engine's read buffer); ``out``: an (n, dB) buffer
    of the compute dtype for the product. Raises NonFiniteError naming the first bad row
    (``start`` is the block's global offset): NaN/Inf, or a value the cast to a narrower
    ``dtype`` overflows (float16 ends at 65504).
    """
    work = np.float64 if np.dtype(dtype) == np.float64 else np.float32
    if normalize:
        x = normalize_rows(x, work, start, "source")
        inplace = True
    elif x.dtype != work:
        x = x.astype(work)
        inplace = True
    if inplace:
        xc = np.subtract(x, source_mean.astype(work), out=x)
    else:
        xc = x - source_mean.astype(work)
    y = np.matmul(xc, matrix, out=out)
    y += target_mean.astype(work)
    check_finite(y.sum(axis=0), y, start, "source")  # in y's dtype: a quarter of the time
    if renormalize:
        y /= np.linalg.norm(y, axis=1, keepdims=True).clip(min=np.finfo(work).tiny)
    with np.errstate(over="ignore"):  # checked below, with a clearer message
        result = y.astype(dtype, copy=False)
    if result.dtype.itemsize < y.dtype.itemsize:
        _check_range(result, y, start)
    return result


def _check_range(result: np.ndarray, y: np.ndarray, start: int) -> None:
    """A cast to a narrower float (float16: largest 65504) turns big finite values into
    Inf silently. ``y`` is finite (checked before the cast), so a finite float32 column sum
    of ``result`` proves the cast clean at one cheap pass; otherwise name the first row."""
    if np.isfinite(result.sum(axis=0, dtype=np.float32)).all():
        return
    bad = np.flatnonzero(~np.isfinite(result).all(axis=1))
    i = int(bad[0]) if bad.size else 0
    info = np.finfo(result.dtype)
    raise NonFiniteError(
        f"source row {start + i} maps to values up to {float(np.abs(y[i]).max()):.6g}, "
        f"beyond the {result.dtype} range (largest {float(info.max):g}): {bad.size} rows of "
        f"block rows {start}:{start + len(result)} would be written as Inf. Write float32 "
        f"(--dtype float32), or L2-normalise the output (--renormalize)")
