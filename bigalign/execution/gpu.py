"""GPU backend (``device="cuda"``): the fit and apply block kernels on a CUDA device (CuPy).

The plans, graphs, merge trees, checkpoints and error messages are the CPU path's; only the
work inside a task moves. A fit task reads its rows whole chunks at a time into *pinned*
host buffers, copies them to the device on its thread's own CUDA stream and reduces them
there; the statistics stay on the device through the merge tree (``DeviceMoments``) and come
back as float64 numpy :class:`~bigalign.maths.stats.Moments` at the root (and when a checkpoint
unit is saved), so merges, checkpoints and the solve are unchanged. An apply task reads a
region into a pinned buffer, maps it on the device and copies it back into a pinned buffer
that Zarr writes from.

Overlap: each Dask thread has its own stream and buffers (a *lane*), so while one thread's
chunks are read by the CPU, others' are copied and multiplied. Within a fit task the host
buffers alternate between two slots: the next read fills one slot while the device still
copies from the other (an event guards the reuse), and the host never waits for the device
until the task ends.

There are no GPU kernels here: a fit task runs the one statistics kernel,
:class:`bigalign.maths.stats.Accumulator`, and an apply task the one apply kernel,
:func:`bigalign.maths.mapping.map_rows`, both written against the array API (NumPy and CuPy
through ``array-api-compat``, :mod:`bigalign.maths.arrays`), on the device arrays: the same
operations as on the CPU (a float64 mean per block, centring by the mean rounded to the GEMM
dtype with the float64 residual-mean correction, float32 GEMMs into a float64 state: cuBLAS
FP32, TF32 is *not* enabled; CuPy only uses it when the environment sets ``CUPY_TF32=1``,
which bigalign warns about) and the Chan et al. merge between tasks. What differs is only
when the checks are read: the kernels run with ``flags=[...]`` (deferred checks), which
record each check (NaN/Inf, a row that cannot be normalised, the output cast to a narrower
dtype) as a 0-d bool on the device instead of waiting for it; the task reads them after its
stream synchronises, and for a failed block re-reads it and runs the same kernel on the
host, so the error names the row exactly as the CPU path does.

The tasks and their lanes also run with numpy arrays (:class:`NumpyBackend`): the tests
run this very code path, deferred checks included, on machines without a GPU.

CuPy is imported lazily: ``pip install 'bigalign[gpu]'``; CPU users need neither CuPy nor a
CUDA driver.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from dataclasses import dataclass

import numpy as np

from ..errors import InputError, NonFiniteError
from ..planning.plan import plan_blocks
from ..maths.mapping import map_rows
from ..maths.stats import Accumulator, Moments, block_moments, merge_with
from ..storage.stores import EmbeddingArray, read_rows

log = logging.getLogger("bigalign")

__all__ = ["DEVICES", "check_device", "merge", "DeviceMoments",
           "fit_block", "map_region", "merge_task", "to_host", "release_lanes"]

DEVICES = ("cpu", "cuda")


# ---- device selection ----------------------------------------------------------------------

def check_device(device: str) -> str:
    """Validate ``device`` ("cpu" or "cuda") before any work starts; for "cuda", check that
    CuPy imports and sees a CUDA device. Raises InputError saying what is missing."""
    if device not in DEVICES:
        raise InputError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cuda":
        _cupy()
    return device


def _cupy():
    """Import CuPy and check for a device, or raise InputError (never a bare ImportError)."""
    try:
        import cupy
    except ImportError as e:
        raise InputError(
            "device 'cuda' needs CuPy, which is not installed: pip install 'bigalign[gpu]' "
            "(cupy-cuda12x; for CUDA 13 drivers install cupy-cuda13x instead)"
            f" [{type(e).__name__}: {e}]") from None
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # CUDARuntimeError: no driver, no device
        raise InputError(f"device 'cuda': CuPy finds no usable CUDA device "
                         f"({type(e).__name__}: {e})") from None
    if count < 1:
        raise InputError("device 'cuda': CuPy finds no CUDA device")
    if os.environ.get("CUPY_TF32", "0") not in ("", "0"):
        log.warning("CUPY_TF32 is set: float32 GEMMs may run in TF32 (10-bit mantissa), "
                    "less accurate than the float32 the results are stated for")
    return cupy


# ---- device statistics and their merge -----------------------------------------------------

@dataclass(frozen=True, eq=False)
class DeviceMoments(Moments):
    """:class:`Moments` whose arrays, and ``sq_a``/``sq_b`` as 0-d float64 arrays, live on
    the device of the backend that made them (a task result on its way up the merge tree)."""


def merge(xp, p: Moments, q: Moments) -> DeviceMoments:
    """Exact pairwise merge (Chan et al.): :func:`bigalign.maths.stats.merge_with` on ``xp``'s
    device; numpy Moments (a resumed unit) are copied to the device first."""
    return merge_with(to_device(xp, p), to_device(xp, q), outer=xp.outer, cls=DeviceMoments,
                      scalar=lambda v: v)


def to_device(xp, m: Moments) -> DeviceMoments:
    """``m`` on the device (unchanged if it already is)."""
    if isinstance(m, DeviceMoments):
        return m
    put = lambda v: None if v is None else xp.asarray(v, dtype=xp.float64)  # noqa: E731
    return DeviceMoments(int(m.n), put(m.mean_a), put(m.mean_b), put(m.cross), put(m.sq_a),
                         put(m.sq_b), put(m.gram_a), put(m.gram_b), m.rounding)


def to_host(m: Moments) -> Moments:
    """Plain float64 numpy :class:`Moments` (unchanged if ``m`` is not on a device)."""
    if not isinstance(m, DeviceMoments):
        return m
    get = lambda v: None if v is None else _asnumpy(v).astype(np.float64, copy=False)  # noqa: E731
    return Moments(int(m.n), get(m.mean_a), get(m.mean_b), get(m.cross),
                   float(_asnumpy(m.sq_a)), float(_asnumpy(m.sq_b)), get(m.gram_a),
                   get(m.gram_b), m.rounding)


def _asnumpy(v) -> np.ndarray:
    return v.get() if hasattr(v, "get") and not isinstance(v, np.ndarray) else np.asarray(v)


def _failed(xp, flags):
    """0-d bool on the device: some check of ``flags`` (the kernels' deferred checks) failed."""
    return xp.any(xp.stack([xp.asarray(f) for f in flags]))


# ---- backends and per-thread lanes ---------------------------------------------------------

class _HostStream:
    """Stand-in for a CUDA stream on the numpy backend (work is synchronous)."""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def synchronize(self) -> None:
        pass


class NumpyBackend:
    """The lane machinery with numpy arrays and no device: runs the GPU tasks' exact code
    path (buffers, slots, copies, deferred checks) on the CPU, for tests."""

    xp = np

    def stream(self):
        return _HostStream()

    def empty_pinned(self, size: int, dtype) -> np.ndarray:
        return np.empty(size, dtype)

    def empty(self, size: int, dtype):
        return np.empty(size, dtype)

    def upload(self, dev, host, stream) -> None:
        dev[...] = host

    def download(self, dev, host, stream) -> None:
        host[...] = dev

    def event(self, stream):
        return None

    def release(self) -> None:
        pass


class CupyBackend(NumpyBackend):
    """CUDA via CuPy: one non-blocking stream per lane, pinned host buffers, async copies."""

    def __init__(self):
        self.cupy = _cupy()
        self.xp = self.cupy

    def stream(self):
        return self.cupy.cuda.Stream(non_blocking=True)

    def empty_pinned(self, size: int, dtype) -> np.ndarray:
        import cupyx
        return cupyx.empty_pinned((size,), dtype=dtype)

    def empty(self, size: int, dtype):
        return self.cupy.empty(size, dtype)

    def upload(self, dev, host, stream) -> None:
        dev.set(host, stream=stream)  # async: host is pinned

    def download(self, dev, host, stream) -> None:
        dev.get(stream=stream, out=host, blocking=False)

    def event(self, stream):
        ev = self.cupy.cuda.Event(block=False, disable_timing=True)
        ev.record(stream)
        return ev

    def release(self) -> None:
        # blocks return to CuPy's pools (cached for the next run, as CuPy does for any
        # program); cupy.get_default_memory_pool().free_all_blocks() gives them back
        pass


_backends: dict[str, object] = {}
_backends_lock = threading.Lock()


def get_backend(device: str = "cuda"):
    """The backend running ``device``'s tasks in this process (tests substitute
    :class:`NumpyBackend` to run the GPU code path without a GPU)."""
    with _backends_lock:
        be = _backends.get(device)
        if be is None:
            if device != "cuda":
                raise InputError(f"no GPU backend for device {device!r}")
            be = _backends[device] = CupyBackend()
        return be


class Lane:
    """One thread's stream and reusable buffers: pinned host buffers (each with the event
    of the last copy out of it, waited on before the buffer is refilled), device buffers,
    and the apply's constants (matrix, means) copied to the device once per run."""

    def __init__(self, backend):
        self.backend = backend
        self.xp = backend.xp
        self.stream = backend.stream()
        self._host: dict = {}
        self._dev: dict = {}
        self._events: dict = {}
        self._consts: dict = {}

    def host(self, name: str, rows: int, dim: int, dtype) -> np.ndarray:
        """A pinned (rows, dim) host buffer, free to overwrite (waits for its last copy)."""
        ev = self._events.pop(name, None)
        if ev is not None:
            ev.synchronize()
        return self._take(self._host, self.backend.empty_pinned, name, rows, dim, dtype)

    def device(self, name: str, rows: int, dim: int, dtype):
        """A (rows, dim) device buffer; stream order makes reuse safe."""
        return self._take(self._dev, self.backend.empty, name, rows, dim, dtype)

    @staticmethod
    def _take(pool, make, name, rows, dim, dtype):
        dtype = np.dtype(dtype)
        flat = pool.get(name)
        if flat is None or flat.dtype != dtype or flat.size < rows * dim:
            pool[name] = flat = None  # free the old one first
            flat = pool[name] = make(rows * dim, dtype)
        return flat[: rows * dim].reshape(rows, dim)

    def upload(self, host_name: str, host: np.ndarray, dev_name: str):
        """Copy a pinned host buffer (from :meth:`host`) to the device buffer ``dev_name``
        on this lane's stream; the host buffer is not refilled before the copy is done."""
        dev = self.device(dev_name, host.shape[0], host.shape[1], host.dtype)
        self.backend.upload(dev, host, self.stream)
        self._events[host_name] = self.backend.event(self.stream)
        return dev

    def download(self, dev, host: np.ndarray) -> None:
        """Queue a copy of ``dev`` into the pinned ``host`` (valid after synchronize)."""
        self.backend.download(dev, host, self.stream)

    def constant(self, name: str, value: np.ndarray):
        """``value`` on the device, copied once while the same host object is passed (the
        lane keeps a reference, so the identity test cannot be fooled by a reused id)."""
        held = self._consts.get(name)
        if held is None or held[0] is not value:
            self._consts[name] = held = (value, self.xp.asarray(value))
        return held[1]


_lanes: dict[tuple[str, int], Lane] = {}
_lanes_lock = threading.Lock()


def lane(device: str = "cuda") -> Lane:
    """This thread's lane for ``device``."""
    key = (device, threading.get_ident())
    with _lanes_lock:
        ln = _lanes.get(key)
    if ln is None:
        ln = Lane(get_backend(device))
        with _lanes_lock:
            _lanes[key] = ln
    return ln


def release_lanes() -> None:
    """Drop every thread's lane (streams and buffers) after a run."""
    with _lanes_lock:
        lanes = list(_lanes.values())
        _lanes.clear()
    for ln in lanes:
        ln.stream.synchronize()
    for be in set(ln.backend for ln in lanes):
        be.release()


# ---- tasks ---------------------------------------------------------------------------------

def fit_block(source: EmbeddingArray, target: EmbeddingArray, start: int, stop: int,
              normalize: bool, gram: bool, dtype: str, step: int, rows_per_read: int,
              device: str = "cuda") -> DeviceMoments:
    """The device version of engine.block_task: read paired rows [start, stop) once,
    ``rows_per_read`` at a time into alternating pinned slots, reduce each read on the
    device and merge in row order (the CPU task's order). Returns DeviceMoments after
    synchronising the stream; raises NonFiniteError naming the first bad row."""
    ln = lane(device)
    xp = ln.xp
    reads = plan_blocks(start, stop, step, rows_per_read)
    acc = Accumulator(source.dim, target.dim, gram=gram, normalize=normalize, dtype=dtype)
    failed = []
    with ln.stream:
        for i, r in enumerate(reads):
            slot = i % 2
            a_h = ln.host(f"source-{slot}", r.rows, source.dim, source.dtype)
            read_rows(source, r.start, r.stop, out=a_h)
            b_h = ln.host(f"target-{slot}", r.rows, target.dim, target.dtype)
            read_rows(target, r.start, r.stop, out=b_h)
            a = ln.upload(f"source-{slot}", a_h, "source")
            b = ln.upload(f"target-{slot}", b_h, "target")
            scratch = (ln.device("centred-source", r.rows, source.dim, dtype),
                       ln.device("centred-target", r.rows, target.dim, dtype))
            flags: list = []
            acc.add(a, b, start=r.start, scratch=scratch, flags=flags)
            failed.append(_failed(xp, flags))
        bad = _asnumpy(xp.stack(failed))
        ln.stream.synchronize()
    if bad.any():
        r = reads[int(np.flatnonzero(bad)[0])]
        _raise_fit(source, target, r.start, r.stop, normalize, dtype)
    m = acc.moments()
    return DeviceMoments(m.n, m.mean_a, m.mean_b, m.cross, m.sq_a, m.sq_b, m.gram_a, m.gram_b,
                         m.rounding)


def _raise_fit(source, target, start, stop, normalize, dtype):
    """Re-read a block the device found non-finite and run the kernel on the host, where
    its checks name the row."""
    a, b = read_rows(source, start, stop), read_rows(target, start, stop)
    block_moments(a, b, normalize=normalize, dtype=dtype, start=start)
    raise NonFiniteError(f"rows {start}:{stop} hold NaN or Inf (found on the device)")


def merge_task(*parts: Moments) -> Moments:
    """engine.merge_task for partials on the device: merged in the given (row) order on
    this thread's stream, synchronised before returning (so inputs may be freed)."""
    ln = lane("cuda")
    out = parts[0]
    with ln.stream:
        out = to_device(ln.xp, out)
        for p in parts[1:]:
            out = merge(ln.xp, out, p)
        ln.stream.synchronize()
    return out


def to_host_task(m: Moments) -> Moments:
    """The last task of a device fit: the merged statistics as numpy float64 Moments."""
    return to_host(m)


def map_region(source: EmbeddingArray, start: int, stop: int, params: tuple, dtype: str,
               renormalize: bool, normalize: bool, device: str = "cuda") -> np.ndarray:
    """The device version of the apply kernel of engine.region_task: read source rows
    [start, stop) into a pinned buffer, map them on the device, copy them back into a
    pinned (rows, dB) buffer of ``dtype`` and return it (valid until this thread's next
    region). Raises NonFiniteError naming the first bad row, as the CPU path does."""
    matrix, source_mean, target_mean = params[:3]
    ln = lane(device)
    xp = ln.xp
    rows = stop - start
    work = matrix.dtype
    with ln.stream:
        x_h = ln.host("source-0", rows, source.dim, source.dtype)
        read_rows(source, start, stop, out=x_h)
        x = ln.upload("source-0", x_h, "source")
        flags: list = []
        y = map_rows(x, ln.constant("matrix", matrix), ln.constant("source_mean", source_mean),
                     ln.constant("target_mean", target_mean), normalize=normalize,
                     renormalize=renormalize, dtype=dtype, start=start, inplace=True,
                     out=ln.device("mapped", rows, matrix.shape[1], work), flags=flags)
        y_h = ln.host("mapped-out", rows, matrix.shape[1], dtype)
        ln.download(y, y_h)
        bad = _asnumpy(_failed(xp, flags))
        ln.stream.synchronize()
    if bool(bad):  # the host run of the same kernel names the row (NaN/Inf, or the cast)
        map_rows(read_rows(source, start, stop), matrix, source_mean, target_mean,
                 normalize=normalize, renormalize=renormalize, dtype=dtype, start=start)
        raise NonFiniteError(f"source rows {start}:{stop} map to NaN or Inf (found on the device)")
    return y_h


@contextlib.contextmanager
def using_backend(backend, device: str = "cuda"):
    """Run ``device``'s tasks on ``backend`` inside the block (tests: NumpyBackend)."""
    with _backends_lock:
        old = _backends.get(device)
        _backends[device] = backend
    try:
        yield backend
    finally:
        release_lanes()
        with _backends_lock:
            if old is None:
                _backends.pop(device, None)
            else:
                _backends[device] = old


# ---- the backend interface (bigalign.execution.devices) ----------------------------------

def check(device: str) -> None:
    """:func:`check_device` as the backend interface names it."""
    check_device(device)


def owns(m) -> bool:
    """Is ``m`` a partial on this backend's device?"""
    return isinstance(m, DeviceMoments)


release = release_lanes
