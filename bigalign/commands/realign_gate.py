"""Realign's held-out evaluation and its gate (:func:`evaluate`, :func:`gate`): the
candidate, the current version and no alignment scored on the held-out copies, each gated
figure with a seeded bootstrap interval (:mod:`bigalign.maths.bootstrap`) from the per-query
values the one search keeps; the paired differences candidate - current; with ``[gate]
queries_old / queries_new``, stay vs bridge (:mod:`bigalign.commands.realign_stay`).
"""

from __future__ import annotations

import logging
from typing import Optional

import numpy as np

from ..errors import InputError
from ..storage.registry import Registry
from .realign_config import GATED, GateConfig, RealignConfig
from .realign_pairs import RunFiles, open_side

log = logging.getLogger("bigalign")

__all__ = ["evaluate", "gate"]


# ---------------------------------------------------------------------------------------

def _boot(g: GateConfig) -> dict:
    """The bootstrap's settings (seeded: the same evaluation gives the same intervals)."""
    return {"resamples": g.resamples, "level": g.confidence, "seed": 0}


def _figures(entry: dict, spread: np.ndarray, g: GateConfig) -> dict:
    """A method's held-out figures, each gated one with its bootstrap interval: recall@k
    over the sampled held-out queries (their 0/1 hits resampled), the held-out relative
    residual sum ||y_i - b_i||^2 / sum ||b_i - mean b||^2 over the held-out pairs (the
    pairs resampled, numerator and denominator together)."""
    from ..maths.bootstrap import interval, ratio_interval

    raw, cen = entry["retrieval"]["raw"], entry["retrieval"]["centred"]
    ranks, sq = entry["per_query"]["ranks_raw"], entry["per_query"]["sq_error"]
    out = {"recall@1": raw["recall@1"], "recall@10": raw["recall@10"],
           "recall@10_centred": cen["recall@10"], "cosine_mean": entry["cosine"]["mean"],
           "heldout_relative_residual": entry["relative_residual"], "intervals": {}}
    for k in (1, 10):
        iv = interval((ranks < k).astype(np.float64), **_boot(g))
        out["intervals"][f"recall@{k}"] = [iv.lo, iv.hi]
    if spread.sum() > 0 and np.isfinite(sq).all():
        iv = ratio_interval(sq, spread, **_boot(g))
        out["heldout_relative_residual"] = iv.estimate  # the ratio the interval is about
        out["intervals"]["heldout_relative_residual"] = [iv.lo, iv.hi]
    return out


def _paired(cand: dict, cur: dict, spread: np.ndarray, g: GateConfig) -> dict:
    """Candidate - current over the same held-out queries / pairs: recall@10 (paired hits)
    and the held-out relative residual (sum of per-pair differences over the spread)."""
    from ..maths.bootstrap import difference_interval, ratio_interval

    hits = [(m["per_query"]["ranks_raw"] < 10).astype(np.float64) for m in (cand, cur)]
    d = difference_interval(*hits, **_boot(g))
    out = {"recall@10": {"estimate": d.estimate, "interval": [d.lo, d.hi]}}
    diff = cand["per_query"]["sq_error"] - cur["per_query"]["sq_error"]
    if spread.sum() > 0 and np.isfinite(diff).all():
        r = ratio_interval(diff, spread, **_boot(g))
        out["heldout_relative_residual"] = {"estimate": r.estimate, "interval": [r.lo, r.hi]}
    return out


def _stay(cfg: RealignConfig, files: RunFiles, cand, split_rows: dict, by_ids: bool, src,
          so, threads: Optional[int]) -> dict:
    """Stay / bridge / re-embed on the held-out pairs that have queries of both models
    (:mod:`bigalign.commands.realign_stay`)."""
    from .realign_pairs import _ids_at
    from .realign_stay import query_positions, stay_and_bridge

    g = cfg.gate
    q_old, q_new = open_side("queries_old", g.queries_old, so), \
        open_side("queries_new", g.queries_new, so)
    for q, model, which in ((q_old, cand.metadata.get("source_model"), "old"),
                            (q_new, cand.metadata.get("target_model"), "new")):
        if q.model and model and q.model != model:
            raise InputError(f"[gate] {q.name} holds vectors of {q.model!r}, but the "
                             f"{which} model is {model!r}")
    rows = split_rows["holdout_source"]
    keys = _ids_at(src.ids, rows) if by_ids else rows
    positions, old_rows, new_rows = query_positions(keys, by_ids, q_old, q_new,
                                                    src.emb.rows, cfg.duplicates)
    return stay_and_bridge(cand, files.array("holdout_source"), files.array("holdout_target"),
                           q_old, q_new, positions, old_rows, new_rows,
                           max_queries=g.max_queries, level=g.confidence,
                           resamples=g.resamples, storage_options=so, workers=threads)


def evaluate(cfg: RealignConfig, reg: Registry, files: RunFiles, so,
              threads: Optional[int], stay_inputs: Optional[tuple] = None) -> dict:
    """Candidate, current version and no alignment on the held-out copies, with bootstrap
    intervals (kept per-query values: no second search); with ``stay_inputs`` ((split
    rows, by_ids, source Side): ``[gate] queries_old/new`` set), stay vs bridge too."""
    from .evaluate_engine import evaluate_maps
    from ..maths.metrics import AffineMap, Method
    from ..transform import Transform

    cand = Transform.load(files.candidate, storage_options=so)
    methods = [Method("candidate", AffineMap.from_transform(cand), "this run's fit",
                      this=True)]
    current, why = reg.current(), None
    if current is not None:
        cur = reg.load(current)
        cand_model, cur_model = cand.metadata.get("source_model"), cur.metadata.get("source_model")
        if tuple(cur.dims) != tuple(cand.dims):
            why = f"{current} maps {cur.dims[0]} -> {cur.dims[1]} dims, the candidate " \
                  f"{cand.dims[0]} -> {cand.dims[1]}"
        elif cand_model and cur_model and cand_model != cur_model:
            why = f"{current} maps vectors of {cur_model!r}, the candidate of {cand_model!r}"
        else:
            methods.append(Method("current", AffineMap.from_transform(cur), current))
        if why:
            log.warning("realign: the current version is not comparable: %s", why)
    dim_a, dim_b = cand.dims
    if dim_a == dim_b:
        methods.append(Method("none", AffineMap.identity(dim_a, cand.normalize),
                              "source vectors as they are"))
    result = evaluate_maps(methods, files.array("holdout_source"),
                           files.array("holdout_target"), ks=(1, 10),
                           max_queries=cfg.gate.max_queries, seed=0,
                           normalize_target=cand.normalize, storage_options=so,
                           workers=threads, command="realign", per_query=True)
    spread = result["per_pair_spread"]
    by_name = {m["name"]: m for m in result["methods"]}
    out = {"pairs": result["pairs"], "queries": result["queries"],
           "compared_with": current if why is None else None,
           "current_version": current, "not_comparable": why,
           "methods": {m["name"]: _figures(m, spread, cfg.gate) for m in result["methods"]},
           "bootstrap": dict(_boot(cfg.gate), resampled="held-out queries (recall), "
                             "held-out pairs (residual)"),
           "train_relative_residual": cand.metadata.get("relative_residual"),
           "train_pairs": cand.metadata.get("n_pairs"),
           "candidate_sha256": cand.digest()}
    if "current" in by_name:
        out["candidate_minus_current"] = _paired(by_name["candidate"], by_name["current"],
                                                 spread, cfg.gate)
    if stay_inputs is not None:
        out["stay"] = _stay(cfg, files, cand, *stay_inputs, so, threads)
    return out


def _figure(fig: dict, key: str):
    """A figure of an evaluation, also one recorded before the held-out residual was
    renamed (``relative_residual``)."""
    if key == "heldout_relative_residual" and key not in fig:
        return fig.get("relative_residual")
    return fig[key]


def gate(g: GateConfig, evaluation: dict) -> dict:
    """The verdict of the gate on an evaluation (:func:`_evaluate`'s record): {"passed",
    "criteria": [{name, passed, value, threshold | current, interval, note}], "notes"}.

    Thresholds (``min_recall_at_10``, ``max_heldout_relative_residual``) judge the point
    estimate; NaN never passes. The comparisons judge the paired bootstrap interval of a
    difference over the same held-out queries (pairs, for the residual), with ``t`` =
    ``g.tolerance``: the candidate is worse than the current version when
    candidate - current recall@10 has its upper bound below -t, or the held-out relative
    residual's difference its lower bound above +t; the bridge is worse than staying
    when bridge - stay recall@10 has its upper bound below -t. A difference the queries
    cannot tell from one within the tolerance does not reject."""
    cand = evaluation["methods"]["candidate"]
    intervals = cand.get("intervals") or {}
    criteria, notes = [], []
    for key, (figure, direction) in GATED.items():
        threshold = getattr(g, key)
        if threshold is not None:
            v = _figure(cand, figure)
            c = {"name": key, "value": v, "threshold": threshold,
                 "passed": bool(v >= threshold if direction == "min" else v <= threshold)}
            if figure in intervals:
                c["interval"] = intervals[figure]
            criteria.append(c)
    if g.not_worse_than_current:
        criteria.append(_against_current(g, evaluation))
    stay = evaluation.get("stay")
    if g.not_worse_than_stay:
        criteria.append(_against_stay(g, stay))
    elif stay is None:
        notes.append("staying on the old model not checked: no [gate] queries_old / "
                     "queries_new")
    return {"passed": all(c["passed"] for c in criteria), "criteria": criteria,
            "notes": notes}


def _against_current(g: GateConfig, evaluation: dict) -> dict:
    """The ``not_worse_than_current`` criterion (see :func:`gate`)."""
    cand, cur = evaluation["methods"]["candidate"], evaluation["methods"].get("current")
    c = {"name": "not_worse_than_current", "tolerance": g.tolerance}
    if cur is None:
        c.update(passed=True, note=evaluation.get("not_comparable") and
                 f"not compared: {evaluation['not_comparable']}" or "no current version")
        return c
    keys = ("recall@10", "heldout_relative_residual")
    c.update(version=evaluation.get("compared_with"),
             value={k: _figure(cand, k) for k in keys},
             current={k: _figure(cur, k) for k in keys})
    diff = evaluation.get("candidate_minus_current")
    if diff is None:  # an evaluation recorded before the intervals: point estimates
        c["passed"] = bool(cand["recall@10"] >= cur["recall@10"] - g.tolerance and
                           _figure(cand, keys[1]) <= _figure(cur, keys[1]) + g.tolerance)
        return c
    c["difference"] = diff
    worse = [diff["recall@10"]["interval"][1] < -g.tolerance]
    if "heldout_relative_residual" in diff:
        worse.append(diff["heldout_relative_residual"]["interval"][0] > g.tolerance)
    c["passed"] = not any(worse)
    return c


def _against_stay(g: GateConfig, stay: Optional[dict]) -> dict:
    """The ``not_worse_than_stay`` criterion (see :func:`gate`)."""
    c = {"name": "not_worse_than_stay", "tolerance": g.tolerance}
    if stay is None:  # the configuration refuses this; an old evaluation could lack it
        c.update(passed=False, note="cannot check: no stay figures (queries_old / "
                 "queries_new) in this run's evaluation")
        return c
    d = stay["bridge_minus_stay"]
    c.update(value=stay["bridge"]["recall@10"], stay=stay["stay"]["recall@10"],
             difference={"recall@10": {"estimate": d["recall@10"], "interval": d["interval"]}},
             passed=not d["interval"][1] < -g.tolerance)
    return c
