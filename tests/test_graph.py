"""The one graph builder (bigalign.execution.graph): deterministic keys, fixed fan-in
trees, and the same builder behind fit, apply, import and export."""

from __future__ import annotations

import dask
import pytest

from bigalign.execution.graph import GraphSpec, Group, Leaf, Shared, build, token
from bigalign.planning.plan import COUNT_FAN_IN, make_apply_plan, make_fit_plan


def add(*xs):
    return sum(xs)


def spec(n, run="r1", fan_in=4):
    groups = tuple(Group(i, (Leaf(i, add, (Shared("one"), i), label="leaf"),))
                   for i in range(n))
    return GraphSpec("test", token({"n": n}, run), {"one": 1}, groups, add, fan_in)


def test_keys_are_deterministic_and_runs_never_share_one():
    g1, k1, _ = build(spec(50))
    g2, k2, _ = build(spec(50))
    assert g1.keys() == g2.keys() and k1 == k2
    g3, _, _ = build(spec(50, run="r2"))
    assert not set(g1) & set(g3)  # two runs on one cluster never exchange results


@pytest.mark.parametrize("n,fan_in", [(1, 4), (5, 4), (50, 4), (1000, 32)])
def test_fixed_trees_compute_the_sum_with_bounded_fan_in(n, fan_in):
    graph, key, leaves = build(spec(n, fan_in=fan_in))
    assert leaves == n
    assert dask.get(graph, key) == sum(1 + i for i in range(n))
    inputs = [sum(1 for a in v[1:] if isinstance(a, tuple) and a in graph)
              for v in graph.values() if isinstance(v, tuple) and v and v[0] is add]
    assert max(inputs) <= fan_in


def test_nothing_left_to_do_is_the_empty_result():
    empty = GraphSpec("test", token("none"), {}, (), add, 4, empty=lambda: (0, []))
    graph, key, leaves = build(empty)
    assert leaves == 0 and dask.get(graph, key) == (0, [])


def test_the_commands_graphs_are_named_after_their_plan_and_run():
    from bigalign.execution.engine import apply_graph, fit_graph

    fit = make_fit_plan(0, 10_000, (100, 100), (8, 8), (4, 4), False, block_bytes=4096)
    a, _, _ = fit_graph(object(), object(), fit, run_id="run-a")
    b, _, _ = fit_graph(object(), object(), fit, run_id="run-a")
    c, _, _ = fit_graph(object(), object(), fit, run_id="run-b")
    assert a.keys() == b.keys() and not set(a) & set(c)
    apply = make_apply_plan(10_000, 100, 100, 64, block_bytes=4096)
    x, _, n = apply_graph(object(), None, None, apply.blocks(), run_id="run-a")
    y, _, m = apply_graph(object(), None, None, apply.blocks(), done={0, 1}, run_id="run-a")
    assert n == m + 2 and all(k[0].startswith("bigalign-apply-") for k in x if
                              isinstance(k, tuple))


def test_import_counts_with_a_tree_not_one_task_of_every_unit():
    """At 10^4 units the final count was one task with 10^4 inputs."""
    from bigalign.commands.ingest import _count, import_graph, make_import_plan

    plan = make_import_plan([1000] * 200, 64, 10, block_bytes=640, row_groups=[None] * 200)
    graph, key, tasks = import_graph(tuple(range(200)), plan, None, None, run_id="r")
    assert tasks == len(plan.units()) > COUNT_FAN_IN
    counts = [len(v) - 1 for v in graph.values() if isinstance(v, tuple) and v[0] is _count]
    assert counts and max(counts) <= COUNT_FAN_IN
