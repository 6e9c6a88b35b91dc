"""Which map family: ``bigalign.fit(..., method=...)`` for every family and ``auto``, on real
data, next to scipy's Procrustes and a ridge fit by plain numpy on the same split.

Items: Debian package descriptions (../shared/data): the one-line synopsis is the query, the
extended description the document; query i is relevant to document i only. For each
directed model pair A -> B (A the old model, B the new one), the training pairs are the
*documents* of items [0, train) of both models, held out are items [train, n):

* bigalign: ``bigalign.fit(a.zarr, b.zarr, rows=(0, train), method=M, center=C)`` for M in
  orthogonal, similarity, affine, ridge, reduced-rank and auto, C centred (the default) and
  uncentred (``--no-center``). ridge and reduced-rank choose their parameter on bigalign's
  own held-out windows of the training pairs; auto chooses the family there by the mean of
  recall@1 both ways (raw cosine), then refits the winner on all training pairs. Nothing
  here sees the held-out items before the fits are done.
* scipy: ``scipy.linalg.orthogonal_procrustes`` on the training pairs (centred: each side
  minus its training mean, the target mean added back after mapping; uncentred: raw). It
  needs equal shapes, so for dA != dB the smaller side is zero-padded to the larger width
  and the padding's rows (dA < dB) or columns (dA > dB) of R are dropped: the rectangular
  Procrustes solution, the one bigalign solves.
* numpy ridge: W = (XᵀX + λI)⁻¹ XᵀY in closed form (centred: X, Y minus their training
  means, i.e. an unpenalised intercept; uncentred: raw rows, no intercept). λ = g·tr(XᵀX)/dA
  with g on the grid 10^-4 .. 10^2 (half decades), chosen by the lowest mean squared error on
  the last 20% of the training rows when fitted on the first 80%, then refitted on all
  training rows with that g (the squared-error criterion ridge is usually tuned by, not a
  retrieval score).

Measured on the held-out items, exact search, ties counted in the query's favour:

* R@1 (doc -> doc): each mapped held-out A document searches the held-out B documents; a
  hit when its own B document comes first;
* ARR@10: B's held-out queries search the mapped held-out A documents (recall@10), divided
  by B's queries searching B's own documents (a full re-embed);
* raw: cosine on the vectors as they are; centred: each set minus its own mean (mapped
  documents, B documents, B queries) before the cosine, as docs/evaluation.md defines.

For the comparison of auto with the best single family (the families fitted with the same
centring as auto), a paired bootstrap over held-out queries (1,000 resamples, seed 0) gives
a 95% interval of auto minus that family: "best" when auto chose it, "tie" when the interval
holds 0, "loses" when it lies below 0. The best family is picked on the very items it is
scored on, so it is optimistic: auto is compared with a hindsight oracle.

    python examples/families.py --out docs/results   # 4 directed pairs, 45 s on 2 cores
    python examples/families.py --quick               # 2 pairs (static64 cut to 4,000 items), 13 s
"""

from __future__ import annotations

import logging
import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import bigalign  # noqa: E402
from bigalign.maths.bootstrap import difference_interval  # noqa: E402

FAMILIES = ("orthogonal", "similarity", "affine", "ridge", "reduced-rank")
VIEWS = ("raw", "centred")
METRICS = ("r1", "arr")
#: numpy ridge: relative penalties g (λ = g·tr(XᵀX)/dA) and the validation share
RIDGE_GRID = 10.0 ** np.arange(-4.0, 2.01, 0.5)
RIDGE_VALIDATION = 0.2
FILES = {"minilm": "minilm", "e5small": "e5small", "static64": "static64"}


# ---------------------------------------------------------------------------------------
# the measurements (numpy float64, independent of bigalign's evaluation code)
# ---------------------------------------------------------------------------------------

def own_ranks(queries: np.ndarray, docs: np.ndarray) -> np.ndarray:
    """For each query i (n, d), how many of the documents (n, d) score strictly higher by
    cosine than document i (0: found first). (n,) int64. Rows are normalised in float64,
    the scores computed in float32 (as a vector index would)."""
    q = (queries / np.linalg.norm(queries, axis=1, keepdims=True)).astype(np.float32)
    d = (docs / np.linalg.norm(docs, axis=1, keepdims=True)).astype(np.float32)
    s = q @ d.T
    return (s > np.diag(s)[:, None]).sum(axis=1)


def view(x: np.ndarray, v: str) -> np.ndarray:
    return x - x.mean(axis=0) if v == "centred" else x


def hits(mapped: np.ndarray, docs_b: np.ndarray, queries_b: np.ndarray) -> dict:
    """Per-query 0/1 hits on the held-out items: {"r1": {view: (n,)}, "bridge10": {view:
    (n,)}, "r1_back": {view: (n,)}}: mapped A documents finding their B document first; B
    queries finding their mapped A document in the top 10; B documents finding their
    mapped A document first (the other half of auto's criterion)."""
    out = {"r1": {}, "bridge10": {}, "r1_back": {}}
    for v in VIEWS:
        out["r1"][v] = (own_ranks(view(mapped, v), view(docs_b, v)) < 1).astype(np.float64)
        out["r1_back"][v] = (own_ranks(view(docs_b, v), view(mapped, v)) < 1
                             ).astype(np.float64)
        out["bridge10"][v] = (own_ranks(view(queries_b, v), view(mapped, v)) < 10
                              ).astype(np.float64)
    return out


def native_hits(docs_b: np.ndarray, queries_b: np.ndarray) -> dict:
    """B queries finding their own B document in the top 10 (the full re-embed)."""
    return {v: (own_ranks(view(queries_b, v), view(docs_b, v)) < 10).astype(np.float64)
            for v in VIEWS}


def figures(h: dict, native: dict) -> dict:
    return {v: {"r1": float(h["r1"][v].mean()), "r1_back": float(h["r1_back"][v].mean()),
                "criterion": float((h["r1"][v].mean() + h["r1_back"][v].mean()) / 2),
                "bridge_r10": float(h["bridge10"][v].mean()),
                "arr": float(h["bridge10"][v].mean() / native[v].mean())} for v in VIEWS}


# ---------------------------------------------------------------------------------------
# the reference fits: scipy's Procrustes, ridge by numpy
# ---------------------------------------------------------------------------------------

def scipy_procrustes(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """The (dA, dB) orthogonal map of a (n, dA) onto b (n, dB) by
    ``scipy.linalg.orthogonal_procrustes``, zero-padding the narrower side."""
    from scipy.linalg import orthogonal_procrustes

    da, db = a.shape[1], b.shape[1]
    width = max(da, db)
    pad = lambda x: np.pad(x, ((0, 0), (0, width - x.shape[1])))  # noqa: E731
    r, _ = orthogonal_procrustes(pad(a), pad(b))
    return r[:da, :db]


def ridge_matrix(x: np.ndarray, y: np.ndarray, g: float) -> np.ndarray:
    """(XᵀX + λI)⁻¹ XᵀY with λ = g·tr(XᵀX)/dA; x (n, dA), y (n, dB) float64."""
    gram = x.T @ x
    lam = g * np.trace(gram) / x.shape[1]
    return np.linalg.solve(gram + lam * np.eye(x.shape[1]), x.T @ y)


def numpy_ridge(a: np.ndarray, b: np.ndarray, center: bool) -> tuple:
    """(map function, chosen g, validation table): g chosen by validation MSE on the last
    RIDGE_VALIDATION of the training rows, refitted on all of them."""
    cut = int(round(len(a) * (1 - RIDGE_VALIDATION)))

    def fit(x, y, g):
        mx, my = (x.mean(axis=0), y.mean(axis=0)) if center else (0.0, 0.0)
        w = ridge_matrix(x - mx, y - my, g)
        return lambda z: (z - mx) @ w + my

    table = []
    for g in RIDGE_GRID:
        f = fit(a[:cut], b[:cut], g)
        table.append((float(g), float(np.mean(np.sum((f(a[cut:]) - b[cut:]) ** 2, axis=1)))))
    best = min(table, key=lambda t: t[1])[0]
    return fit(a, b, best), best, table


def centred_procrustes_map(a, b, center: bool):
    ma, mb = (a.mean(axis=0), b.mean(axis=0)) if center else (0.0, 0.0)
    r = scipy_procrustes(a - ma, b - mb)
    return lambda z: (z - ma) @ r + mb


# ---------------------------------------------------------------------------------------
# one directed pair
# ---------------------------------------------------------------------------------------

def load_pair(data: str, a: str, b: str, n: int) -> tuple:
    """(A docs, B docs, B queries) of items [0, n), float64."""
    f = lambda name: C.load(data, name, slice(0, n)).astype(np.float64)  # noqa: E731
    return f(f"{FILES[a]}_docs.npy"), f(f"{FILES[b]}_docs.npy"), f(f"{FILES[b]}_queries.npy")


def bigalign_fits(scratch, da, db, n_train: int) -> list[dict]:
    """Every family and auto, centred and not, through ``bigalign.fit`` on Zarr arrays."""
    za, zb = scratch.zarr(da.astype(np.float32)), scratch.zarr(db.astype(np.float32))
    out = []
    for center in (True, False):
        for method in FAMILIES + ("auto",):
            t0 = time.perf_counter()
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # rank warnings of the small e5 sample
                t = bigalign.fit(za, zb, rows=(0, n_train), method=method, center=center)
            meta = t.metadata
            params = {k: v for k, v in (meta.get("params") or {}).items()}
            if meta["family"] == "similarity":
                params["scale"] = float(t.scale)
            row = {"tool": "bigalign", "method": method, "center": center,
                   "family": meta["family"], "params": params, "map": t.transform,
                   "seconds": time.perf_counter() - t0}
            if method == "auto":
                sel = meta["selection"]
                row["selection"] = {"criterion": sel["criterion"], "holdout": sel["holdout"],
                                    "candidates": [{k: c.get(k) for k in (
                                        "family", "params", "score", "score_interval",
                                        "heldout_relative_residual", "chosen")}
                                        for c in sel["candidates"]]}
            out.append(row)
    with warnings.catch_warnings():  # the check: the same fit with float64 block products
        warnings.simplefilter("ignore")
        t = bigalign.fit(za, zb, rows=(0, n_train), method="orthogonal", precision="float64")
    out.append({"tool": "bigalign", "method": "orthogonal, precision float64", "center": True,
                "family": "orthogonal", "params": {}, "map": t.transform, "check": True})
    return out


def reference_fits(a_tr, b_tr) -> list[dict]:
    out = []
    for center in (True, False):
        out.append({"tool": "scipy", "method": "orthogonal_procrustes", "center": center,
                    "family": "orthogonal", "params": {},
                    "map": centred_procrustes_map(a_tr, b_tr, center)})
        f, g, table = numpy_ridge(a_tr, b_tr, center)
        out.append({"tool": "numpy", "method": "ridge (closed form)", "center": center,
                    "family": "ridge", "params": {"g": g, "ridge": g * float(
                        np.sum((a_tr - (a_tr.mean(axis=0) if center else 0)) ** 2)
                        ) / a_tr.shape[1]}, "validation": table, "map": f})
    return out


def run_direction(scratch, data: str, a: str, b: str, n: int, n_train: int) -> dict:
    t0 = time.perf_counter()
    da, db, qb = load_pair(data, a, b, n)
    held = slice(n_train, n)
    native = native_hits(db[held], qb[held])
    fits = bigalign_fits(scratch, da, db, n_train) + reference_fits(da[:n_train],
                                                                    db[:n_train])
    rows, kept = [], {}
    for f in fits:
        mapped = np.asarray(f.pop("map")(da[held]), dtype=np.float64)
        h = hits(mapped, db[held], qb[held])
        key = (f["tool"], f["method"], f["center"])
        kept[key] = (h, mapped)
        rows.append(dict(f, figures=figures(h, native)))
    out = {"source": a, "target": b, "dims": [da.shape[1], db.shape[1]],
           "train": [0, n_train], "held_out": [n_train, n], "chance_r1": 1 / (n - n_train),
           "native_r10": {v: float(native[v].mean()) for v in VIEWS}, "fits": rows}
    out["checks"] = _checks(kept, da[:n_train], db[:n_train])
    out["auto_vs_best"] = {str(c): _auto_vs_best(rows, kept, native, c) for c in (True, False)}
    out["seconds"] = time.perf_counter() - t0
    return out


def _checks(kept: dict, a_tr: np.ndarray, b_tr: np.ndarray) -> dict:
    """bigalign's orthogonal maps next to scipy's: the largest difference of mapped
    held-out vectors, and how well-determined the rotation is: the smallest singular value
    of the (centred / raw) training cross-covariance AᵀB over its largest. Near 0 the
    rotation is not unique in those directions (bigalign's NotUniqueWarning), and
    bigalign's float32 block products (float32 input) pick another one than scipy's
    float64 SVD there: the mapped vectors then differ, the retrieval figures need not."""
    out = {}
    for c in (True, False):
        name = "centred" if c else "uncentred"
        a, b = (a_tr - a_tr.mean(axis=0), b_tr - b_tr.mean(axis=0)) if c else (a_tr, b_tr)
        sv = np.linalg.svd(a.T @ b, compute_uv=False)
        out[f"orthogonal_vs_scipy_max_abs_{name}"] = float(np.max(np.abs(
            kept[("bigalign", "orthogonal", c)][1] -
            kept[("scipy", "orthogonal_procrustes", c)][1])))
        out[f"cross_covariance_sv_ratio_{name}"] = float(sv[-1] / sv[0])
    out["orthogonal_float64_vs_scipy_max_abs_centred"] = float(np.max(np.abs(
        kept[("bigalign", "orthogonal, precision float64", True)][1] -
        kept[("scipy", "orthogonal_procrustes", True)][1])))
    return out


def _metric_hits(h: dict, metric: str, v: str) -> np.ndarray:
    return h["r1"][v] if metric == "r1" else h["bridge10"][v]


def _versus(hits_a: np.ndarray, hits_b: np.ndarray, scale: float) -> tuple:
    """(difference, lo, hi): mean(hits_a) - mean(hits_b) times ``scale``, with its paired
    bootstrap 95% interval (1,000 resamples of the held-out queries, seed 0)."""
    return tuple(x * scale for x in difference_interval(hits_a, hits_b, seed=0))


def _auto_vs_best(rows, kept, native, center: bool) -> dict:
    """For each metric and view: auto's figure, the best single bigalign family fitted with
    the same centring, and the paired bootstrap interval of auto minus it; and which
    families tie the best in all four cells (could any single map have done it?)."""
    auto = next(r for r in rows if r["tool"] == "bigalign" and r["method"] == "auto"
                and r["center"] == center)
    fams = [r for r in rows if r["tool"] == "bigalign" and r["method"] in FAMILIES
            and r["center"] == center]
    out = {"chosen": auto["family"], "params": auto["params"]}
    everywhere = {f["method"] for f in fams}
    for metric in METRICS:
        for v in VIEWS:
            best = max(fams, key=lambda r: r["figures"][v][metric])
            scale = 1.0 if metric == "r1" else 1.0 / native[v].mean()
            hb = _metric_hits(kept[("bigalign", best["method"], center)][0], metric, v)
            for f in fams:
                if f is not best and _versus(_metric_hits(kept[(
                        "bigalign", f["method"], center)][0], metric, v), hb, scale)[2] < 0:
                    everywhere.discard(f["method"])
            ha = _metric_hits(kept[("bigalign", "auto", center)][0], metric, v)
            d, lo, hi = _versus(ha, hb, scale)
            verdict = ("best" if best["method"] == auto["family"] or d >= 0
                       else "tie" if hi >= 0 else "loses")
            out[f"{metric}_{v}"] = {"auto": auto["figures"][v][metric],
                                    "best_family": best["method"],
                                    "best": best["figures"][v][metric],
                                    "difference": d, "interval": [lo, hi],
                                    "verdict": verdict}
    out["families_tying_best_everywhere"] = [f for f in FAMILIES if f in everywhere]
    return out


# ---------------------------------------------------------------------------------------
# tables
# ---------------------------------------------------------------------------------------

def _name(r: dict) -> str:
    if r["tool"] != "bigalign":
        return f"{r['tool']} {r['method']}"
    if r["method"] == "auto":
        return f"**auto → {r['family']}**"
    return r["method"]


def _params(r: dict) -> str:
    p = r["params"]
    if "rank" in p:
        return f"rank {p['rank']}"
    if "ridge" in p:
        return f"λ {p['ridge']:.3g}" + (f" (g {p['g']:.2g})" if "g" in p else "")
    if "scale" in p:
        return f"s {p['scale']:.3f}"
    return ""


def tables(results: list[dict]) -> dict[str, str]:
    main, summary, auto_rows, checks = [], [], [], []
    for res in results:
        pair = f"{res['source']}→{res['target']}"
        for r in res["fits"]:
            if r.get("check"):
                continue
            f = r["figures"]
            main.append([pair, "yes" if r["center"] else "no", _name(r), _params(r),
                         f["raw"]["r1"], f["centred"]["r1"], f["raw"]["arr"],
                         f["centred"]["arr"], f["raw"]["criterion"]])
        for c in ("True", "False"):
            s = res["auto_vs_best"][c]
            for key in (f"{m}_{v}" for m in METRICS for v in VIEWS):
                e = s[key]
                summary.append([pair, "yes" if c == "True" else "no", key.replace("_", " "),
                                s["chosen"], e["auto"], e["best_family"], e["best"],
                                f"{e['difference']:+.3f} [{e['interval'][0]:+.3f}, "
                                f"{e['interval'][1]:+.3f}]", e["verdict"],
                                ", ".join(s["families_tying_best_everywhere"]) or "none"])
        k = res["checks"]
        checks.append([pair] + [f"{k[f'{key}_{c}']:.2g}" for c in ("centred", "uncentred")
                                for key in ("orthogonal_vs_scipy_max_abs",
                                            "cross_covariance_sv_ratio")] +
                      [f"{k['orthogonal_float64_vs_scipy_max_abs_centred']:.2g}"])
        for r in res["fits"]:
            if r.get("selection"):
                for cand in r["selection"]["candidates"]:
                    auto_rows.append([pair, "yes" if r["center"] else "no", cand["family"],
                                      cand["score"], cand["heldout_relative_residual"],
                                      "✓" if cand["chosen"] else ""])
    return {
        "main": C.table(["A→B", "centred fit", "fit", "parameter", "R@1 raw", "R@1 centred",
                         "ARR@10 raw", "ARR@10 centred", "auto's criterion (R@1 both ways, "
                         "raw)"], main),
        "summary": C.table(["A→B", "centred fit", "figure", "auto chose", "auto",
                            "best family", "its figure", "auto − best [95% interval]",
                            "verdict", "families that tie the best in all 4 figures"],
                           summary),
        "auto": C.table(["A→B", "centred fit", "candidate", "auto's score (held-out part "
                         "of training pairs)", "held-out rel. residual", "chosen"], auto_rows),
        "checks": C.table(["A→B", "max abs difference (centred)", "σmin/σmax of AᵀB "
                           "(centred)", "max abs difference (uncentred)",
                           "σmin/σmax (uncentred)", "max abs difference, bigalign "
                           "--precision float64 (centred)"], checks),
    }


def main(argv=None) -> int:
    args = C.parser(__doc__).parse_args(argv)
    quick = args.quick or args.smoke
    logging.getLogger("bigalign").setLevel(logging.ERROR)
    t_start = time.perf_counter()
    if quick:
        plan = [("e5small", "minilm", 1500, 1000), ("static64", "minilm", 4000, 3000)]
    else:
        plan = [("e5small", "minilm", 1500, 1000), ("minilm", "e5small", 1500, 1000),
                ("static64", "minilm", 10000, 8000), ("minilm", "static64", 10000, 8000)]
    report = C.Report(args.out, "families")
    scratch = C.Scratch()
    try:
        results = []
        for a, b, n, n_train in plan:
            r = run_direction(scratch, args.data, a, b, n, n_train)
            print(f"{a}->{b}: {r['seconds']:.1f}s", flush=True)
            results.append(r)
    finally:
        scratch.close()
    tabs = tables(results)
    split = "; ".join(f"{r['source']}→{r['target']}: train items {r['train'][0]}–"
                      f"{r['train'][1] - 1}, held out {r['held_out'][0]}–{r['held_out'][1] - 1}"
                      for r in results)
    report.section(f"Every family, auto, scipy and numpy ridge on held-out items ({split})",
                   tabs["main"])
    report.section("auto next to the best single family (hindsight, on the same held-out "
                   "items; paired bootstrap, 1,000 resamples)", tabs["summary"])
    report.section("What auto saw: its criterion on its own held-out windows of the "
                   "training pairs", tabs["auto"])
    report.section("bigalign's orthogonal map next to scipy's (mapped held-out vectors)",
                   tabs["checks"])
    report.record.update(pairs=results, mode="quick" if quick else "full",
                         seconds=time.perf_counter() - t_start)
    report.save()
    print(f"\nfamilies example ({report.record['mode']}): {time.perf_counter() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
