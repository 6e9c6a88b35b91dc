"""In-memory inputs: numpy arrays and Dask arrays as sources and targets of ``fit`` and
``apply`` (Python API), read by the same engine as Zarr arrays.

    >>> t = bigalign.fit(old_vectors, new_vectors)            # (N, dA), (N, dB) numpy
    >>> bigalign.apply(t, dask_array, "mapped.zarr")          # (N, dA) Dask, out of core

:func:`adapt` wraps such an input as an :class:`InMemoryRows`, an
:class:`~bigalign.storage.stores.EmbeddingArray` whose reads slice the array (a Dask array
computes one block per read, with the synchronous scheduler inside the engine's task, so
it stays out of core). What a Zarr input gets from its URL it gets from its content:

- **identity** (the fingerprint a resume and a no-op rerun compare): ``dask.base.tokenize``
  of the array: a hash of a numpy array's bytes, a Dask array's graph name. Rerunning
  ``fit(a, b, output=...)`` with equal arrays is a no-op; with other arrays, a changed job.
- **location** ``memory://numpy-<token>`` / ``memory://dask-<token>``: never the same as a
  file or object-store output.
- **where it runs**: in this process (the rows live here); a cluster is not used.

Reads are blocks of whole "chunks" of about :data:`CHUNK_BYTES` (a Dask array's own row
chunks when they are uniform).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InputError
from .stores import FLOAT_DTYPES, EmbeddingArray

__all__ = ["adapt", "is_in_memory", "InMemoryRows", "CHUNK_BYTES"]

#: Rows per read of a numpy input: about this many bytes.
CHUNK_BYTES = 16 * 2**20


def _is_dask(x) -> bool:
    return type(x).__module__.startswith("dask.") and hasattr(x, "compute") and \
        hasattr(x, "chunks")


def is_in_memory(x) -> bool:
    """Whether ``x`` is a numpy or Dask array (or already adapted)."""
    return isinstance(x, (np.ndarray, InMemoryRows)) or _is_dask(x)


class _Rows:
    """The part of zarr.Array's surface the engine reads: shape, dtype, chunks, slicing."""

    def __init__(self, x, chunk_rows: int):
        self.x, self.shape, self.dtype = x, tuple(x.shape), np.dtype(x.dtype)
        self.chunks = (chunk_rows, self.shape[1])
        self.ndim = 2
        self.dask = _is_dask(x)

    def __getitem__(self, key):
        part = self.x[key]
        return np.asarray(part.compute(scheduler="sync") if self.dask else part)


class InMemoryRows(EmbeddingArray):
    """An in-memory (N, d) input as an EmbeddingArray (see the module doc); ``token``: its
    content's identity."""

    def __init__(self, x, side: str):
        kind = "dask" if _is_dask(x) else "numpy"
        shape = tuple(getattr(x, "shape", ()))
        if len(shape) != 2 or 0 in shape:
            raise InputError(f"{side}: expected a non-empty 2-D (rows, dim) {kind} array, "
                             f"got shape {shape}")
        if np.dtype(x.dtype) not in [np.dtype(t) for t in FLOAT_DTYPES]:
            raise InputError(f"{side}: dtype {x.dtype} is not float16, float32 or float64 "
                             f"(convert it: x.astype('float32'))")
        if kind == "dask":
            rows = x.chunks[0]
            if any(r != rows[0] for r in rows[:-1]) or np.isnan(rows[0]) or rows[-1] > rows[0]:
                raise InputError(f"{side}: a Dask array with unknown or uneven row chunks "
                                 f"{rows[:4]}...: rechunk it (x.rechunk(({rows[0]}, -1)))")
            if len(x.chunks[1]) != 1:
                x = x.rechunk({1: -1})  # whole rows per block
            chunk = int(rows[0])
        else:
            x = np.ascontiguousarray(x)
            chunk = max(1, CHUNK_BYTES // (shape[1] * x.dtype.itemsize))
        from dask.base import tokenize

        self.token = tokenize(x)
        super().__init__(_Rows(x, chunk), f"memory://{kind}-{self.token}", side)

    @property
    def store_path(self) -> str:  # what bigalign.storage.locations reads of an input
        return self.url

    def fingerprint(self) -> dict:
        return {"url": self.url, "shape": list(self.shape), "chunks": list(self.array.chunks),
                "dtype": str(self.dtype), "content": {"tokenize": self.token}}


def adapt(x: Any, side: str) -> Any:
    """``x`` as an :class:`InMemoryRows` when it is a numpy or Dask array; anything else
    (paths, URLs, zarr arrays) unchanged."""
    if isinstance(x, InMemoryRows) or not is_in_memory(x):
        return x
    return InMemoryRows(x, side)
