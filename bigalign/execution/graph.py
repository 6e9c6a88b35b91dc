"""One graph builder: a plan's tasks, as data, turned into a Dask graph.

Every streaming command describes its work as a :class:`GraphSpec`: the objects its tasks
share (input arrays, the output, parameters), and *groups* of leaf tasks, one group per
checkpoint unit (fit: the blocks of a unit, merged by a fixed tree whose root stores the
unit; apply / import / export: one region, unit or file task each). :func:`build` turns any
spec into a plain dict graph, as dask/array/reductions.py and rechunker do:

* fixed fan-in trees (:func:`bigalign.planning.plan.merge_tree`) merge each group, then the
  groups' results, so that no task has more than ``fan_in`` inputs and the float64 result
  does not depend on worker count or finishing order;
* deterministic names: every key ends in the spec's ``token``
  (:func:`token`: ``dask.base.tokenize`` of the plan, the run id and what is left to do),
  so the same plan of the same run gives the same keys, and two runs never share one;
* the seam where another executor could plug in later: :mod:`bigalign.execution.cluster`
  runs the dict on the threaded or the distributed scheduler today.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from ..planning.plan import merge_tree

__all__ = ["Shared", "Leaf", "Group", "GraphSpec", "build", "token", "task_count"]


@dataclass(frozen=True)
class Shared:
    """In a task's arguments: the spec's shared object of this name (put in the graph once
    and passed to every task that names it; on a cluster, sent once)."""

    name: str


@dataclass(frozen=True)
class Leaf:
    """A task reading input: ``func(*args)``; ``label`` and ``index`` name it (its key is
    ``(bigalign-NAME-TOKEN-LABEL, index)``): what it is ("block", "region", "unit",
    "file") and its place in the plan."""

    index: int
    func: Callable
    args: tuple = ()
    label: str = "task"


@dataclass(frozen=True)
class Group:
    """Leaves merged by a fixed tree (in order). ``root``: ``(func, *leading args)`` of the
    tree's root task (fit: store the unit's statistics), called with the leading args and
    the merged inputs; None: the plain merge (a single leaf is then the group's result)."""

    index: int
    leaves: tuple
    root: Optional[tuple] = None


@dataclass(frozen=True)
class GraphSpec:
    """What :func:`build` needs: ``name`` (the command), ``token`` (:func:`token`),
    ``shared`` objects, ``groups`` in plan order, the ``merge`` function of both trees and
    their ``fan_in``, ``empty`` (called for the result when no group is left to do) and
    ``finish`` (a task applied to the total, or None)."""

    name: str
    token: str
    shared: dict
    groups: tuple
    merge: Callable
    fan_in: int
    empty: Optional[Callable] = None
    finish: Optional[Callable] = None


def token(*parts: Any) -> str:
    """The deterministic suffix of a graph's keys: ``dask.base.tokenize`` of ``parts``
    (the plan as a dict, the run id, the indices left to do), shortened."""
    from dask.base import tokenize

    return tokenize(*parts)[:16]


def _tree(graph: dict, name: str, keys: list, fan_in: int, merge: Callable,
          root: Optional[tuple] = None):
    """A fixed merge tree over ``keys`` (in order) added to ``graph``; returns its root's
    key. ``root``: (function, *leading args) of the last level's task instead of
    ``merge`` (a task of its own even over a single key)."""
    if len(keys) == 1 and root is None:
        return keys[0]
    levels = merge_tree(len(keys), fan_in) or [[range(1)]]
    for level, groups in enumerate(levels):
        keys_next = []
        for j, group in enumerate(groups):
            key = (name, level, j)
            head = root if root is not None and level == len(levels) - 1 else (merge,)
            graph[key] = (*head, *[keys[i] for i in group])
            keys_next.append(key)
        keys = keys_next
    return keys[0]


def task_count(graph: dict) -> int:
    """The tasks of a graph :func:`build` made (its shared objects are data, not tasks):
    the total the progress line counts ("40% (32 of 80 tasks)"), so the run's first log
    line names the same number."""
    return sum(1 for v in graph.values() if isinstance(v, tuple) and v and callable(v[0]))


def build(spec: GraphSpec) -> tuple[dict, Any, int]:
    """The Dask graph of ``spec``: (graph, key of the result, number of leaf tasks)."""
    suffix = f"{spec.name}-{spec.token}"
    names = {n: f"bigalign-{suffix}-{n}" for n in spec.shared}
    graph: dict = {names[n]: obj for n, obj in spec.shared.items()}

    def resolve(args: tuple) -> tuple:
        return tuple(names[a.name] if isinstance(a, Shared) else a for a in args)

    group_keys, leaves = [], 0
    for g in spec.groups:
        keys = []
        for leaf in g.leaves:
            key = (f"bigalign-{suffix}-{leaf.label}", leaf.index)
            graph[key] = (leaf.func, *resolve(leaf.args))
            keys.append(key)
        leaves += len(keys)
        root = None if g.root is None else (g.root[0], *resolve(g.root[1:]))
        group_keys.append(_tree(graph, f"bigalign-{suffix}-merge-{g.index}", keys,
                                spec.fan_in, spec.merge, root))
    if not group_keys:
        total = f"bigalign-{suffix}-total"
        graph[total] = (spec.empty or spec.merge,)
        return graph, total, 0
    total = _tree(graph, f"bigalign-{suffix}-total", group_keys, spec.fan_in, spec.merge)
    if spec.finish is not None:
        graph[f"bigalign-{suffix}-result"] = (spec.finish, total)
        total = f"bigalign-{suffix}-result"
    return graph, total, leaves
