"""Device backends (bigalign.execution.devices): each is one module with one interface."""

from __future__ import annotations

import importlib

import pytest

from bigalign.errors import InputError
from bigalign.execution import devices

INTERFACE = ("check", "fit_block", "merge_task", "owns", "to_host", "map_region", "release")


@pytest.mark.parametrize("device", sorted(devices.BACKENDS))
def test_every_backend_provides_the_interface(device):
    module = importlib.import_module(devices.BACKENDS[device])
    assert devices.backend(device) is module
    missing = [name for name in INTERFACE if not callable(getattr(module, name, None))]
    assert not missing, f"{devices.BACKENDS[device]} lacks {missing}"


def test_cpu_needs_no_backend_and_unknown_devices_are_refused():
    assert devices.backend("cpu") is None and devices.check_device("cpu") == "cpu"
    with pytest.raises(InputError, match="device must be one of cpu, cuda, got 'tpu'"):
        devices.check_device("tpu")


def test_host_statistics_pass_through():
    from bigalign.maths.stats import block_moments
    import numpy as np

    m = block_moments(np.ones((3, 2)), np.ones((3, 2)))
    assert devices.owner([m]) is None and devices.to_host(m) is m
