"""The array namespace the kernels are written against (the array API standard, through
``array-api-compat``, as scikit-learn's ``get_namespace``): NumPy on the host, CuPy on a
CUDA device, any other conforming library in principle.

The kernels (:class:`bigalign.maths.stats.Accumulator`, :func:`bigalign.maths.mapping.map_rows`)
are written once with ``xp = namespace(...)``; where NumPy or CuPy offer something faster
than the standard (``out=`` buffers, ``einsum``, BLAS ``dger``), the kernel selects it inside
itself through :func:`native`, so every backend runs the same sequence of operations.

Adding a backend: a library array-api-compat knows needs nothing here; one with faster
primitives gets its branch in :func:`native` and the helpers that use it.

Pure: no Dask, no Zarr.
"""

from __future__ import annotations

import numpy as np
from array_api_compat import array_namespace, is_cupy_namespace, is_numpy_namespace

__all__ = ["namespace", "native", "is_host", "dtype_in", "np_dtype", "to_numpy"]


_NUMPY = array_namespace(np.empty(0))


def namespace(*arrays):
    """The array-API namespace of ``arrays`` (all from one library; TypeError otherwise).
    Plain numpy arrays take a shortcut (the kernels ask several times per block)."""
    if all(type(a) is np.ndarray for a in arrays):
        return _NUMPY
    return array_namespace(*arrays)


def native(xp):
    """The library module behind ``xp`` when it has NumPy's ufuncs (``out=``, ``dtype=``,
    ``einsum``): numpy or cupy; None for any other namespace (the standard's operations)."""
    if is_numpy_namespace(xp):
        return np
    if is_cupy_namespace(xp):
        import cupy
        return cupy
    return None


def is_host(xp) -> bool:
    """True when ``xp``'s arrays are NumPy's (reading one of their values costs nothing)."""
    return is_numpy_namespace(xp)


def dtype_in(xp, dtype):
    """``dtype`` (anything np.dtype accepts: "float32", np.float32) as ``xp``'s dtype."""
    return getattr(xp, np.dtype(dtype).name)


def np_dtype(dtype) -> np.dtype:
    """An array's dtype as numpy's (NumPy and CuPy use numpy's; other libraries name theirs
    ``library.float32``)."""
    try:
        return np.dtype(dtype)
    except TypeError:
        return np.dtype(str(dtype).rsplit(".", 1)[-1])


def to_numpy(v) -> np.ndarray:
    """A host numpy copy (or view) of an array of any backend."""
    if isinstance(v, np.ndarray):
        return v
    get = getattr(v, "get", None)  # cupy
    return get() if callable(get) else np.asarray(v)
