"""Realign's "stay" check: would searching with the new model through the candidate map
(*bridge*) be worse than keeping the old model for queries and documents (*stay*)?

Given ``[gate] queries_old`` and ``queries_new`` (the same queries embedded by the old and
the new model, one query per item: query *k* belongs to pair *k*'s document, as in the
shared data's ``*_queries.npy`` / ``*_docs.npy``), every held-out pair that has a query on
both sides is searched, exactly, among all the held-out documents:

- stay     : old-model query  -> old-model documents (held-out source rows);
- bridge   : new-model query  -> candidate-mapped old documents;
- re-embed : new-model query  -> new-model documents (held-out target rows).

A hit is the query's own document in the top 10 (raw cosine, as the gate's recall@10).
The per-query hits are kept, so recall@10 of each gets a bootstrap interval and the
difference bridge - stay a paired one (:mod:`bigalign.maths.bootstrap`), over the same
resampled queries.

Which query goes with which pair: by id when the pairs are paired by id (the query stores
must then have ids; query id = the source document's id), else by row (the query stores
must have as many rows as the pairs).
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from ..errors import InputError
from ..maths.bootstrap import difference_interval, interval
from ..maths.metrics import AffineMap, count_better, query_sample, score_rows, unit_rows
from ..maths.verdict import verdict

log = logging.getLogger("bigalign")

__all__ = ["query_positions", "stay_and_bridge", "K"]

#: the cut-off of the stay / bridge comparison (the gate's recall@10)
K = 10


def query_positions(holdout_keys: np.ndarray, by_ids: bool, q_old, q_new, n_pairs: int,
                    duplicates: str = "error") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The held-out pairs that have a query of both models: (positions, old rows, new rows),
    each (m,) int64, positions into the held-out arrays (ascending), rows of the two query
    stores (:class:`bigalign.commands.realign_pairs.Side`).

    holdout_keys : (h,) the held-out pairs' keys in held-out order: source ids when
    ``by_ids``, else source row numbers (then both query stores must have ``n_pairs`` rows).
    Raises InputError when a store lacks ids by id, has the wrong row count by row, or no
    held-out pair has both queries."""
    keys = np.asarray(holdout_keys)
    if by_ids:
        from ..execution.pairing import join

        found = []
        for q in (q_old, q_new):
            if q.ids is None:
                raise InputError(f"[gate] {q.name}: the pairs are paired by id, so the "
                                 "queries must be an embedding store with ids (query id = "
                                 "its document's id)")
            p = join(keys, q.ids, duplicates=duplicates,
                     sides=("held-out pairs", f"[gate] {q.name}"))
            rows = np.full(len(keys), -1, dtype=np.int64)
            rows[p.source_rows] = p.target_rows
            found.append(rows)
        old_rows, new_rows = found
    else:
        for q in (q_old, q_new):
            if q.emb.rows != n_pairs:
                raise InputError(f"[gate] {q.name}: paired by row, the queries must have one "
                                 f"row per pair ({n_pairs}), got {q.emb.rows}")
        old_rows = new_rows = keys.astype(np.int64)
    positions = np.flatnonzero((old_rows >= 0) & (new_rows >= 0))
    if not len(positions):
        raise InputError("[gate] queries_old / queries_new: no held-out pair has a query of "
                         "both models")
    return positions, old_rows[positions], new_rows[positions]


def _ranks(queries: np.ndarray, true_docs: np.ndarray, positions: np.ndarray, doc_blocks,
           pool) -> np.ndarray:
    """(nq,) int64: how many documents score strictly above each query's own (cosine)."""
    q, true = unit_rows(queries), unit_rows(true_docs)
    true_scores = np.einsum("ij,ij->i", q, true)
    counts = np.zeros(len(q), dtype=np.int64)
    for offset, block in doc_blocks:
        block = unit_rows(block)
        qb = score_rows(len(q), len(block), pool.workers)
        pool.run([lambda q0=q0, q1=q1: count_better(
                      q[q0:q1], true_scores[q0:q1], positions[q0:q1], block, offset,
                      counts[q0:q1], query_block=qb) for q0, q1 in pool.chunks(len(q))])
    return counts


def stay_and_bridge(candidate, holdout_source: str, holdout_target: str, q_old, q_new,
                    positions: np.ndarray, old_rows: np.ndarray, new_rows: np.ndarray, *,
                    max_queries: Optional[int], level: float, resamples: int, seed: int = 0,
                    storage_options=None, workers: Optional[int] = None) -> dict:
    """Recall@10 of stay, bridge and re-embed on the held-out pairs (see the module doc),
    each with a bootstrap interval, and the paired interval of bridge - stay.

    candidate : the candidate Transform (old -> new). holdout_source / holdout_target : the
    held-out copies (h rows each, row-aligned). q_old / q_new : query Sides;
    positions, old_rows, new_rows : :func:`query_positions`. At most ``max_queries``
    queries (a seeded sample). Returns a JSON-ready dict."""
    from .evaluate_engine import Parallel, blocks, open_rows, read_checked, take_rows_in_order

    pick = query_sample(len(positions), max_queries, seed)
    positions, old_rows, new_rows = positions[pick], old_rows[pick], new_rows[pick]
    src = open_rows(holdout_source, "held-out source", storage_options)
    tgt = open_rows(holdout_target, "held-out target", storage_options)
    if q_old.emb.dim != src.dim or q_new.emb.dim != tgt.dim:
        raise InputError(f"[gate] queries_old must have the old model's {src.dim} dims and "
                         f"queries_new the new model's {tgt.dim}; got {q_old.emb.dim} and "
                         f"{q_new.emb.dim}")
    work = np.float32
    amap = AffineMap.from_transform(candidate)
    qa = take_rows_in_order(q_old.emb, old_rows).astype(work)
    qb = take_rows_in_order(q_new.emb, new_rows).astype(work)
    docs_a = take_rows_in_order(src, positions).astype(work)
    ranges = blocks(0, src.rows, [src, tgt])
    pool = Parallel(workers)

    def stream(arr, fn=None):
        for b in ranges:
            x = read_checked(arr, b.start, b.stop, work)
            yield b.start, (fn(x, work, start=b.start) if fn else x)

    ranks = {"stay": _ranks(qa, docs_a, positions, stream(src), pool),
             "bridge": _ranks(qb, amap(docs_a, work), positions, stream(src, amap), pool),
             "reembed": _ranks(qb, take_rows_in_order(tgt, positions).astype(work), positions,
                               stream(tgt), pool)}
    hits = {k: (r < K).astype(np.float64) for k, r in ranks.items()}
    boot = {"resamples": resamples, "level": level, "seed": seed}
    out = {"queries": int(len(positions)), "documents": int(src.rows),
           "search": "raw cosine, exact, among every held-out document"}
    for name, h in hits.items():
        iv = interval(h, **boot)
        out[name] = {f"recall@{K}": iv.estimate, "interval": [iv.lo, iv.hi],
                     "recall@1": float(np.mean(ranks[name] < 1))}
    d = difference_interval(hits["bridge"], hits["stay"], **boot)
    out["bridge_minus_stay"] = {f"recall@{K}": d.estimate, "interval": [d.lo, d.hi]}
    # the same three-way verdict as evaluate-retrieval's, on these per-query hits
    out["verdict"] = verdict(hits["stay"], hits["bridge"], hits["reembed"],
                             metric=f"recall@{K}", **boot).as_dict()
    log.info("realign: stay %.4f, bridge %.4f, re-embed %.4f (recall@%d, %d queries)",
             out["stay"][f"recall@{K}"], out["bridge"][f"recall@{K}"],
             out["reembed"][f"recall@{K}"], K, len(positions))
    return out
