#!/usr/bin/env python
"""A/B of bigalign.fit between two checkouts on the same data (run by hand, not a test).

Alternates fresh processes importing bigalign from ``--old`` and ``--new`` (paths put first on
PYTHONPATH), on the source/target arrays of each case folder that ``bench.py`` generated, with
diagnostics off and on; prints the median wall time, the statistics pass
(``metadata["run"]["seconds"]``) and the ratio of the statistics passes. Imports (bigalign,
SciPy: the fit's rank-1 updates use SciPy's BLAS, ~0.1 s to import) happen before the timing.

    python benchmarks/ab_fit.py --old ../base-checkout --new . bench-data/d1024_n183105_c4096
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

CODE = ("import time, json, sys, bigalign, scipy.linalg  # imports outside the timing\n"
        "src, tgt, diag = sys.argv[1], sys.argv[2], sys.argv[3] == '1'\n"
        "t0 = time.perf_counter()\n"
        "t = bigalign.fit(src, tgt, center=True, diagnostics=diag)\n"
        "print(json.dumps({'wall': time.perf_counter() - t0, 'n': t.metadata['n_pairs'],\n"
        "                  'stats': t.metadata['run']['seconds']}))\n")


def run(path, src, tgt, diag):
    env = dict(os.environ, PYTHONPATH=os.path.abspath(path))
    out = subprocess.run([sys.executable, "-c", CODE, src, tgt, diag], env=env, cwd="/",
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("cases", nargs="+", help="bench.py case folders (source.zarr, target.zarr)")
    p.add_argument("--old", required=True, help="checkout of the base version")
    p.add_argument("--new", required=True, help="checkout of the new version")
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--diagnostics", default="0,1", help="0, 1 or 0,1 (default)")
    a = p.parse_args()
    for case in a.cases:
        src, tgt = os.path.join(case, "source.zarr"), os.path.join(case, "target.zarr")
        for diag in a.diagnostics.split(","):
            res = {"old": [], "new": []}
            for _ in range(a.repeat):
                for which in ("old", "new"):
                    res[which].append(run(getattr(a, which), src, tgt, diag))
            med = {k: {m: statistics.median(r[m] for r in v) for m in ("wall", "stats")}
                   for k, v in res.items()}
            n = res["new"][0]["n"]
            print(f"{os.path.basename(case.rstrip('/'))} diagnostics={diag}: "
                  f"old wall {med['old']['wall']:.2f} s, statistics {med['old']['stats']:.2f} s "
                  f"({n / med['old']['stats']:,.0f} rows/s); new wall {med['new']['wall']:.2f} s, "
                  f"statistics {med['new']['stats']:.2f} s ({n / med['new']['stats']:,.0f} "
                  f"rows/s); statistics speedup {med['old']['stats'] / med['new']['stats']:.2f}x",
                  flush=True)


if __name__ == "__main__":
    main()
