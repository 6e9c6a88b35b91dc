"""Mixed search during a migration, on real data, and a synthetic modality gap.

No image-text model ships its weights inside a PyPI package (the paper's text <-> image
experiments need CLIP-like towers that are downloaded from a model hub), so this example
reproduces the *effect* the paper describes for a mixed index with real text models:

1. **Mixed index.** A corpus is half-way through a migration: half of the documents are
   still embedded with the old model (mapped into the new model's space with a bigalign
   transform fitted on other items), half are re-embedded with the new model; queries come
   from the new model. Measured: nDCG@10 and recall@10 (query i is relevant to document i),
   and the share of the top 10 taken by each half (a fair index gives each half ~50 %), for
   none / orthogonal / orthogonal + centring (searched raw, and in the centred space:
   ``transform(x, target_centred=True)`` among new vectors minus ``target_mean``), against
   the fully re-embedded index.
2. **Synthetic modality gap.** Two "modalities" of the same latent items: B = rotation of A
   plus noise, each shifted by its own common vector (as image and text towers sit in two
   separate cones). A mixed index of both, queried from B, shows what centring removes.

    python examples/mixed_search.py --quick       # seconds, ../shared/data only
    python examples/mixed_search.py --out docs/results   # full: + GloVe -> MiniLM
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
from bigalign.maths.metrics import ndcg_at_k, recall_at_k  # noqa: E402


def search(q: np.ndarray, d: np.ndarray, k: int = 10) -> np.ndarray:
    """Exact cosine top-k document indices, in order."""
    s = C.unit(q) @ C.unit(d).T
    top = np.argpartition(-s, k, axis=1)[:, :k]
    order = np.argsort(-np.take_along_axis(s, top, axis=1), axis=1)
    return np.take_along_axis(top, order, axis=1)


def scores(ranked: np.ndarray, old_half: np.ndarray) -> dict:
    rel = [{i: 1.0} for i in range(len(ranked))]
    own_old = old_half[np.arange(len(ranked))]
    r10 = recall_at_k(ranked, rel, 10)
    return {"ndcg10": float(np.mean(ndcg_at_k(ranked, rel, 10))),
            "r10": float(np.mean(r10)),
            "r10_old_docs": float(np.mean(r10[own_old])),
            "r10_new_docs": float(np.mean(r10[~own_old])),
            "old_share_top10": float(np.mean(old_half[ranked]))}


def mixed(scratch, old_docs, new_docs, new_queries, n_train: int, seed: int = 0) -> dict:
    """Fit old -> new on documents [0, n_train); index the rest, half old (mapped), half new."""
    za, zb = scratch.zarr(old_docs[:n_train]), scratch.zarr(new_docs[:n_train])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t_plain = bigalign.fit(za, zb, center=False)
        t_cent = bigalign.fit(za, zb, center=True)
    a, b, q = old_docs[n_train:], new_docs[n_train:], new_queries[n_train:]
    n = len(a)
    old_half = np.zeros(n, dtype=bool)
    old_half[np.random.default_rng(seed).permutation(n)[: n // 2]] = True
    mu = t_cent.target_mean.astype(np.float32)

    def index(mapped):
        return np.where(old_half[:, None], mapped, b)

    out = {"reference: all re-embedded": scores(search(q, b), old_half)}
    if a.shape[1] == b.shape[1]:
        out["none"] = scores(search(q, index(a)), old_half)
    out["orthogonal"] = scores(search(q, index(t_plain.transform(a))), old_half)
    out["orthogonal + centring"] = scores(search(q, index(t_cent.transform(a))), old_half)
    cen = np.where(old_half[:, None], t_cent.transform(a, target_centred=True), b - mu)
    out["orthogonal + centring, centred search"] = scores(search(q - mu, cen), old_half)
    out["reference, centred search"] = scores(search(q - mu, b - mu), old_half)
    return {"index": n, "train": n_train, "methods": out}


def modality_gap(scratch, n: int = 6000, d: int = 64, gap: float = 2.0, noise: float = 0.3,
                 n_train: int = 3000, seed: int = 1) -> dict:
    """Latent items X; modality A = X + gA; modality B = X R + noise + gB (unit rows), with
    gA, gB common vectors of norm ``gap`` (each modality in its own cone). Queries: another
    noisy B view of each item."""
    rng = np.random.default_rng(seed)
    x = C.unit(rng.standard_normal((n, d)).astype(np.float32))
    r, _ = np.linalg.qr(rng.standard_normal((d, d)))
    ga, gb = (gap * C.unit(rng.standard_normal((2, d)))).astype(np.float32)
    a = C.unit(x + ga)
    b = C.unit(x @ r + noise * rng.standard_normal((n, d)) / np.sqrt(d) + gb).astype(np.float32)
    qv = C.unit(x @ r + noise * rng.standard_normal((n, d)) / np.sqrt(d) + gb).astype(np.float32)
    res = mixed(scratch, a, b, qv, n_train, seed)
    def cos(u, v):
        return float((C.unit(u.mean(0, keepdims=True)) @ C.unit(v.mean(0, keepdims=True)).T)[0, 0])

    res["gap"] = {"cos(mean A, mean B)": cos(a, b), "|mean A|": float(np.linalg.norm(a.mean(0))),
                  "|mean B|": float(np.linalg.norm(b.mean(0)))}
    return res


def show(report, title, res):
    rows = [[name, s["ndcg10"], s["r10"], s["r10_old_docs"], s["r10_new_docs"],
             s["old_share_top10"]] for name, s in res["methods"].items()]
    report.section(title + f" ({res['train']} training pairs, index of {res['index']}, half old)",
                   C.table(["method", "nDCG@10", "R@10", "R@10 (doc in old half)",
                            "R@10 (doc in new half)", "old half's share of top 10"], rows))


def main(argv=None) -> int:
    args = C.parser(__doc__).parse_args(argv)
    full = not (args.quick or args.smoke)
    t0 = time.perf_counter()
    report = C.Report(args.out, "mixed_search")
    d = args.data
    minilm = (C.load(d, "minilm_docs.npy"), C.load(d, "minilm_queries.npy"))
    e5 = C.load(d, "e5small_docs.npy")
    static = C.load(d, "static64_docs.npy")
    scratch = C.Scratch()
    try:
        n = len(e5)
        res = mixed(scratch, e5, minilm[0][:n], minilm[1][:n], 1000)
        show(report, "e5-small (old) → MiniLM (new)", res)
        report.record["e5small_minilm"] = res
        if not args.smoke:
            res = mixed(scratch, static, minilm[0], minilm[1], 6000)
            show(report, "static64 (old) → MiniLM (new)", res)
            report.record["static64_minilm"] = res
        if full:
            items = C.texts(d)
            g = C.Glove()
            glove = C.cached(args.cache, "glove50_docs", lambda: g.encode([r["doc"] for r in items]))
            res = mixed(scratch, glove, minilm[0], minilm[1], 6000)
            show(report, "GloVe-50 average (old) → MiniLM (new)", res)
            report.record["glove50_minilm"] = res
        res = modality_gap(scratch, n=4000 if args.smoke else 6000, n_train=2000 if args.smoke else 3000)
        show(report, "Synthetic modality gap (A → B, queries from B)", res)
        report.section("The gap", C.table(list(res["gap"]), [list(res["gap"].values())]))
        report.record["modality_gap"] = res
        report.record["seconds"] = time.perf_counter() - t0
        report.record["mode"] = "smoke" if args.smoke else "quick" if args.quick else "full"
        report.save()
    finally:
        scratch.close()
    print(f"\nmixed search example ({report.record['mode']}): {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
