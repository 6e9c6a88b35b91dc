"""Options as data: what a fit or an apply computes, separate from where it runs.

As scikit-learn separates an estimator's parameters from ``n_jobs``, the statistical options
(:class:`FitOptions`, :class:`ApplyOptions`) go into a job's fingerprint (a change refuses a
resume), while :class:`Execution` (workers, threads, task size, progress display) never does:
a killed job may be resumed on another cluster.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from ..errors import InputError
from .plan import DEFAULT_BLOCK_BYTES

__all__ = ["FitOptions", "ApplyOptions", "Execution", "OUTPUT_DTYPES", "BAD_ROWS"]

OUTPUT_DTYPES = ("float16", "float32", "float64")
BAD_ROWS = ("fail", "nan", "zero")


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
    ``device`` where the block kernels run ("cpu" or "cuda", :mod:`bigalign.execution.gpu`);
    ``stall_timeout`` the seconds a run on a cluster waits with no worker before it stops
    with exit code 75 (None: ``--stall-timeout``, ``BIGALIGN_STALL_TIMEOUT`` or 300 s; 0:
    for ever; :func:`bigalign.execution.cluster.stall_timeout`)."""

    scheduler: Optional[str] = None
    workers: Optional[int] = None
    memory_limit: Optional[str] = None
    threads: Optional[int] = None
    block_bytes: int = DEFAULT_BLOCK_BYTES
    progress: bool = False
    device: str = "cpu"
    stall_timeout: Optional[float] = None

    def session_args(self) -> dict:
        return dict(scheduler=self.scheduler, workers=self.workers,
                    memory_limit=self.memory_limit, threads=self.threads,
                    progress=self.progress, stall=self.stall_timeout)
