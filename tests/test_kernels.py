"""Parity of the two kernels on every available backend against a float64 numpy oracle.

The statistics kernel (bigalign.maths.stats.Accumulator, and block_moments, its one-block
form) and the apply kernel (bigalign.maths.mapping.map_rows) are written once against the
array API. Each test runs on:

- ``numpy``: the CPU path (checks raise at once, naming the row);
- ``emulated``: numpy arrays with deferred checks (``flags=[...]``), as the GPU tasks run
  them on the numpy-emulated device of tests/test_gpu.py;
- ``strict``: array-api-strict, the standard's reference namespace: the kernels' generic
  path (no ``out=``, einsum or BLAS dger), which no NumPy run takes;
- ``cupy``: a CUDA device with deferred checks (skipped without CuPy and a device).
"""

from __future__ import annotations

import numpy as np
import pytest

from bigalign.errors import NonFiniteError
from bigalign.maths.arrays import to_numpy
from bigalign.maths.mapping import check_cast, map_rows
from bigalign.maths.stats import Accumulator, block_moments

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


class Backend:
    def __init__(self, name, put, deferred, float16=True):
        self.name, self.put, self.deferred, self.float16 = name, put, deferred, float16

    def need(self, *dtypes):
        """Skip where the backend lacks float16 (the array API standard has none)."""
        if not self.float16 and any(np.dtype(d) == np.float16 for d in dtypes):
            pytest.skip(f"{self.name} has no float16")

    def flags(self):
        """The kernels' ``flags`` argument of this backend: None (raise) or a list."""
        return [] if self.deferred else None

    def __repr__(self):
        return self.name


def _strict():
    xp = pytest.importorskip("array_api_strict")
    return Backend("strict", lambda v: xp.asarray(v), False, float16=False)


def _cupy():
    cupy = pytest.importorskip("cupy")
    try:
        if cupy.cuda.runtime.getDeviceCount() < 1:
            pytest.skip("no CUDA device")
    except Exception as e:  # no driver
        pytest.skip(f"no CUDA device ({e})")
    return Backend("cupy", cupy.asarray, True)


BACKENDS = {
    "numpy": lambda: Backend("numpy", np.array, False),
    "emulated": lambda: Backend("emulated", np.array, True),
    "strict": _strict,
    "cupy": _cupy,
}


@pytest.fixture(params=list(BACKENDS))
def backend(request):
    return BACKENDS[request.param]()


def _failed(flags) -> bool:
    return any(bool(to_numpy(f)) for f in flags)


def _block(n=700, da=24, db=32, offset=30.0, dtype=np.float32, seed=1):
    """Paired blocks with a large common offset (centring must be float64-accurate)."""
    rng = np.random.default_rng(seed)
    a = (rng.standard_normal((n, da)) * 2 + offset).astype(dtype)
    b = (rng.standard_normal((n, db)) - offset / 3).astype(dtype)
    return a, b


def _oracle_moments(a, b, normalize):
    x, y = a.astype(np.float64), b.astype(np.float64)
    if normalize:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        y /= np.linalg.norm(y, axis=1, keepdims=True)
    xc, yc = x - x.mean(0), y - y.mean(0)
    return dict(n=len(x), mean_a=x.mean(0), mean_b=y.mean(0), cross=xc.T @ yc,
                sq_a=float((xc * xc).sum()), sq_b=float((yc * yc).sum()), gram_a=xc.T @ xc,
                gram_b=yc.T @ yc)


def _assert_moments_near(m, want, gram, gemm, normalize):
    tol = 1e-12 if gemm == np.float64 else 3e-6
    mtol = 1e-7 if (normalize and gemm == np.float32) else 1e-12
    assert m.n == want["n"] and m.has_gram == gram
    for f in ("mean_a", "mean_b"):
        np.testing.assert_allclose(to_numpy(getattr(m, f)), want[f], rtol=mtol, atol=mtol,
                                   err_msg=f)
    fields = ["cross", "sq_a", "sq_b"] + (["gram_a", "gram_b"] if gram else [])
    for f in fields:
        g, w = np.asarray(to_numpy(getattr(m, f)), np.float64), np.asarray(want[f])
        assert np.linalg.norm(g - w) <= tol * max(np.linalg.norm(w), 1.0), f
    if not gram:
        assert m.gram_a is None and m.gram_b is None


# ---- the statistics kernel -----------------------------------------------------------------

@pytest.mark.parametrize("gram", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("in_dtype,gemm", [(np.float32, np.float32), (np.float16, np.float32),
                                           (np.float64, np.float64), (np.float64, np.float32)])
def test_accumulator_matches_float64_oracle(backend, gram, normalize, in_dtype, gemm):
    backend.need(in_dtype)
    a, b = _block(n=2300, dtype=in_dtype)
    acc = Accumulator(24, 32, gram=gram, normalize=normalize, dtype=gemm)
    start = 0
    for k in [1, 700, 0, 333, 1266]:  # ragged, with a one-row and an empty block
        flags = backend.flags()
        acc.add(backend.put(a[start:start + k]), backend.put(b[start:start + k]),
                start=start, flags=flags)
        assert not (flags and _failed(flags))
        start += k
    m = acc.moments()
    _assert_moments_near(m, _oracle_moments(a, b, normalize), gram, gemm, normalize)
    # the rounding record is the backend's too (the same for every backend)
    want = Accumulator(24, 32, gram=gram, normalize=normalize, dtype=gemm)
    for i, j in [(0, 1), (1, 701), (701, 1034), (1034, 2300)]:
        want.add(a[i:j], b[i:j])
    np.testing.assert_array_equal(m.rounding, want.moments().rounding)


def test_block_moments_with_scratch_matches_oracle(backend):
    a, b = _block()
    m = block_moments(backend.put(a), backend.put(b), gram=True)
    _assert_moments_near(m, _oracle_moments(a, b, False), True, np.float32, False)
    if backend.name != "strict":  # scratch buffers: numpy/cupy's out= centring
        sa, sb = backend.put(np.empty_like(a)), backend.put(np.empty_like(b))
        m2 = block_moments(backend.put(a), backend.put(b), gram=True, scratch=(sa, sb))
        np.testing.assert_array_equal(to_numpy(m2.cross), to_numpy(m.cross))
        np.testing.assert_allclose(to_numpy(sa).mean(axis=0), 0, atol=1e-4)


@pytest.mark.parametrize("where", ["source-nan", "target-inf", "zero-norm"])
def test_accumulator_checks_name_the_row_or_flag_it(backend, where):
    a, b = _block()
    normalize = where == "zero-norm"
    side, row = ("target", 600) if where == "target-inf" else ("source", 17)
    if where == "source-nan":
        a[17, 3] = np.nan
    elif where == "target-inf":
        b[600, 0] = np.inf
    else:
        a[17] = 0
    acc = Accumulator(24, 32, normalize=normalize)
    flags = backend.flags()
    if flags is None:
        with pytest.raises(NonFiniteError, match=f"{side} row {1000 + row} holds"):
            acc.add(backend.put(a), backend.put(b), start=1000)
    else:
        acc.add(backend.put(a), backend.put(b), start=1000, flags=flags)
        assert _failed(flags)


# ---- the apply kernel ----------------------------------------------------------------------

def _map_case(dtype, n=300, da=24, db=32, seed=3):
    x, _ = _block(n=n, da=da, offset=3.0)
    rng = np.random.default_rng(seed)
    work = np.float64 if dtype == "float64" else np.float32
    matrix = (rng.standard_normal((da, db)) / np.sqrt(da)).astype(work)
    return x, matrix, rng.standard_normal(da), rng.standard_normal(db)


def _oracle_map(x, matrix, mu_a, mu_b, normalize, renormalize):
    x = x.astype(np.float64)
    if normalize:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
    y = (x - mu_a) @ matrix.astype(np.float64) + mu_b
    if renormalize:
        y /= np.linalg.norm(y, axis=1, keepdims=True)
    return y


@pytest.mark.parametrize("normalize,renormalize", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("dtype", ["float16", "float32", "float64"])
@pytest.mark.parametrize("inplace", [False, True])
def test_map_rows_matches_float64_oracle(backend, normalize, renormalize, dtype, inplace):
    backend.need(dtype)
    x, matrix, mu_a, mu_b = _map_case(dtype)
    flags = backend.flags()
    got = map_rows(backend.put(x), backend.put(matrix), backend.put(mu_a), backend.put(mu_b),
                   normalize=normalize, renormalize=renormalize, dtype=dtype,
                   inplace=inplace, flags=flags)
    assert not (flags and _failed(flags))
    got = to_numpy(got)
    assert got.dtype == np.dtype(dtype) and got.shape == (300, 32)
    want = _oracle_map(x, matrix, mu_a, mu_b, normalize, renormalize)
    tol = {"float16": 1e-3, "float32": 1e-5, "float64": 1e-12}[dtype]
    np.testing.assert_allclose(got, want, rtol=tol, atol=tol * float(np.abs(want).max()))


def test_map_rows_is_the_same_bits_on_numpy_and_emulated_device():
    x, matrix, mu_a, mu_b = _map_case("float16")
    want = map_rows(x.copy(), matrix, mu_a, mu_b, dtype="float16", renormalize=True)
    flags = []
    got = map_rows(x.copy(), matrix, mu_a, mu_b, dtype="float16", renormalize=True,
                   inplace=True, flags=flags)
    assert not _failed(flags)
    np.testing.assert_array_equal(got, want)


def test_map_rows_nan_row_is_named_or_flagged(backend):
    x, matrix, mu_a, mu_b = _map_case("float32", n=50, da=8, db=8)
    x[7, 2] = np.inf
    flags = backend.flags()
    args = (backend.put(x), backend.put(matrix), backend.put(mu_a), backend.put(mu_b))
    if flags is None:
        with pytest.raises(NonFiniteError, match="source row 507 holds NaN or Inf"):
            map_rows(*args, start=500)
    else:
        map_rows(*args, start=500, flags=flags)
        assert _failed(flags)


def test_float16_cast_overflow_is_named_or_flagged(backend):
    """The output-cast check (finite after the cast to the output dtype) on every backend:
    the GPU path used to check before the cast only and wrote Inf."""
    backend.need(np.float16)
    x = np.ones((40, 3), np.float32)
    x[29, 1] = 2e4
    args = [backend.put(v) for v in (x, 4 * np.eye(3, dtype=np.float32), np.zeros(3),
                                     np.zeros(3))]
    flags = backend.flags()
    if flags is None:
        with pytest.raises(NonFiniteError, match=r"source row 129 maps to values up to 80000.*"
                                                 r"beyond the float16 range"):
            map_rows(*args, dtype="float16", start=100)
    else:
        y = map_rows(*args, dtype="float16", start=100, flags=flags)
        assert _failed(flags) and not np.isfinite(to_numpy(y)).all()
    # float32 output and a renormalised float16 output are fine
    for kw in ({"dtype": "float32"}, {"dtype": "float16", "renormalize": True}):
        flags = backend.flags()
        y = to_numpy(map_rows(*[backend.put(to_numpy(v)) for v in args], flags=flags, **kw))
        assert np.isfinite(y).all() and not (flags and _failed(flags))


def test_check_cast_alone():
    y = np.array([[1.0, 7e4], [2.0, 3.0]], np.float32)
    with np.errstate(over="ignore"):
        r = y.astype(np.float16)
    with pytest.raises(NonFiniteError, match="source row 10 maps to values up to 70000"):
        check_cast(r, y, 10)
    flags = []
    check_cast(r, y, 10, flags)
    assert _failed(flags)
    flags = []
    check_cast(y[1:].astype(np.float16), y[1:], 0, flags)
    assert not _failed(flags)
