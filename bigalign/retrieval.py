"""Query -> document retrieval across two models, with relevance judgements (nDCG, recall).

The paper's "upgrade the query model" setting: documents indexed with one model, queries
from another, one side mapped by the transform. :func:`evaluate_retrieval` searches every
judged query (or a seeded sample) exactly, blockwise, among all searched documents, for the
transform, its baselines (:func:`bigalign.metrics.methods_for`) and optionally the native
ceiling, in raw and centred cosine search; :func:`load_qrels` reads the judgements.
Streaming as :mod:`bigalign.evaluate`: memory is the queries, one block of documents and
one block of scores per thread.
"""

from __future__ import annotations

import logging
import time
from typing import Optional, Sequence

import numpy as np

from .errors import InputError, NonFiniteError
from .evaluate import (DEFAULT_MAX_QUERIES, Parallel, blocks, load_transform, open_rows,
                       read_checked, row_range, take_rows, training_statistics)
from .metrics import (methods_for, ndcg_at_k, query_sample, recall_at_k, score_rows,
                      sort_topk, topk_block, unit_rows)
from .stats import Moments, normalize_rows

log = logging.getLogger("bigalign")

__all__ = ["evaluate_retrieval", "load_qrels"]


def load_qrels(qrels) -> dict[int, dict[int, float]]:
    """Relevance judgements {query_id: {doc_id: relevance}} from a parquet / CSV / TSV file
    (read with polars) or a polars DataFrame with columns query_id, doc_id and optionally
    relevance (default 1). Ids are row indices of the query and document arrays."""
    import polars as pl

    if isinstance(qrels, pl.DataFrame):
        df = qrels
    else:
        path = str(qrels)
        try:
            if path.endswith((".parquet", ".pq")):
                df = pl.read_parquet(path)
            elif path.endswith((".tsv", ".tsv.gz")):
                df = pl.read_csv(path, separator="\t")
            else:
                df = pl.read_csv(path)
        except FileNotFoundError:
            raise InputError(f"qrels {path!r}: no such file") from None
        except Exception as e:
            raise InputError(f"qrels {path!r}: cannot read it as parquet/CSV ({e})") from None
    missing = {"query_id", "doc_id"} - set(df.columns)
    if missing:
        raise InputError(f"qrels: missing column(s) {sorted(missing)}; expected query_id, "
                         f"doc_id[, relevance], got {df.columns}")
    if "relevance" not in df.columns:
        df = df.with_columns(pl.lit(1.0).alias("relevance"))
    try:
        df = df.select(pl.col("query_id").cast(pl.Int64, strict=True),
                       pl.col("doc_id").cast(pl.Int64, strict=True),
                       pl.col("relevance").cast(pl.Float64, strict=True))
    except Exception:
        raise InputError("qrels: query_id and doc_id must be integer row indices of the query "
                         "and document arrays, relevance a number") from None
    if df.null_count().sum_horizontal().item():
        raise InputError("qrels: null values in query_id, doc_id or relevance")
    if not len(df):
        raise InputError("qrels: no judgements")
    out: dict[int, dict[int, float]] = {}
    for q, d, r in df.iter_rows():
        out.setdefault(q, {})[d] = max(r, out.get(q, {}).get(d, r))
    return out


def evaluate_retrieval(transform, queries, docs, qrels, *, map_side: str = "queries",
                       native=None, statistics: Optional[Moments] = None, train_source=None,
                       train_target=None, ridge: float = 0.0, query_rows=None, doc_rows=None,
                       ks: Sequence[int] = (1, 10, 100), ndcg_k: int = 10,
                       max_queries: Optional[int] = DEFAULT_MAX_QUERIES, seed: int = 0,
                       dtype="float32", block_rows: Optional[int] = None,
                       storage_options=None, check_chunks: bool = True) -> dict:
    """Query -> document retrieval when queries and documents come from different models.

    queries : (Nq, d) query embeddings; docs : (Nd, d') document embeddings; qrels : see
    :func:`load_qrels` (query_id / doc_id are row indices of ``queries`` / ``docs``).
    map_side : "queries": ``transform`` maps the query model into the document model's
        space and queries are mapped (the paper's "upgrade the query model"); "docs": it maps
        the document model into the query model's space and documents are mapped.
    native : the same texts embedded by the other model (queries by the document model when
        map_side="queries", documents by the query model otherwise): the no-migration
        ceiling.
    Baselines come from training statistics as in :func:`bigalign.evaluate.evaluate`
    (``statistics``, stored, or ``train_source``/``train_target`` = the transform's
    training pairs).

    Every method is searched twice: raw cosine, and "centred" (query side minus the query
    set's mean, document side minus the collection's mean). Returns nDCG@``ndcg_k`` and
    recall@k per method and variant ("kind": "retrieval").
    """
    if map_side not in ("queries", "docs"):
        raise InputError(f"map side must be 'queries' or 'docs', got {map_side!r}")
    t = load_transform(transform, storage_options)
    qa = open_rows(queries, "queries", storage_options, check_chunks)
    da = open_rows(docs, "documents", storage_options, check_chunks)
    dim_a, dim_b = t.dims
    mapped, fixed = (qa, da) if map_side == "queries" else (da, qa)
    if mapped.dim != dim_a or fixed.dim != dim_b:
        raise InputError(
            f"the transform maps {dim_a} -> {dim_b} dims; with --map {map_side} the "
            f"{mapped.side} must have {dim_a} dims (got {mapped.dim}) and the {fixed.side} "
            f"{dim_b} (got {fixed.dim})")
    nat = None
    if native is not None:
        nat = open_rows(native, "native " + mapped.side, storage_options, check_chunks)
        if nat.rows != mapped.rows or nat.dim != dim_b:
            raise InputError(f"native {mapped.side} must be the {mapped.side} embedded by the "
                             f"other model: shape ({mapped.rows}, {dim_b}), got "
                             f"({nat.rows}, {nat.dim})")
    q0, q1 = row_range(query_rows, qa.rows, "query rows")
    d0, d1 = row_range(doc_rows, da.rows, "document rows")
    judged = load_qrels(qrels)
    judged = {q: rel for q, rel in judged.items() if q0 <= q < q1}
    bad_docs = sorted({d for rel in judged.values() for d in rel if not d0 <= d < d1})
    if bad_docs:
        raise InputError(f"qrels name {len(bad_docs)} document(s) outside the searched rows "
                         f"{d0}:{d1} (first: {bad_docs[0]}); pass --doc-rows to include them")
    qids = np.array(sorted(q for q, rel in judged.items() if any(r > 0 for r in rel.values())),
                    dtype=np.int64)
    if not len(qids):
        raise InputError(f"no query in rows {q0}:{q1} has a relevant document (relevance > 0) "
                         "in the qrels")
    n_judged = len(qids)
    qids = qids[query_sample(n_judged, max_queries, seed)]
    relevance = [judged[int(q)] for q in qids]
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1 or ndcg_k < 1:
        raise InputError("cut-offs must be positive integers")
    n_docs = d1 - d0
    depth = min(max(max(ks), ndcg_k), n_docs)
    work = np.dtype(dtype)
    t0 = time.perf_counter()

    moments, origin = training_statistics(
        t, statistics, train_source=train_source, train_target=train_target,
        storage_options=storage_options, check_chunks=check_chunks, block_rows=block_rows)
    methods = methods_for(t, moments, ridge)
    log.info("evaluate-retrieval: %d queries (rows %d:%d) among %d documents (rows %d:%d), "
             "%s mapped, %d methods", len(qids), q0, q1, n_docs, d0, d1, map_side,
             len(methods) + (nat is not None))

    def fixed(x: np.ndarray, start: int = 0, side: str = "target", ids=None) -> np.ndarray:
        """Rows in the target model's space, preprocessed as the fit preprocessed its
        targets (unit rows when it normalised: its maps normalise their inputs). ``ids``:
        the row indices of ``x`` when they are not ``start, start + 1, ...``."""
        x = x.astype(work, copy=False)
        if not t.normalize:
            return x
        if ids is None:
            return normalize_rows(x, work, start, side)
        norms = np.linalg.norm(x, axis=1)
        bad = np.flatnonzero(~(norms > 0))
        if bad.size:
            raise NonFiniteError(f"{side} row {int(ids[bad[0]])} is a zero-norm row "
                                 "(cannot normalise, as the transform's fit did)")
        return x / norms.astype(work)[:, None]

    # entries: (name, note, this, query vectors, doc stream key); streams: key -> (rows, map)
    q_raw = take_rows(qa, qids)
    entries, streams = [], {}
    if map_side == "queries":
        streams["docs"] = (da, None)
        if nat is not None:
            entries.append(("native", "queries embedded by the document model", False,
                            fixed(take_rows(nat, qids), side=nat.side, ids=qids), "docs"))
        for m in methods:
            entries.append((m.name, m.note, m.this, m.map(q_raw, work), "docs"))
    else:
        q_work = fixed(q_raw, side=qa.side, ids=qids)
        if nat is not None:
            streams["native"] = (nat, None)
            entries.append(("native", "documents embedded by the query model", False,
                            q_work, "native"))
        for i, m in enumerate(methods):
            streams[f"m{i}"] = (da, m.map)
            entries.append((m.name, m.note, m.this, q_work, f"m{i}"))

    arrays = list({id(arr): arr for arr, _ in streams.values()}.values())
    ranges = blocks(d0, d1, arrays, block_rows)

    def doc_blocks():
        """Yield (offset, {stream key: mapped block}) reading each array once per block."""
        for blk in ranges:
            s = blk.start
            read = {id(arr): read_checked(arr, s, blk.stop) for arr in arrays}
            yield s, {key: fn(read[id(arr)], work, start=s) if fn is not None
                      else fixed(read[id(arr)], s, arr.side)
                      for key, (arr, fn) in streams.items()}

    # pass 1: the mean of each document stream (for centred search)
    sums_ = {key: np.zeros(dim_b) for key in streams}
    for _, out in doc_blocks():
        for key, y in out.items():
            sums_[key] += y.sum(axis=0, dtype=np.float64)
    doc_mean = {key: (v / n_docs).astype(work) for key, v in sums_.items()}
    # queries, both variants
    search = []
    for name, note, this, qv, key in entries:
        qv = np.asarray(qv, dtype=work)
        search.append((name, "raw", unit_rows(qv), key))
        search.append((name, "centred", unit_rows(qv - qv.mean(axis=0)), key))
    # pass 2: exact top-k; one running best per (search, query chunk), filled in parallel
    pool = Parallel()
    chunks = pool.chunks(len(qids))
    best = {(j, c): (np.empty((c[1] - c[0], 0), dtype=work),
                     np.empty((c[1] - c[0], 0), dtype=np.int64))
            for j in range(len(search)) for c in chunks}

    def task(j, c, docs, offset):
        qv = search[j][2]
        best[(j, c)] = topk_block(qv[c[0]:c[1]], docs, offset, depth, *best[(j, c)],
                                  score_rows(c[1] - c[0], len(docs), pool.workers))

    for s, out in doc_blocks():
        units = {}
        for key, y in out.items():
            units[(key, "raw")] = unit_rows(y)
            units[(key, "centred")] = unit_rows(y - doc_mean[key])
        pool.run([lambda j=j, c=c, d=units[(key, variant)], s=s: task(j, c, d, s)
                  for j, (_, variant, _, key) in enumerate(search) for c in chunks])
    results = {}
    for j, (name, variant, _, _) in enumerate(search):
        _, ranked = sort_topk(np.concatenate([best[(j, c)][0] for c in chunks]),
                              np.concatenate([best[(j, c)][1] for c in chunks]))
        scores = {f"ndcg@{ndcg_k}": float(np.nanmean(ndcg_at_k(ranked, relevance, ndcg_k)))}
        for k in ks:
            scores[f"recall@{k}"] = float(np.nanmean(recall_at_k(ranked, relevance, k)))
        results.setdefault(name, {})[variant] = scores
    out_methods = [{"name": name, "note": note, "this": this, "retrieval": results[name]}
                   for name, note, this, _, _ in entries]
    seconds = time.perf_counter() - t0
    log.info("evaluate-retrieval: done in %.1fs", seconds)
    return {"kind": "retrieval", "map": map_side, "queries": int(len(qids)),
            "query_rows": [q0, q1], "doc_rows": [d0, d1], "documents": n_docs,
            "sampled": len(qids) < n_judged, "ks": ks,
            "ndcg_k": ndcg_k, "training": {"rows": t.options.get("rows"), "statistics": origin},
            "transform": {"dims": list(t.dims), "options": t.options},
            "seconds": seconds, "methods": out_methods}
