"""Options as data: what a fit or an apply computes, separate from where it runs.

As scikit-learn separates an estimator's parameters from ``n_jobs``, the statistical options
(:class:`FitOptions`, :class:`ApplyOptions`) go into a job's fingerprint (a change refuses a
resume), while :class:`Execution` (workers, threads, task size, progress display) never does:
a killed job may be resumed on another cluster.
"""

from __future__ import annotations

import numbers
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from ..errors import InputError
from .plan import DEFAULT_BLOCK_BYTES

__all__ = ["FitOptions", "ApplyOptions", "Execution", "OUTPUT_DTYPES", "BAD_ROWS",
           "positive_count", "memory_limit_bytes"]

OUTPUT_DTYPES = ("float16", "float32", "float64")
BAD_ROWS = ("fail", "nan", "zero")


def positive_count(value, what: str) -> int:
    """``value`` as an int when it is a whole number > 0, else InputError naming ``what``
    (the flag: "--threads", ...). Booleans and fractions are refused, not truncated."""
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) or \
        isinstance(value, float) and value.is_integer()
    if not ok or value <= 0:
        raise InputError(f"{what} must be a positive whole number, got {value!r}")
    return int(value)


def memory_limit_bytes(limit) -> Optional[int]:
    """Bytes per worker that ``limit`` (``--memory-limit``: "4GiB", "500MB", a number of
    bytes, or "auto", as Dask's LocalCluster takes it) stands for; None for "auto", None, 0
    and fractions of the machine (Dask's "no limit" / "share the machine": the caller uses
    the machine's memory). InputError naming the value when it is none of those."""
    if limit is None or (isinstance(limit, str) and limit.strip().lower() == "auto"):
        return None
    if isinstance(limit, bool):
        value = None
    elif isinstance(limit, numbers.Real):
        value = float(limit)
    else:
        from dask.utils import parse_bytes

        try:
            value = float(parse_bytes(str(limit).strip()))
        except (ValueError, TypeError):
            value = None
    if value is None or value < 0 or value != value:
        raise InputError(f"--memory-limit {limit!r}: expected a size such as 4GiB or 500MB, "
                         "a number of bytes, or auto")
    return None if value <= 1 else int(value)  # 0: no limit; 0 < x <= 1: a fraction


@dataclass(frozen=True)
class FitOptions:
    """center, normalize, scale, reflection: see :func:`bigalign.fit`. ``diagnostics``:
    accumulate the Gram matrices. ``precision``: GEMM dtype ("float32"/"float64", resolved
    from "auto" by :meth:`resolve`)."""

    center: bool = False
    normalize: bool = False
    scale: bool = False
    reflection: bool = True
    diagnostics: bool = True
    precision: str = "auto"

    def resolve(self, *input_dtypes) -> "FitOptions":
        """``precision`` "auto" made concrete: float64 when an input is float64."""
        p = self.precision
        if p == "auto":
            p = "float64" if any(np.dtype(d) == np.float64 for d in input_dtypes) else "float32"
        if p not in ("float32", "float64"):
            raise InputError(f"precision must be 'auto', 'float32' or 'float64', got "
                             f"{self.precision!r}")
        return FitOptions(self.center, self.normalize, self.scale, self.reflection,
                          self.diagnostics, p)

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class ApplyOptions:
    """dtype, renormalize, target_centred, compression, chunk_rows, bad_rows: see
    :func:`bigalign.apply`."""

    dtype: str = "float32"
    renormalize: bool = False
    target_centred: bool = False
    compression: str = "none"
    chunk_rows: Optional[int] = None
    bad_rows: str = "fail"

    def validate(self) -> "ApplyOptions":
        if self.dtype not in OUTPUT_DTYPES:
            raise InputError(f"--dtype must be one of {', '.join(OUTPUT_DTYPES)}, got "
                             f"{self.dtype!r}")
        if self.bad_rows not in BAD_ROWS:
            raise InputError(f"--bad-rows must be one of {', '.join(BAD_ROWS)}, got "
                             f"{self.bad_rows!r}")
        if self.chunk_rows is not None and int(self.chunk_rows) <= 0:
            raise InputError(f"chunk_rows must be positive, got {self.chunk_rows}")
        return self

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Execution:
    """Where and how a run executes (never part of a fingerprint): see
    :func:`bigalign.execution.cluster.session`; ``block_bytes`` is the input bytes per task;
    ``device`` where the block kernels run ("cpu" or "cuda", :mod:`bigalign.execution.gpu`).

    Checked when built (the one place every command's execution settings pass through,
    before any output is created): ``workers`` and ``threads`` whole numbers > 0 (or None),
    ``block_bytes`` > 0, ``memory_limit`` a size (:func:`memory_limit_bytes`); InputError
    (exit 2) naming the flag otherwise."""

    scheduler: Optional[str] = None
    workers: Optional[int] = None
    memory_limit: Optional[str] = None
    threads: Optional[int] = None
    block_bytes: int = DEFAULT_BLOCK_BYTES
    progress: bool = False
    device: str = "cpu"

    def __post_init__(self):
        for name, flag in (("workers", "--workers"), ("threads", "--threads")):
            if getattr(self, name) is not None:
                positive_count(getattr(self, name), flag)
        if isinstance(self.block_bytes, bool) or not isinstance(self.block_bytes, numbers.Real) \
                or not self.block_bytes >= 1:
            raise InputError(f"--block-mb (block_bytes) must be positive, got "
                             f"{self.block_bytes!r} bytes per task")
        memory_limit_bytes(self.memory_limit)

    def session_args(self) -> dict:
        return dict(scheduler=self.scheduler, workers=self.workers,
                    memory_limit=self.memory_limit, threads=self.threads,
                    progress=self.progress)
