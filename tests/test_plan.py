import math

import pytest
from hypothesis import given, strategies as st

from bigalign.plan import (choose_block_rows, common_step, merge_tree, plan_blocks,
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
    from bigalign.plan import choose_fan_in, fit_block_rows, partial_bytes
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
    from bigalign.plan import apply_task_bytes, fit_task_bytes, partial_bytes
    # d = 384 float32, 64 MB of reads: reads + centred copies + a few 3.5 MB partials
    reads = 21845 * 384 * 4 * 2
    est = fit_task_bytes(21845, 384, 384, 4, 4, 4, gram=True, fan_in=8)
    assert est == 2 * reads + 11 * partial_bytes(384, 384, True)
    # apply float32 -> float32: source centred in place, product buffer, matrix
    assert apply_task_bytes(1000, 8, 4, 4, 4) == 1000 * (8 * 4 + 4 * 4) + 4 * 8 * 4
    # float16 in, float64 out: a float64 working copy of the source, no output cast
    assert apply_task_bytes(10, 2, 3, 2, 8) == 10 * (2 * (2 + 8) + 3 * 8) + 8 * 2 * 3
