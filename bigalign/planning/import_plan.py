"""The plan of an import (pure: no I/O): input files end to end as store rows, cut into
regions of whole output chunks, grouped into units (one task each) so that each Parquet row
group is decoded about once. :func:`bigalign.commands.ingest.import_vectors` runs it."""

from __future__ import annotations

import bisect
import functools
import itertools
import math
from dataclasses import dataclass
from typing import Optional, Sequence

from ..errors import InputError
from .plan import (COUNT_FAN_IN, DEFAULT_BLOCK_BYTES, MIN_BLOCKS, ApplyPlan, Block,
                   choose_block_rows, regions_within_budget, tree_nodes)

__all__ = ["ImportPlan", "Slice", "Region", "make_import_plan", "choose_chunk_rows",
           "TARGET_CHUNK_BYTES", "UNIT_WASTE"]

#: Default bytes per output chunk: chunks of 16-64 MB read and write fastest (plan.py).
TARGET_CHUNK_BYTES = 32 * 2**20

#: A new task may start inside a Parquet row group when the rows it decodes for nothing (the
#: row group's rows before it) are at most this fraction of the previous task's rows or of
#: the row group (and at most one region): see :meth:`ImportPlan.units`.
UNIT_WASTE = 0.5


@dataclass(frozen=True)
class Slice:
    """Rows [file_start, file_stop) of input file ``file`` (its index in the plan), which
    land on store rows [start, start + file_stop - file_start)."""

    file: int
    file_start: int
    file_stop: int
    start: int

    @property
    def rows(self) -> int:
        return self.file_stop - self.file_start


@dataclass(frozen=True)
class Region:
    """Store rows [start, stop) (whole output chunks) written by one task, read from
    ``slices`` in order."""

    index: int
    start: int
    stop: int
    slices: tuple

    @property
    def rows(self) -> int:
        return self.stop - self.start


@dataclass(frozen=True)
class ImportPlan:
    """Input files end to end (``file_rows``: rows of each, in order) cut into ``regions``
    (an :class:`~bigalign.planning.plan.ApplyPlan`: rows [0, N) in regions of whole output chunks of
    ``regions.step`` rows). The job's manifest stores ``asdict(regions)`` (so ``bigalign
    status`` reads it like an apply's); the file rows are in the job's fingerprint, which a
    resume must match.

    ``row_groups``: for each file, the rows of its row groups (Parquet), or None where any
    row can be read directly (.npy, .fvecs). They decide the *units*, runs of consecutive
    regions that one task streams through (see :meth:`units`); they change how work is
    grouped, never what is written."""

    file_rows: tuple
    regions: ApplyPlan
    row_groups: tuple = ()

    @property
    def rows(self) -> int:
        return self.regions.rows

    @property
    def chunk_rows(self) -> int:
        return self.regions.step

    @functools.cached_property
    def _offsets(self) -> tuple:
        """Store row of each file's first row, and the total: computed once (O(files))."""
        return tuple(itertools.accumulate((int(n) for n in self.file_rows), initial=0))

    @functools.cached_property
    def _group_starts(self) -> tuple:
        """For each file, the file rows where its row groups start (and its end), or None
        where it is read directly: computed once, so :meth:`restart_cost` bisects."""
        out = []
        for f, n in enumerate(self.file_rows):
            groups = self.row_groups[f] if f < len(self.row_groups) else None
            if groups is None:
                out.append(None)
            elif not groups:  # unknown: the whole file is one row group
                out.append((0, int(n)))
            else:
                out.append(tuple(itertools.accumulate(groups, initial=0)))
        return tuple(out)

    def offsets(self) -> list[int]:
        """Store row of each file's first row (and the total at the end)."""
        return list(self._offsets)

    def blocks(self) -> list[Block]:
        return self.regions.blocks()

    def region_rows(self) -> dict[int, tuple[int, int]]:
        return self.regions.region_rows()

    def region_list(self) -> list[Region]:
        """Every region with the file slices that cover it (empty files are skipped)."""
        offsets = self.offsets()
        out = []
        for b in self.blocks():
            slices, row = [], b.start
            f = bisect.bisect_right(offsets, row) - 1
            while row < b.stop:
                while offsets[f + 1] <= row:  # skip files that end here (and empty ones)
                    f += 1
                take = min(b.stop, offsets[f + 1]) - row
                slices.append(Slice(f, row - offsets[f], row - offsets[f] + take, row))
                row += take
            out.append(Region(b.index, b.start, b.stop, tuple(slices)))
        return out

    def restart_cost(self, row: int) -> tuple[int, int]:
        """``(rows decoded for nothing, rows of the row group)`` when a read starts at store
        row ``row``: a Parquet read starting inside a row group decodes it from its start.
        ``(0, 0)`` for files read directly; the cost is 0 at file and row-group starts.
        O(log files + log row groups)."""
        if row >= self.rows:
            return 0, 0
        f, i = self.locate(row)
        starts = self._group_starts[f]
        if starts is None:
            return 0, 0
        g = bisect.bisect_right(starts, i) - 1
        if g >= len(starts) - 1:  # past the row groups the footer lists
            return 0, 0
        return i - starts[g], starts[g + 1] - starts[g]

    def units(self, waste: Optional[float] = None) -> list[list[int]]:
        """Consecutive regions grouped into units, one task each.

        A task starting at a region that begins inside a Parquet row group decodes that
        row group from its start for nothing (:meth:`restart_cost`). A new unit starts at
        a region when that costs at most one region's rows, at most ``waste`` (50 %) of the
        larger of the current unit and the row group, and less than the current unit's
        rows (a unit that began in the same row group streams on for free); otherwise the
        region joins the current unit, whose task streams on. So every region is a unit
        for .npy/.fvecs and small row groups; with one large row group per file a unit is
        about a file, and with huge row groups about a row group: each row group is decoded
        about once, and no task decodes more than a region for nothing. (Units group work;
        they never change what is written, so they may change between versions.)"""
        waste = UNIT_WASTE if waste is None else waste
        blocks = self.blocks()
        if waste == math.inf:  # no grouping: a task per region (benchmarks compare it)
            return [[b.index] for b in blocks]
        per = self.regions.rows_per_block
        units = [[blocks[0].index]]
        for b in blocks[1:]:
            cost, group = self.restart_cost(b.start)
            rows = b.start - blocks[units[-1][0]].start
            if cost <= per and cost <= waste * max(rows, group) and (cost < rows or not cost):
                units.append([b.index])
            else:
                units[-1].append(b.index)
        return units

    def locate(self, row: int) -> tuple[int, int]:
        """(file index, row in that file) of store row ``row``: a bisection over the files'
        first rows (O(log files)); empty files are skipped."""
        offsets = self._offsets
        f = bisect.bisect_right(offsets, row) - 1
        while f < len(self.file_rows) - 1 and self.file_rows[f] == 0:
            f += 1
        return f, row - offsets[f]

    def tasks(self, waste: Optional[float] = None) -> int:
        """Tasks of :func:`bigalign.commands.ingest.import_graph` with nothing done: one
        per unit and the tree (fan-in COUNT_FAN_IN) that sums the rows written."""
        n = len(self.units(waste))
        return n + tree_nodes(n, COUNT_FAN_IN)


def choose_chunk_rows(dim: int, itemsize: int, rows: int,
                      target: int = TARGET_CHUNK_BYTES) -> int:
    """Rows per output chunk: about ``target`` bytes (32 MiB: inside the 16-64 MB that read
    and write fastest), a multiple of 1024 rows when that many fit, never more than
    ``rows``."""
    per = max(1, target // max(dim * itemsize, 1))
    if per >= 1024:
        per = per // 1024 * 1024
    return int(max(1, min(per, rows)))


def make_import_plan(file_rows: Sequence[int], row_bytes: int, chunk_rows: int,
                     block_bytes: int = DEFAULT_BLOCK_BYTES,
                     row_groups: Sequence = (), task_budget: Optional[int] = None
                     ) -> ImportPlan:
    """Plan an import of files of ``file_rows`` rows (in order): regions of whole chunks of
    ``chunk_rows`` holding about ``block_bytes`` of output (``row_bytes`` a row), at least
    :data:`~bigalign.planning.plan.MIN_BLOCKS` regions when there are enough chunks, and
    grown until the graph fits the task budget apply has (``task_budget``, default
    :func:`~bigalign.planning.plan.max_tasks`;
    :func:`~bigalign.planning.plan.regions_within_budget`).
    A region is written ``regions.rows_per_write`` rows (about ``block_bytes``) at a time,
    so a task's memory stays one write however large its region grows. ``row_groups`` as
    :class:`ImportPlan` says (default: every file read directly)."""
    total = int(sum(file_rows))
    if total <= 0:
        raise InputError("the inputs hold no rows")
    if chunk_rows <= 0:
        raise InputError(f"chunk rows must be positive, got {chunk_rows}")
    per_write = choose_block_rows(total, chunk_rows, row_bytes, block_bytes, MIN_BLOCKS)
    per = regions_within_budget(total, chunk_rows, per_write, per_write, task_budget)
    groups = tuple(None if g is None else tuple(int(n) for n in g) for g in row_groups)
    regions = ApplyPlan(total, chunk_rows, per, rows_per_write=per_write if per != per_write
                        else 0, write_step=chunk_rows if per != per_write else 0)
    return ImportPlan(tuple(int(n) for n in file_rows), regions, groups)
