"""In-memory inputs (bigalign/storage/in_memory.py): numpy and Dask arrays as fit and apply
inputs, read by the engine as Zarr arrays are, with a content identity for no-op reruns."""

from __future__ import annotations

import dask.array as da
import numpy as np
import pytest
import zarr

import bigalign
from bigalign import InputError
from bigalign.storage.in_memory import InMemoryRows, adapt
import scipy.linalg

from conftest import planted, write_zarr


def test_numpy_and_dask_fit_equal_the_zarr_fit(tmp_path):
    a, b, _ = planted(2000, 12, noise=0.05, offset_a=0.5, seed=21)
    ref = bigalign.fit(write_zarr(tmp_path / "a.zarr", a, 250),
                       write_zarr(tmp_path / "b.zarr", b, 250))
    for src, tgt in ((a, b), (da.from_array(a, chunks=(250, 12)), b),
                     (a, da.from_array(b, chunks=(300, 5)))):  # columns split: rows made whole
        t = bigalign.fit(src, tgt)
        np.testing.assert_allclose(t.rotation, ref.rotation, atol=1e-6)
        np.testing.assert_allclose(t.target_mean, ref.target_mean, atol=1e-9)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    oracle = scipy.linalg.orthogonal_procrustes(a64 - a64.mean(0), b64 - b64.mean(0))[0]
    np.testing.assert_allclose(ref.rotation, oracle, atol=1e-5)


def test_apply_of_arrays_equals_transform_and_reruns_are_no_ops(tmp_path):
    a, b, _ = planted(1500, 8, noise=0.05, seed=22)
    t = bigalign.fit(a, b, output=str(tmp_path / "t"))
    again = bigalign.fit(a.copy(), b.copy(), output=str(tmp_path / "t"))  # equal content
    assert again.metadata["job"] == t.metadata["job"]
    with pytest.raises(InputError, match="already exists"):  # other content: another job
        bigalign.fit(a + 1, b, output=str(tmp_path / "t"))
    out = str(tmp_path / "o.zarr")
    r = bigalign.apply(t, da.from_array(a, chunks=(100, 8)), out)
    assert r.rows == 1500
    np.testing.assert_allclose(zarr.open_array(out)[:], t.transform(a), atol=1e-6)
    assert bigalign.apply(t, da.from_array(a, chunks=(100, 8)), out).already_complete


def test_bad_in_memory_inputs_are_named():
    for x, msg in ((np.zeros((0, 4), np.float32), "non-empty 2-D"),
                   (np.zeros(4, np.float32), "non-empty 2-D"),
                   (np.zeros((4, 4), np.int64), "not float16, float32 or float64"),
                   (da.zeros((10, 4), chunks=((3, 7), (4,))), "uneven row chunks")):
        with pytest.raises(InputError, match=msg):
            adapt(x, "source")
    assert adapt("a/path.zarr", "source") == "a/path.zarr"
    rows = adapt(np.ones((3, 2), np.float32), "source")
    assert isinstance(rows, InMemoryRows) and rows.url.startswith("memory://numpy-")
    assert adapt(np.ones((3, 2), np.float32), "source").token == rows.token


def test_a_cluster_is_not_used_for_in_memory_rows(caplog):
    a, b, _ = planted(300, 4, seed=23)
    bigalign.fit(a, b, workers=2)
    assert "read in this process" in caplog.text
