"""bigalign.commands.retrieval: nDCG and recall of query -> document retrieval against brute force,
relevance judgements, and the real query-model upgrade in ../shared/data."""

from __future__ import annotations

import numpy as np
import pytest

from bigalign import InputError
from bigalign.commands.evaluate import training_moments
from bigalign.maths.metrics import baseline_methods, recall_at_k, unit_rows
from bigalign.commands.retrieval import evaluate_retrieval, load_qrels
from conftest import load_shared
from evaluation_reference import brute_ndcg, pairs, streamed, transform_from

# the 4-bit e5 vectors are numerically rank 381 of 384: expected, and said by the fit
pytestmark = pytest.mark.filterwarnings("ignore::bigalign.maths.solve.NotUniqueWarning")


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


def test_centred_search_needs_enough_queries(caplog):
    """The centred search removes the queries' own mean: 1 query centres to a zero vector
    (every centred figure was 0.000), 2 to +-v (all 0.500). Below MIN_CENTRED_QUERIES the
    centred figures are left out (None, '-' in the table) with a warning; raw ones stay."""
    import logging

    import polars as pl
    from bigalign.cli.evaluate import format_retrieval
    from bigalign.commands.retrieval import MIN_CENTRED_QUERIES

    rng = np.random.default_rng(5)
    a, b = pairs(200, 6, 6, noise=0.1, seed=6)
    t = transform_from(streamed(a, b), True, (0, 200))
    queries = rng.standard_normal((40, 6))
    docs = t.transform(queries, dtype=np.float64)        # query i -> doc i
    for n in (1, 2, MIN_CENTRED_QUERIES - 1):
        qrels = pl.DataFrame({"query_id": range(n), "doc_id": range(n)})
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="bigalign"):
            res = evaluate_retrieval(t, queries, docs, qrels, ks=(1,), dtype="float64")
        assert f"only {n} quer" in caplog.text and "centred" in caplog.text
        assert not res["centred_computed"]
        for m in res["methods"]:
            assert set(m["retrieval"]["centred"].values()) == {None}, (n, m["name"])
        this = [m for m in res["methods"] if m["this"]][0]["retrieval"]
        assert this["raw"]["recall@1"] == 1.0
        table = format_retrieval(res)
        assert "centred: not computed" in table
        assert table.startswith(f"{n} {'query' if n == 1 else 'queries'} (rows 0:40) "
                                "searched among 40 documents"), table   # not '1 queries'
    qrels = pl.DataFrame({"query_id": range(MIN_CENTRED_QUERIES),
                          "doc_id": range(MIN_CENTRED_QUERIES)})
    res = evaluate_retrieval(t, queries, docs, qrels, ks=(1,), dtype="float64")
    assert res["centred_computed"]
    this = [m for m in res["methods"] if m["this"]][0]["retrieval"]
    assert this["centred"]["recall@1"] == 1.0


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


def test_real_query_model_upgrade_retrieval():
    """Documents indexed with e5-small; queries from MiniLM mapped into e5's space by a map
    fitted on 1,000 document pairs; held-out items 1000:1500, query i relevant to doc i.

    Measured: native e5 nDCG@10 0.94; none 0.01; orthogonal + centring 0.80 raw / 0.82
    centred; least squares 0.64 raw."""
    import polars as pl

    docs_e5, q_minilm, q_e5 = load_shared("e5small_docs.npy"), \
        load_shared("minilm_queries.npy")[:1500], load_shared("e5small_queries.npy")
    train_minilm = load_shared("minilm_docs.npy")[:1500]
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


@pytest.mark.parametrize("map_side", ["queries", "docs"])
def test_retrieval_by_ids_equals_rows_on_the_joined_arrays(tmp_path, map_side, caplog):
    """Queries, documents and native twins in stores with string ids, each in its own order
    (the documents searched: rows 10:100 of theirs); qrels naming items by id (one query id
    unknown). Equal to the evaluation by rows of the arrays put in qrels order by hand."""
    import logging

    import polars as pl

    from conftest import make_store

    rng = np.random.default_rng(12)
    a, b = pairs(200, 8, 8, noise=0.5, seed=12)
    m = streamed(a, b)
    t = transform_from(m, True, (0, 200))
    # item i: a query vector (source model) and a document vector (target model); the other
    # model's embedding of the mapped side is the native twin
    q_src = (rng.standard_normal((70, 8)) + 0.5).astype(np.float32)
    d_tgt = (rng.standard_normal((90, 8)) - 0.3).astype(np.float32)
    q_tgt = (q_src @ np.linalg.qr(rng.standard_normal((8, 8)))[0]).astype(np.float32)
    d_src = (rng.standard_normal((90, 8)) + 0.2).astype(np.float32)
    qid = np.array([f"q{i}" for i in range(70)])
    did = np.array([f"d{i}" for i in range(90)])
    rels = {q: {int(d): float(rng.integers(1, 3)) for d in rng.choice(90, 3, replace=False)}
            for q in range(70)}
    rows = [(f"q{q}", f"d{d}", r) for q, rel in rels.items() for d, r in rel.items()]
    rows.append(("q-unknown", "d1", 1.0))
    qrels = pl.DataFrame(rows, schema=["query_id", "doc_id", "relevance"], orient="row")
    pq, pd_, pn = rng.permutation(70), rng.permutation(90), None
    queries, docs = (q_src, d_tgt) if map_side == "queries" else (q_tgt, d_src)
    qs = make_store(tmp_path / "q.store", queries[pq], qid[pq], chunk=16)
    filler = rng.standard_normal((10, 8)).astype(np.float32)   # rows 0:10, not searched
    ds = make_store(tmp_path / "d.store", np.concatenate([filler, docs[pd_]]),
                    np.concatenate([[f"other-{i}" for i in range(10)], did[pd_]]), chunk=16)
    twins, twin_ids = (q_tgt, qid) if map_side == "queries" else (d_tgt, did)
    pn = rng.permutation(len(twins))
    ns = make_store(tmp_path / "n.store", twins[pn], twin_ids[pn], chunk=16)
    with caplog.at_level(logging.WARNING, logger="bigalign"):
        got = evaluate_retrieval(t, qs, ds, qrels, map_side=map_side, native=ns,
                                 doc_rows="10:100", statistics=m, ks=(1, 5), dtype="float64",
                                 block_rows=20)
    assert got["doc_rows"] == [10, 100] and got["documents"] == 90
    assert "1 of 71 judged query ids are not in the queries" in caplog.text
    want = evaluate_retrieval(t, queries, docs, pl.DataFrame(
        [(q, d, r) for q, rel in rels.items() for d, r in rel.items()],
        schema=["query_id", "doc_id", "relevance"], orient="row"), map_side=map_side,
        native=twins, statistics=m, ks=(1, 5), dtype="float64", block_rows=20)
    p = got["pairing"]
    assert (p["by"], p["qrels_queries"], p["queries_missing"], p["qrels_documents"]) == \
        ("ids", 71, 1, len({d for rel in rels.values() for d in rel}))
    assert p["native"]["matched"] == len(twins)
    assert got["queries"] == want["queries"] == 70
    for x, y in zip(got["methods"], want["methods"]):
        assert x["name"] == y["name"]
        for variant in ("raw", "centred"):
            assert x["retrieval"][variant] == pytest.approx(y["retrieval"][variant]), \
                (x["name"], variant)
    # a judged document that is not in the documents is refused; --pair-by rows reads the
    # qrels as row numbers
    with pytest.raises(InputError, match="1 document id.*not in the documents"):
        evaluate_retrieval(t, qs, ds, qrels.vstack(pl.DataFrame(
            [("q1", "d-gone", 1.0)], schema=qrels.schema, orient="row")), map_side=map_side)
    with pytest.raises(InputError, match="integer row indices"):
        evaluate_retrieval(t, qs, ds, qrels, map_side=map_side, pair_by="rows")
