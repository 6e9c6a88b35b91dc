"""Where the block kernels run: "cpu" (numpy, in the task's own thread) or a device backend.

The kernels themselves are :mod:`bigalign.maths`'s, written once against the array API
(:mod:`bigalign.maths.arrays`); a backend only moves data and schedules work on its device.
A backend is one module named in :data:`BACKENDS`, providing:

==============================================  ===============================================
``check(device)``                               InputError unless the device is usable here
``fit_block(source, target, start, stop,        a block's statistics (they may stay on the
normalize, gram, dtype, step, rows_per_read,    device, as the backend's partials)
device)``
``merge_task(*parts)``                          merge partials on the device, in order
``owns(moments)`` / ``to_host(moments)``        is it one of its partials / as numpy float64
``map_region(source, start, stop, params,       mapped rows of a region, as numpy
dtype, renormalize, normalize, device)``
``release()``                                   free per-thread device state after a run
==============================================  ===============================================

Adding a backend is that module, one line in :data:`BACKENDS`, and its case in the parity
tests (tests/test_kernels.py runs every kernel on every backend that imports).
"""

from __future__ import annotations

import importlib
import sys

from ..errors import InputError

__all__ = ["BACKENDS", "DEVICES", "backend", "check_device", "to_host", "owner",
           "release_all"]

#: device name -> the module of its backend ("cpu" needs none)
BACKENDS = {"cuda": "bigalign.execution.gpu"}
DEVICES = ("cpu", *BACKENDS)


def backend(device: str):
    """The backend module of ``device`` (imported on first use), or None for "cpu"."""
    if device == "cpu":
        return None
    if device not in BACKENDS:
        raise InputError(f"device must be one of {', '.join(DEVICES)}, got {device!r}")
    return importlib.import_module(BACKENDS[device])


def check_device(device: str) -> str:
    """Validate ``device`` before any work starts (its backend checks that it is usable
    here: for "cuda", that CuPy imports and sees a device). Returns it."""
    module = backend(device)
    if module is not None:
        module.check(device)
    return device


def _loaded():
    """The backends imported in this process (a partial of a backend arriving from another
    process imports its module when it is unpickled)."""
    return [sys.modules[m] for m in BACKENDS.values() if m in sys.modules]


def owner(parts):
    """The backend whose device holds any of ``parts`` (partial statistics), or None."""
    for module in _loaded():
        if any(module.owns(p) for p in parts):
            return module
    return None


def to_host(moments):
    """``moments`` as numpy float64 statistics, wherever they are."""
    module = owner([moments])
    return moments if module is None else module.to_host(moments)


def release_all() -> None:
    """Free every loaded backend's per-thread device state (after a run)."""
    for module in _loaded():
        module.release()
