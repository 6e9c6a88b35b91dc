"""The GPU backend (bigalign.execution.gpu).

Without a GPU, the backend's tasks run with numpy arrays (NumpyBackend): the same code path
(lanes, slots, the one statistics and apply kernel with deferred checks), checked against
the CPU fit/apply. With CuPy and a CUDA device, the same checks run on the device within
float32 round-off; they skip elsewhere (CI needs no GPU). The kernels themselves are checked
on every backend in tests/test_kernels.py.
"""

from __future__ import annotations

import os
import shutil
import sys

import numpy as np
import pytest
import zarr

import bigalign
import bigalign.storage.job
from bigalign.execution import gpu
from bigalign.errors import InputError, NonFiniteError
from bigalign.maths.stats import Moments, block_moments, merge

from conftest import imported_store, planted, write_zarr

# the bad-row tests feed NaN/Inf through numpy on purpose
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")

FIELDS = ("mean_a", "mean_b", "cross", "sq_a", "sq_b", "gram_a", "gram_b", "rounding")


def _cupy_or_skip():
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except Exception as e:  # no driver
        pytest.skip(f"no CUDA device ({e})")
    return cupy


def _block(n=700, da=24, db=32, offset=3.0, dtype=np.float32, seed=1):
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal((n, da)) + offset).astype(dtype)
    b = (rng.standard_normal((n, db)) - offset).astype(dtype)
    return a, b


def _assert_moments_equal(got: Moments, want: Moments):
    got = gpu.to_host(got)
    assert type(got) is Moments and got.n == want.n
    for f in FIELDS:
        g, w = getattr(got, f), getattr(want, f)
        if w is None:
            assert g is None, f
        else:
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w), err_msg=f)
    assert isinstance(got.sq_a, float) and got.cross.dtype == np.float64


def _assert_moments_close(got: Moments, want: Moments, rtol=2e-6):
    got = gpu.to_host(got)
    assert got.n == want.n
    for f in FIELDS:
        g, w = getattr(got, f), getattr(want, f)
        if w is None:
            assert g is None
            continue
        w = np.asarray(w)
        np.testing.assert_allclose(g, w, rtol=rtol, atol=rtol * float(np.abs(w).max()),
                                   err_msg=f)


def _assert_streamed_equal(got: Moments, want: Moments):
    """A device fit against the CPU fit: the same centring and GEMMs, but the CPU folds a
    task's blocks into one in-place stats.Accumulator while the device merges per-block
    partials (stats.merge_with), so float64 sums agree to round-off, not bit for bit; the
    rounding record is the same."""
    _assert_moments_close(got, want, rtol=1e-12)
    np.testing.assert_array_equal(gpu.to_host(got).rounding, want.rounding)


# ---- the device merge (the kernels' parity on every backend: tests/test_kernels.py) ---------

def test_merge_numpy_matches_cpu_merge():
    a, b = _block(n=900)
    parts = [block_moments(a[i:j], b[i:j], gram=True)
             for i, j in [(0, 200), (200, 650), (650, 900)]]
    dev = [gpu.to_device(np, p) for p in parts]
    want = merge(merge(parts[0], parts[1]), parts[2])
    got = gpu.merge(np, gpu.merge(np, dev[0], dev[1]), dev[2])
    _assert_moments_equal(got, want)
    # mixed host/device inputs (a resumed unit) and empty partials
    _assert_moments_equal(gpu.merge(np, parts[0], dev[1]), merge(parts[0], parts[1]))
    empty = Moments.empty(24, 32, gram=True)
    _assert_moments_equal(gpu.merge(np, empty, dev[2]), parts[2])
    with pytest.raises(ValueError):
        gpu.merge(np, parts[0], Moments.empty(24, 32, gram=False))


# ---- the GPU tasks end to end, on the numpy backend (no GPU needed) -------------------------

@pytest.fixture
def emulated(monkeypatch):
    """device="cuda" runs bigalign.execution.gpu's task code with numpy arrays (NumpyBackend)."""
    monkeypatch.setattr(gpu, "_cupy", lambda: None)
    with gpu.using_backend(gpu.NumpyBackend()):
        yield


@pytest.mark.parametrize("diagnostics", [False, True])
def test_fit_on_emulated_device_equals_cpu_fit(pair, emulated, diagnostics):
    # 40 rows per read and 3 reads per task: slots alternate, several partials per tree
    s, t, a, b, q = pair(n=2000, dim_a=12, dim_b=16, chunk_a=40, offset_a=5.0, offset_b=-2.0)
    kw = dict(center=True, diagnostics=diagnostics, block_bytes=40 * 28 * 4 * 3, threads=4)
    cpu = bigalign.fit(s, t, **kw)
    dev = bigalign.fit(s, t, device="cuda", **kw)
    assert dev.metadata["run"]["device"] == "cuda" and cpu.metadata["run"]["device"] == "cpu"
    assert dev.metadata["run"]["tasks"] > 4
    _assert_streamed_equal(dev.statistics, cpu.statistics)
    np.testing.assert_allclose(dev.rotation, cpu.rotation, rtol=0, atol=1e-10)
    assert gpu._lanes == {}  # released after the run


def test_fit_on_emulated_device_checkpoints_and_resumes(pair, emulated, tmp_path):
    from bigalign.storage.job import Job
    from bigalign.planning.plan import FitPlan
    s, t, *_ = pair(n=3000, dim_a=8, chunk_a=50, offset_a=1.0)
    kw = dict(center=True, block_bytes=50 * 16 * 4, threads=3)
    cpu = bigalign.fit(s, t, **kw)
    out = str(tmp_path / "t.transform")
    dev = bigalign.fit(s, t, device="cuda", output=out, keep_checkpoint=True, **kw)
    _assert_streamed_equal(dev.statistics, cpu.statistics)
    # units saved by the device run are plain numpy Moments, equal to the CPU's
    prog = Job(bigalign.storage.job.default_checkpoint(out))
    manifest = prog.manifest()
    prog.run_id = manifest["run_id"]
    rows = FitPlan(**manifest["plan"]).unit_rows()
    done = sorted(prog.done_units(rows))
    assert len(done) > 2
    assert type(prog.load_unit(done[0], *rows[done[0]])) is Moments
    # an interrupted run: no transform yet, half of the units stored; the rerun merges
    # resumed host partials with fresh device partials
    shutil.rmtree(out)
    for u in done[len(done) // 2:]:  # unit files are named INDEX_RUN_START_STOP_N.npz
        for name in os.listdir(os.path.join(prog.url, "units")):
            if name.startswith(f"{u:09d}_"):
                os.remove(os.path.join(prog.url, "units", name))
    again = bigalign.fit(s, t, device="cuda", output=out, **kw)
    assert again.metadata["run"]["units_resumed"] == len(done) // 2
    _assert_streamed_equal(again.statistics, cpu.statistics)


@pytest.mark.parametrize("options", [{}, {"renormalize": True, "dtype": "float16"},
                                     {"target_centred": True, "dtype": "float64"}])
def test_apply_on_emulated_device_writes_the_cpu_bytes(pair, emulated, tmp_path, options):
    s, t, *_ = pair(n=1500, dim_a=12, dim_b=16, chunk_a=100, offset_a=2.0)
    tr = bigalign.fit(s, t, center=True, scale=True)
    bigalign.apply(tr, s, str(tmp_path / "cpu.zarr"), **options)
    r = bigalign.apply(tr, s, str(tmp_path / "dev.zarr"), device="cuda", threads=3, **options)
    assert r.rows == 1500 and r.tasks > 3
    got = zarr.open_array(str(tmp_path / "dev.zarr"))
    want = zarr.open_array(str(tmp_path / "cpu.zarr"))
    assert got.attrs["bigalign"]["complete"] is True
    np.testing.assert_array_equal(got[:], want[:])


def _apply_store_on(device, tmp_path, **kw):
    """Apply of an imported store (string ids) on ``device`` and on the CPU: (device
    output group, CPU output group, source ids)."""
    a, b, _ = planted(1500, 12, noise=0.1, offset_a=2.0, seed=41)
    ids = np.array([f"k{i * 13 % 1500}" for i in range(1500)])
    s = imported_store(tmp_path / "a.store", a, ids, model="old", chunk_rows=100)
    t = imported_store(tmp_path / "b.store", b, ids, model="new", chunk_rows=100)
    tr = bigalign.fit(s, t, center=True)
    bigalign.apply(tr, s, str(tmp_path / "cpu.store"), **kw)
    bigalign.apply(tr, s, str(tmp_path / "dev.store"), device=device, threads=3, **kw)
    return (zarr.open_group(str(tmp_path / "dev.store")),
            zarr.open_group(str(tmp_path / "cpu.store")), ids)


def test_apply_of_a_store_on_emulated_device_copies_the_ids(emulated, tmp_path):
    """The device path writes the ids too (a host copy): the CPU's store, byte for byte."""
    got, want, ids = _apply_store_on("cuda", tmp_path, rows="150:1450")
    assert got.attrs["bigalign"]["complete"] is True and got.attrs["model"] == "new"
    assert got["ids"][:].tolist() == want["ids"][:].tolist() == ids[150:1450].tolist()
    np.testing.assert_array_equal(got["embeddings"][:], want["embeddings"][:])


def test_normalized_fit_and_apply_on_emulated_device(pair, emulated, tmp_path):
    s, t, *_ = pair(n=800, dim_a=10, chunk_a=100)
    cpu = bigalign.fit(s, t, normalize=True, center=True)
    dev = bigalign.fit(s, t, normalize=True, center=True, device="cuda")
    _assert_streamed_equal(dev.statistics, cpu.statistics)
    bigalign.apply(cpu, s, str(tmp_path / "c.zarr"))
    bigalign.apply(cpu, s, str(tmp_path / "d.zarr"), device="cuda")
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "d.zarr"))[:],
                                  zarr.open_array(str(tmp_path / "c.zarr"))[:])


def _error(fn):
    with pytest.raises(NonFiniteError) as e:
        fn()
    return str(e.value)


@pytest.mark.parametrize("side,row", [("source", 1234), ("target", 7)])
def test_fit_on_emulated_device_names_the_bad_row_as_the_cpu_does(tmp_path, emulated, side, row):
    a, b, _ = planted(2000, 8)
    (a if side == "source" else b)[row, 3] = np.nan
    s, t = write_zarr(tmp_path / "a.zarr", a, 100), write_zarr(tmp_path / "b.zarr", b, 100)
    cpu = _error(lambda: bigalign.fit(s, t, block_bytes=100 * 64 * 3))
    dev = _error(lambda: bigalign.fit(s, t, block_bytes=100 * 64 * 3, device="cuda"))
    assert f"{side} row {row} holds NaN or Inf" in dev
    assert dev == cpu


def test_normalized_fit_on_emulated_device_names_a_zero_row(tmp_path, emulated):
    a, b, _ = planted(600, 8)
    a[333] = 0
    s, t = write_zarr(tmp_path / "a.zarr", a, 100), write_zarr(tmp_path / "b.zarr", b, 100)
    dev = _error(lambda: bigalign.fit(s, t, normalize=True, device="cuda"))
    assert "source row 333 holds a zero-norm row" in dev
    assert dev == _error(lambda: bigalign.fit(s, t, normalize=True))


def test_float16_apply_on_emulated_device_refuses_overflow_as_the_cpu_does(tmp_path, emulated):
    """--dtype float16: a mapped value beyond 65504 must not be written as Inf. The device
    path used to check finiteness before the cast only, wrote Inf and marked the output
    complete where the CPU path refuses; both now run one cast check."""
    a, b, _ = planted(600, 8)
    tr = bigalign.fit(write_zarr(tmp_path / "a.zarr", a, 100),
                      write_zarr(tmp_path / "b.zarr", b, 100))
    a[412] *= 1e5  # maps to ~1e5, beyond float16
    s = write_zarr(tmp_path / "big.zarr", a, 100)
    dev = _error(lambda: bigalign.apply(tr, s, str(tmp_path / "o1.zarr"), dtype="float16",
                                        device="cuda"))
    cpu = _error(lambda: bigalign.apply(tr, s, str(tmp_path / "o2.zarr"), dtype="float16"))
    assert "source row 412 maps to values up to" in dev and "float16 range" in dev
    assert dev == cpu
    out = zarr.open_array(str(tmp_path / "o1.zarr"))
    assert out.attrs["bigalign"].get("complete") is not True


def test_apply_on_emulated_device_names_the_bad_row(tmp_path, emulated):
    a, b, _ = planted(600, 8)
    tr = bigalign.fit(write_zarr(tmp_path / "a.zarr", a, 100),
                      write_zarr(tmp_path / "b.zarr", b, 100))
    a[412, 0] = np.inf
    s = write_zarr(tmp_path / "bad.zarr", a, 100)
    dev = _error(lambda: bigalign.apply(tr, s, str(tmp_path / "o1.zarr"), device="cuda"))
    cpu = _error(lambda: bigalign.apply(tr, s, str(tmp_path / "o2.zarr")))
    assert "source row 412 holds NaN or Inf" in dev and dev == cpu


# ---- device validation (clear errors, before any work) --------------------------------------

def test_unknown_device_is_an_input_error(pair):
    s, t, *_ = pair(n=100, dim_a=4)
    with pytest.raises(InputError, match="device must be one of cpu, cuda"):
        bigalign.fit(s, t, device="gpu")
    with pytest.raises(InputError, match="device must be one of"):
        bigalign.apply("nowhere", s, "out.zarr", device="tpu")


def test_cuda_without_cupy_is_an_input_error_not_an_import_error(pair, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "cupy", None)  # import cupy -> ImportError
    s, t, *_ = pair(n=100, dim_a=4)
    with pytest.raises(InputError, match=r"needs CuPy.*bigalign\[gpu\].*cupy-cuda13x"):
        bigalign.fit(s, t, device="cuda")
    with pytest.raises(InputError, match="needs CuPy"):
        bigalign.apply("nowhere.transform", s, str(tmp_path / "o.zarr"), device="cuda")
    assert not (tmp_path / "o.zarr").exists()


def test_cli_device_option(pair, monkeypatch, tmp_path, capsys):
    from bigalign.cli import build_parser, main
    s, t, *_ = pair(n=200, dim_a=4, chunk_a=50)
    args = build_parser().parse_args(["fit", s, t, "-o", "x"])
    assert args.device == "cpu"
    monkeypatch.setitem(sys.modules, "cupy", None)
    assert main(["fit", s, t, "-o", str(tmp_path / "t"), "--device", "cuda", "-q"]) == 2
    err = capsys.readouterr().err
    assert "needs CuPy" in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["fit", s, t, "-o", "x", "--device", "gpu"])


def test_cli_device_on_emulated_device(pair, emulated, tmp_path, capsys):
    from bigalign.cli import main
    s, t, *_ = pair(n=600, dim_a=6, chunk_a=50, offset_a=1.0)
    out = str(tmp_path / "t.transform")
    assert main(["fit", s, t, "-o", out, "--center", "--device", "cuda", "-q"]) == 0
    assert bigalign.Transform.load(out).metadata["run"]["device"] == "cuda"
    assert main(["apply", out, s, "-o", str(tmp_path / "o.zarr"), "--device", "cuda", "-q"]) == 0
    np.testing.assert_array_equal(zarr.open_array(str(tmp_path / "o.zarr"))[:],
                                  bigalign.Transform.load(out).transform(zarr.open_array(s)[:]))


# ---- on a real GPU (skipped without CuPy and a CUDA device) ---------------------------------

def test_fit_and_apply_on_cuda_match_cpu(pair, tmp_path):
    _cupy_or_skip()
    s, t, *_ = pair(n=20000, dim_a=48, dim_b=64, chunk_a=500, offset_a=4.0, offset_b=-1.0)
    kw = dict(center=True, block_bytes=500 * 112 * 4 * 2)
    cpu = bigalign.fit(s, t, **kw)
    dev = bigalign.fit(s, t, device="cuda", **kw)
    _assert_moments_close(dev.statistics, cpu.statistics)
    np.testing.assert_allclose(dev.rotation, cpu.rotation, atol=1e-5)
    bigalign.apply(cpu, s, str(tmp_path / "c.zarr"))
    bigalign.apply(cpu, s, str(tmp_path / "d.zarr"), device="cuda")
    want = zarr.open_array(str(tmp_path / "c.zarr"))[:]
    np.testing.assert_allclose(zarr.open_array(str(tmp_path / "d.zarr"))[:], want,
                               rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_apply_of_a_store_on_cuda_copies_the_ids(tmp_path):
    _cupy_or_skip()
    got, want, ids = _apply_store_on("cuda", tmp_path, rows="150:1450")
    assert got.attrs["bigalign"]["complete"] is True and got.attrs["model"] == "new"
    assert got["ids"][:].tolist() == ids[150:1450].tolist()
    np.testing.assert_allclose(got["embeddings"][:], want["embeddings"][:], rtol=1e-5,
                               atol=1e-5)


def test_fit_on_cuda_names_the_bad_row(tmp_path):
    _cupy_or_skip()
    a, b, _ = planted(3000, 16)
    b[2222, 5] = np.inf
    s, t = write_zarr(tmp_path / "a.zarr", a, 250), write_zarr(tmp_path / "b.zarr", b, 250)
    assert "target row 2222 holds NaN or Inf" in _error(lambda: bigalign.fit(s, t, device="cuda"))


def test_apply_rows_and_bad_rows_on_emulated_device(pair, emulated, tmp_path):
    """--rows reads the right source rows on the device, and a region holding a NaN row
    under --bad-rows nan is mapped again on the CPU: the same bytes as the CPU path."""
    s, t, a, *_ = pair(n=1200, dim_a=6, chunk_a=100)
    tr = bigalign.fit(s, t, center=True)
    bad = a.copy()
    bad[650, 2] = np.nan
    src = zarr.create_array(str(tmp_path / "bad.zarr"), data=bad, chunks=(100, 6))
    kw = dict(rows="200:1000", bad_rows="nan", chunk_rows=100)
    cpu = bigalign.apply(tr, src, str(tmp_path / "cpu.zarr"), **kw)
    dev = bigalign.apply(tr, src, str(tmp_path / "dev.zarr"), device="cuda", threads=3, **kw)
    assert cpu.bad_rows == dev.bad_rows == [650]
    got, want = zarr.open_array(str(tmp_path / "dev.zarr"))[:], zarr.open_array(str(tmp_path / "cpu.zarr"))[:]
    assert got.shape == (800, 6) and np.isnan(got[450]).all()
    np.testing.assert_array_equal(got, want)
