"""Scoring candidate maps on held-out pairs and choosing one: pure numpy, in memory.

A fit with ``method="auto"`` (:mod:`bigalign.commands.select`) fits every family from its
one pass (:mod:`bigalign.maths.adapters`), maps the held-out source rows with each, and
keeps the one that retrieves best, by default:

    score = recall@1 of mapped source rows searching the held-out target rows

by cosine similarity on the vectors as they are (what a vector database serving the mapped
rows next to native ones does), or after removing each side's mean (``centred``). The other
direction (target rows searching mapped rows) is hurt by *hubs* (mapped rows crowding
around the target mean, which a map that shrinks the spread makes) and can be chosen, or
both averaged (:data:`CRITERIA`). No one map is best for every use (measured: docs/results.md, section 4), so the
criterion is the deployment's to choose. Ties (equal scores) go to the lower held-out relative
residual, then to the earlier family in :data:`bigalign.maths.adapters.FAMILIES` (the
simpler one). The per-query hits are kept, so a bootstrap interval of every figure
(:mod:`bigalign.maths.bootstrap`) costs no second search.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .metrics import unit_rows

__all__ = ["own_ranks", "retrieval_hits", "selection_score", "per_query", "choose",
           "CRITERIA"]


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


#: What auto can choose by: the serving case its held-out score stands for.
CRITERIA = {
    "both": "mean of held-out recall@1 both ways (mapped source rows searching target rows, "
            "and target rows searching mapped source rows)",
    "mapped-queries": "held-out recall@1 of mapped source rows searching target rows (old-model "
                      "queries mapped into a new-model index)",
    "mapped-docs": "held-out recall@1 of target rows searching mapped source rows (a mapped "
                   "corpus searched with new-model queries: the bridge, ARR's numerator)",
    "residual": "the lowest held-out relative residual (no search)",
}


def selection_score(hits: dict, criterion: str = "both") -> float:
    """The criterion (:data:`CRITERIA`) from :func:`retrieval_hits`' hits (``residual``:
    0, the residual breaking the tie)."""
    return float(np.mean(per_query(hits, criterion)))


def per_query(hits: dict, criterion: str = "both") -> np.ndarray:
    """The criterion's per-query values (n,) float64 (for a bootstrap interval)."""
    fwd, bwd = hits["forward@1"].astype(np.float64), hits["backward@1"].astype(np.float64)
    if criterion == "both":
        return (fwd + bwd) / 2
    if criterion == "mapped-queries":
        return fwd
    if criterion == "mapped-docs":
        return bwd
    if criterion == "residual":
        return np.zeros_like(fwd)
    raise ValueError(f"unknown criterion {criterion!r}: expected one of {', '.join(CRITERIA)}")


def choose(rows: Sequence[dict]) -> int:
    """Index of the winner among ``rows`` ({"score", "heldout_relative_residual"}, in
    family order): the highest score, ties to the lower residual, then the earlier row."""
    if not rows:
        raise ValueError("no candidates to choose from")

    def key(i):  # residuals equal to 9 digits tie (e.g. reduced-rank at full rank = affine)
        r = rows[i]
        res = r.get("heldout_relative_residual")
        return (-r["score"], np.inf if res is None else float(f"{res:.9g}"), i)

    return min(range(len(rows)), key=key)
