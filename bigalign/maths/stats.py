"""Sufficient statistics of paired rows: compute from a block, merge, read off.

Everything a fit needs is a handful of small sums over paired rows ``a_i`` (dA) and
``b_i`` (dB). We keep them *centred*, in float64:

=========  ===========================================  ==========
field      value                                        shape
=========  ===========================================  ==========
n          number of pairs                              int
mean_a     mean of a_i                                  (dA,)
mean_b     mean of b_i                                  (dB,)
cross      sum (a_i - mean_a)(b_i - mean_b)^T           (dA, dB)
sq_a       sum ||a_i - mean_a||^2                       float
sq_b       sum ||b_i - mean_b||^2                       float
gram_a     sum (a_i - mean_a)(a_i - mean_a)^T or None   (dA, dA)
gram_b     sum (b_i - mean_b)(b_i - mean_b)^T or None   (dB, dB)
rounding   what bounds their round-off, or None         (5,)
=========  ===========================================  ==========

Two partials of disjoint row ranges merge exactly with the pairwise update of Chan, Golub
and LeVeque, so a tree of merges, a checkpoint of partials and a resume are one algebra.
The uncentred sums follow without cancellation (``raw_cross = cross + n mean_a mean_b^T``).

``rounding`` records how the sums were computed, so that :mod:`bigalign.maths.solve` can bound
their round-off rigorously (and say when a figure derived from them, such as the paper's
discrepancy or the closed-form residual, is below what the arithmetic can resolve):
``[u, k, depth, eta_a, eta_b]`` = the unit round-off of the block GEMMs (2^-24 for float32,
2^-53 for float64), the most rows summed by one GEMM, the depth of the merge tree, and the
relative perturbation of the source / target rows before centring (0 for float16/32 input
kept as is; ``u`` where float64 input is rounded to a float32 GEMM; the normalisation's
round-off with ``normalize``). Merging takes the maximum of each, and depth + 1. None:
unknown (statistics from an older version or built by hand); :func:`bigalign.maths.solve.
statistic_errors` then assumes the worst the code could have done.

The kernel (:class:`Accumulator`) is written against the array API, so the same code runs
on NumPy and, in bigalign.execution.gpu, on CuPy; the merges and the serialised
:class:`Moments` are float64 numpy. Pure: no Dask, no Zarr.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Optional

import numpy as np
from array_api_compat import device, is_array_api_obj

from ..errors import NonFiniteError
from .arrays import dtype_in, is_host, namespace, native, np_dtype, to_numpy

__all__ = ["Moments", "Accumulator", "block_moments", "merge", "merge_with", "merge_all",
           "subtract",
           "NonFiniteError", "rounding_of", "unit_roundoff", "normalize_rows", "bad_norms",
           "bad_norm_reason", "check_finite"]


def unit_roundoff(dtype) -> float:
    """u = 2^-24 (float32), 2^-53 (float64): |fl(x) - x| <= u |x|."""
    return float(np.finfo(np.dtype(dtype)).eps) / 2


def _gamma(m: float, u: float) -> float:
    """Higham's gamma_m = m u / (1 - m u): the relative error bound of m roundings."""
    return m * u / (1 - m * u) if m * u < 0.5 else float("inf")


def rounding_of(n_rows: int, dtype, a_dtype, b_dtype, dim_a: int, dim_b: int,
                normalize: bool) -> np.ndarray:
    """The ``rounding`` record of one block (see the module doc): GEMMs of ``n_rows`` rows
    in ``dtype`` over inputs of ``a_dtype`` / ``b_dtype``."""
    u = unit_roundoff(dtype)
    itemsize = np.dtype(dtype).itemsize

    def eta(in_dtype, dim):
        if normalize:  # cast, d squares summed in dtype, sqrt, cast, divide: < gamma_(d+5)
            return _gamma(dim + 5, u)
        return u if np.dtype(in_dtype).itemsize > itemsize else 0.0

    return np.array([u, float(n_rows), 0.0, eta(a_dtype, dim_a), eta(b_dtype, dim_b)])


@dataclass(frozen=True, eq=False)
class Moments:
    """Centred float64 sufficient statistics of a set of paired rows (see module doc)."""

    n: int
    mean_a: np.ndarray
    mean_b: np.ndarray
    cross: np.ndarray
    sq_a: float
    sq_b: float
    gram_a: Optional[np.ndarray] = None
    gram_b: Optional[np.ndarray] = None
    rounding: Optional[np.ndarray] = None

    @property
    def dims(self) -> tuple[int, int]:
        return self.mean_a.shape[0], self.mean_b.shape[0]

    @property
    def has_gram(self) -> bool:
        return self.gram_a is not None

    @classmethod
    def empty(cls, dim_a: int, dim_b: int, gram: bool = False) -> "Moments":
        z = np.zeros
        return cls(
            0, z(dim_a), z(dim_b), z((dim_a, dim_b)), 0.0, 0.0,
            z((dim_a, dim_a)) if gram else None, z((dim_b, dim_b)) if gram else None,
        )

    # ---- uncentred sums, by addition only (no cancellation) -----------------------
    def raw_cross(self) -> np.ndarray:
        """sum a_i b_i^T, (dA, dB) float64."""
        return self.cross + self.n * np.outer(self.mean_a, self.mean_b)

    def raw_sq(self) -> tuple[float, float]:
        """(sum ||a_i||^2, sum ||b_i||^2)."""
        return (self.sq_a + self.n * float(self.mean_a @ self.mean_a),
                self.sq_b + self.n * float(self.mean_b @ self.mean_b))

    def raw_gram(self) -> tuple[np.ndarray, np.ndarray]:
        """(A^T A, B^T B) uncentred, float64."""
        self._need_gram()
        return (self.gram_a + self.n * np.outer(self.mean_a, self.mean_a),
                self.gram_b + self.n * np.outer(self.mean_b, self.mean_b))

    def _need_gram(self) -> None:
        if not self.has_gram:
            raise ValueError("these statistics were accumulated without Gram matrices "
                             "(fit without --no-diagnostics to get them)")

    # ---- serialisation (checkpoints) ----------------------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        out = {f.name: np.asarray(getattr(self, f.name)) for f in fields(self)
               if getattr(self, f.name) is not None}
        return out

    @classmethod
    def from_arrays(cls, arrays) -> "Moments":
        get = lambda k: np.asarray(arrays[k]) if k in arrays else None  # noqa: E731
        return cls(int(get("n")), get("mean_a"), get("mean_b"), get("cross"),
                   float(get("sq_a")), float(get("sq_b")), get("gram_a"), get("gram_b"),
                   get("rounding"))

    def equals(self, other: "Moments") -> bool:
        """Bit-for-bit equality (used by resume tests and checkpoint validation)."""
        a, b = self.to_arrays(), other.to_arrays()
        return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


def _centre(x, dtype, start: int, side: str, out=None, flags=None):
    """Return (float64 mean, centred x in ``dtype``, float64 residual mean of the centred x).

    The mean is computed in float64; it is subtracted after rounding to ``dtype``, so the
    centred block keeps a tiny residual mean ``r = mean - round(mean)``, which the caller
    corrects for exactly. NaN/Inf anywhere in a column makes its float64 mean non-finite:
    a free check, done before any other arithmetic (``flags``: see :meth:`Accumulator.add`).
    ``out``: a buffer of x's shape in ``dtype`` to centre into (reused across blocks by the
    engine; NumPy and CuPy: elsewhere a fresh array).
    """
    xp = namespace(x)
    mean = xp.sum(x, axis=0, dtype=xp.float64) / x.shape[0]  # = numpy's mean, bit for bit
    check_finite(mean, x, start, side, flags)
    m = xp.astype(mean, dtype_in(xp, dtype))
    nat = native(xp)
    if nat is not None:
        xc = nat.subtract(x, m, dtype=dtype, out=out)
    else:
        xc = xp.astype(x, dtype_in(xp, dtype)) - m
    return mean, xc, mean - xp.astype(m, xp.float64)


def block_moments(a, b, *, gram: bool = False, normalize: bool = False, dtype=None,
                  start: int = 0, scratch=None) -> Moments:
    """Statistics of one block of paired rows: :meth:`Accumulator.add` of that one block
    (the one statistics kernel; a reference and the form merged by evaluate).

    Parameters
    ----------
    a, b : (n, dA), (n, dB) float16/32/64 arrays, row i of ``a`` paired with row i of ``b``.
    gram : also accumulate the centred Gram matrices (for diagnostics / least squares).
    normalize : L2-normalise each row first.
    dtype : dtype of the GEMMs (float32 or float64); default: float64 for float64 input,
        else float32. ``C64 += X32^T Y32`` runs at float32 GEMM speed; the centring is done
        first, in float64-accurate form, so the float32 GEMM only sees small numbers.
    start : global index of the block's first row, used in error messages.
    scratch : optional (buffer_a, buffer_b) of shapes (n, dA), (n, dB) in ``dtype`` to hold
        the centred blocks (saves two large allocations per block; contents are clobbered).

    Raises
    ------
    NonFiniteError if the block holds NaN/Inf, or a zero-norm row with ``normalize``.
    """
    if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0]:
        raise ValueError(f"paired blocks must be 2-D with equal row counts, got {a.shape} and {b.shape}")
    acc = Accumulator(a.shape[1], b.shape[1], gram=gram, normalize=normalize, dtype=dtype)
    acc.add(a, b, start=start, scratch=scratch)
    return acc.moments()


class Accumulator:
    """The statistics kernel: the statistics of a stream of blocks, merged in place.
    ``add(a, b)`` for each block, then :meth:`moments`. Equal to ``merge_all([block_moments(a,
    b) for each block])`` up to float64 round-off (the same centring and GEMMs, the Chan
    updates in another order), at a fraction of its memory traffic: the float64 (dA, dB)
    state is allocated once and each block costs one cast-add of its float32 GEMM and two
    rank-1 updates, where a merge of fresh partials allocates a handful of d x d temporaries
    per block (at d = 4096 each is 128 MB, and the page faults of allocating it cost more
    than the arithmetic). The CPU fit, the GPU fit (bigalign.execution.gpu, with CuPy arrays
    and deferred checks) and :func:`block_moments` all run this one kernel.

    Written against the array API (:mod:`bigalign.maths.arrays`): the blocks' namespace
    (NumPy or CuPy) holds the state; NumPy's fast paths (``out=`` centring, ``einsum`` row
    norms, BLAS ``dger`` rank-1 updates) are chosen inside the helpers.

    dim_a, dim_b : widths of the source and target blocks. gram : also the Gram matrices.
    normalize : L2-normalise rows first. dtype : GEMM dtype (float32 or float64); None:
    float64 when the first block holds float64 input, else float32.
    """

    def __init__(self, dim_a: int, dim_b: int, *, gram: bool = False,
                 normalize: bool = False, dtype=None):
        self.dims = (int(dim_a), int(dim_b))
        self.gram, self.normalize, self.dtype = gram, normalize, dtype
        self.n = 0
        self._state = None  # mean_a, mean_b, cross, sq (2,), gram_a, gram_b
        self.rounding = None

    def add(self, a, b, *, start: int = 0, scratch=None, flags: Optional[list] = None) -> None:
        """Fold one block of paired rows in.

        a, b : (n, dA), (n, dB) float16/32/64 arrays of one namespace (NumPy; CuPy on a
            device), row i of ``a`` paired with row i of ``b``; the float64 state lives in
            the namespace of the first block.
        start : global index of the block's first row, used in error messages.
        scratch : optional (buffer_a, buffer_b) of shapes (n, dA), (n, dB) in the GEMM
            dtype to hold the centred blocks (NumPy/CuPy; contents are clobbered).
        flags : None: a NaN/Inf row (or, with ``normalize``, a row whose norm is zero or
            not finite) raises NonFiniteError naming it, at once. A list (a device, which
            must not wait): each check appends a 0-d bool array (True: failed) instead; the
            caller reads them after the stream is synchronised and, if one is set, runs the
            block again on the host to name the row (the statistics are then garbage).
        """
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[0] or \
                (a.shape[1], b.shape[1]) != self.dims:
            raise ValueError(f"expected paired blocks of widths {self.dims} with equal row "
                             f"counts, got {a.shape} and {b.shape}")
        n = a.shape[0]
        if n == 0:
            return
        xp = namespace(a, b)
        dtype = self.dtype
        if dtype is None:
            dtype = np.float64 if (a.dtype == xp.float64 or b.dtype == xp.float64) \
                else np.float32
        dtype = self.dtype = np.dtype(dtype)
        rounding = rounding_of(n, dtype, np_dtype(a.dtype), np_dtype(b.dtype), *self.dims,
                               self.normalize)
        if self.normalize:
            a = normalize_rows(a, dtype, start, "source", flags)
            b = normalize_rows(b, dtype, start, "target", flags)
        out_a, out_b = scratch if scratch is not None else (None, None)
        mean_a, ac, ra = _centre(a, dtype, start, "source", out_a, flags)
        mean_b, bc, rb = _centre(b, dtype, start, "target", out_b, flags)
        if self._state is None:
            self._start(xp, a)
        m_a, m_b, cross, sq, g_a, g_b = self._state
        total = self.n + n
        w = self.n * n / total  # 0 for the first block
        da, db = mean_a - m_a, mean_b - m_b
        _add_product(cross, ac.T, bc, (-n, ra, rb), (w, da, db))
        sq[0] += xp.sum(_row_sq(ac)) - n * (ra @ ra) + w * (da @ da)
        sq[1] += xp.sum(_row_sq(bc)) - n * (rb @ rb) + w * (db @ db)
        if self.gram:
            _add_product(g_a, ac.T, ac, (-n, ra, ra), (w, da, da))
            _add_product(g_b, bc.T, bc, (-n, rb, rb), (w, db, db))
        m_a += da * (n / total)
        m_b += db * (n / total)
        if self.rounding is None:
            self.rounding = rounding
        else:  # as merge(): the worst of each, one more level of merges
            self.rounding = np.maximum(self.rounding, rounding)
            self.rounding[2] += 1.0
        self.n = total

    def _start(self, xp, like) -> None:
        dim_a, dim_b = self.dims
        where = device(like)
        z = lambda *shape: xp.zeros(shape, dtype=xp.float64, device=where)  # noqa: E731
        self._state = (z(dim_a), z(dim_b), z(dim_a, dim_b), z(2),
                       z(dim_a, dim_a) if self.gram else None,
                       z(dim_b, dim_b) if self.gram else None)

    def moments(self) -> Moments:
        """The statistics so far (the accumulator's own arrays: do not add to it after), in
        the blocks' namespace; ``sq_a``/``sq_b`` are floats on the host and 0-d float64
        arrays on a device (reading them would wait for it)."""
        if self._state is None:
            return Moments.empty(*self.dims, self.gram)
        m_a, m_b, cross, sq, g_a, g_b = self._state
        if is_host(namespace(sq)):
            sq_a, sq_b = float(sq[0]), float(sq[1])
        else:
            sq_a, sq_b = sq[0], sq[1]
        return Moments(self.n, m_a, m_b, cross, sq_a, sq_b, g_a, g_b, self.rounding)


def _add_product(acc, x, y, *rank_ones) -> None:
    """acc (float64, C order) += x @ y (a GEMM in x's dtype; numpy's matmul, which calls
    syrk for x.T @ x; measured: writing into a reused ``out=`` buffer was not faster) plus
    the rank-1 terms ``alpha * u v^T`` of ``rank_ones`` ((alpha, u, v) each), in place."""
    acc += x @ y
    for alpha, u, v in rank_ones:
        if alpha:
            _rank_one(acc, alpha, u, v)


def _rank_one(acc, alpha: float, u, v) -> None:
    """acc += alpha * outer(u, v) in place: with NumPy, BLAS dger on the transposed,
    Fortran-ordered view (no d x d temporary), or numpy in row bands where that is not
    possible; elsewhere (a device) the broadcast product."""
    if native(namespace(acc)) is not np:
        acc += (alpha * u)[:, None] * v[None, :]
        return
    try:
        from scipy.linalg.blas import dger
    except ImportError:  # pragma: no cover - scipy is a dependency
        dger = None
    if dger is not None and acc.flags.c_contiguous and acc.dtype == np.float64:
        out = dger(float(alpha), np.ascontiguousarray(v, np.float64),
                   np.ascontiguousarray(u, np.float64), a=acc.T, overwrite_a=True)
        if np.shares_memory(out, acc):
            return
        acc[...] = out.T  # pragma: no cover - scipy copied after all
        return
    band = max(1, 2**20 // max(acc.shape[1], 1))
    for i in range(0, acc.shape[0], band):
        acc[i:i + band] += (alpha * u[i:i + band])[:, None] * v


def _row_sq(x):
    """Per-row squared norms, summed in the block dtype over d terms, returned float64
    (NumPy: einsum; elsewhere a plain reduction, not einsum, which CuPy may turn into
    batched GEMMs)."""
    if isinstance(x, np.ndarray):
        return np.einsum("ij,ij->i", x, x).astype(np.float64)
    xp = namespace(x)
    return xp.astype(xp.sum(x * x, axis=1, dtype=x.dtype), xp.float64)


def bad_norms(x: np.ndarray, dtype) -> np.ndarray:
    """(n,) bool: the rows of ``x`` (n, d) that :func:`normalize_rows` into ``dtype`` refuses
    (their norm in ``dtype`` is zero, NaN or Inf). The one test of every caller that must
    find such rows before the fit or apply does (an id join, ``--bad-rows``)."""
    return _unusable(np.sqrt(_row_sq(np.asarray(x, dtype=dtype))))


def bad_norm_reason(row: np.ndarray, dtype) -> str:
    """What is wrong with one (d,) row that :func:`bad_norms` flags, for error messages."""
    if not np.isfinite(row).all():
        return "NaN or Inf"
    if _row_sq(np.asarray(row, dtype=dtype)[None])[0] == 0:
        return "a zero-norm row (cannot normalise)"
    return f"a row whose norm overflows {np.dtype(dtype).name} (cannot normalise)"


def _unusable(norms: np.ndarray) -> np.ndarray:
    return ~(np.isfinite(norms) & (norms > 0))


def normalize_rows(x, dtype, start: int = 0, side: str = "source", flags=None):
    """L2-normalise rows of ``x`` (n, d) into ``dtype``, in x's namespace (any array-like:
    numpy). A zero or non-finite norm raises NonFiniteError naming the row, or with
    ``flags`` (a list; see :meth:`Accumulator.add`) appends a 0-d bool instead."""
    if not is_array_api_obj(x):
        x = np.asarray(x)
    xp = namespace(x)
    x = xp.astype(x, dtype_in(xp, dtype), copy=False)
    norms = xp.sqrt(_row_sq(x))
    ok = xp.isfinite(norms) & (norms > 0)
    if flags is not None:
        flags.append(~xp.all(ok))
    elif not bool(xp.all(ok)):
        i = int(xp.nonzero(~ok)[0][0])
        raise NonFiniteError(f"{side} row {start + i} holds "
                             f"{bad_norm_reason(to_numpy(x[i, ...]), dtype)} "
                             f"(block rows {start}:{start + x.shape[0]})")
    return x / xp.astype(norms, x.dtype)[:, None]


def check_finite(colsum, x, start: int, side: str, flags=None) -> None:
    """Raise NonFiniteError naming the first bad row if ``colsum`` (a column sum or mean of
    ``x``) is not finite and some row of ``x`` holds NaN/Inf. A finite float64 sum of
    float16/32 values proves the block clean at no extra pass; a float32 sum can also
    overflow on finite values, so a non-finite sum with no bad row passes. ``flags`` (a
    list; see :meth:`Accumulator.add`): append ``colsum`` is not finite, as a 0-d bool of
    the arrays' namespace, and return (no wait for a device)."""
    xp = namespace(colsum, x)
    clean = xp.all(xp.isfinite(colsum))
    if flags is not None:
        flags.append(~clean)
        return
    if bool(clean):
        return
    rows = xp.nonzero(~xp.all(xp.isfinite(x), axis=1))[0]
    if not rows.shape[0]:
        return
    i = int(rows[0])
    raise NonFiniteError(f"{side} row {start + i} holds NaN or Inf "
                         f"({rows.shape[0]} bad rows in block rows {start}:{start + x.shape[0]})")


def merge(p: Moments, q: Moments) -> Moments:
    """Exact pairwise merge of the statistics of two disjoint row sets (Chan et al.)."""
    return merge_with(p, q, outer=np.outer, cls=Moments, scalar=float)


def merge_with(p: Moments, q: Moments, *, outer, cls, scalar):
    """The merge's arithmetic for any array module: ``outer`` its outer product, ``cls``
    the Moments class to build (bigalign.execution.gpu's device Moments share it), ``scalar`` how a
    0-d product becomes ``sq_a``/``sq_b`` (``float`` on the host; identity on a device,
    where it stays a 0-d array). The ``rounding`` record (host numpy) merges by maximum,
    one more level of merges."""
    if p.dims != q.dims:
        raise ValueError(f"cannot merge statistics of dims {p.dims} and {q.dims}")
    if p.has_gram != q.has_gram:
        raise ValueError("cannot merge statistics with and without Gram matrices")
    if q.n == 0:
        return p
    if p.n == 0:
        return q
    n = p.n + q.n
    w = p.n * q.n / n
    da = q.mean_a - p.mean_a
    db = q.mean_b - p.mean_b
    ga = gb = None
    if p.has_gram:
        ga = p.gram_a + q.gram_a + w * outer(da, da)
        gb = p.gram_b + q.gram_b + w * outer(db, db)
    rounding = None
    if p.rounding is not None and q.rounding is not None:
        rounding = np.maximum(p.rounding, q.rounding)
        rounding[2] += 1.0  # one more level of merges
    return cls(n, p.mean_a + da * (q.n / n), p.mean_b + db * (q.n / n),
               p.cross + q.cross + w * outer(da, db),
               p.sq_a + q.sq_a + w * scalar(da @ da), p.sq_b + q.sq_b + w * scalar(db @ db),
               ga, gb, rounding)


def subtract(total: Moments, part: Moments) -> Moments:
    """The statistics of the rows of ``total`` that are not in ``part`` (a subset of them):
    :func:`merge` run backwards, exact algebra (merge(subtract(t, p), p) == t up to
    round-off). Used to hold pairs out of a finished pass: the held-out rows' statistics,
    computed from the rows, are taken out of the pass's. Round-off grows with the share
    held out (the complement's sums are differences); a fit holds out a small share.
    ``rounding``: the total's, one more level (the subtraction is one more operation)."""
    if total.dims != part.dims or total.has_gram != part.has_gram:
        raise ValueError("cannot subtract statistics of other dims or without the same Gram "
                         "matrices")
    n = total.n - part.n
    if n < 1 or part.n < 0:
        raise ValueError(f"cannot take {part.n} rows out of {total.n}: the rest must hold "
                         "at least one row")
    if part.n == 0:
        return total
    mean_a = (total.n * total.mean_a - part.n * part.mean_a) / n
    mean_b = (total.n * total.mean_b - part.n * part.mean_b) / n
    w = n * part.n / total.n
    da, db = part.mean_a - mean_a, part.mean_b - mean_b
    ga = gb = None
    if total.has_gram:
        ga = total.gram_a - part.gram_a - w * np.outer(da, da)
        gb = total.gram_b - part.gram_b - w * np.outer(db, db)
    rounding = None
    if total.rounding is not None:
        rounding = total.rounding.copy()
        rounding[2] += 1.0
    return Moments(n, mean_a, mean_b, total.cross - part.cross - w * np.outer(da, db),
                   max(total.sq_a - part.sq_a - w * float(da @ da), 0.0),
                   max(total.sq_b - part.sq_b - w * float(db @ db), 0.0), ga, gb, rounding)


def merge_all(parts) -> Moments:
    """Merge a non-empty sequence of partials left to right (a fixed order)."""
    parts = list(parts)
    if not parts:
        raise ValueError("nothing to merge")
    out = parts[0]
    for p in parts[1:]:
        out = merge(out, p)
    return out
