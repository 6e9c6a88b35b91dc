import math

import pytest
from hypothesis import given, strategies as st

from bigalign.planning.plan import (choose_block_rows, common_step, merge_tree, plan_blocks,
                           plan_units)


@given(st.integers(0, 500), st.integers(1, 500), st.integers(1, 40), st.integers(1, 6))
def test_blocks_tile_the_range_on_aligned_boundaries(start, length, step, mult):
    stop = start + length
    blocks = plan_blocks(start, stop, step, step * mult)
    assert blocks[0].start == start and blocks[-1].stop == stop
    for x, y in zip(blocks, blocks[1:]):
        assert x.stop == y.start
        assert x.stop % step == 0  # inner boundaries on chunk boundaries
    assert all(b.rows > 0 for b in blocks)
    assert all(b.rows <= step * mult for b in blocks)
    assert [b.index for b in blocks] == list(range(len(blocks)))


def test_empty_and_bad_ranges():
    assert plan_blocks(5, 5, 10, 10) == []
    with pytest.raises(ValueError):
        plan_blocks(6, 5, 10, 10)
    with pytest.raises(ValueError, match="multiple"):
        plan_blocks(0, 5, 10, 15)


def test_common_step():
    assert common_step([1000, 1500], 100, 10**6) == (3000, True)
    # coprime large chunks: an lcm block would be far over budget -> first array's step
    assert common_step([1000, 1001], 1000, 10**6) == (1000, False)
    with pytest.raises(ValueError):
        common_step([0, 5], 1, 1)


def test_choose_block_rows():
    # 64 MB of 1 KB rows, chunks of 1000 rows -> 65000 rows
    assert choose_block_rows(10**9, 1000, 1024, 64 * 2**20) == 65000
    # small input: at least min_blocks blocks where rows allow
    per = choose_block_rows(10000, 100, 1024, 64 * 2**20, min_blocks=4)
    assert per == 2500 and math.ceil(10000 / per) == 4
    # never below one step
    assert choose_block_rows(10, 100, 10**9, 1) == 100


def test_units_partition_blocks_and_bound_overhead():
    units = plan_units(100, block_bytes=64 * 2**20, partial_bytes=8 * 2**20)
    flat = [i for u in units for i in u]
    assert flat == list(range(100))
    assert all(8 * 2**20 <= 0.02 * len(u) * 64 * 2**20 for u in units[:-1])
    # small partials: every block is its own unit
    assert len(plan_units(100, 64 * 2**20, 2**20)) == 100
    assert plan_units(0, 1, 1) == []


@given(st.integers(1, 300), st.integers(2, 9))
def test_merge_tree_covers_each_input_once(n, fan_in):
    levels = merge_tree(n, fan_in)
    width = n
    for groups in levels:
        assert [i for g in groups for i in g] == list(range(width))
        assert all(1 <= len(g) <= fan_in for g in groups)
        width = len(groups)
    assert width == 1


def test_fit_tasks_outweigh_their_partials_at_large_d():
    from bigalign.planning.plan import choose_fan_in, fit_block_rows, partial_bytes
    # d = 384: a 64 MB read already dwarfs the 3.5 MB partial: one read per task
    p384 = partial_bytes(384, 384, gram=True)
    assert fit_block_rows(21845, 384 * 8, p384) == 21845
    # d = 4096: the partial is ~400 MB; a task spans enough reads to be >= 2x that
    p4k = partial_bytes(4096, 4096, gram=True)
    rows = fit_block_rows(2048, 4096 * 8, p4k)
    assert rows % 2048 == 0 and rows * 4096 * 8 >= 2 * p4k
    # merges hold at most ~1 GiB of partials at large d, fan-in 8 at small d
    assert choose_fan_in(p384) == 8
    assert choose_fan_in(p4k) == 2


def test_task_memory_estimates():
    from bigalign.planning.plan import apply_task_bytes, fit_task_bytes, partial_bytes
    # d = 384 float32, 64 MB of reads: reads + centred copies + a few 3.5 MB partials
    reads = 21845 * 384 * 4 * 2
    est = fit_task_bytes(21845, 384, 384, 4, 4, 4, gram=True, fan_in=8)
    assert est == 2 * reads + 11 * partial_bytes(384, 384, True)
    # apply float32 -> float32: source centred in place, product buffer, matrix
    assert apply_task_bytes(1000, 8, 4, 4, 4) == 1000 * (8 * 4 + 4 * 4) + 4 * 8 * 4
    # float16 in, float64 out: a float64 working copy of the source, no output cast
    assert apply_task_bytes(10, 2, 3, 2, 8) == 10 * (2 * (2 + 8) + 3 * 8) + 8 * 2 * 3


# ---- scale bounds --------------------------------------------------------------------------

def _sixteen_mib_chunks(d, itemsize=4):
    return (16 * 2**20) // (d * itemsize)


@pytest.mark.parametrize("rows,budget", [(10**9, 50_000), (10**10, 200_000)])
@pytest.mark.parametrize("d", [384, 1024, 4096])
def test_task_and_file_counts_are_bounded_at_scale(rows, budget, d):
    """The issue's bounds: <= ~50k tasks at 10^9 rows and ~200k at 10^10, checkpoint writes
    within 2 % at every d, at most MAX_UNITS unit files, one marker per region."""
    from bigalign.planning.plan import (MAX_UNITS, make_apply_plan, make_fit_plan, max_tasks,
                               partial_bytes)
    c = _sixteen_mib_chunks(d)
    fit = make_fit_plan(0, rows, (c, c), (d, d), (4, 4), gram=True)
    assert fit.tasks() <= max_tasks(rows) <= budget
    units = len(fit.units())
    assert units <= MAX_UNITS
    assert units * partial_bytes(d, d, True) <= 0.02 * rows * d * 8
    apply = make_apply_plan(rows, c, c, d * 8)
    assert apply.tasks() <= max_tasks(rows)
    # memory stays one read (~64 MiB of input) however large the blocks grow
    assert fit.rows_per_read * d * 8 <= 2 * 64 * 2**20 or fit.rows_per_read == c
    _, per_write, _, per_read = apply.layout()
    assert per_write * d * 8 <= 2 * 64 * 2**20 and per_read <= per_write


@pytest.mark.parametrize("d,gram", [(16, True), (64, False)])
def test_plan_counts_the_graph_the_engine_builds(d, gram):
    """fit_task_count / apply_task_count are the engine's graphs, exactly, also when a small
    task budget makes blocks grow."""
    from bigalign.execution.engine import apply_graph, fit_graph
    from bigalign.planning.plan import make_apply_plan, make_fit_plan
    for budget in (None, 40):
        fit = make_fit_plan(0, 200_000, (100, 300), (d, d), (4, 4), gram, block_bytes=4096,
                            task_budget=budget)
        for job in (object(), None):
            graph, _, leaves = fit_graph(object(), object(), fit, job=job)
            assert len(graph) - 2 == fit.tasks(checkpointed=job is not None)
            assert leaves == len(fit.blocks())
        if budget:
            assert fit.tasks() <= budget
        apply = make_apply_plan(200_000, 100, 300, d * 8, block_bytes=4096,
                                task_budget=budget)
        graph, _, regions = apply_graph(object(), None, None, apply.blocks(), job=object())
        assert len(graph) - 3 == apply.tasks() and regions == len(apply.blocks())
        from bigalign.execution.engine import count_task
        sums = [v for v in graph.values() if isinstance(v, tuple) and v[0] is count_task]
        assert sums and max(len(v) - 1 for v in sums) <= 32  # no task waits on 10^5 inputs


def test_old_manifest_plans_load_and_keep_their_meaning():
    from bigalign.planning.plan import ApplyPlan, FitPlan, plan_from_dict
    old_fit = {"start": 0, "stop": 1000, "step": 100, "rows_per_block": 200,
               "rows_per_read": 100, "blocks_per_unit": 2, "fan_in": 8, "aligned": True}
    f = plan_from_dict("fit", old_fit)
    assert isinstance(f, FitPlan) and f.reads_step() == 100 and len(f.units()) == 3
    old_apply = {"rows": 1000, "step": 100, "rows_per_block": 300, "aligned": True,
                 "offset": 0}
    a = plan_from_dict("apply", old_apply)
    assert isinstance(a, ApplyPlan) and a.layout() == (100, 300, 1, 300)


@given(st.integers(1, 5000), st.integers(1, 50), st.integers(1, 8), st.integers(1, 6))
def test_apply_writes_tile_each_region(rows, chunk, per_shard, mult):
    """Writes of whole output shards (or chunks) tile every region; reads tile every write."""
    from bigalign.planning.plan import make_apply_plan
    shard = chunk * per_shard
    plan = make_apply_plan(rows, chunk, shard, 64, block_bytes=64 * chunk * mult,
                           shard_rows=shard if per_shard > 1 else None,
                           source_read_step=chunk)
    write_step, per_write, read_step, per_read = plan.layout()
    assert write_step == (shard if per_shard > 1 else chunk)
    for b in plan.blocks():
        assert b.start % write_step == 0
        writes = plan_blocks(b.start, b.stop, write_step, per_write)
        assert writes[0].start == b.start and writes[-1].stop == b.stop
        assert all(w.start % write_step == 0 for w in writes)  # whole shards per write
        for w in writes:
            reads = plan_blocks(w.start, w.stop, read_step, per_read)
            assert reads[0].start == w.start and reads[-1].stop == w.stop


def test_output_layout_mirrors_the_source():
    from bigalign.planning.plan import output_layout
    assert output_layout(1000, None, 384, 4) == (1000, None)  # unsharded source
    assert output_layout(1000, 50_000, 384, 4) == (1000, 50_000)  # 73 MiB shards: mirrored
    # a 1 GiB output shard is split into the largest exact fraction within 512 MiB
    chunk, shard = output_layout(4096, 65536, 4096, 4)
    assert chunk == 4096 and 65536 % shard == 0 and shard * 4096 * 4 <= 512 * 2**20
    assert shard == 32768
    assert output_layout(1000, 50_000, 384, 4, chunk_rows=3000) == (3000, None)  # no divisor
    assert output_layout(1000, 1000, 384, 4) == (1000, None)  # one chunk per shard


def test_fit_reads_inner_chunks_of_shards():
    """Sharded inputs: tasks own whole shards, reads are ~64 MiB of inner chunks (not a
    1 GiB shard at once)."""
    from bigalign.planning.plan import make_fit_plan
    d = 1024
    shard, chunk = 2**18, 2**12  # 1 GiB shards of 4 MiB... inner chunks of 16 MiB
    plan = make_fit_plan(0, 10**8, (shard, shard), (d, d), (4, 4), True,
                         read_steps=(chunk, chunk))
    assert plan.step == shard and plan.rows_per_block % shard == 0
    assert plan.reads_step() == chunk and plan.rows_per_read * d * 8 <= 64 * 2**20
