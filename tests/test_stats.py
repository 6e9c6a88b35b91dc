import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from bigalign.errors import NonFiniteError
from bigalign.maths.stats import (Accumulator, Moments, bad_norm_reason, bad_norms,
                                  block_moments, merge, merge_all, normalize_rows)


def oracle(a, b):
    """float64 two-pass in-memory reference."""
    a = a.astype(np.float64)
    b = b.astype(np.float64)
    ac, bc = a - a.mean(0), b - b.mean(0)
    return dict(n=len(a), mean_a=a.mean(0), mean_b=b.mean(0), cross=ac.T @ bc,
                sq_a=(ac * ac).sum(), sq_b=(bc * bc).sum(), gram_a=ac.T @ ac, gram_b=bc.T @ bc)


def assert_close(m: Moments, ref, rtol=1e-10, atol=0.0):
    assert m.n == ref["n"]
    for k in ("mean_a", "mean_b", "cross", "sq_a", "sq_b", "gram_a", "gram_b"):
        got = getattr(m, k)
        if got is None:
            continue
        scale = max(np.abs(ref[k]).max(), 1e-30)
        np.testing.assert_allclose(got, ref[k], rtol=0, atol=rtol * scale + atol, err_msg=k)


def data(n, da, db, seed=0, offset=0.0, dtype=np.float64):
    r = np.random.default_rng(seed)
    return ((r.standard_normal((n, da)) + offset).astype(dtype),
            (r.standard_normal((n, db)) - offset).astype(dtype))


@pytest.mark.parametrize("da,db", [(5, 5), (3, 8), (8, 3)])
def test_block_float64_matches_oracle(da, db):
    a, b = data(200, da, db)
    assert_close(block_moments(a, b, gram=True), oracle(a, b), rtol=1e-12)


def test_float32_gemm_accuracy_documented():
    # float32 GEMMs on centred blocks, float64 sums: relative error ~1e-6 of the scale
    a, b = data(5000, 32, 24, dtype=np.float32)
    m = block_moments(a, b, gram=True)
    assert m.cross.dtype == np.float64
    assert_close(m, oracle(a, b), rtol=2e-6)


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 60), min_size=1, max_size=8), st.integers(0, 10**6))
def test_merge_of_any_split_equals_whole(sizes, seed):
    a, b = data(sum(sizes), 4, 3, seed=seed, offset=3.0)
    bounds = np.cumsum([0] + sizes)
    parts = [block_moments(a[i:j], b[i:j], gram=True) for i, j in zip(bounds[:-1], bounds[1:])]
    assert_close(merge_all(parts), oracle(a, b), rtol=1e-11)
    # merge is order-free up to round-off: reversed order and a balanced tree agree
    assert_close(merge_all(parts[::-1]), oracle(a, b), rtol=1e-11)
    if len(parts) >= 2:
        h = len(parts) // 2
        assert_close(merge(merge_all(parts[:h]), merge_all(parts[h:])), oracle(a, b), rtol=1e-11)


def test_large_common_offset_is_stable():
    # vectors with an offset 1e4 times their spread: raw sums minus n*mu*mu^T would lose
    # every digit in float32 and most in float64; centred accumulation keeps them.
    r = np.random.default_rng(1)
    n, d = 20000, 8
    a = (1e3 + 0.1 * r.standard_normal((n, d))).astype(np.float64)
    b = (-1e3 + 0.1 * r.standard_normal((n, d))).astype(np.float64)
    parts = [block_moments(a[i:i + 1000].astype(np.float32), b[i:i + 1000].astype(np.float32))
             for i in range(0, n, 1000)]
    m = merge_all(parts)
    ref = oracle(a.astype(np.float32), b.astype(np.float32))
    assert_close(m, ref, rtol=1e-4)
    # the naive formula in float64 from raw float64 sums, for contrast, is far worse
    a32, b32 = a.astype(np.float32).astype(np.float64), b.astype(np.float32).astype(np.float64)
    naive = a32.T.astype(np.float32) @ b32.astype(np.float32) - n * np.outer(a32.mean(0), b32.mean(0))
    assert np.abs(naive - ref["cross"]).max() > 100 * np.abs(m.cross - ref["cross"]).max()


def test_float16_input_and_mixed_dims():
    a, b = data(300, 6, 10, dtype=np.float16)
    assert_close(block_moments(a, b, gram=True), oracle(a, b), rtol=1e-5)


def test_normalize_rows():
    a, b = data(50, 4, 4)
    m = block_moments(a, b, normalize=True)
    an = a / np.linalg.norm(a, axis=1, keepdims=True)
    bn = b / np.linalg.norm(b, axis=1, keepdims=True)
    assert_close(m, oracle(an, bn), rtol=1e-6)


def test_nan_names_the_row():
    a, b = data(100, 4, 4)
    b[37, 2] = np.nan
    with pytest.raises(NonFiniteError, match=r"target row 1037 .*1000:1100"):
        block_moments(a, b, start=1000)
    a[5, 0] = np.inf
    with pytest.raises(NonFiniteError, match=r"source row 5"):
        block_moments(a, b)


def test_zero_norm_row_with_normalize():
    a, b = data(10, 4, 4)
    a[3] = 0
    with pytest.raises(NonFiniteError, match=r"source row 3 holds a zero-norm row"):
        block_moments(a, b, normalize=True)
    block_moments(a, b)  # fine without normalisation


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bad_norms_flags_exactly_the_rows_normalize_rows_refuses(dtype):
    """bad_norms is the one test callers use to find, before normalising, the rows that
    normalize_rows would refuse: zero, underflowing (1e-30 squared is 0 in float32),
    overflowing (1e30 squared is Inf in float32) and non-finite rows."""
    rows = np.array([[0.0, 0.0], [1e-30, 1e-30], [np.nan, 1.0], [1e30, 1.0], [3.0, 4.0]])
    flags = bad_norms(rows, dtype)
    for i, row in enumerate(rows):
        try:
            normalize_rows(row[None], dtype, start=i)
            refused = False
        except NonFiniteError as e:
            refused = True
            assert f"source row {i} holds {bad_norm_reason(row, dtype)}" in str(e)
        assert flags[i] == refused, (i, dtype)
    expect = [True, True, True, True, False] if dtype == np.float32 else \
        [True, False, True, False, False]
    assert flags.tolist() == expect
    assert bad_norm_reason(rows[0], dtype) == "a zero-norm row (cannot normalise)"
    assert bad_norm_reason(rows[2], dtype) == "NaN or Inf"


def test_empty_block_and_merge_identity():
    a, b = data(20, 3, 2)
    e = block_moments(a[:0], b[:0], gram=True)
    m = block_moments(a, b, gram=True)
    assert e.n == 0
    assert merge(e, m) is m and merge(m, e) is m


def test_merge_rejects_mismatch():
    a, b = data(20, 3, 2)
    with pytest.raises(ValueError, match="dims"):
        merge(block_moments(a, b), block_moments(b, a))
    with pytest.raises(ValueError, match="Gram"):
        merge(block_moments(a, b, gram=True), block_moments(a, b))


def test_roundtrip_arrays():
    a, b = data(20, 3, 2)
    for gram in (True, False):
        m = block_moments(a, b, gram=gram)
        assert Moments.from_arrays(m.to_arrays()).equals(m)


def test_raw_sums_follow_by_addition():
    a, b = data(100, 3, 4, offset=2.0)
    m = block_moments(a, b, gram=True)
    np.testing.assert_allclose(m.raw_cross(), a.T @ b, rtol=1e-12)
    ga, gb = m.raw_gram()
    np.testing.assert_allclose(ga, a.T @ a, rtol=1e-12)
    np.testing.assert_allclose(m.raw_sq(), [(a * a).sum(), (b * b).sum()], rtol=1e-12)


# ---- the round-off record and the rigorous error bounds built on it --------------------------

def test_rounding_record_block_merge_and_roundtrip():
    from bigalign.maths.stats import unit_roundoff

    a, b = data(90, 5, 3, dtype=np.float32)
    m = block_moments(a, b, gram=True)
    assert m.rounding.tolist() == [unit_roundoff(np.float32), 90.0, 0.0, 0.0, 0.0]
    assert block_moments(a, b, dtype=np.float64).rounding[0] == unit_roundoff(np.float64)
    # float64 input rounded for a float32 GEMM: perturbed by u; normalised rows: by more
    a64, b64 = data(90, 5, 3)
    r = block_moments(a64, b64, dtype=np.float32).rounding
    assert r[3] == r[4] == unit_roundoff(np.float32)
    r = block_moments(a, b, normalize=True).rounding
    assert r[3] > unit_roundoff(np.float32) and r[4] > unit_roundoff(np.float32)
    # merging keeps the worst of each and counts the merge levels
    m = merge_all([block_moments(a[i:i + 30], b[i:i + 30]) for i in (0, 30, 60)])
    assert m.rounding.tolist() == [unit_roundoff(np.float32), 30.0, 2.0, 0.0, 0.0]
    back = Moments.from_arrays(m.to_arrays())
    assert back.equals(m) and back.rounding.tolist() == m.rounding.tolist()
    # statistics from before the record existed: unknown, and unknown once merged
    old = Moments.from_arrays({k: v for k, v in m.to_arrays().items() if k != "rounding"})
    assert old.rounding is None and merge(old, m).rounding is None


@pytest.mark.parametrize("case", ["float32", "float64", "f64-input-f32-gemm", "normalize",
                                  "offset", "float16", "unrecorded"])
def test_error_bounds_hold_against_a_float64_oracle(case):
    """statistic_errors bounds the actual error of every statistic (Frobenius for matrices),
    measured against float64 two-pass sums of the same rows."""
    from dataclasses import replace

    from bigalign.maths.solve import statistic_errors

    dtype, kw, offset, in_dtype = np.float32, {}, 0.5, np.float32
    if case == "float64":
        dtype = np.float64
    elif case == "f64-input-f32-gemm":
        in_dtype = np.float64
    elif case == "normalize":
        kw = {"normalize": True}
    elif case == "offset":
        offset = 300.0
    elif case == "float16":
        in_dtype = np.float16
    a, b = data(3000, 24, 17, seed=5, offset=offset, dtype=in_dtype)
    m = merge_all(block_moments(a[i:i + 700], b[i:i + 700], gram=True, dtype=dtype, **kw)
                  for i in range(0, len(a), 700))
    if case == "unrecorded":
        m = replace(m, rounding=None)
    if kw.get("normalize"):
        a = a.astype(np.float64) / np.linalg.norm(a.astype(np.float64), axis=1, keepdims=True)
        b = b.astype(np.float64) / np.linalg.norm(b.astype(np.float64), axis=1, keepdims=True)
    ref = oracle(a, b)
    e = statistic_errors(m)
    for key, bound in (("cross", e["cross"]), ("gram_a", e["gram_a"]), ("gram_b", e["gram_b"])):
        err = np.linalg.norm(getattr(m, key) - ref[key])
        assert err <= bound, (key, err, bound)
        assert bound < 1e-2 * np.linalg.norm(ref[key])       # and is not vacuous
    for key in ("sq_a", "sq_b"):
        assert abs(getattr(m, key) - ref[key]) <= e[key], key
    raw = m.raw_cross()
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    assert np.linalg.norm(raw - a64.T @ b64) <= e["cross"] + 1e-13 * np.linalg.norm(a64.T @ b64)


# ---- the streaming accumulator (the engine's form of "block_moments, then merge") -------

@pytest.mark.parametrize("gram", [False, True])
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_accumulator_equals_merged_blocks_and_a_float64_oracle(gram, normalize, dtype):
    rng = np.random.default_rng(7)
    a = (rng.standard_normal((2300, 24)) * 3 + 40).astype(np.float32)  # large common offset
    b = (rng.standard_normal((2300, 16)) - 7).astype(np.float32)
    sizes = [1, 700, 0, 333, 1266]  # ragged, with a one-row and an empty block
    acc = Accumulator(24, 16, gram=gram, normalize=normalize, dtype=dtype)
    parts, start = [], 0
    for k in sizes:
        acc.add(a[start:start + k], b[start:start + k], start=start)
        if k:
            parts.append(block_moments(a[start:start + k], b[start:start + k], gram=gram,
                                       normalize=normalize, dtype=dtype))
        start += k
    got, want = acc.moments(), merge_all(parts)
    assert got.n == want.n == 2300 and got.has_gram == gram
    np.testing.assert_array_equal(got.rounding, want.rounding)
    for f in ("mean_a", "mean_b", "cross", "sq_a", "sq_b", "gram_a", "gram_b"):
        g, w = getattr(got, f), getattr(want, f)
        if w is None:
            assert g is None
            continue
        np.testing.assert_allclose(g, w, rtol=1e-12, atol=1e-12 * np.abs(w).max(), err_msg=f)
    # and against float64 arithmetic on the whole data
    x, y = a.astype(np.float64), b.astype(np.float64)
    if normalize:
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        y /= np.linalg.norm(y, axis=1, keepdims=True)
    xc, yc = x - x.mean(0), y - y.mean(0)
    tol = 1e-5 if dtype == np.float32 else 1e-12
    scale = np.linalg.norm(xc) * np.linalg.norm(yc)
    assert np.linalg.norm(got.cross - xc.T @ yc) <= tol * scale
    # means are float64-accurate, except for rows normalised in float32
    mtol = 1e-7 if (normalize and dtype == np.float32) else 1e-12
    np.testing.assert_allclose(got.mean_a, x.mean(0), rtol=mtol, atol=mtol)


def test_accumulator_empty_errors_and_bad_rows():
    acc = Accumulator(3, 2)
    assert acc.moments().n == 0
    with pytest.raises(ValueError, match="widths"):
        acc.add(np.zeros((4, 2)), np.zeros((4, 2)))
    a = np.ones((10, 3), np.float32)
    a[6, 1] = np.nan
    acc.add(np.ones((5, 3), np.float32), np.ones((5, 2), np.float32))
    with pytest.raises(NonFiniteError, match="source row 106"):
        acc.add(a, np.ones((10, 2), np.float32), start=100)
