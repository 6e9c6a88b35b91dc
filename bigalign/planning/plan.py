"""Planning: which rows go to which task, which tasks form a checkpoint unit, how partials
merge, and how much memory a task needs. Pure functions over shapes; no I/O.

Rows are split into *blocks* (one Dask task each) whose boundaries fall on the chunk (or
shard) boundaries of every array the task reads or writes, so each stored chunk is read once
per fit and written by exactly one task in an apply. A task streams its block in *reads* (and,
in an apply, *writes*) of ~64 MiB of whole chunks (inner chunks of a sharded input; whole
shards of a sharded output), so its memory is one read, whatever the block's size.
Consecutive blocks form *units*, the grain of checkpointing: a unit's merged statistics are
written to storage when it finishes.

Scale bounds (what a plan of N rows costs, whatever N):

* **Tasks.** Blocks start at ~64 MiB of input and grow with N once the graph would pass
  :func:`max_tasks` (about 48,000 tasks at 10^9 rows, growing as sqrt(N): 152,000 at
  10^10), counted exactly as the engine builds the graph (leaves, merge trees, unit saves,
  the apply's count tree). Growing a block costs no memory (a task streams it) and little
  balance (a 10^10-row job still has ~10^5 tasks).
* **Fit checkpoint.** A unit spans the fewest blocks that keep its statistics' write under
  2 % of the bytes it read, and a job has at most :data:`MAX_UNITS` units (a unit is then
  at least 1/1024 of the job: a kill loses that and the tasks in flight). Checkpoint bytes
  written are at most 2 % of the input at every d, and at most 1024 partials in all
  (0.4 TB at d = 4096 with Gram matrices, instead of 6.3 TB at 10^10 rows).
* **Apply markers.** One done-marker per region (task), written after the region's last
  write: a kill loses at most the regions in flight, never a group. Markers are bounded by
  the task budget, and their names carry the run id, rows and bad-row count, so resume,
  verify and ``status`` read one listing, not one file per marker
  (:mod:`bigalign.storage.progress_files`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

__all__ = ["Block", "common_step", "choose_block_rows", "plan_blocks", "count_blocks",
           "partial_bytes", "fit_block_rows", "choose_fan_in", "plan_units", "group",
           "merge_tree", "tree_nodes", "max_tasks", "fit_task_count", "apply_task_count",
           "fit_task_bytes", "apply_task_bytes", "output_layout", "DEFAULT_BLOCK_BYTES",
           "MAX_UNITS", "COUNT_FAN_IN", "FitPlan", "ApplyPlan", "make_fit_plan",
           "make_apply_plan", "plan_from_dict", "ExportPlan", "make_export_plan",
           "FILE_BYTES", "GROUP_BYTES", "export_row_bytes", "DEFAULT_MAX_QUERIES",
           "MIN_CENTRED_QUERIES", "regions_within_budget"]

#: Output compression choices. Embeddings compress ~1.05-1.1x; Zarr 3's default zstd halves
#: read/write speed (measured), so outputs are uncompressed unless asked.
COMPRESSIONS = ("none", "lz4", "zstd")

#: Default input bytes per task: chunks of ~8-32 MB read fastest here, and a task of a few
#: of them amortises Dask's per-task overhead (~1 ms) to nothing.
DEFAULT_BLOCK_BYTES = 64 * 2**20

#: Queries an evaluation searches when the held-out set is larger (a seeded sample); exact
#: search of 10^4 queries among 10^5 targets of 384 dims is ~1.5 TFLOP per method and search
#: variant.
DEFAULT_MAX_QUERIES = 10_000

#: Fewest queries for the centred search: it removes the queries' own mean, which a handful
#: of queries cannot estimate (1 query centres to a zero vector, 2 to a vector and its
#: negation); below this the centred figures are not computed (None, printed "-").
MIN_CENTRED_QUERIES = 10

#: Small inputs are still split into at least this many blocks (and checkpoint units) so
#: every worker gets work. A constant, not the worker count: the plan, and so the float64
#: merge order and the result, must not depend on how many workers run it.
MIN_BLOCKS = 16

#: The task budget at 10^9 rows; it grows as sqrt(N) (:func:`max_tasks`).
TASKS_AT_1E9 = 48_000

#: At most this many fit checkpoint units per job (each then holds >= 1/1024 of the rows).
MAX_UNITS = 1024

#: Fan-in of the apply's tree that sums rows written and bad rows over regions.
COUNT_FAN_IN = 32

#: A sharded output mirrors its source's shards unless one would pass this many bytes: a
#: task holds a whole output shard (twice: mapped and encoded) while writing it.
MAX_OUTPUT_SHARD_BYTES = 512 * 2**20

#: ``export --format parquet``: bytes per file (vector database bulk loaders take files of
#: 100 MB to 1 GB best; one file is one task) and per row group (what a writer holds while
#: encoding, and what a reader decodes at a time).
FILE_BYTES = 256 * 2**20
GROUP_BYTES = 32 * 2**20


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


def count_blocks(start: int, stop: int, step: int, rows_per_block: int) -> int:
    """``len(plan_blocks(start, stop, step, rows_per_block))``, in O(1)."""
    if stop <= start:
        return 0
    first = (start // step + 1) * step + (rows_per_block - step)
    return 1 if first >= stop else 1 + math.ceil((stop - first) / rows_per_block)


def max_tasks(rows: int) -> int:
    """The task budget of a plan of ``rows`` rows: TASKS_AT_1E9 * sqrt(rows / 10^9), and never
    below 2048 (small jobs are bounded by their bytes long before)."""
    return max(2048, int(TASKS_AT_1E9 * math.sqrt(max(rows, 1) / 1e9)))


def tree_nodes(n: int, fan_in: int) -> int:
    """Merge tasks of :func:`merge_tree` over ``n`` leaves (0 for one leaf)."""
    total, width = 0, n
    while width > 1:
        width = math.ceil(width / fan_in)
        total += width
    return total


def fit_task_count(n_blocks: int, blocks_per_unit: int, fan_in: int,
                   checkpointed: bool = True) -> int:
    """Tasks of :func:`bigalign.execution.engine.fit_graph` for a plan with nothing done yet: one leaf
    per block, each unit's merge tree (whose root saves the unit; a unit of one block needs
    a task of its own for that when checkpointed), and the tree over the units."""
    if n_blocks == 0:
        return 0
    full, last = divmod(n_blocks, blocks_per_unit)

    def unit(k):
        nodes = tree_nodes(k, fan_in)
        return k + (max(nodes, 1) if checkpointed else nodes)

    units = full + (1 if last else 0)
    return full * unit(blocks_per_unit) + (unit(last) if last else 0) + \
        tree_nodes(units, fan_in)


def apply_task_count(n_regions: int) -> int:
    """Tasks of :func:`bigalign.execution.engine.apply_graph` with nothing done yet: one per region,
    and the tree (fan-in COUNT_FAN_IN) that sums what they wrote."""
    return n_regions + max(tree_nodes(n_regions, COUNT_FAN_IN), 1 if n_regions == 0 else 0)


def _grow(rows: int, step: int) -> int:
    """The next larger block size: 5/4 as many rows, rounded up to a multiple of ``step``."""
    return max(rows + step, math.ceil(rows * 5 / 4 / step) * step)


def regions_within_budget(rows: int, step: int, per: int, unit: int,
                      budget: Optional[int] = None) -> int:
    """Rows per region of an apply-shaped graph (one task per region of ``per`` rows, on
    multiples of ``step``, and the count tree: :func:`apply_task_count`): ``per`` grown by
    5/4 (in multiples of ``unit``) until the graph fits ``budget`` tasks (default
    :func:`max_tasks` of ``rows``), never below :data:`MIN_BLOCKS` regions. Apply, import
    and export share it, so every job has the same task budget."""
    budget = max_tasks(rows) if budget is None else budget
    while count_blocks(0, rows, step, per) > MIN_BLOCKS and \
            apply_task_count(count_blocks(0, rows, step, per)) > budget:
        per = _grow(per, unit)
    return per


def plan_units(n_blocks: int, block_bytes: int, partial_bytes: int, *,
               max_overhead: float = 0.02, max_units: int = MAX_UNITS) -> list[range]:
    """Group consecutive blocks into checkpoint units.

    A unit writes one partial (``partial_bytes``, d^2 float64 matrices) per
    ``len(unit) * block_bytes`` of input read: a unit spans the fewest blocks that keep that
    write under ``max_overhead`` of the bytes read, so progress is saved as often as the
    budget allows (every few blocks at d = 384; every ~20 blocks at d = 1024 with Gram
    matrices, whose partial is 25 MB), but a job has at most ``max_units`` units: beyond
    that, more progress files only cost storage and listing time.
    """
    return group(n_blocks, units_per(n_blocks, block_bytes, partial_bytes, max_overhead,
                                     max_units))


def units_per(n_blocks: int, block_bytes: int, partial_bytes: int,
              max_overhead: float = 0.02, max_units: int = MAX_UNITS) -> int:
    """Blocks per unit of :func:`plan_units`."""
    per = max(1, math.ceil(partial_bytes / (max_overhead * max(block_bytes, 1))))
    per = max(per, math.ceil(n_blocks / max_units))
    return min(per, max(n_blocks, 1))


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


def apply_task_bytes(rows: int, dim_a: int, dim_b: int, item_in: int, item_out: int,
                     write_rows: Optional[int] = None, sharded: bool = False) -> int:
    """Memory one apply thread holds, roughly: ``rows`` source rows of a read (centred in
    place, or a working copy when the dtype changes), the mapped rows in the compute dtype,
    the output cast when its dtype differs, and the d_A x d_B matrix.

    ``write_rows`` > ``rows``: a write (a whole output shard, say) gathers several reads in
    a buffer of the output dtype (the product goes straight into it when the dtypes agree);
    ``sharded``: Zarr encodes the whole shard before storing it (one more shard of bytes)."""
    work = 8 if item_out == 8 else 4
    copy = work if item_in != work else 0
    cast = item_out if item_out != work else 0
    matrix = work * dim_a * dim_b
    write = write_rows or rows
    if write <= rows:
        out = rows * (dim_a * (item_in + copy) + dim_b * (work + cast)) + matrix
    else:
        scratch = rows * dim_b * work if cast else 0
        out = rows * dim_a * (item_in + copy) + scratch + write * dim_b * item_out + matrix
    return out + (write * dim_b * item_out if sharded else 0)


def output_layout(source_chunk: int, source_shard: Optional[int], dim_out: int,
                  item_out: int, chunk_rows: Optional[int] = None,
                  max_shard_bytes: int = MAX_OUTPUT_SHARD_BYTES) -> tuple[int, Optional[int]]:
    """(chunk rows, shard rows or None) of an apply's output.

    It mirrors the source: the source's chunk rows (its inner chunks when sharded) unless
    ``chunk_rows`` is given, and, for a sharded source, its shard rows, or the largest
    exact fraction of them whose output shard stays within ``max_shard_bytes`` (a writer
    holds a whole shard). A ``chunk_rows`` that does not divide the source's shard, or
    shards of a single chunk, give an unsharded output. A ``chunk_rows`` of 0 or less is
    refused (InputError), not taken for "the source's"."""
    if chunk_rows is not None and not int(chunk_rows) > 0:
        from ..errors import InputError
        raise InputError(f"--chunk-rows (chunk_rows) must be a positive whole number, got "
                         f"{chunk_rows!r}")
    chunk = int(chunk_rows or source_chunk)
    if not source_shard or source_shard % chunk:
        return chunk, None
    per = source_shard // chunk  # chunks per source shard
    row = dim_out * item_out
    for m in sorted((m for m in range(1, per + 1) if per % m == 0), reverse=True):
        if m * chunk * row <= max_shard_bytes:
            return (chunk, m * chunk) if m > 1 else (chunk, None)
    return chunk, None


# ---- plans: what a run will do, as data (stored as-is in the job's manifest) -------------

@dataclass(frozen=True)
class FitPlan:
    """Rows [start, stop) in blocks of ``rows_per_block`` (one task each; boundaries on
    multiples of ``step``, the inputs' shards or chunks), read ``rows_per_read`` at a time
    (boundaries on multiples of ``read_step``, their inner chunks; 0: ``step``), grouped
    ``blocks_per_unit`` to a checkpoint unit, merged with fan-in ``fan_in``. ``aligned``:
    every chunk of both inputs is read by one task only. Fields added later have defaults,
    so the plan of an older manifest still loads (and means what it meant)."""

    start: int
    stop: int
    step: int
    rows_per_block: int
    rows_per_read: int
    blocks_per_unit: int
    fan_in: int
    aligned: bool = True
    read_step: int = 0

    def blocks(self) -> list[Block]:
        return plan_blocks(self.start, self.stop, self.step, self.rows_per_block)

    def units(self) -> list[range]:
        return group(count_blocks(self.start, self.stop, self.step, self.rows_per_block),
                     self.blocks_per_unit)

    def unit_rows(self) -> dict[int, tuple[int, int]]:
        """Unit index -> the rows [start, stop) it covers."""
        blocks = self.blocks()
        return {u: (blocks[r[0]].start, blocks[r[-1]].stop) for u, r in enumerate(self.units())}

    def reads_step(self) -> int:
        """The row step reads are aligned to."""
        return self.read_step or self.step

    def tasks(self, checkpointed: bool = True) -> int:
        """Tasks of the graph with nothing done (:func:`fit_task_count`)."""
        return fit_task_count(count_blocks(self.start, self.stop, self.step,
                                           self.rows_per_block),
                              self.blocks_per_unit, self.fan_in, checkpointed)


@dataclass(frozen=True)
class ApplyPlan:
    """Output rows [0, rows) in regions of ``rows_per_block`` (one task each, whole output
    shards or chunks: boundaries on multiples of ``step``). Output row r is source row
    ``offset + r`` (``apply --rows START:STOP`` maps a slice).

    A region is written ``rows_per_write`` rows at a time (whole output shards or chunks,
    multiples of ``write_step``), each write mapped from source reads of ``rows_per_read``
    rows (on multiples of ``read_step``, the source's inner chunks), so a region can be
    large while a task's memory stays one write. 0 in these fields (plans of older
    manifests): one read and one write per region."""

    rows: int
    step: int
    rows_per_block: int
    aligned: bool = True
    offset: int = 0
    rows_per_write: int = 0
    write_step: int = 0
    rows_per_read: int = 0
    read_step: int = 0

    def blocks(self) -> list[Block]:
        return plan_blocks(0, self.rows, self.step, self.rows_per_block)

    def region_rows(self) -> dict[int, tuple[int, int]]:
        return {b.index: (b.start, b.stop) for b in self.blocks()}

    def layout(self) -> tuple[int, int, int, int]:
        """(write_step, rows_per_write, read_step, rows_per_read) with the old defaults
        resolved: one write and one read per region."""
        write_step = self.write_step or self.step
        per_write = self.rows_per_write or self.rows_per_block
        read_step = self.read_step or 1
        per_read = self.rows_per_read or per_write
        return write_step, per_write, read_step, per_read

    def tasks(self) -> int:
        """Tasks of the graph with nothing done (:func:`apply_task_count`)."""
        return apply_task_count(count_blocks(0, self.rows, self.step, self.rows_per_block))


@dataclass(frozen=True)
class ExportPlan:
    """Source rows [start, stop) written as files of ``rows_per_file`` rows, one task each
    (file boundaries on multiples of ``step``, the source's shards or chunks, so a task
    owns whole stored objects; the first and last file may be shorter), each file read
    ``rows_per_group`` rows at a time (boundaries on multiples of ``read_step``, its inner
    chunks) and written in row groups of ``rows_per_group`` rows from its start."""

    start: int
    stop: int
    step: int
    rows_per_file: int
    rows_per_group: int
    read_step: int

    @property
    def rows(self) -> int:
        return self.stop - self.start

    def blocks(self) -> list[Block]:
        """The files, in order: block ``i`` is file ``i``."""
        return plan_blocks(self.start, self.stop, self.step, self.rows_per_file)

    def region_rows(self) -> dict[int, tuple[int, int]]:
        return {b.index: (b.start, b.stop) for b in self.blocks()}

    def groups(self, block: Block) -> list[Block]:
        """The source reads of one file, in order."""
        return plan_blocks(block.start, block.stop, self.read_step, self.rows_per_group)

    def tasks(self) -> int:
        """Tasks of the graph with nothing done: one per file and the tree that counts."""
        return apply_task_count(count_blocks(self.start, self.stop, self.step,
                                             self.rows_per_file))


def make_export_plan(start: int, stop: int, step: int, row_bytes: int, *,
                     read_step: Optional[int] = None, rows_per_file: Optional[int] = None,
                     file_bytes: int = FILE_BYTES, group_bytes: int = GROUP_BYTES,
                     task_budget: Optional[int] = None) -> ExportPlan:
    """Plan an export of source rows [start, stop) whose stored objects hold ``step`` rows
    (inner chunks ``read_step``, default ``step``), ``row_bytes`` bytes a row as written:
    files of ``rows_per_file`` rows (a positive multiple of ``step``; ValueError
    otherwise), by default about ``file_bytes`` (whole objects, at least one; more when the
    files would pass the task budget, :func:`max_tasks`), in row groups of about
    ``group_bytes`` (whole inner chunks, at least one, at most a file)."""
    read_step = int(read_step or step)
    if step <= 0 or read_step <= 0 or step % read_step:
        raise ValueError(f"bad steps: objects of {step} rows, reads of {read_step}")
    if not 0 <= start < stop:
        raise ValueError(f"bad row range {start}:{stop}")
    if rows_per_file is not None:
        per = int(rows_per_file)
        if per <= 0 or per % step:
            raise ValueError(f"rows per file {per} is not a positive multiple of {step}")
    else:
        per = choose_block_rows(stop - start, step, row_bytes, file_bytes)
        budget = max_tasks(stop - start) if task_budget is None else task_budget
        while apply_task_count(count_blocks(start, stop, step, per)) > budget:
            per = _grow(per, step)
    group_rows = min(per, choose_block_rows(stop - start, read_step, row_bytes, group_bytes))
    return ExportPlan(start, stop, step, per, group_rows, read_step)


def export_row_bytes(dim: int, itemsize: int, ids_kind: Optional[str]) -> int:
    """Bytes a row takes in an exported file: the vector, and an int64 id (row numbers when
    the store has none) or ~16 bytes of a string id."""
    return int(dim) * int(itemsize) + (16 if ids_kind == "string" else 8)


def plan_from_dict(kind: str, values: dict):
    """The plan a manifest stores (``dataclasses.asdict`` of it), rebuilt."""
    return {"fit": FitPlan, "export": ExportPlan}.get(kind, ApplyPlan)(**values)


def _read_step(read_steps, step: int, row_bytes: int, block_bytes: int) -> int:
    """Row step of reads: the least common multiple of the inputs' inner chunks when it
    divides ``step`` and fits the budget, else the first input's inner chunk (which divides
    its shard, and so ``step`` when that is the first input's)."""
    read_steps = [int(s) for s in read_steps]
    lcm, _ = common_step(read_steps, row_bytes, block_bytes)
    if step % lcm == 0:
        return lcm
    return read_steps[0] if step % read_steps[0] == 0 else step


def make_fit_plan(start: int, stop: int, steps: tuple[int, int], dims: tuple[int, int],
                  itemsizes: tuple[int, int], gram: bool,
                  block_bytes: int = DEFAULT_BLOCK_BYTES, read_steps=None,
                  task_budget: Optional[int] = None) -> FitPlan:
    """Plan a fit of rows [start, stop): task boundaries on the shard (or chunk) boundaries
    of both inputs (``steps``), reads of ~``block_bytes`` on their inner-chunk boundaries
    (``read_steps``; default ``steps``), tasks of whole reads at least twice their
    partial's size, tasks grouped into checkpoint units within the 2 % write budget and
    MAX_UNITS, merge fan-in for a 1 GiB budget of partials; blocks grow until the graph
    fits ``task_budget`` (default :func:`max_tasks`; counted as checkpointed, so that a fit
    with and without a checkpoint has the same plan, merge order and bits)."""
    row_bytes = dims[0] * itemsizes[0] + dims[1] * itemsizes[1]
    step, aligned = common_step(list(steps), row_bytes, block_bytes)
    read_step = _read_step(read_steps or steps, step, row_bytes, block_bytes)
    partial = partial_bytes(dims[0], dims[1], gram)
    fan_in = choose_fan_in(partial)
    per_read = choose_block_rows(stop - start, read_step, row_bytes, block_bytes, MIN_BLOCKS)
    per = fit_block_rows(per_read, row_bytes, partial)
    per = max(step, math.ceil(per / step) * step)
    budget = max_tasks(stop - start) if task_budget is None else task_budget
    unit = per_read if per_read % step == 0 else step  # grow by whole reads where they can
    while True:
        n_blocks = count_blocks(start, stop, step, per)
        bpu = units_per(n_blocks, per * row_bytes, partial)
        if n_blocks <= MIN_BLOCKS or fit_task_count(n_blocks, bpu, fan_in) <= budget:
            break
        per = _grow(per, unit)
    return FitPlan(start, stop, step, per, min(per_read, per), bpu, fan_in, aligned,
                   read_step if read_step != step else 0)


def make_apply_plan(rows: int, chunk_rows: int, source_step: int, row_bytes: int,
                    block_bytes: int = DEFAULT_BLOCK_BYTES, offset: int = 0, *,
                    shard_rows: Optional[int] = None, source_read_step: Optional[int] = None,
                    task_budget: Optional[int] = None) -> ApplyPlan:
    """Plan an apply of ``rows`` rows starting at source row ``offset``: regions of whole
    output shards (``shard_rows``) or chunks (``chunk_rows``), on source shard or chunk
    boundaries (``source_step``) too where the two share a small common multiple (and
    ``offset`` falls on one), written ~``block_bytes`` (or one shard) at a time from source
    reads on its inner-chunk boundaries (``source_read_step``); regions grow until the
    graph fits ``task_budget`` (default :func:`max_tasks`). ``row_bytes``: bytes read plus
    written per row."""
    write_step = int(shard_rows or chunk_rows)
    step, aligned = common_step([write_step, source_step], row_bytes, block_bytes)
    aligned = aligned and offset % source_step == 0
    per_write = choose_block_rows(rows, write_step, row_bytes, block_bytes, MIN_BLOCKS)
    read_step = int(source_read_step or source_step)
    per_read = per_write  # one read per write, unless a write (a big shard) is too big
    if per_write * row_bytes > 4 * block_bytes:
        per_read = min(per_write, choose_block_rows(rows, read_step, row_bytes, block_bytes))
    per = max(step, math.ceil(per_write / step) * step)
    per = min(per, max(step, math.ceil(rows / MIN_BLOCKS / step) * step))
    unit = per_write if per_write % step == 0 else step  # grow by whole writes where they can
    per = regions_within_budget(rows, step, per, unit, task_budget)
    per_write = min(per_write, per)
    return ApplyPlan(rows, step, per, aligned, offset, per_write, write_step, per_read,
                     read_step)
