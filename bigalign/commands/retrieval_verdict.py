"""Bridge, re-embed or stay: :func:`evaluate_verdict` searches the held-out queries four
ways and decides by :mod:`bigalign.maths.verdict`.

Given the old model's and the new model's embeddings of the same queries and documents
(row-aligned: row i of OLD_QUERIES and NEW_QUERIES is one query, row i of OLD_DOCS and
NEW_DOCS one document) and a transform mapping old -> new, it searches, by exact cosine
among every searched document:

* stay: old queries among old documents;
* bridge: new queries among the old documents mapped by the transform (what serving with the
  map does: no document re-encoded);
* bridge (queries mapped): old queries mapped by the transform among new documents (what
  old-model clients see once the corpus is re-embedded; reported, not decided on);
* re-embed: new queries among new documents.

Every figure is a mean over queries with a seeded bootstrap interval; ARR = bridge /
re-embed and the differences against staying are intervals over the same resampled queries.
Streaming as :mod:`bigalign.commands.retrieval`: memory is the queries, one block of each
document array and the running top-k.
"""

from __future__ import annotations

import logging
import time
from typing import Optional, Sequence

import numpy as np

from ..errors import InputError
from ..maths.bootstrap import difference_interval, interval, ratio_interval
from ..maths.metrics import AffineMap, ndcg_at_k, recall_at_k, unit_rows
from ..maths.verdict import Rule, decide, figures
from ..maths.stats import normalize_rows
from .evaluate import load_transform
from .evaluate_engine import (DEFAULT_MAX_QUERIES, blocks, counted, open_input, read_checked,
                              row_range, take_rows)
from .retrieval import _judged_queries, _top_k, load_qrels, qrels_by_ids

log = logging.getLogger("bigalign")

__all__ = ["evaluate_verdict", "SYSTEMS"]

#: The searches, in the order reported: (key, what it is).
SYSTEMS = (("stay", "old queries, old documents"),
           ("bridge", "new queries, old documents mapped"),
           ("bridge (queries mapped)", "old queries mapped, new documents"),
           ("re-embed", "new queries, new documents"))


def evaluate_verdict(transform, old_queries, old_docs, new_queries, new_docs, qrels=None, *,
                     query_rows=None, doc_rows=None, ks: Sequence[int] = (1, 10),
                     ndcg_k: int = 10, metric: str = "recall@10", search: str = "raw",
                     rule: Rule = Rule(), resamples: int = 1000, level: float = 0.95,
                     max_queries: Optional[int] = DEFAULT_MAX_QUERIES, seed: int = 0,
                     dtype="float32", block_rows: Optional[int] = None, pair_by: str = "auto",
                     duplicates: str = "error", storage_options=None,
                     check_chunks: bool = True) -> dict:
    """Stay, bridge and re-embed on the same held-out queries, and the verdict.

    transform : maps the old model (dA) into the new model's space (dB). old_queries (Nq,
    dA), new_queries (Nq, dB), old_docs (Nd, dA), new_docs (Nd, dB): row-aligned (arrays,
    Zarr paths or embedding stores; stores with ids must hold the same ids in the same
    rows on both models). qrels : as :func:`bigalign.commands.retrieval.load_qrels` (by
    the stores' ids when they have ids and ``pair_by`` is not "rows"); None: query row i
    is relevant to document row i only. query_rows / doc_rows : "START:STOP" or (start,
    stop) ranges searched. metric : what the verdict reads, "recall@K" (K is added to
    ``ks``) or "ndcg@``ndcg_k``". search : "raw" cosine, or "centred" (each query set minus
    its mean, each document set minus its mean). rule, resamples, level, seed : the
    verdict's thresholds and bootstrap (``seed`` also draws the query sample when there
    are more than ``max_queries``).

    Returns {"kind": "verdict", "systems": {name: {metric: {estimate, lo, hi}}},
    "comparisons": {metric: {"bridge - stay", "re-embed - stay", "arr", "arr (queries
    mapped)"}}, "verdict": {decision, reason, rule, figures}, ...}.
    """
    if search not in ("raw", "centred"):
        raise InputError(f"search must be 'raw' or 'centred', got {search!r}")
    t = load_transform(transform, storage_options)
    dim_a, dim_b = t.dims
    opened = {}
    for key, data, dim in (("old queries", old_queries, dim_a), ("new queries", new_queries, dim_b),
                           ("old documents", old_docs, dim_a), ("new documents", new_docs, dim_b)):
        arr, ids = open_input(data, key, storage_options, check_chunks)
        if arr.dim != dim:
            raise InputError(f"the transform maps {dim_a} -> {dim_b} dims (old -> new): the "
                             f"{key} must have {dim} dims, got {arr.dim}")
        opened[key] = (arr, ids)
    q_ids = _aligned(opened, "queries", pair_by)
    d_ids = _aligned(opened, "documents", pair_by)
    oq, nq = opened["old queries"][0], opened["new queries"][0]
    od, nd = opened["old documents"][0], opened["new documents"][0]
    q0, q1 = row_range(query_rows, oq.rows, "query rows")
    d0, d1 = row_range(doc_rows, od.rows, "document rows")
    ks, metric = _cutoffs(ks, ndcg_k, metric)
    if qrels is None:
        if q0 < d0 or q1 > d1:
            raise InputError(f"without --qrels query row i is relevant to document row i: "
                             f"the query rows {q0}:{q1} must lie inside the document rows "
                             f"{d0}:{d1}")
        judged, pairing = {i: {i: 1.0} for i in range(q0, q1)}, {"by": "rows", "qrels": None}
    elif q_ids is not None and d_ids is not None:
        judged, pairing = qrels_by_ids(qrels, q_ids, d_ids, duplicates)
    else:
        judged, pairing = load_qrels(qrels), {"by": "rows"}
    qids, relevance, n_judged = _judged_queries(judged, (q0, q1), (d0, d1), max_queries, seed)
    work = np.dtype(dtype)
    t0 = time.perf_counter()
    log.info("evaluate-retrieval: stay / bridge / re-embed for %s (rows %d:%d) among %s "
             "(rows %d:%d), %s search", counted(len(qids), "query", "queries"), q0, q1,
             counted(d1 - d0, "document", "documents"), d0, d1, search)
    values = _per_query(t, (oq, nq, od, nd), qids, relevance, (d0, d1), ks, ndcg_k, search,
                        work, block_rows)
    boot = dict(resamples=resamples, level=level, seed=seed)
    systems = {name: {m: _plain(interval(v[m], **boot)) for m in v} for name, v in values.items()}
    comparisons = {m: _comparisons(values, m, boot) for m in values["stay"]}
    v = decide(figures(values["stay"][metric], values["bridge"][metric],
                       values["re-embed"][metric], metric=metric, **boot), rule)
    log.info("evaluate-retrieval: verdict %s in %.1fs", v.decision, time.perf_counter() - t0)
    return {"kind": "verdict", "queries": int(len(qids)), "judged_queries": n_judged,
            "sampled": len(qids) < n_judged, "query_rows": [q0, q1], "doc_rows": [d0, d1],
            "documents": d1 - d0, "pairing": pairing, "search": search, "ks": ks,
            "ndcg_k": ndcg_k, "metric": metric, "metrics": list(values["stay"]),
            "bootstrap": {"resamples": resamples, "level": level, "seed": seed},
            "systems": systems, "comparisons": comparisons, "verdict": v.as_dict(),
            "transform": {"dims": list(t.dims), "options": t.options},
            "seconds": time.perf_counter() - t0}


def _aligned(opened: dict, side: str, pair_by: str):
    """The shared ids of the old and new ``side`` (queries / documents), or None (paired by
    rows). Both must have the same rows; by ids (``pair_by`` "ids", or "auto" with ids on
    both) the same ids in the same rows: the verdict reads row i of both as one item."""
    (a, ia), (b, ib) = opened[f"old {side}"], opened[f"new {side}"]
    if a.rows != b.rows:
        raise InputError(f"old and new {side} must be the same {side} in the same rows: "
                         f"{a.rows:,} rows against {b.rows:,}")
    if pair_by == "rows" or (pair_by == "auto" and (ia is None or ib is None)):
        return None
    if ia is None or ib is None:
        raise InputError(f"--pair-by ids: the old and new {side} must both be embedding "
                         "stores with ids")
    if not np.array_equal(np.asarray(ia[:]), np.asarray(ib[:])):
        raise InputError(f"the old and new {side} hold different ids (or in another order): "
                         "the verdict needs them row-aligned (re-import both in one order, or "
                         "pass --pair-by rows if the rows are aligned anyway)")
    return np.asarray(ia[:])


def _cutoffs(ks, ndcg_k: int, metric: str) -> tuple[list[int], str]:
    """Sorted recall cut-offs (with the metric's), and the metric checked."""
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1 or ndcg_k < 1:
        raise InputError("cut-offs must be positive integers")
    name, _, k = str(metric).lower().partition("@")
    if name not in ("recall", "ndcg") or not k.isdigit() or int(k) < 1 or \
            (name == "ndcg" and int(k) != ndcg_k):
        raise InputError(f"the verdict's metric must be recall@K or ndcg@{ndcg_k} (the nDCG "
                         f"cut-off), got {metric!r}")
    if name == "recall":
        ks = sorted(set(ks) | {int(k)})
    return ks, f"{name}@{int(k)}"


def _native(t, work, x: np.ndarray, start: int, side: str) -> np.ndarray:
    """Rows searched as they are: unit rows when the transform's fit normalised (so the
    centred search removes the mean of what the map sees), else as read, in ``work``."""
    x = x.astype(work, copy=False)
    return normalize_rows(x, work, start, side) if t.normalize else x


def _per_query(t, arrays, qids, relevance, doc_range, ks, ndcg_k, search, work, block_rows
               ) -> dict:
    """{system: {metric: (nq,) float64 per-query values}} for :data:`SYSTEMS`, from the
    exact top-k of each search over documents ``doc_range`` of the four row-aligned arrays
    (old queries, new queries, old documents, new documents)."""
    oq, nq, od, nd = arrays
    (d0, d1), fmap = doc_range, AffineMap.from_transform(t)
    old_q, new_q = take_rows(oq, qids), take_rows(nq, qids)
    queries = {"stay": (_native(t, work, old_q, 0, oq.side), "old"),
               "bridge": (_native(t, work, new_q, 0, nq.side), "mapped"),
               "bridge (queries mapped)": (fmap(old_q, work), "new"),
               "re-embed": (_native(t, work, new_q, 0, nq.side), "new")}
    centred = search == "centred"

    def doc_blocks():
        for blk in blocks(d0, d1, [od, nd], block_rows):
            old = read_checked(od, blk.start, blk.stop)
            new = read_checked(nd, blk.start, blk.stop)
            yield blk.start, {"old": _native(t, work, old, blk.start, od.side),
                              "mapped": fmap(old, work, start=blk.start),
                              "new": _native(t, work, new, blk.start, nd.side)}

    means = {}
    if centred:  # pass 1: each document stream's mean
        sums = {}
        for _, out in doc_blocks():
            for key, y in out.items():
                sums[key] = sums.get(key, 0) + y.sum(axis=0, dtype=np.float64)
        means = {key: (v / (d1 - d0)).astype(work) for key, v in sums.items()}
    entries = []
    for name, (qv, key) in queries.items():
        qv = np.asarray(qv, dtype=work)
        entries.append((name, "centred" if centred else "raw",
                        unit_rows(qv - qv.mean(axis=0) if centred else qv), key))
    depth = min(max(max(ks), ndcg_k), d1 - d0)
    ranked = _top_k(entries, doc_blocks(), means, centred, depth, len(qids), work)
    out = {}
    for (name, _, _, _), r in zip(entries, ranked):
        v = {f"recall@{k}": recall_at_k(r, relevance, k) for k in ks}
        v[f"ndcg@{ndcg_k}"] = ndcg_at_k(r, relevance, ndcg_k)
        out[name] = v
    return out


def _plain(x) -> dict:
    return {"estimate": x.estimate, "lo": x.lo, "hi": x.hi}


def _comparisons(values: dict, m: str, boot: dict) -> dict:
    """The paired intervals of metric ``m``: each migration against staying, and ARR of
    each bridge (None where re-embedding scores 0)."""
    stay, re = values["stay"][m], values["re-embed"][m]
    out = {"bridge - stay": _plain(difference_interval(values["bridge"][m], stay, **boot)),
           "re-embed - stay": _plain(difference_interval(re, stay, **boot))}
    for key, name in (("arr", "bridge"), ("arr (queries mapped)", "bridge (queries mapped)")):
        out[key] = _plain(ratio_interval(values[name][m], re, **boot)) if re.sum() else None
    return out
