#!/usr/bin/env python
"""Import planning at 10^9-10^10 rows (run by hand, not a test): the README's sizing table.

For each case, a synthetic file list (no real files: ``--files`` files of equal rows, Parquet
with row groups of 262,144 rows, polars' default, or .npy read directly) is planned as
``bigalign import`` plans it (d = 384 float32 by default: chunks of ~32 MiB, regions of
~64 MiB within apply's task budget), and the script times, in this process:

* ``plan``: :func:`~bigalign.planning.import_plan.make_import_plan`;
* ``units``: grouping the regions into tasks (:meth:`ImportPlan.units`);
* ``graph``: :func:`bigalign.commands.ingest.import_graph` (regions, units and the Dask
  graph with its count tree; stand-in objects for the files and the store);

and counts from the graph itself: tasks (every entry that is a task), regions, unit tasks,
the most inputs any task waits on, and apply's budget at that many rows. Only APIs that
existed before this change are used, so ``PYTHONPATH=<older checkout>`` times the old
planner (``--cases 1e9:4000`` there: at 10^10 its units() is quadratic).

    python benchmarks/plan_scale.py
    python benchmarks/plan_scale.py --cases 1e9:4000 1e10:40000 --dim 1024
"""

from __future__ import annotations

import argparse
import time


def count(graph: dict) -> tuple[int, int]:
    """(tasks, the most graph keys one task takes as inputs)."""
    tasks, widest = 0, 0
    for value in graph.values():
        if isinstance(value, tuple) and value and callable(value[0]):
            tasks += 1
            widest = max(widest, sum(1 for a in value[1:]
                                     if isinstance(a, (tuple, str)) and _key(a, graph)))
    return tasks, widest


def _key(a, graph: dict) -> bool:
    try:
        return a in graph
    except TypeError:  # an unhashable argument (a tuple of regions)
        return False


def case(rows: int, files: int, dim: int, fmt: str) -> dict:
    from bigalign.commands.ingest import import_graph
    from bigalign.planning.import_plan import choose_chunk_rows, make_import_plan
    from bigalign.planning.plan import max_tasks

    q, r = divmod(rows, files)
    file_rows = [q + (i < r) for i in range(files)]
    group = 262_144
    groups = [None] * files if fmt == "npy" else \
        [(group,) * (n // group) + ((n % group,) if n % group else ()) for n in file_rows]
    t0 = time.perf_counter()
    plan = make_import_plan(file_rows, dim * 4, choose_chunk_rows(dim, 4, rows),
                            row_groups=groups)
    t1 = time.perf_counter()
    units = plan.units()
    t2 = time.perf_counter()
    graph, _, leaves = import_graph(tuple(range(files)), plan, None, None, run_id="bench")
    t3 = time.perf_counter()
    tasks, widest = count(graph)
    return {"rows": rows, "files": files, "format": fmt, "plan_s": t1 - t0,
            "units_s": t2 - t1, "graph_s": t3 - t2, "regions": len(plan.blocks()),
            "unit_tasks": len(units), "tasks": tasks, "widest": widest,
            "budget": max_tasks(rows)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=["1e9:4000", "1e10:4000", "1e10:40000"],
                    metavar="ROWS:FILES")
    ap.add_argument("--dim", type=int, default=384)
    ap.add_argument("--formats", nargs="+", default=["parquet", "npy"])
    args = ap.parse_args()
    print(f"d = {args.dim}, float32; seconds in this process (planning is pure Python)\n")
    print("| rows | files | format | plan s | units s | graph s | total s | regions "
          "| unit tasks | tasks (graph) | most inputs of a task | apply's budget |")
    print("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for spec in args.cases:
        rows, files = spec.split(":")
        for fmt in args.formats:
            c = case(int(float(rows)), int(files), args.dim, fmt)
            total = c["plan_s"] + c["units_s"] + c["graph_s"]
            print(f"| {c['rows']:.0e} | {c['files']:,} | {fmt} | {c['plan_s']:.2f} | "
                  f"{c['units_s']:.2f} | {c['graph_s']:.2f} | {total:.2f} | "
                  f"{c['regions']:,} | {c['unit_tasks']:,} | {c['tasks']:,} | "
                  f"{c['widest']} | {c['budget']:,} |", flush=True)


if __name__ == "__main__":
    main()
