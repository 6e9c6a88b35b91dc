"""Planning: which rows go to which task, which tasks form a checkpoint unit, how partials
merge, and how much memory a task needs. Pure functions over shapes; no I/O.

Rows are split into *blocks* (one Dask task each, tens of MB) whose boundaries fall on the
chunk (or shard) boundaries of every array the task reads or writes, so each stored chunk is
read once per fit and written by exactly one task in an apply. Consecutive blocks form
*units*, the grain of checkpointing: a unit's merged statistics are written to storage when
it finishes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["Block", "common_step", "choose_block_rows", "plan_blocks", "partial_bytes",
           "fit_block_rows", "choose_fan_in", "plan_units", "group", "merge_tree",
           "fit_task_bytes", "apply_task_bytes", "DEFAULT_BLOCK_BYTES", "FitPlan", "ApplyPlan",
           "make_fit_plan", "make_apply_plan", "plan_from_dict"]

#: Default input bytes per task: chunks of ~8-32 MB read fastest here, and a task of a few
#: of them amortises Dask's per-task overhead (~1 ms) to nothing.
DEFAULT_BLOCK_BYTES = 64 * 2**20

#: Small inputs are still split into at least this many blocks (and checkpoint units) so
#: every worker gets work. A constant, not the worker count: the plan, and so the float64
#: merge order and the result, must not depend on how many workers run it.
MIN_BLOCKS = 16


@dataclass(frozen=True)
class Block:
    """Rows [start, stop) handled by one task."""

    index: int
    start: int
    stop: int

    @property
    def rows(self) -> int:
        return self.stop - self.start


def common_step(steps, row_bytes: int, block_bytes: int) -> tuple[int, bool]:
    """Row step that block boundaries must be multiples of.

    ``steps``: the row chunk (or shard) size of each array involved. Returns (step, aligned):
    the least common multiple when a block of that many rows stays within 4x the block budget
    (or 4x the largest chunk, when chunks are larger than the budget)
    (``aligned`` True: every chunk of every array is touched by one task only); otherwise the
    first array's step (``aligned`` False: chunks of the others that straddle a boundary are
    read by both neighbouring tasks; never the case for writes, whose array is listed first).
    """
    steps = [int(s) for s in steps]
    if any(s <= 0 for s in steps):
        raise ValueError(f"chunk sizes must be positive, got {steps}")
    lcm = math.lcm(*steps)
    if lcm * row_bytes <= 4 * max(block_bytes, max(steps) * row_bytes):
        return lcm, True
    return steps[0], False


def choose_block_rows(total: int, step: int, row_bytes: int,
                      block_bytes: int = DEFAULT_BLOCK_BYTES, min_blocks: int = 1) -> int:
    """Rows per block: a multiple of ``step`` holding about ``block_bytes`` of input (never
    less than one step), small enough that ``total`` rows make at least ``min_blocks``
    blocks where they can (so small inputs still use every worker)."""
    per = max(step, max(1, block_bytes // max(row_bytes, 1)) // step * step)
    if min_blocks > 1:
        per = min(per, max(step, math.ceil(total / min_blocks / step) * step))
    return per


def plan_blocks(start: int, stop: int, step: int, rows_per_block: int) -> list[Block]:
    """Split rows [start, stop) into blocks of ``rows_per_block`` (a multiple of ``step``)
    whose inner boundaries are multiples of ``step``. Blocks are in row order; the first and
    last may be shorter when ``start``/``stop`` are not aligned."""
    if not 0 <= start <= stop:
        raise ValueError(f"bad row range {start}:{stop}")
    if rows_per_block <= 0 or rows_per_block % step:
        raise ValueError(f"rows_per_block {rows_per_block} is not a positive multiple of {step}")
    bounds = [start]
    nxt = (start // step + 1) * step + (rows_per_block - step)
    while nxt < stop:
        bounds.append(nxt)
        nxt += rows_per_block
    if stop > start:
        bounds.append(stop)
    return [Block(i, a, b) for i, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]


def plan_units(n_blocks: int, block_bytes: int, partial_bytes: int, *,
               max_overhead: float = 0.02) -> list[range]:
    """Group consecutive blocks into checkpoint units.

    A unit writes one partial (``partial_bytes``, d^2 float64 matrices) per
    ``len(unit) * block_bytes`` of input read: a unit spans the fewest blocks that keep that
    write under ``max_overhead`` of the bytes read, so progress is saved as often as the
    budget allows (every block at d = 384; every ~20 blocks at d = 1024 with Gram matrices,
    whose partial is 25 MB).
    """
    per = max(1, math.ceil(partial_bytes / (max_overhead * max(block_bytes, 1))))
    return group(n_blocks, min(per, max(n_blocks, 1)))


def group(n: int, per: int) -> list[range]:
    """Consecutive groups of ``per`` indices out of range(n) (the last may be shorter)."""
    return [range(i, min(i + per, n)) for i in range(0, n, per)]


def merge_tree(n: int, fan_in: int = 8) -> list[list[range]]:
    """Levels of a fixed merge tree over ``n`` leaves in row order.

    Level k is a list of ranges of indices into level k-1's outputs (level 0 merges leaves).
    The tree depends only on (n, fan_in), so merge order, and therefore float64 round-off,
    is the same whoever computes which leaf, in whatever order, and on resume.
    """
    if fan_in < 2:
        raise ValueError("fan_in must be >= 2")
    levels = []
    width = n
    while width > 1:
        groups = group(width, fan_in)
        levels.append(groups)
        width = len(groups)
    return levels


def fit_block_rows(rows_per_read: int, row_bytes: int, partial: int, ratio: int = 2) -> int:
    """Rows per fit task: whole reads, and enough of them that the task's input is at least
    ``ratio`` times its float64 partial (d^2 matrices). At d = 4096 a partial with Gram
    matrices is ~400 MB; without this, 64 MB tasks would make more partial than data. A task
    streams its reads one at a time, so its memory is one read plus its partial."""
    reads = max(1, math.ceil(ratio * partial / max(rows_per_read * row_bytes, 1)))
    return rows_per_read * reads


def choose_fan_in(partial: int, budget: int = 2**30, widest: int = 8) -> int:
    """Fan-in of the merge trees: a merge task holds its inputs and its output at once, so
    at most ``budget`` bytes of partials (never below 2, never above ``widest``)."""
    return int(min(widest, max(2, budget // max(partial, 1) - 1)))


def partial_bytes(dim_a: int, dim_b: int, gram: bool) -> int:
    """Size of one float64 partial: cross (+ Gram matrices) and means."""
    d2 = dim_a * dim_b + (dim_a * dim_a + dim_b * dim_b if gram else 0)
    return 8 * (d2 + dim_a + dim_b + 4)


def fit_task_bytes(rows_per_read: int, dim_a: int, dim_b: int, item_a: int, item_b: int,
                   work: int, gram: bool, fan_in: int = 8) -> int:
    """Memory one fit thread holds, roughly: a read of both arrays (``item_*`` bytes per
    value), their centred copies in the GEMM dtype (``work`` bytes), the running partial and
    the GEMM result, and the partials of one merge (``fan_in`` + 1)."""
    data = rows_per_read * (dim_a * (item_a + work) + dim_b * (item_b + work))
    return data + (fan_in + 3) * partial_bytes(dim_a, dim_b, gram)


def apply_task_bytes(rows: int, dim_a: int, dim_b: int, item_in: int, item_out: int) -> int:
    """Memory one apply thread holds, roughly: the source rows (centred in place, or a
    working copy when the dtype changes), the mapped rows in the compute dtype, the output
    cast when its dtype differs, and the d_A x d_B matrix."""
    work = 8 if item_out == 8 else 4
    copy = work if item_in != work else 0
    cast = item_out if item_out != work else 0
    return rows * (dim_a * (item_in + copy) + dim_b * (work + cast)) + work * dim_a * dim_b


# ---- plans: what a run will do, as data (stored as-is in the job's manifest) -------------

@dataclass(frozen=True)
class FitPlan:
    """Rows [start, stop) in blocks of ``rows_per_block`` (one task each; boundaries on
    multiples of ``step``), read ``rows_per_read`` at a time, grouped ``blocks_per_unit``
    to a checkpoint unit, merged with fan-in ``fan_in``. ``aligned``: every chunk of both
    inputs is read by one task only."""

    start: int
    stop: int
    step: int
    rows_per_block: int
    rows_per_read: int
    blocks_per_unit: int
    fan_in: int
    aligned: bool = True

    def blocks(self) -> list[Block]:
        return plan_blocks(self.start, self.stop, self.step, self.rows_per_block)

    def units(self) -> list[range]:
        return group(len(self.blocks()), self.blocks_per_unit)

    def unit_rows(self) -> dict[int, tuple[int, int]]:
        """Unit index -> the rows [start, stop) it covers."""
        blocks = self.blocks()
        return {u: (blocks[r[0]].start, blocks[r[-1]].stop) for u, r in enumerate(self.units())}


@dataclass(frozen=True)
class ApplyPlan:
    """Output rows [0, rows) in regions of ``rows_per_block`` (one task each, whole output
    chunks: boundaries on multiples of ``step``). Output row r is source row
    ``offset + r`` (``apply --rows START:STOP`` maps a slice)."""

    rows: int
    step: int
    rows_per_block: int
    aligned: bool = True
    offset: int = 0

    def blocks(self) -> list[Block]:
        return plan_blocks(0, self.rows, self.step, self.rows_per_block)

    def region_rows(self) -> dict[int, tuple[int, int]]:
        return {b.index: (b.start, b.stop) for b in self.blocks()}


def plan_from_dict(kind: str, values: dict):
    """The plan a manifest stores (``dataclasses.asdict`` of it), rebuilt."""
    return (FitPlan if kind == "fit" else ApplyPlan)(**values)


def make_fit_plan(start: int, stop: int, steps: tuple[int, int], dims: tuple[int, int],
                  itemsizes: tuple[int, int], gram: bool,
                  block_bytes: int = DEFAULT_BLOCK_BYTES) -> FitPlan:
    """Plan a fit of rows [start, stop): reads on chunk boundaries of both inputs
    (``steps``: their row chunk or shard sizes), tasks of whole reads at least twice their
    partial's size, tasks grouped into checkpoint units within the 2 % write budget,
    merge fan-in for a 1 GiB budget of partials."""
    row_bytes = dims[0] * itemsizes[0] + dims[1] * itemsizes[1]
    step, aligned = common_step(list(steps), row_bytes, block_bytes)
    partial = partial_bytes(dims[0], dims[1], gram)
    per_read = choose_block_rows(stop - start, step, row_bytes, block_bytes, MIN_BLOCKS)
    per = fit_block_rows(per_read, row_bytes, partial)
    n_blocks = len(plan_blocks(start, stop, step, per))
    units = plan_units(n_blocks, per * row_bytes, partial)
    return FitPlan(start, stop, step, per, per_read, len(units[0]), choose_fan_in(partial),
                   aligned)


def make_apply_plan(rows: int, chunk_rows: int, source_step: int, row_bytes: int,
                    block_bytes: int = DEFAULT_BLOCK_BYTES, offset: int = 0) -> ApplyPlan:
    """Plan an apply of ``rows`` rows starting at source row ``offset``: regions of whole
    output chunks (``chunk_rows``), on source chunk boundaries too where the two share a
    small common multiple (and ``offset`` falls on a source chunk boundary).
    ``row_bytes``: bytes read plus written per row."""
    step, aligned = common_step([chunk_rows, source_step], row_bytes, block_bytes)
    aligned = aligned and offset % source_step == 0
    return ApplyPlan(rows, step, choose_block_rows(rows, step, row_bytes, block_bytes,
                                                   MIN_BLOCKS), aligned, offset)
