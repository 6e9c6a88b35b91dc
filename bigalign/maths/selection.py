"""Scoring candidate maps on held-out pairs and choosing one: pure numpy, in memory.

A fit with ``method="auto"`` (:mod:`bigalign.commands.select`) fits every family from its
one pass (:mod:`bigalign.maths.adapters`), maps the held-out source rows with each, and
keeps the one that retrieves best:

    score = (recall@1 of mapped source rows searching the held-out target rows
             + recall@1 of target rows searching the mapped source rows) / 2

by cosine similarity on the vectors as they are (what a vector database serving the mapped
rows next to native ones does). Both directions count: the second one is hurt by *hubs*
(mapped rows crowding around the target mean, which a map that shrinks the spread makes),
the first by maps that scatter. Ties (equal scores) go to the lower held-out relative
residual, then to the earlier family in :data:`bigalign.maths.adapters.FAMILIES` (the
simpler one). The per-query hits are kept, so a bootstrap interval of every figure
(:mod:`bigalign.maths.bootstrap`) costs no second search.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .metrics import unit_rows

__all__ = ["own_ranks", "retrieval_hits", "selection_score", "choose", "CRITERION"]

#: What :func:`choose` maximises, in words (recorded in a transform's metadata).
CRITERION = ("mean of held-out recall@1 in both directions (mapped source rows searching "
             "target rows, and target rows searching mapped source rows; cosine on the "
             "vectors as they are); ties to the lower held-out relative residual")


def own_ranks(queries: np.ndarray, docs: np.ndarray, block: int = 1024) -> np.ndarray:
    """For each query i (n, d), how many of the n documents (n, d) score strictly higher
    than document i, its own pair (0: found first), by inner product. (n,) int64. Blocks
    of ``block`` queries bound the memory to block x n scores."""
    n = len(queries)
    if len(docs) != n:
        raise ValueError(f"{n} queries need {n} paired documents, got {len(docs)}")
    ranks = np.empty(n, dtype=np.int64)
    for q0 in range(0, n, block):
        q = queries[q0:q0 + block]
        s = q @ docs.T
        own = s[np.arange(len(q)), np.arange(q0, q0 + len(q))]
        ranks[q0:q0 + len(q)] = (s > own[:, None]).sum(axis=1)
    return ranks


def retrieval_hits(mapped: np.ndarray, target: np.ndarray, ks: Sequence[int] = (1, 10),
                   *, centred: bool = False) -> dict:
    """Per-query hits of held-out retrieval between ``mapped`` source rows (n, dB) and
    their paired ``target`` rows (n, dB), cosine similarity. ``centred``: subtract each
    side's own mean first (centred search). Returns {"forward@k": (n,) bool (mapped row i
    finds target i in its top k), "backward@k": (n,) bool (target row i finds mapped row
    i)} for each k."""
    m = np.asarray(mapped, dtype=np.float32)
    t = np.asarray(target, dtype=np.float32)
    if centred:
        m = m - m.mean(axis=0)
        t = t - t.mean(axis=0)
    m, t = unit_rows(m), unit_rows(t)
    fwd, bwd = own_ranks(m, t), own_ranks(t, m)
    out = {}
    for k in ks:
        out[f"forward@{k}"] = fwd < k
        out[f"backward@{k}"] = bwd < k
    return out


def selection_score(hits: dict) -> float:
    """The criterion (:data:`CRITERION`) from :func:`retrieval_hits`' hits."""
    return float((np.mean(hits["forward@1"]) + np.mean(hits["backward@1"])) / 2)


def choose(rows: Sequence[dict]) -> int:
    """Index of the winner among ``rows`` ({"score", "heldout_relative_residual"}, in
    family order): the highest score, ties to the lower residual, then the earlier row."""
    if not rows:
        raise ValueError("no candidates to choose from")

    def key(i):
        r = rows[i]
        res = r.get("heldout_relative_residual")
        return (-r["score"], np.inf if res is None else res, i)

    return min(range(len(rows)), key=key)
