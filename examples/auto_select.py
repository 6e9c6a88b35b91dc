"""What ``fit --method auto`` chooses under each ``--select`` / ``--select-search``, next to the
best single family, on the real samples (held-out items; centred fits, the default).

    python examples/auto_select.py [--data ../shared/data] [--out docs/results]

For each direction (the splits of examples/families.py) every family is fitted once, then
auto once per criterion; the table gives auto's family and, for R@1 and ARR@10 in raw and
centred search, auto's figure minus the best single family's (0: auto chose a best one).
The "best" family is picked on the same held-out items: a hindsight oracle."""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings

import numpy as np
import zarr

import bigalign
import _common as C
import families as F

DIRECTIONS = (("e5small", "minilm", 1500, 1000), ("minilm", "e5small", 1500, 1000),
              ("static64", "minilm", 10000, 8000), ("minilm", "static64", 10000, 8000))
CRITERIA = (("mapped-queries", "raw"), ("mapped-queries", "centred"), ("both", "raw"),
            ("mapped-docs", "raw"), ("residual", "raw"))
CELLS = [(k, v) for v in F.VIEWS for k in ("r1", "arr")]


def _fit(za, zb, n_train, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # rank warnings of the small e5 sample
        return bigalign.fit(za, zb, rows=(0, n_train), **kw)


def direction(tmp, data, a, b, n, n_train) -> dict:
    da, db, qb = F.load_pair(data, a, b, n)
    held = slice(n_train, n)
    native = F.native_hits(db[held], qb[held])
    za, zb = (zarr.create_array(os.path.join(tmp, f"{a}-{b}-{s}.zarr"), shape=x.shape,
                                chunks=(1000, x.shape[1]), dtype="float32")
              for s, x in (("a", da), ("b", db)))
    za[:], zb[:] = da, db
    figs = {}
    for m in F.FAMILIES:
        t = _fit(za, zb, n_train, method=m)
        figs[m] = F.figures(F.hits(np.asarray(t.transform(da[held]), np.float64), db[held],
                                   qb[held]), native)
    best = {(k, v): max(figs[m][v][k] for m in figs) for k, v in CELLS}
    rows = []
    for sel, search in CRITERIA:
        fam = _fit(za, zb, n_train, method="auto", select=sel,
                   select_search=search).options["family"]
        rows.append({"select": sel, "search": search, "chose": fam,
                     **{f"{k}_{v}": figs[fam][v][k] - best[(k, v)] for k, v in CELLS}})
    return {"direction": f"{a}→{b}", "best": {f"{k}_{v}": x for (k, v), x in best.items()},
            "rows": rows}


def main() -> None:
    p = C.parser(__doc__)
    args = p.parse_args()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        out = [direction(tmp, args.data, *d) for d in DIRECTIONS]
    head = ["direction", "--select", "search", "auto chose",
            *[f"{'R@1' if k == 'r1' else 'ARR@10'} {v}" for k, v in CELLS]]
    lines = []
    for d in out:
        for r in d["rows"]:
            lines.append([d["direction"], r["select"], r["search"], r["chose"],
                          *[f"{r[f'{k}_{v}']:+.3f}" for k, v in CELLS]])
    table = C.table(head, lines)
    print(table)
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "auto_select.md"), "w") as f:
            f.write(table + "\n")
        with open(os.path.join(args.out, "auto_select.json"), "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
