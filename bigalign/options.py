"""Options as data: what a fit or an apply computes, separate from where it runs.

As scikit-learn separates an estimator's parameters from ``n_jobs``, the statistical options
(:class:`FitOptions`, :class:`ApplyOptions`) go into a job's fingerprint (a change refuses a
resume), while :class:`Execution` (workers, threads, task size, progress display) never does:
a killed job may be resumed on another cluster.
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import asdict, dataclass, replace
from typing import Any, Optional

from .errors import InputError
from .maths.families import FAMILIES, ORTHOGONAL
from .planning.plan import COMPRESSIONS, DEFAULT_BLOCK_BYTES

__all__ = ["FitOptions", "ApplyOptions", "Execution", "Pairing", "JobOptions", "requests",
           "keywords_of",
           "OUTPUT_DTYPES", "BAD_ROWS",
           "positive_count", "memory_limit_bytes", "machine_memory", "format_bytes"]

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


def machine_memory() -> Optional[int]:
    """Bytes of memory this process may use: the machine's physical memory, or the
    container's cgroup limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``) when lower;
    None when neither can be read."""
    import os

    sizes = []
    try:
        sizes.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
    except (AttributeError, ValueError, OSError):
        pass
    for path in ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"):
        try:
            with open(path) as f:
                text = f.read().strip()
        except OSError:
            continue
        if text.isdigit() and int(text) > 0:
            sizes.append(int(text))
    return min(sizes) if sizes else None


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units: "74.5 GiB", "1.1 TiB"."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:,.0f} {unit}" if unit == "B" else f"{n:,.1f} {unit}"
        n /= 1024
    return f"{n} B"  # not reached


#: The map families ``fit`` solves from its one pass (:mod:`bigalign.maths.adapters`), and
#: "auto": fit them all and keep the best on held-out pairs (:mod:`bigalign.commands.select`).
METHODS = (*FAMILIES, "auto")
#: What ``method="auto"`` chooses by (:data:`bigalign.maths.selection.CRITERIA`).
SELECT = ("both", "mapped-queries", "mapped-docs", "residual")


@dataclass(frozen=True)
class FitOptions:
    """center, normalize, scale, reflection: see :func:`bigalign.fit`. ``diagnostics``:
    accumulate the Gram matrices. ``precision``: GEMM dtype ("float32"/"float64", resolved
    from "auto" by :meth:`resolve`). ``method``: the map family (:data:`METHODS`; ``scale``
    with "orthogonal" is "similarity"); ``ridge`` / ``rank``: the family's parameter (None:
    chosen on held-out pairs); ``holdout``: the share of pairs held out to choose (auto,
    and ridge/rank without their parameter), at most ``max_holdout`` rows; ``select`` /
    ``select_search``: what auto maximises (:data:`SELECT`) and in which search ("raw" or
    "centred" cosine).

    Centring is on by default: real models' vectors share a common offset, and an
    uncentred orthogonal map cannot move it (e5-small -> MiniLM recall@1 0.224 uncentred,
    0.804 centred); ``center=False`` (``--no-center``) opts out."""

    center: bool = True
    normalize: bool = False
    scale: bool = False
    reflection: bool = True
    diagnostics: bool = True
    precision: str = "auto"
    method: str = "orthogonal"
    ridge: Optional[float] = None
    rank: Optional[int] = None
    holdout: float = 0.2
    max_holdout: int = 10_000
    select: str = "mapped-queries"
    select_search: str = "raw"

    def __post_init__(self):
        if self.precision not in ("auto", "float32", "float64"):
            raise InputError(f"--precision must be 'auto', 'float32' or 'float64', got "
                             f"{self.precision!r}")
        if self.method not in METHODS:
            raise InputError(f"--method must be one of {', '.join(METHODS)}, got "
                             f"{self.method!r}")
        if self.ridge is not None and not (float(self.ridge) >= 0):
            raise InputError(f"--ridge must be a penalty >= 0, got {self.ridge!r}")
        if self.rank is not None and int(self.rank) < 1:
            raise InputError(f"--rank must be at least 1, got {self.rank!r}")
        if not 0 < float(self.holdout) < 1:
            raise InputError(f"--holdout is the share of pairs held out, between 0 and 1 "
                             f"(exclusive), got {self.holdout!r}")
        if int(self.max_holdout) < 2:
            raise InputError(f"--max-holdout must be at least 2 rows, got {self.max_holdout!r}")
        if self.select not in SELECT:
            raise InputError(f"--select must be one of {', '.join(SELECT)}, got "
                             f"{self.select!r}")
        if self.select_search not in ("raw", "centred"):
            raise InputError(f"--select-search must be raw or centred, got "
                             f"{self.select_search!r}")
        if self.ridge is not None and self.method not in ("ridge", "auto"):
            raise InputError(f"--ridge is the penalty of --method ridge, not of {self.method}")
        if self.rank is not None and self.method not in ("reduced-rank", "auto"):
            raise InputError(f"--rank is the rank of --method reduced-rank, not of "
                             f"{self.method}")
        if self.scale and self.method not in ORTHOGONAL:
            raise InputError(f"--scale is a similarity scale of an orthogonal map (--method "
                             f"similarity); --method {self.method} fits its own scales")
        if self.method != "orthogonal" and not self.diagnostics:
            raise InputError(f"--method {self.method} needs the Gram matrices A^T A and "
                             "B^T B: drop --no-diagnostics")

    @property
    def family(self) -> str:
        """The family solved ("orthogonal" with ``scale`` is "similarity"), or "auto"."""
        return "similarity" if self.method == "orthogonal" and self.scale else self.method

    @property
    def needs_holdout(self) -> bool:
        """Whether the fit holds pairs out to choose: auto, or a parameter left open."""
        return (self.method == "auto" or (self.method == "ridge" and self.ridge is None)
                or (self.method == "reduced-rank" and self.rank is None))

    def resolve(self, *input_dtypes) -> "FitOptions":
        """``precision`` "auto" made concrete: float64 when an input is float64."""
        p = self.precision
        if p == "auto":
            import numpy as np  # here: the command line's parser imports this module

            p = "float64" if any(np.dtype(d) == np.float64 for d in input_dtypes) else "float32"
        if p not in ("float32", "float64"):
            raise InputError(f"precision must be 'auto', 'float32' or 'float64', got "
                             f"{self.precision!r}")
        return replace(self, precision=p)

    def as_dict(self) -> dict:
        return asdict(self)


PAIR_BY = ("auto", "rows", "ids")
DUPLICATES = ("error", "first", "last")


@dataclass(frozen=True)
class Pairing:
    """Which rows of the two inputs of a fit are pairs: ``by`` "rows" (row i with row i,
    optionally only ``rows``, "START:STOP" or (start, stop)), "ids" (equal ids, an inner
    join: ``duplicates`` "error" / "first" / "last"; ``sample`` a reproducible random
    subset of that many pairs with ``seed``; the gathered pairs go to ``scratch``) or
    "auto" (ids when both inputs have them). Part of the fit's fingerprint (but
    ``scratch``); see :func:`bigalign.fit`."""

    by: str = "auto"
    rows: Any = None
    duplicates: str = "error"
    sample: Optional[int] = None
    seed: int = 0
    scratch: Optional[str] = None

    def __post_init__(self):
        if self.by not in PAIR_BY:
            raise InputError(f"--pair-by must be one of {', '.join(PAIR_BY)}, got {self.by!r}")
        if self.duplicates not in DUPLICATES:
            raise InputError(f"--duplicates must be one of {', '.join(DUPLICATES)}, got "
                             f"{self.duplicates!r}")
        if self.sample is not None:
            positive_count(self.sample, "--sample")


@dataclass(frozen=True)
class JobOptions:
    """The job protocol of a streaming command (never part of a fingerprint):
    ``overwrite`` (replace an output of other inputs or options that bigalign wrote),
    ``checkpoint`` (where progress goes: None next to the output, False nowhere),
    ``restart`` (discard recorded progress), ``keep_checkpoint`` (keep a fit's units after
    success) and ``check_chunks`` (False: ``--allow-missing-chunks``)."""

    overwrite: bool = False
    checkpoint: Any = None
    restart: bool = False
    keep_checkpoint: bool = False
    check_chunks: bool = True


def keywords_of(cls, **renamed) -> tuple:
    """``(cls, {keyword: field})``: every field of the options class ``cls`` is a keyword
    of the same name, but those ``renamed`` (keyword=field)."""
    names = {f.name: f.name for f in dataclasses.fields(cls)}
    for keyword, field in renamed.items():
        names.pop(field, None)
        names[keyword] = field
    return cls, names


def requests(command: str, given: dict, keywords: dict, kinds: dict) -> dict:
    """The options objects a Python API function (``command``) runs with, the one place
    where flat keywords become them: for each name of ``kinds`` (name -> :func:`keywords_of`),
    the object ``given[name]`` when one is given, else one built from those of the flat
    ``keywords`` that belong to it, validated by its constructor (InputError naming the
    flag). TypeError for an object given both ways, an object of the wrong class, or a
    keyword that belongs to none."""
    keywords = dict(keywords)
    out = {}
    for name, (cls, names) in kinds.items():
        taken = {k: keywords.pop(k) for k in list(keywords) if k in names}
        obj = given.get(name)
        if obj is not None and taken:
            raise TypeError(f"{command}() got {name}= and its keywords "
                            f"({', '.join(sorted(taken))}): give one or the other")
        if obj is not None and not isinstance(obj, cls):
            raise TypeError(f"{command}(): {name}= must be a {cls.__name__}, got "
                            f"{type(obj).__name__}")
        out[name] = obj if obj is not None else cls(**{names[k]: v for k, v in taken.items()})
    if keywords:
        raise TypeError(f"{command}() got unexpected keyword arguments: "
                        f"{', '.join(sorted(keywords))}")
    return out


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

    def __post_init__(self):
        if self.dtype not in OUTPUT_DTYPES:
            raise InputError(f"--dtype must be one of {', '.join(OUTPUT_DTYPES)}, got "
                             f"{self.dtype!r}")
        if self.bad_rows not in BAD_ROWS:
            raise InputError(f"--bad-rows must be one of {', '.join(BAD_ROWS)}, got "
                             f"{self.bad_rows!r}")
        if self.chunk_rows is not None:
            positive_count(self.chunk_rows, "--chunk-rows")
        if self.compression not in COMPRESSIONS:
            raise InputError(f"--compression must be one of {', '.join(COMPRESSIONS)}, got "
                             f"{self.compression!r}")

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class Execution:
    """Where and how a run executes (never part of a fingerprint): see
    :func:`bigalign.execution.cluster.session`; ``block_bytes`` is the input bytes per task;
    ``device`` where the block kernels run ("cpu" or "cuda", :mod:`bigalign.execution.gpu`);
    ``stall_timeout`` the seconds a run on a cluster waits with no worker before it stops
    with exit code 75 (None: ``--stall-timeout``, ``BIGALIGN_STALL_TIMEOUT`` or 300 s; 0:
    for ever; :func:`bigalign.execution.cluster.stall_timeout`).

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
    stall_timeout: Optional[float] = None

    def __post_init__(self):
        for name, flag in (("workers", "--workers"), ("threads", "--threads")):
            if getattr(self, name) is not None:
                positive_count(getattr(self, name), flag)
        if isinstance(self.block_bytes, bool) or not isinstance(self.block_bytes, numbers.Real) \
                or not self.block_bytes >= 1:
            raise InputError(f"--block-mb (block_bytes) must be positive, got "
                             f"{self.block_bytes!r} bytes per task")
        memory_limit_bytes(self.memory_limit)

    def task_memory(self) -> Optional[tuple[int, str]]:
        """(bytes one task may hold where this run executes, where that figure comes from),
        or None when it is not known here (an existing cluster's workers: --scheduler or
        Dask's configuration). With --workers: the --memory-limit per worker, else the
        machine's memory shared by the workers (Dask's "auto"); in-process: the machine's."""
        if self.scheduler:
            return None
        machine = machine_memory()
        if self.workers:
            limit = memory_limit_bytes(self.memory_limit)
            if limit:
                return limit, f"the --memory-limit of each worker ({self.memory_limit})"
            if machine:
                return machine // self.workers, (f"each of the {self.workers} workers' share "
                                                 f"of this machine's {format_bytes(machine)}")
            return None
        from .execution.cluster import scheduler_from_config

        if scheduler_from_config() or not machine:
            return None
        return machine, "this machine's memory"

    def check_memory(self, what: str, need: int, advice: str, client: int = 0) -> None:
        """Refuse (InputError, exit 2) a job whose planned memory per task, ``need`` bytes,
        exceeds what a task has where it runs (:meth:`task_memory`), or whose ``client``
        bytes (what this process holds itself: a fit's last merge and solve) exceed this
        machine's memory: it would fail partway (MemoryError, or workers killed one after
        the other). Called before anything is written. ``advice``: what to do instead."""
        have = self.task_memory()
        if have is not None and need > have[0]:
            raise InputError(f"{what} needs ~{format_bytes(need)} of memory per task as "
                             f"planned, but {have[1]} is {format_bytes(have[0])}; {advice}")
        machine = machine_memory()
        if machine and client > machine:
            raise InputError(f"{what} needs ~{format_bytes(client)} of memory in this process "
                             f"as planned (the last merge and the solve), but this machine's "
                             f"memory is {format_bytes(machine)}; {advice}")

    def session_args(self) -> dict:
        return dict(scheduler=self.scheduler, workers=self.workers,
                    memory_limit=self.memory_limit, threads=self.threads,
                    progress=self.progress, stall=self.stall_timeout)
