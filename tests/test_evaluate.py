"""bigalign.evaluate: diagnostics against direct computation, metrics against brute-force
references, baselines against numpy.linalg.lstsq, and the real samples in ../shared/data."""

from __future__ import annotations

import logging
import math
from pathlib import Path

import numpy as np
import pytest

from bigalign import InputError, Transform
from bigalign.evaluate import (AffineMap, CosineHistogram, Method, baseline_methods,
                               count_better, default_sizes, evaluate, evaluate_maps,
                               evaluate_retrieval, exact_search, fit_diagnostics,
                               learning_curve, load_qrels, ndcg_at_k, recall_at_k,
                               recall_from_ranks, training_moments, unit_rows)
from bigalign.solve import procrustes
from bigalign.stats import block_moments, merge_all

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"

# the 4-bit e5 vectors are numerically rank 381 of 384: expected, and said by the fit
pytestmark = pytest.mark.filterwarnings("ignore::bigalign.solve.NotUniqueWarning")


# ---- helpers and references ------------------------------------------------------------

def pairs(n=300, dim_a=12, dim_b=12, noise=0.3, offset=1.5, seed=0):
    """Paired rows with a planted orthogonal map and common offsets on both sides."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, dim_a)) / math.sqrt(dim_a)
    q, _ = np.linalg.qr(rng.standard_normal((max(dim_a, dim_b), max(dim_a, dim_b))))
    q = q[:dim_a, :dim_b]
    a = z + offset * rng.standard_normal(dim_a) / math.sqrt(dim_a)
    b = z @ q + noise * rng.standard_normal((n, dim_b)) / math.sqrt(dim_b) \
        + offset * rng.standard_normal(dim_b) / math.sqrt(dim_b)
    return a, b


def streamed(a, b, step=37, center=False):
    """Statistics merged over blocks, as the streaming fit computes them."""
    return merge_all(block_moments(a[i:i + step], b[i:i + step], gram=True, dtype=np.float64)
                     for i in range(0, len(a), step))


def transform_from(m, center, rows):
    sol = procrustes(m, center=center)
    dim_a, dim_b = m.dims
    return Transform(sol.rotation, m.mean_a.copy() if center else np.zeros(dim_a),
                     m.mean_b.copy() if center else np.zeros(dim_b), 1.0,
                     {"center": center, "normalize": False, "scale": False, "reflection": True,
                      "rows": list(rows)}, {"residual": sol.residual})


def brute_ranks(q, t):
    """rank_i = #{j != i : cos(q_i, t_j) > cos(q_i, t_i)} with a full score matrix."""
    s = unit_rows(q.astype(np.float64)) @ unit_rows(t.astype(np.float64)).T
    own = np.diag(s).copy()
    better = s > own[:, None]
    np.fill_diagonal(better, False)
    return better.sum(axis=1)


def brute_ndcg(scores, rel, k):
    """nDCG@k straight from the definition with a full sort."""
    order = np.argsort(-scores, kind="stable")[:k]
    dcg = sum(rel.get(int(d), 0) / math.log2(r + 2) for r, d in enumerate(order))
    ideal = sorted((v for v in rel.values() if v > 0), reverse=True)[:k]
    return dcg / sum(v / math.log2(r + 2) for r, v in enumerate(ideal))


# ---- the paper's diagnostics ---------------------------------------------------------------

@pytest.mark.parametrize("dims", [(12, 12), (8, 20), (20, 8)])
@pytest.mark.parametrize("center", [False, True])
def test_epsilon_delta_bound_from_streamed_statistics_equal_direct(dims, center):
    a, b = pairs(250, *dims, seed=sum(dims))
    d = fit_diagnostics(streamed(a, b), center=center)
    if center:
        a, b = a - a.mean(0), b - b.mean(0)
    eps = np.linalg.norm(a @ a.T - b @ b.T)
    n, big = len(a), max(dims)
    assert d["epsilon"] == pytest.approx(eps, rel=1e-9)
    assert d["delta"] == pytest.approx(eps / n, rel=1e-9)
    # delta^2 is the mean squared dot-product gap over all n^2 pairs of items
    assert d["delta"] ** 2 == pytest.approx(np.mean((a @ a.T - b @ b.T) ** 2), rel=1e-8)
    assert d["bound_residual"] == pytest.approx((2 * big) ** 0.25 * math.sqrt(eps), rel=1e-9)
    assert d["bound_mean_sq_distance"] == pytest.approx(math.sqrt(2 * big) * eps / n, rel=1e-9)
    # the achieved residual equals the direct Procrustes residual
    u, _, vt = np.linalg.svd(a.T @ b, full_matrices=False)
    achieved = np.linalg.norm(a @ (u @ vt) - b)
    assert d["achieved_residual"] == pytest.approx(achieved, rel=1e-7)
    assert d["achieved_mean_sq_distance"] == pytest.approx(achieved ** 2 / n, rel=1e-7)


@pytest.mark.parametrize("seed", range(6))
def test_bound_holds_on_random_data(seed):
    rng = np.random.default_rng(seed)
    dim_a, dim_b = rng.integers(2, 24, size=2)
    n = int(rng.integers(5, 200))
    kind = seed % 3
    if kind == 0:  # unrelated models: large epsilon
        a, b = rng.standard_normal((n, dim_a)), rng.standard_normal((n, dim_b))
    elif kind == 1:  # nearly the same geometry: small epsilon
        a, b = pairs(n, dim_a, dim_b, noise=0.01, seed=seed)
    else:  # different scales and offsets
        a, b = pairs(n, dim_a, dim_b, noise=1.0, seed=seed)
        b = 3 * b
    for center in (False, True):
        d = fit_diagnostics(streamed(a, b, step=11), center=center)
        assert d["bound_holds"], d
        assert d["achieved_residual"] <= d["bound_residual"] + 1e-9
        assert d["achieved_mean_sq_distance"] <= d["bound_mean_sq_distance"] + 1e-12


def test_bound_in_fit_metadata_holds_and_matches_diagnostics(tmp_path):
    """bigalign.fit stores the same epsilon / bound / achieved residual."""
    import zarr

    import bigalign

    a, b = pairs(400, 10, 10, seed=3)
    for name, x in (("a", a), ("b", b)):
        zarr.create_array(str(tmp_path / f"{name}.zarr"), data=x.astype(np.float32),
                          chunks=(64, 10))
    t = bigalign.fit(str(tmp_path / "a.zarr"), str(tmp_path / "b.zarr"), center=True)
    disc = t.metadata["discrepancy"]
    d = fit_diagnostics(streamed(a.astype(np.float32), b.astype(np.float32)), center=True)
    assert disc["epsilon"] == pytest.approx(d["epsilon"], rel=1e-4)
    assert disc["achieved_residual"] <= disc["bound_residual"]
    assert disc["achieved_residual"] == pytest.approx(d["achieved_residual"], rel=1e-4)


# ---- baselines from statistics -------------------------------------------------------------

@pytest.mark.parametrize("dims", [(10, 10), (6, 14), (14, 6)])
def test_least_squares_equals_numpy_lstsq(dims):
    a, b = pairs(200, *dims, seed=7)
    m = streamed(a, b)
    for center in (False, True):
        ls = {x.name: x for x in baseline_methods(m, center=center, ridge=0.5)}
        ac, bc = (a - a.mean(0), b - b.mean(0)) if center else (a, b)
        w = np.linalg.lstsq(ac, bc, rcond=None)[0]
        np.testing.assert_allclose(ls["least squares"].map.matrix, w, atol=1e-9)
        np.testing.assert_allclose(ls["least squares"].map(a, np.float64), ac @ w + (b.mean(0) if center else 0),
                                   atol=1e-9)
        ridge = np.linalg.solve(ac.T @ ac + 0.5 * np.eye(dims[0]), ac.T @ bc)
        np.testing.assert_allclose(ls["ridge 0.5"].map.matrix, ridge, atol=1e-9)


def test_least_squares_rank_deficient_is_minimum_norm_lstsq():
    a, b = pairs(8, 20, 20, seed=1)  # fewer pairs than dimensions
    ls = {x.name: x for x in baseline_methods(streamed(a, b), center=False)}
    np.testing.assert_allclose(ls["least squares"].map.matrix,
                               np.linalg.lstsq(a, b, rcond=None)[0], atol=1e-8)


def test_baselines_training_residuals_equal_direct():
    a, b = pairs(300, 9, 9, seed=2)
    m = streamed(a, b)
    spread = ((b - b.mean(0)) ** 2).sum()
    methods = baseline_methods(m, center=True, ridge=1.0)
    assert [x.name for x in methods] == ["none", "least squares", "ridge 1", "orthogonal",
                                         "orthogonal + centring"]
    for x in methods:
        direct = ((x.map(a, np.float64) - b) ** 2).sum() / spread
        assert x.train["relative_residual"] == pytest.approx(direct, rel=1e-8), x.name


def test_baselines_use_the_transform_and_its_options():
    a, b = pairs(300, 9, 9, seed=2)
    m = streamed(a, b)
    t = transform_from(m, True, (0, 300))
    methods = baseline_methods(m, transform=t)
    this = [x for x in methods if x.this]
    assert len(this) == 1 and this[0].name == "orthogonal + centring"
    np.testing.assert_array_equal(this[0].map.matrix, t.rotation)
    # no identity when dimensions differ
    a2, b2 = pairs(100, 5, 9)
    assert "none" not in [x.name for x in baseline_methods(streamed(a2, b2))]


def test_training_moments_stream_and_prefix_snapshots():
    a, b = pairs(500, 7, 5, seed=4)
    whole = training_moments(a, b, (50, 450), block_rows=64)
    direct = block_moments(a[50:450], b[50:450], gram=True, dtype=np.float64)
    np.testing.assert_allclose(whole.cross, direct.cross, atol=1e-10)
    np.testing.assert_allclose(whole.gram_a, direct.gram_a, atol=1e-10)
    snaps = training_moments(a, b, (50, 450), cuts=[150, 333], block_rows=64)
    assert [s.n for s in snaps] == [100, 283, 400]
    ref = block_moments(a[50:333], b[50:333], gram=True, dtype=np.float64)
    np.testing.assert_allclose(snaps[1].cross, ref.cross, atol=1e-10)
    np.testing.assert_allclose(snaps[1].mean_b, ref.mean_b, atol=1e-12)


# ---- metrics against brute force -----------------------------------------------------------

@pytest.mark.parametrize("k", [1, 5, 40])
def test_exact_search_equals_brute_force(k):
    rng = np.random.default_rng(k)
    q, db = rng.standard_normal((23, 8)), rng.standard_normal((31, 8))
    blocks = [(i, db[i:i + 7]) for i in range(0, 31, 7)]
    s, idx = exact_search(q, blocks, k, query_block=5)
    full = q @ db.T
    want = np.argsort(-full, axis=1)[:, :min(k, 31)]
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_allclose(s, np.take_along_axis(full, want, axis=1))


def test_count_better_equals_brute_ranks():
    rng = np.random.default_rng(5)
    q, t = unit_rows(rng.standard_normal((40, 6))), unit_rows(rng.standard_normal((40, 6)))
    true_index = np.arange(40)
    true = np.einsum("ij,ij->i", q, t)
    counts = np.zeros(40, dtype=np.int64)
    for off in range(0, 40, 9):
        count_better(q, true, true_index, t[off:off + 9], off, counts, query_block=4)
    np.testing.assert_array_equal(counts, brute_ranks(q, t))
    r = recall_from_ranks(counts, (1, 10))
    assert r["recall@1"] == np.mean(counts == 0)
    assert r["recall@10"] == np.mean(counts < 10)


def test_ndcg_and_recall_equal_brute_force():
    rng = np.random.default_rng(6)
    scores = rng.standard_normal((30, 50))
    rels = [{int(d): float(rng.integers(1, 4)) for d in rng.choice(50, rng.integers(1, 6),
                                                                    replace=False)}
            for _ in range(30)]
    rels[0][7] = 0.0  # judged non-relevant: no gain, not in the ideal
    ranked = np.argsort(-scores, axis=1)
    got = ndcg_at_k(ranked, rels, 10)
    want = [brute_ndcg(scores[i], rels[i], 10) for i in range(30)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    for k in (1, 10):
        want = [len({d for d, r in rels[i].items() if r > 0} & set(ranked[i, :k].tolist())) /
                sum(r > 0 for r in rels[i].values()) for i in range(30)]
        np.testing.assert_allclose(recall_at_k(ranked, rels, k), want)


def test_ndcg_by_hand():
    # ranked 3, 1, 2; rel(1) = 2, rel(2) = 1: DCG = 2/log2(3) + 1/log2(4), IDCG = 2 + 1/log2(3)
    got = ndcg_at_k(np.array([[3, 1, 2]]), [{1: 2.0, 2: 1.0}], 10)[0]
    assert got == pytest.approx((2 / math.log2(3) + 0.5) / (2 + 1 / math.log2(3)))
    assert np.isnan(ndcg_at_k(np.array([[0, 1]]), [{5: 0.0}], 10)[0])


def test_cosine_histogram_percentiles_and_mean():
    rng = np.random.default_rng(0)
    v = np.tanh(rng.standard_normal(20_000))
    h = CosineHistogram()
    for part in np.array_split(v, 7):
        h.add(part)
    s = h.summary()
    assert s["mean"] == pytest.approx(v.mean(), abs=1e-12)
    for q in (5, 25, 50, 75, 95):
        assert abs(s[f"p{q}"] - np.percentile(v, q)) < 1e-3
    assert sum(h.coarse()["counts"]) == 20_000


@pytest.mark.parametrize("max_queries", [None, 37])
def test_evaluate_maps_equals_brute_force(max_queries):
    a, b = pairs(150, 8, 8, noise=0.8, seed=9)
    m = streamed(a[:100], b[:100])
    methods = baseline_methods(m, center=True)
    res = evaluate_maps(methods, a, b, (100, 150), ks=(1, 3, 10), max_queries=max_queries,
                        seed=1, dtype="float64", block_rows=13, csls=True, csls_k=4)
    x, y = a[100:], b[100:]
    n = len(x)
    sample = np.arange(n) if max_queries is None else \
        np.sort(np.random.default_rng(1).choice(n, max_queries, replace=False))
    assert res["queries"] == len(sample) and res["targets"] == n
    for meth, entry in zip(methods, res["methods"]):
        f = meth.map(x, np.float64)
        spread = ((y - y.mean(0)) ** 2).sum()
        assert entry["relative_residual"] == pytest.approx(((f - y) ** 2).sum() / spread)
        cos = np.einsum("ij,ij->i", unit_rows(f), unit_rows(y))
        assert entry["cosine"]["mean"] == pytest.approx(cos.mean())
        for variant, (fq, yt) in {"raw": (f, y),
                                  "centred": (f - f.mean(0), y - y.mean(0))}.items():
            ranks = brute_ranks(fq, yt)[sample]
            for k in (1, 3, 10):
                assert entry["retrieval"][variant][f"recall@{k}"] == pytest.approx(
                    np.mean(ranks < k)), (meth.name, variant, k)
            # CSLS: 2 cos(q, t) - r_S(t), r_S(t) = mean of t's 4 best cosines among the queries
            qs, ts = unit_rows(fq)[sample], unit_rows(yt)
            s = qs @ ts.T
            r_s = np.sort(s, axis=0)[-4:].mean(axis=0)
            c = 2 * s - r_s
            own = c[np.arange(len(sample)), sample]
            better = c > own[:, None]
            better[np.arange(len(sample)), sample] = False
            csls_ranks = better.sum(axis=1)
            assert entry["retrieval"][f"{variant}+csls"]["recall@1"] == pytest.approx(
                np.mean(csls_ranks < 1))


def test_evaluate_retrieval_equals_brute_force(tmp_path):
    rng = np.random.default_rng(3)
    a, b = pairs(200, 8, 8, noise=0.5, seed=11)   # the transform's training pairs
    m = streamed(a, b)
    t = transform_from(m, True, (0, 200))
    queries = rng.standard_normal((60, 8)) + 0.5   # query model (source space)
    docs = rng.standard_normal((80, 8)) - 0.3      # document model (target space)
    rels = {q: {int(d): float(rng.integers(0, 3)) for d in rng.choice(80, 3, replace=False)}
            for q in range(60)}
    rows = [(q, d, r) for q, rel in rels.items() for d, r in rel.items()]
    import polars as pl
    path = tmp_path / "qrels.csv"
    pl.DataFrame(rows, schema=["query_id", "doc_id", "relevance"], orient="row").write_csv(path)
    res = evaluate_retrieval(t, queries, docs, str(path), statistics=m, ks=(1, 5),
                             dtype="float64", block_rows=9)
    kept = [q for q in range(60) if any(r > 0 for r in rels[q].values())]
    assert res["queries"] == len(kept)
    by = {x["name"]: x for x in res["methods"]}
    for meth in baseline_methods(m, transform=t):
        fq = meth.map(queries[kept], np.float64)
        for variant, (qv, dv) in {"raw": (fq, docs),
                                  "centred": (fq - fq.mean(0), docs - docs.mean(0))}.items():
            s = unit_rows(qv) @ unit_rows(dv).T
            want = np.mean([brute_ndcg(s[i], rels[q], 10) for i, q in enumerate(kept)])
            got = by[meth.name]["retrieval"][variant]
            assert got["ndcg@10"] == pytest.approx(want), (meth.name, variant)
            ranked = np.argsort(-s, axis=1)
            assert got["recall@5"] == pytest.approx(
                np.mean(recall_at_k(ranked, [rels[q] for q in kept], 5)))
    # documents mapped instead (the transform maps doc model -> query model)
    q2, d2 = rng.standard_normal((60, 8)), rng.standard_normal((80, 8))
    res2 = evaluate_retrieval(t, q2, d2, str(path), map_side="docs", statistics=m, ks=(1,),
                              dtype="float64")
    meth = baseline_methods(m, transform=t)[1]   # least squares, applied to the documents
    s = unit_rows(q2[kept]) @ unit_rows(meth.map(d2, np.float64)).T
    want = np.mean([brute_ndcg(s[i], rels[q], 10) for i, q in enumerate(kept)])
    got = {x["name"]: x for x in res2["methods"]}["least squares"]["retrieval"]["raw"]
    assert got["ndcg@10"] == pytest.approx(want)
    assert {x["name"] for x in res2["methods"]} >= {"none", "least squares", "orthogonal"}


def test_evaluate_retrieval_docs_side_and_native():
    rng = np.random.default_rng(8)
    a, b = pairs(200, 6, 6, noise=0.1, seed=12)
    m = streamed(a, b)
    t = transform_from(m, False, (0, 200))
    docs_a = rng.standard_normal((40, 6))            # documents, model A (mapped)
    native_docs = t.transform(docs_a, dtype=np.float64)  # "the same docs by model B"
    queries_b = native_docs + 0.01 * rng.standard_normal((40, 6))  # query i -> doc i
    qrels = __import__("polars").DataFrame({"query_id": range(40), "doc_id": range(40)})
    res = evaluate_retrieval(t, queries_b, docs_a, qrels, map_side="docs", native=native_docs,
                             ks=(1,), dtype="float64")
    by = {x["name"]: x["retrieval"]["raw"] for x in res["methods"]}
    assert by["native"]["recall@1"] == 1.0
    assert by["orthogonal"]["recall@1"] == 1.0       # the map reproduces the native docs
    assert res["methods"][-1]["this"]


def test_qrels_reading_and_errors(tmp_path):
    import polars as pl

    df = pl.DataFrame({"query_id": [0, 0, 1], "doc_id": [3, 4, 3], "relevance": [1, 2, 0]})
    df.write_parquet(tmp_path / "q.parquet")
    df.write_csv(tmp_path / "q.tsv", separator="\t")
    want = {0: {3: 1.0, 4: 2.0}, 1: {3: 0.0}}
    assert load_qrels(str(tmp_path / "q.parquet")) == want
    assert load_qrels(str(tmp_path / "q.tsv")) == want
    assert load_qrels(df.drop("relevance")) == {0: {3: 1.0, 4: 1.0}, 1: {3: 1.0}}
    with pytest.raises(InputError, match="missing column"):
        load_qrels(df.rename({"doc_id": "doc"}))
    with pytest.raises(InputError, match="integer row indices"):
        load_qrels(pl.DataFrame({"query_id": ["q1"], "doc_id": ["d1"]}))
    with pytest.raises(InputError, match="no such file"):
        load_qrels(str(tmp_path / "missing.csv"))


# ---- evaluate(): defaults, statistics, hook --------------------------------------------------

def test_evaluate_defaults_and_statistics_sources(caplog):
    a, b = pairs(300, 8, 8, seed=13)
    m = streamed(a[:200], b[:200])
    t = transform_from(m, True, (0, 200))
    res = evaluate(t, a, b, dtype="float64")                 # held out: rows 200:300
    assert res["rows"] == [200, 300]
    assert res["training"]["statistics"] == "streamed from the training rows"
    assert res["training"]["reproduces_transform"] is True
    assert res["training"]["diagnostics"]["bound_holds"]
    given = evaluate(t, a, b, statistics=m, dtype="float64")
    assert given["training"]["statistics"] == "given"
    for x, y in zip(res["methods"], given["methods"]):
        assert x["retrieval"] == y["retrieval"]
    # the hook: statistics stored with the transform are used without a pass
    t.statistics = m
    assert evaluate(t, a, b, dtype="float64")["training"]["statistics"] == \
        "stored with the transform"
    del t.statistics
    # no baselines: none + the transform
    bare = evaluate(t, a, b, baselines=False)
    assert [x["name"] for x in bare["methods"]] == ["none", "orthogonal + centring"]
    # evaluating on training rows warns and records the overlap
    with caplog.at_level(logging.WARNING, logger="bigalign"):
        over = evaluate(t, a, b, rows=(150, 250), baselines=False)
    assert over["overlap_with_training"] == 50 and "flatter" in caplog.text


def test_evaluate_input_errors():
    a, b = pairs(100, 6, 6)
    t = transform_from(streamed(a, b), False, (0, 100))
    with pytest.raises(InputError, match="none are held out"):
        evaluate(t, a, b)
    with pytest.raises(InputError, match="maps 6 -> 6"):
        evaluate(t, a[:, :4], b, rows=(0, 50))
    with pytest.raises(InputError, match="rows"):
        evaluate(t, a, b[:50], rows=(0, 50))
    with pytest.raises(InputError, match="empty"):
        evaluate(t, a, b, rows=(60, 60))
    bad = a.copy()
    bad[70, 2] = np.nan
    with pytest.raises(InputError, match="row 70"):
        evaluate(t, bad, b, rows=(50, 100), baselines=False)


# ---- learning curve --------------------------------------------------------------------------

def test_default_sizes():
    assert default_sizes(50) == [50]
    assert default_sizes(1000) == [100, 300, 1000]
    assert default_sizes(45_000) == [100, 300, 1000, 3000, 10_000, 30_000, 45_000]


def test_learning_curve_saturates_on_easy_data_and_matches_separate_fits():
    a, b = pairs(3000, 8, 8, noise=0.05, seed=14)
    res = learning_curve(a, b, (0, 2500), (2500, 3000), sizes=[20, 100, 500, 2500],
                         center=True, dtype="float64", block_rows=128)
    orth = [p for p in res["points"] if p["name"] == "orthogonal"]
    assert [p["pairs"] for p in orth] == [20, 100, 500, 2500]
    assert res["saturation"]["pairs"] is not None and res["saturation"]["pairs"] <= 500
    # each size equals a separate fit on that prefix
    m = block_moments(a[:100], b[:100], gram=True, dtype=np.float64)
    single = evaluate_maps([Method("x", AffineMap(procrustes(m, center=True).rotation,
                                                   m.mean_a, m.mean_b))],
                           a, b, (2500, 3000), dtype="float64")
    assert single["methods"][0]["retrieval"] == orth[1]["retrieval"]
    assert all(p["diagnostics"]["bound_holds"] for p in orth)
    with pytest.raises(InputError, match="overlap"):
        learning_curve(a, b, (0, 2500), (2000, 3000))
    with pytest.raises(InputError, match="sizes"):
        learning_curve(a, b, (0, 2500), (2500, 3000), sizes=[5000])


# ---- real data -------------------------------------------------------------------------------

def real(name):
    path = DATA / f"{name}.npy"
    if not path.exists():
        pytest.skip(f"real samples not found at {DATA}")
    return np.load(path)


def test_real_e5_to_minilm_alignment_and_centring():
    """e5-small -> MiniLM (doc vectors), 1,000 training pairs, 500 held out.

    Measured (float32): none R@1 0.000; orthogonal uncentred R@1 raw 0.224; centred fit:
    raw search 0.804, centred search 0.964; least squares raw 0.928. Margins below leave
    room for BLAS / float32 round-off but not for a broken pipeline."""
    a, b = real("e5small_docs"), real("minilm_docs")[:1500]
    m = training_moments(a, b, (0, 1000))
    t = transform_from(m, True, (0, 1000))
    res = evaluate(t, a, b, statistics=m)
    by = {x["name"]: x for x in res["methods"]}
    r = {k: v["retrieval"] for k, v in by.items()}
    assert r["none"]["raw"]["recall@1"] < 0.02
    assert r["none"]["raw"]["recall@10"] < 0.06
    # aligned cross-model recall is far above unaligned
    assert r["orthogonal + centring"]["centred"]["recall@1"] > 0.93
    assert r["orthogonal + centring"]["centred"]["recall@10"] > 0.99
    # centring matters, twice: in the fit, and in the space searched
    assert r["orthogonal"]["raw"]["recall@1"] < 0.35
    assert 0.74 < r["orthogonal + centring"]["raw"]["recall@1"] < 0.87
    assert r["orthogonal + centring"]["centred"]["recall@1"] > \
        r["orthogonal + centring"]["raw"]["recall@1"] + 0.10
    assert r["least squares"]["raw"]["recall@1"] > 0.88
    assert by["orthogonal + centring"]["cosine"]["mean"] > 0.5 > by["none"]["cosine"]["mean"] + 0.4
    d = res["training"]["diagnostics"]
    assert d["bound_holds"] and 0.3 < d["tightness"] < 0.7


def test_real_bound_holds_for_every_pair_and_centring():
    for src, tgt, n in (("e5small_docs", "minilm_docs", 1500), ("minilm_docs", "static64_docs", 10_000),
                        ("static64_queries", "minilm_queries", 10_000)):
        a, b = real(src)[:n], real(tgt)[:n]
        m = training_moments(a, b)
        for center in (False, True):
            d = fit_diagnostics(m, center=center)
            assert d["bound_holds"], (src, tgt, center, d)


def test_real_minilm_to_static64_dimension_mismatch():
    """MiniLM (384) -> static64 (64): 8,000 training pairs, 2,000 held out, 1,000 queries.

    Measured on all 2,000 queries: centred fit, centred search R@1 0.43, R@10 0.76; chance
    R@10 = 0.005. The static model is weak on its own, so the ceiling is low."""
    a, b = real("minilm_docs"), real("static64_docs")
    m = training_moments(a, b, (0, 8000))
    t = transform_from(m, True, (0, 8000))
    res = evaluate(t, a, b, statistics=m, max_queries=1000)
    assert res["sampled"] and res["queries"] == 1000
    r = {x["name"]: x["retrieval"] for x in res["methods"]}
    assert "none" not in r
    assert r["orthogonal + centring"]["centred"]["recall@10"] > 0.68
    assert r["orthogonal + centring"]["centred"]["recall@1"] > 0.35
    assert r["orthogonal + centring"]["centred"]["recall@1"] > r["orthogonal"]["raw"]["recall@1"]


def test_real_query_model_upgrade_retrieval():
    """Documents indexed with e5-small; queries from MiniLM mapped into e5's space by a map
    fitted on 1,000 document pairs; held-out items 1000:1500, query i relevant to doc i.

    Measured: native e5 nDCG@10 0.94; none 0.01; orthogonal + centring 0.80 raw / 0.82
    centred; least squares 0.64 raw."""
    import polars as pl

    docs_e5, q_minilm, q_e5 = real("e5small_docs"), real("minilm_queries")[:1500], \
        real("e5small_queries")
    train_minilm = real("minilm_docs")[:1500]
    m = training_moments(train_minilm, docs_e5, (0, 1000))
    t = transform_from(m, True, (0, 1000))
    qrels = pl.DataFrame({"query_id": range(1000, 1500), "doc_id": range(1000, 1500)})
    res = evaluate_retrieval(t, q_minilm, docs_e5, qrels, native=q_e5, statistics=m,
                             query_rows=(1000, 1500), doc_rows=(1000, 1500), ks=(1, 10))
    by = {x["name"]: x["retrieval"] for x in res["methods"]}
    assert by["native"]["raw"]["ndcg@10"] > 0.9
    assert by["none"]["raw"]["ndcg@10"] < 0.05
    assert 0.74 < by["orthogonal + centring"]["raw"]["ndcg@10"] < 0.87
    assert by["orthogonal + centring"]["centred"]["recall@10"] > 0.9
    assert by["orthogonal + centring"]["raw"]["ndcg@10"] > by["least squares"]["raw"]["ndcg@10"] + 0.1


def test_parallel_query_chunks_give_identical_results():
    """Queries split into chunks over threads (>= 256 per chunk) rank exactly as one thread,
    and as brute force."""
    a, b = pairs(1400, 8, 8, noise=1.0, seed=21)
    m = streamed(a[:600], b[:600])
    methods = baseline_methods(m, center=True)
    kw = dict(ks=(1, 10), dtype="float64", block_rows=97, csls=True, csls_k=5)
    one = evaluate_maps(methods, a, b, (600, 1400), workers=1, **kw)
    many = evaluate_maps(methods, a, b, (600, 1400), workers=3, **kw)
    assert [x["retrieval"] for x in one["methods"]] == [x["retrieval"] for x in many["methods"]]
    f = methods[-1].map(a[600:], np.float64)
    assert many["methods"][-1]["retrieval"]["raw"]["recall@10"] == pytest.approx(
        np.mean(brute_ranks(f, b[600:]) < 10))


def test_retrieval_parallel_chunks_equal_brute_force():
    rng = np.random.default_rng(22)
    a, b = pairs(300, 6, 6, seed=23)
    m = streamed(a, b)
    t = transform_from(m, False, (0, 300))
    queries, docs = rng.standard_normal((700, 6)), rng.standard_normal((900, 6))
    qrels = __import__("polars").DataFrame({"query_id": range(700), "doc_id": range(700)})
    res = evaluate_retrieval(t, queries, docs, qrels, ks=(1, 10), dtype="float64",
                             block_rows=200)
    s = unit_rows(t.transform(queries, dtype=np.float64)) @ unit_rows(docs).T
    rels = [{i: 1.0} for i in range(700)]
    want = np.mean([brute_ndcg(s[i], rels[i], 10) for i in range(700)])
    got = {x["name"]: x for x in res["methods"]}["orthogonal"]["retrieval"]["raw"]
    assert got["ndcg@10"] == pytest.approx(want)
