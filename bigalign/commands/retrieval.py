"""Query -> document retrieval across two models, with relevance judgements (nDCG, recall).

The paper's "upgrade the query model" setting: documents indexed with one model, queries
from another, one side mapped by the transform. :func:`evaluate_retrieval` searches every
judged query (or a seeded sample) exactly, blockwise, among all searched documents, for the
transform, its baselines (:func:`bigalign.maths.metrics.methods_for`) and optionally the native
ceiling, in raw and centred cosine search; :func:`load_qrels` reads the judgements.
Streaming as :mod:`bigalign.commands.evaluate_engine`: memory is the queries, one block of documents and
one block of scores per thread.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..errors import InputError, NonFiniteError
from .evaluate import load_transform, training_statistics
from ..planning.plan import MIN_CENTRED_QUERIES
from .evaluate_engine import (DEFAULT_MAX_QUERIES, Parallel, blocks, counted, open_input,
                              read_checked, row_range, take_rows, take_rows_in_order)
from ..execution.pairing import Pairs, gathered, join, pair_by_ids
from ..maths.metrics import (methods_for, ndcg_at_k, query_sample, recall_at_k, score_rows,
                      sort_topk, topk_block, unit_rows)
from ..maths.stats import Moments, bad_norm_reason, bad_norms, normalize_rows

log = logging.getLogger("bigalign")

__all__ = ["evaluate_retrieval", "load_qrels", "qrels_frame", "qrels_by_ids",
           "MIN_CENTRED_QUERIES"]



def qrels_frame(qrels):
    """Relevance judgements as read: a polars DataFrame with columns query_id, doc_id (as in
    the file) and relevance (Float64, default 1), from a parquet / CSV / TSV file or a
    DataFrame. Raises InputError for missing columns, null values or no judgements."""
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
        df = df.select("query_id", "doc_id", pl.col("relevance").cast(pl.Float64, strict=True))
    except Exception:
        raise InputError("qrels: relevance must be a number") from None
    if df.null_count().sum_horizontal().item():
        raise InputError("qrels: null values in query_id, doc_id or relevance")
    if not len(df):
        raise InputError("qrels: no judgements")
    return df


def _judgements(query_rows, doc_rows, relevance) -> dict[int, dict[int, float]]:
    """{query row: {doc row: relevance}} (the highest relevance of a pair judged twice)."""
    out: dict[int, dict[int, float]] = {}
    for q, d, r in zip(query_rows, doc_rows, relevance):
        out.setdefault(q, {})[d] = max(r, out.get(q, {}).get(d, r))
    return out


def load_qrels(qrels) -> dict[int, dict[int, float]]:
    """Relevance judgements {query_id: {doc_id: relevance}} from a parquet / CSV / TSV file
    (read with polars) or a polars DataFrame with columns query_id, doc_id and optionally
    relevance (default 1). Ids are row indices of the query and document arrays."""
    import polars as pl

    df = qrels_frame(qrels)
    try:
        df = df.select(pl.col("query_id").cast(pl.Int64, strict=True),
                       pl.col("doc_id").cast(pl.Int64, strict=True), "relevance")
    except Exception:
        raise InputError("qrels: query_id and doc_id must be integer row indices of the query "
                         "and document arrays, relevance a number") from None
    return _judgements(*(df[c].to_list() for c in df.columns))


def _rows_of(values, ids, duplicates: str, column: str, side: str) -> np.ndarray:
    """Rows ((len(values),) int64, -1 where missing) of ``ids`` (a store's (N,) ids array)
    holding each of ``values`` (a polars Series of qrels ids, cast to the ids' kind), by
    :func:`bigalign.execution.pairing.join` of its distinct values with ``ids``."""
    import polars as pl

    kind = pl.Int64 if np.dtype(ids.dtype).kind in "iu" else pl.String
    try:
        values = values.cast(kind, strict=True)
    except Exception:
        raise InputError(f"qrels: {column} must name {side} by their ids, which are "
                         f"{'integers' if kind == pl.Int64 else 'strings'}") from None
    distinct = values.unique()
    p = join(distinct.to_numpy(), ids, duplicates=duplicates,
             sides=(f"qrels {column}", side))
    return values.replace_strict(distinct.gather(p.source_rows), pl.Series(p.target_rows),
                                 default=-1, return_dtype=pl.Int64).to_numpy()


def qrels_by_ids(qrels, query_ids, doc_ids, duplicates: str = "error"
                 ) -> tuple[dict[int, dict[int, float]], dict]:
    """Judgements naming queries and documents by the ids of two embedding stores (their
    (N,) ids arrays), as {query row: {doc row: relevance}}, and what the pairing found:
    judged query ids missing from the queries (their judgements are dropped) and judged
    document ids (every one must be in the documents: a relevant document that cannot be
    retrieved would lower every method's numbers; InputError otherwise)."""
    df = qrels_frame(qrels)
    q = _rows_of(df["query_id"], query_ids, duplicates, "query_id", "queries")
    d = _rows_of(df["doc_id"], doc_ids, duplicates, "doc_id", "documents")
    if (d < 0).any():
        lost = df["doc_id"].filter(d < 0).unique()
        raise InputError(f"qrels name {len(lost)} document id(s) that are not in the "
                         f"documents (first: {lost[0]!r}): every judged document must be "
                         "searchable")
    found = q >= 0
    report = {"by": "ids", "duplicates": duplicates,
              "qrels_queries": int(df["query_id"].n_unique()),
              "queries_missing": int(df["query_id"].filter(~found).n_unique()),
              "qrels_documents": int(df["doc_id"].n_unique())}
    if report["queries_missing"]:
        log.warning("qrels: %d of %d judged query ids are not in the queries: their "
                    "judgements are left out", report["queries_missing"],
                    report["qrels_queries"])
    return _judgements(q[found].tolist(), d[found].tolist(),
                       df["relevance"].filter(found).to_list()), report


# Over 80 lines by its docstring only, which documents every keyword (the code is ~54).
def evaluate_retrieval(transform, queries, docs, qrels, *, map_side: str = "queries",
                       native=None, statistics: Optional[Moments] = None, train_source=None,
                       train_target=None, ridge: float = 0.0, query_rows=None, doc_rows=None,
                       ks: Sequence[int] = (1, 10, 100), ndcg_k: int = 10,
                       max_queries: Optional[int] = DEFAULT_MAX_QUERIES, seed: int = 0,
                       dtype="float32", block_rows: Optional[int] = None,
                       pair_by: str = "auto", duplicates: str = "error",
                       scratch: Optional[str] = None, storage_options=None,
                       check_chunks: bool = True) -> dict:
    """Query -> document retrieval when queries and documents come from different models.

    queries : (Nq, d) query embeddings; docs : (Nd, d') document embeddings; qrels : see
    :func:`load_qrels` (query_id / doc_id are row indices of ``queries`` / ``docs``).
    pair_by : "rows", "ids" or "auto" (ids when both ``queries`` and ``docs`` are embedding
        stores with ids). By ids, the qrels name queries and documents by their stores' ids
        (:func:`qrels_by_ids`: judged queries missing from ``queries`` are left out and
        counted; a judged document missing from ``docs`` is an error), and ``native`` (a
        store with ids) is paired with the mapped side by id (:func:`bigalign.execution.pairing.join`;
        with map_side="docs" the searched documents and their native twins are gathered
        into ``scratch``). ``duplicates`` as for :func:`bigalign.fit`. ``query_rows`` /
        ``doc_rows`` stay row ranges of the stores. ``pairing`` in the result reports it.
    map_side : "queries": ``transform`` maps the query model into the document model's
        space and queries are mapped (the paper's "upgrade the query model"); "docs": it maps
        the document model into the query model's space and documents are mapped.
    native : the same texts embedded by the other model (queries by the document model when
        map_side="queries", documents by the query model otherwise): the no-migration
        ceiling.
    Baselines come from training statistics as in :func:`bigalign.commands.evaluate.evaluate`
    (``statistics``, stored, or ``train_source``/``train_target`` = the transform's
    training pairs).

    Every method is searched twice: raw cosine, and "centred" (query side minus the query
    set's mean, document side minus the collection's mean). With fewer than
    :data:`MIN_CENTRED_QUERIES` queries the query set's mean means nothing: the centred
    figures are None (a warning says so; ``centred_computed`` is False). Returns
    nDCG@``ndcg_k`` and recall@k per method and variant ("kind": "retrieval").
    """
    if map_side not in ("queries", "docs"):
        raise InputError(f"map side must be 'queries' or 'docs', got {map_side!r}")
    t = load_transform(transform, storage_options)
    qa, q_ids = open_input(queries, "queries", storage_options, check_chunks)
    da, d_ids = open_input(docs, "documents", storage_options, check_chunks)
    by_ids = pair_by_ids(pair_by, q_ids, d_ids)
    dim_a, dim_b = t.dims
    mapped, fixed = (qa, da) if map_side == "queries" else (da, qa)
    if mapped.dim != dim_a or fixed.dim != dim_b:
        raise InputError(
            f"the transform maps {dim_a} -> {dim_b} dims; with --map {map_side} the "
            f"{mapped.side} must have {dim_a} dims (got {mapped.dim}) and the {fixed.side} "
            f"{dim_b} (got {fixed.dim})")
    nat, nat_ids = (None, None) if native is None else \
        _open_native(native, mapped, dim_b, by_ids, storage_options, check_chunks)
    to_map, kept = (queries, docs) if map_side == "queries" else (docs, queries)
    _warn_mapped(t, {mapped.side: (to_map, False), fixed.side: (kept, True),
                     f"native {mapped.side}": (native, True)}, storage_options)
    q0, q1 = row_range(query_rows, qa.rows, "query rows")
    d0, d1 = row_range(doc_rows, da.rows, "document rows")
    if by_ids:
        judged, pairing = qrels_by_ids(qrels, q_ids, d_ids, duplicates)
    else:
        judged, pairing = load_qrels(qrels), {"by": "rows"}
    qids, relevance, n_judged = _judged_queries(judged, (q0, q1), (d0, d1), max_queries, seed)
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1 or ndcg_k < 1:
        raise InputError("cut-offs must be positive integers")
    stack = contextlib.ExitStack()
    native_rows, shift = None, 0
    if nat is not None and by_ids:
        mapped_ids = q_ids if map_side == "queries" else d_ids
        wanted = qids if map_side == "queries" else np.arange(d0, d1, dtype=np.int64)
        native_rows, pairing["native"] = _native_rows(mapped_ids, nat_ids, wanted, duplicates,
                                                      mapped.side)
        if map_side == "docs":  # documents and their native twins, gathered row-aligned
            da, nat = stack.enter_context(gathered(Pairs(wanted, native_rows), da, nat,
                                                   scratch))
            relevance = [{d - d0: r for d, r in rel.items()} for rel in relevance]
            shift, d0, d1 = d0, 0, d1 - d0
    with stack:
        return _search(_Search(
            t, qa, da, nat, native_rows, qids, relevance, n_judged, map_side, (d0, d1), shift,
            (q0, q1), pairing, ks, ndcg_k, dtype, statistics, train_source, train_target,
            ridge, block_rows, storage_options, check_chunks))


def _warn_mapped(t, inputs: dict, storage_options) -> None:
    """Warn when an input holds mapped vectors (:mod:`bigalign.storage.provenance`) where
    native ones are expected: ``inputs`` maps a role to (data, in the target model's
    space?). The side the transform maps must hold the source model's own vectors; the
    other side and ``native``, the target model's own (a target-centred output, in the
    target's centred space, is not comparable with them as it is)."""
    from ..storage.provenance import mapped_of, not_native

    source_model, target_model = (t.metadata.get(k) for k in ("source_model", "target_model"))
    for role, (data, in_target) in inputs.items():
        record = None if data is None else mapped_of(data, storage_options)
        if record is not None:
            model = target_model if in_target else source_model
            log.warning("%s: the figures are not those of native vectors", not_native(
                record, f"{role} {str(data)!r}",
                f"vectors embedded with {model}" if model else "native vectors"))


def _open_native(native, mapped, dim_b: int, by_ids: bool, storage_options, check_chunks
                 ) -> tuple:
    """(rows, ids) of ``native``: the mapped side's texts embedded by the other model,
    (mapped.rows, dim_b) when paired by rows, a store with ids when paired by ids."""
    nat, nat_ids = open_input(native, "native " + mapped.side, storage_options, check_chunks)
    if by_ids and nat_ids is None:
        raise InputError(f"pairing by ids: --native must be an embedding store with ids "
                         f"(the {mapped.side} embedded by the other model)")
    if nat.dim != dim_b or (not by_ids and nat.rows != mapped.rows):
        raise InputError(f"native {mapped.side} must be the {mapped.side} embedded by the "
                         f"other model: shape ({mapped.rows}, {dim_b}), got "
                         f"({nat.rows}, {nat.dim})")
    return nat, nat_ids


def _judged_queries(judged: dict, query_range: tuple, doc_range: tuple,
                    max_queries: Optional[int], seed: int) -> tuple[np.ndarray, list, int]:
    """The queries searched: (qids, relevance, n_judged). ``judged`` (query row -> {doc row:
    relevance}) is kept to rows ``query_range``; every judged document must lie in
    ``doc_range``. qids : (nq,) int64, sorted, queries with a relevant document (a seeded
    sample of at most ``max_queries`` of the ``n_judged``); relevance : their judgements."""
    (q0, q1), (d0, d1) = query_range, doc_range
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
    return qids, [judged[int(q)] for q in qids], n_judged


def _native_rows(mapped_ids, native_ids, rows: np.ndarray, duplicates: str, side: str):
    """Rows of the native store ((len(rows),) int64) holding the ids of ``rows`` of the
    mapped side, by :func:`bigalign.execution.pairing.join`; and what the join found. Every row must
    have its native twin (InputError otherwise: the ceiling would be measured on other
    items)."""
    p = join(mapped_ids, native_ids, duplicates=duplicates, sides=(side, "native " + side))
    at = np.searchsorted(p.source_rows, rows)
    ok = (at < p.matched) & (p.source_rows[np.minimum(at, p.matched - 1)] == rows)
    if not ok.all():
        raise InputError(f"--native: {int((~ok).sum())} of the {len(rows)} evaluated {side} "
                         f"have no id in the native store (first: {side} row "
                         f"{int(rows[~ok][0])})")
    return p.target_rows[at], {"matched": p.matched, "mapped_only": p.source_only,
                               "native_only": p.target_only}


@dataclass(frozen=True)
class _Search:
    """One search of :func:`evaluate_retrieval`, once queries, documents and judgements are
    known.

    t : the transform. queries / docs : the query and document rows; docs are rows
    ``doc_range`` of ``docs`` (``shift`` added back when reporting: gathered documents
    start at 0). native : the native twins of the mapped side, or None; ``native_rows``:
    by ids, their rows for the mapped side's evaluated rows (queries: of ``qids``;
    documents: of ``doc_range``). qids : (nq,) int64 query rows searched; relevance : per
    query, {document row: relevance}; n_judged : judged queries before sampling.
    map_side, query_range, pairing : as reported. ks, ndcg_k : cut-offs; dtype : the work
    dtype. statistics, train_source, train_target, ridge : the baselines' training
    statistics (:func:`bigalign.commands.evaluate.training_statistics`). block_rows,
    storage_options, check_chunks : how inputs are read."""

    t: object
    queries: object
    docs: object
    native: object
    native_rows: Optional[np.ndarray]
    qids: np.ndarray
    relevance: list
    n_judged: int
    map_side: str
    doc_range: tuple
    shift: int
    query_range: tuple
    pairing: dict
    ks: list
    ndcg_k: int
    dtype: object
    statistics: Optional[Moments]
    train_source: object
    train_target: object
    ridge: float
    block_rows: Optional[int]
    storage_options: Optional[dict]
    check_chunks: bool


def _search(s: _Search) -> dict:
    """The searches of :func:`evaluate_retrieval`: the transform, its baselines and the
    native ceiling, raw and centred, exact top-k over every searched document; scored by
    nDCG and recall ("kind": "retrieval")."""
    t, qids = s.t, s.qids
    (d0, d1), (q0, q1) = s.doc_range, s.query_range
    n_docs = d1 - d0
    depth = min(max(max(s.ks), s.ndcg_k), n_docs)
    work = np.dtype(s.dtype)
    t0 = time.perf_counter()

    moments, origin = training_statistics(
        t, s.statistics, train_source=s.train_source, train_target=s.train_target,
        storage_options=s.storage_options, check_chunks=s.check_chunks,
        block_rows=s.block_rows)
    methods = methods_for(t, moments, s.ridge)
    centred = len(qids) >= MIN_CENTRED_QUERIES
    if not centred:
        log.warning("evaluate-retrieval: only %s: the centred search (queries minus their "
                    "own mean) needs at least %d, so its figures are left out; judge more "
                    "queries (or widen --query-rows) for them",
                    counted(len(qids), "query", "queries"), MIN_CENTRED_QUERIES)
    log.info("evaluate-retrieval: %s (rows %d:%d) among %s (rows %d:%d), %s mapped, %s",
             counted(len(qids), "query", "queries"), q0, q1,
             counted(n_docs, "document", "documents"), d0, d1, s.map_side,
             counted(len(methods) + (s.native is not None), "method", "methods"))

    entries, streams = _entries(s, methods, work)
    arrays = list({id(arr): arr for arr, _ in streams.values()}.values())
    ranges = blocks(d0, d1, arrays, s.block_rows)

    def doc_blocks():
        """Yield (offset, {stream key: mapped block}) reading each array once per block."""
        for blk in ranges:
            b0 = blk.start
            read = {id(arr): read_checked(arr, b0, blk.stop) for arr in arrays}
            yield b0, {key: fn(read[id(arr)], work, start=b0) if fn is not None
                       else _fixed(t, work, read[id(arr)], b0, arr.side)
                       for key, (arr, fn) in streams.items()}

    # pass 1: the mean of each document stream (for centred search)
    sums_ = {key: np.zeros(t.dims[1]) for key in streams}
    for _, out in doc_blocks() if centred else ():
        for key, y in out.items():
            sums_[key] += y.sum(axis=0, dtype=np.float64)
    doc_mean = {key: (v / n_docs).astype(work) for key, v in sums_.items()}
    # queries, both variants
    search = []
    for name, note, this, qv, key in entries:
        qv = np.asarray(qv, dtype=work)
        search.append((name, "raw", unit_rows(qv), key))
        if centred:
            search.append((name, "centred", unit_rows(qv - qv.mean(axis=0)), key))
    ranked = _top_k(search, doc_blocks(), doc_mean, centred, depth, len(qids), work)
    results = {}
    for (name, variant, _, _), r in zip(search, ranked):
        scores = {f"ndcg@{s.ndcg_k}": float(np.nanmean(ndcg_at_k(r, s.relevance, s.ndcg_k)))}
        for k in s.ks:
            scores[f"recall@{k}"] = float(np.nanmean(recall_at_k(r, s.relevance, k)))
        results.setdefault(name, {})[variant] = scores
        if not centred:
            results[name]["centred"] = dict.fromkeys(scores)
    out_methods = [{"name": name, "note": note, "this": this, "retrieval": results[name]}
                   for name, note, this, _, _ in entries]
    seconds = time.perf_counter() - t0
    log.info("evaluate-retrieval: done in %.1fs", seconds)
    return {"kind": "retrieval", "map": s.map_side, "queries": int(len(qids)),
            "query_rows": [q0, q1], "doc_rows": [d0 + s.shift, d1 + s.shift],
            "documents": n_docs, "pairing": s.pairing,
            "sampled": len(qids) < s.n_judged, "ks": s.ks, "centred_computed": centred,
            "ndcg_k": s.ndcg_k,
            "training": {"rows": t.options.get("rows"), "statistics": origin},
            "transform": {"dims": list(t.dims), "options": t.options},
            "seconds": seconds, "methods": out_methods}


def _fixed(t, work: np.dtype, x: np.ndarray, start: int = 0, side: str = "target",
           ids=None) -> np.ndarray:
    """Rows in the target model's space, preprocessed as the fit of ``t`` preprocessed its
    targets (unit rows when it normalised: its maps normalise their inputs), as ``work``.
    ``ids``: the row indices of ``x`` when they are not ``start, start + 1, ...``."""
    x = x.astype(work, copy=False)
    if not t.normalize:
        return x
    if ids is not None:  # name the stored row, not the position in x
        bad = np.flatnonzero(bad_norms(x, work))
        if bad.size:
            raise NonFiniteError(f"{side} row {int(ids[bad[0]])} holds "
                                 f"{bad_norm_reason(x[bad[0]], work)} (the transform's "
                                 "fit normalised its rows)")
    return normalize_rows(x, work, start, side)


def _entries(s: _Search, methods, work: np.dtype) -> tuple[list, dict]:
    """What is searched: entries (name, note, this, query vectors, document stream key),
    and the document streams, key -> (rows, map or None): the mapped side's map applied
    to the queries (map_side "queries") or to each block of documents ("docs")."""
    qa, nat = s.queries, s.native
    q_raw = take_rows(qa, s.qids)
    entries, streams = [], {}
    if s.map_side == "queries":
        streams["docs"] = (s.docs, None)
        if nat is not None:
            twins = take_rows_in_order(nat, s.native_rows) if s.native_rows is not None \
                else take_rows(nat, s.qids)
            entries.append(("native", "queries embedded by the document model", False,
                            _fixed(s.t, work, twins, side=nat.side, ids=s.qids), "docs"))
        for m in methods:
            entries.append((m.name, m.note, m.this, m.map(q_raw, work), "docs"))
    else:
        q_work = _fixed(s.t, work, q_raw, side=qa.side, ids=s.qids)
        if nat is not None:
            streams["native"] = (nat, None)
            entries.append(("native", "documents embedded by the query model", False,
                            q_work, "native"))
        for i, m in enumerate(methods):
            streams[f"m{i}"] = (s.docs, m.map)
            entries.append((m.name, m.note, m.this, q_work, f"m{i}"))
    return entries, streams


def _top_k(search: list, doc_blocks, doc_mean: dict, centred: bool, depth: int, nq: int,
           work: np.dtype):
    """Pass 2: exact top-``depth`` of every search (name, variant, (nq, d) unit query
    rows, stream key) among the blocks ``doc_blocks`` yields; one running best per
    (search, query chunk), filled in parallel. Yields, per search, the (nq, depth)
    document rows ranked best first."""
    pool = Parallel()
    chunks = pool.chunks(nq)
    best = {(j, c): (np.empty((c[1] - c[0], 0), dtype=work),
                     np.empty((c[1] - c[0], 0), dtype=np.int64))
            for j in range(len(search)) for c in chunks}

    def task(j, c, docs, offset):
        qv = search[j][2]
        best[(j, c)] = topk_block(qv[c[0]:c[1]], docs, offset, depth, *best[(j, c)],
                                  score_rows(c[1] - c[0], len(docs), pool.workers))

    for s, out in doc_blocks:
        units = {}
        for key, y in out.items():
            units[(key, "raw")] = unit_rows(y)
            if centred:
                units[(key, "centred")] = unit_rows(y - doc_mean[key])
        pool.run([lambda j=j, c=c, d=units[(key, variant)], s=s: task(j, c, d, s)
                  for j, (_, variant, _, key) in enumerate(search) for c in chunks])
    return (sort_topk(np.concatenate([best[(j, c)][0] for c in chunks]),
                      np.concatenate([best[(j, c)][1] for c in chunks]))[1]
            for j in range(len(search)))
