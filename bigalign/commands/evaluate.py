"""Held-out evaluation of an alignment next to its baselines, streaming.

Before rewriting a billion vectors a user wants to know *how good* the map is on pairs it
has not seen, *compared with what*, and *whether it could be better at all*.
:func:`evaluate` answers with, for the transform and each baseline
(:func:`bigalign.maths.metrics.baseline_methods`, fitted from the training statistics):

* relative residual  ``sum ||f(x_i) - y_i||^2 / sum ||y_i - mean(y)||^2`` (0 = perfect,
  1 = no better than always answering the target mean);
* the cosine between each mapped source row and its own target row (mean and percentiles);
* cross-model retrieval recall@k: each mapped source row is a query searched, by exact
  cosine, among *all* held-out target rows; a hit when its own pair ranks within the top k.
  Measured twice: in the raw target space, and "centred" (each side with its own mean
  removed), because a large common offset in a model's space hurts cosine search itself;
* optional CSLS re-scoring (Conneau et al. 2018), which penalises "hub" targets;
* the paper's diagnostics on the training set (:func:`bigalign.maths.metrics.fit_diagnostics`).

It reads the held-out pairs through the streaming engine,
:mod:`bigalign.commands.evaluate_engine` (:func:`evaluate_maps`); this module decides which
pairs are held out and where the baselines' training statistics come from, and holds the
names the other evaluations import from here (re-exported from the engine).

Retrieval is exact: every query is scored against every held-out target, blockwise. When
the held-out set has more than ``max_queries`` rows, a seeded random sample of them are the
queries; the searched set is always every held-out target.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

from ..errors import InputError
from ..storage.locations import canonical_url
from ..execution.pairing import (Pairs, common_positions, fitted_pairing, gathered, join, pair_by_ids,
                      training_positions)
from ..maths.metrics import fit_diagnostics, methods_for
from ..maths.solve import NotUniqueWarning, procrustes
from ..maths.stats import Moments
from ..storage.stores import EmbeddingArray, validate_pair
from .evaluate_engine import (DEFAULT_MAX_QUERIES, Rows, blocks, counted, evaluate_maps,
                              open_input, open_pair, row_range, take_rows, training_moments)

log = logging.getLogger("bigalign")

__all__ = ["evaluate", "evaluate_maps", "training_moments", "training_arrays", "same_array",
           "canonical_url", "open_input", "pairing_summary", "HeldOut", "DEFAULT_MAX_QUERIES",
           "counted", "open_pair", "row_range", "blocks", "take_rows"]


# ---------------------------------------------------------------------------------------
# the transform and its training statistics
# ---------------------------------------------------------------------------------------

def load_transform(transform, storage_options=None):
    """A :class:`bigalign.Transform`, or one loaded from its path / URL."""
    from ..transform import Transform

    if isinstance(transform, Transform):
        return transform
    try:
        return Transform.load(transform, storage_options=storage_options)
    except (FileNotFoundError, ValueError) as e:
        raise InputError(f"transform {str(transform)!r}: {e}") from None


def _default_heldout(train: Optional[Sequence[int]], n: int) -> tuple[int, int]:
    """Rows of the training arrays the transform was not fitted on: after its training
    range, else before it."""
    if train is None:
        raise InputError("the transform does not record its training rows; pass --rows "
                         "START:STOP for the held-out pairs")
    a, b = int(train[0]), int(train[1])
    if b < n:
        return b, n
    if a > 0:
        return 0, a
    raise InputError(f"the transform was fitted on all {n} rows of these arrays, so none are "
                     "held out; pass the held-out arrays, or --rows START:STOP (rows it was "
                     "fitted on flatter every method)")


# ---- which arrays a transform was fitted on ------------------------------------------------

def _path_parts(path: str) -> list[str]:
    return [p for p in os.path.normpath(path).split(os.sep) if p not in ("", ".", "..")]


def same_array(recorded: Optional[dict], arr) -> Optional[bool]:
    """Is ``arr`` the array whose fingerprint (:meth:`bigalign.storage.stores.EmbeddingArray.
    fingerprint`, recorded by the fit in ``Transform.metadata["inputs"]``) is ``recorded``?

    True: the same location (compared as :func:`canonical_url`), whatever its shape now (an
    array rewritten or grown in place still holds the rows fitted on). For a recorded
    *relative* path, whose working directory is unknown: also when the path of ``arr`` ends
    with it (``data/a.zarr`` matches ``/home/u/data/a.zarr``). A recorded ``canonical_url``
    (:func:`canonical_url` where the fit ran) is compared exactly instead. False: provably
    another array. None: cannot tell (nothing recorded, or ``arr`` is an in-memory numpy
    array).
    """
    url = (recorded or {}).get("url")
    if not url or not isinstance(arr, EmbeddingArray):
        return None
    here = canonical_url(arr.url)
    if recorded.get("canonical_url"):  # resolved where the fit ran: no guessing needed
        return recorded["canonical_url"] == here
    if canonical_url(url) == here:
        return True
    spelled = str(url).split("::")[-1]
    if "://" not in spelled and not os.path.isabs(os.path.expanduser(spelled)):
        tail = _path_parts(spelled)
        given = arr.url.split("::")[-1].removeprefix("file://")
        for path in (here, os.path.abspath(os.path.expanduser(given))):
            parts = _path_parts(path)
            if tail and parts[-len(tail):] == tail:
                return True
    return False


def training_arrays(t, source, target) -> str:
    """Are ``source`` / ``target`` the arrays ``t`` was fitted on (its recorded input
    fingerprints, :func:`same_array`)? "same" when either is either training array (an
    inverted transform maps its fit's target to its source); "different" only when both
    provably are neither (then none of their rows were used to fit it); "unknown" when it
    cannot be told, which callers treat as "same" (the cautious side: a training row taken
    for a held-out one would flatter every number)."""
    inputs = (getattr(t, "metadata", None) or {}).get("inputs") or {}
    found = [same_array(inputs.get(side), arr) for side in ("source", "target")
             for arr in (source, target)]
    if True in found:
        return "same"
    if found and all(f is False for f in found):
        return "different"
    return "unknown"


def training_statistics(t, statistics: Optional[Moments] = None, *, want: bool = True,
                        train_source=None, train_target=None, storage_options=None,
                        check_chunks: bool = True, block_rows: Optional[int] = None
                        ) -> tuple[Optional[Moments], Optional[str]]:
    """The training statistics for baselines and where they came from: ``statistics`` when
    given, else those stored with the transform (``Transform.statistics``, saved by every
    fit), else (a transform built by hand or saved before statistics were stored) one
    streaming pass over the transform's training rows of ``train_source``/``train_target``.
    (None, None) when there are none to be had (or ``want`` is False)."""
    if (train_source is None) != (train_target is None):
        raise InputError("give both --train-source and --train-target, or neither")
    if statistics is not None:
        return statistics, "given"
    stored = getattr(t, "statistics", None)
    if stored is not None:
        return stored, "stored with the transform"
    if not want or train_source is None:
        return None, None
    train = t.options.get("rows")
    if fitted_pairing(t.metadata) is not None:  # its rows are positions of gathered pairs
        log.warning("no baselines: the transform was fitted on pairs matched by id and "
                    "stores no training statistics")
        return None, None
    if not train:
        log.warning("no baselines: the transform does not record its training rows")
        return None, None
    try:
        src, tgt = open_pair(train_source, train_target, storage_options, check_chunks)
    except InputError as e:
        raise InputError(f"training pairs for the baselines: {e}") from None
    if (src.dim, tgt.dim) != tuple(t.dims):
        raise InputError(f"training pairs have dims {src.dim} and {tgt.dim} but the transform "
                         f"maps {t.dims[0]} -> {t.dims[1]}")
    a, b = int(train[0]), int(train[1])
    if b > src.rows:
        log.warning("no baselines: the transform was fitted on rows %d:%d but the training "
                    "arrays have %d rows (pass --train-source/--train-target)", a, b, src.rows)
        return None, None
    inputs = t.metadata.get("inputs") or {}
    for side, arr in (("source", src), ("target", tgt)):
        if same_array(inputs.get(side), arr) is False:
            log.warning("baselines: fitting on rows %d:%d of %s %s; the transform was fitted "
                        "on %s", a, b, side, arr.url, inputs[side]["url"])
    log.info("baselines: one streaming pass over training rows %d:%d for their statistics "
             "(transforms saved by bigalign fit store them and skip this)", a, b)
    m = training_moments(src, tgt, (a, b), normalize=t.normalize, gram=True,
                         block_rows=block_rows)
    return m, "streamed from the training rows"


def _reproduces(t, m: Moments) -> Optional[bool]:
    """Do the statistics reproduce the transform's own training residual?"""
    recorded = t.metadata.get("residual")
    if recorded is None:
        return None
    o = t.options
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotUniqueWarning)
        try:
            sol = procrustes(m, center=bool(o.get("center")), scale=bool(o.get("scale")),
                             reflection=bool(o.get("reflection", True)))
        except ValueError:
            return None
    if sol.residual is None:
        return None
    return bool(abs(sol.residual - recorded) <= 1e-6 * max(sol.target_energy, 1e-300))


# ---- which pairs are held out --------------------------------------------------------------

@dataclass
class HeldOut:
    """The pairs an evaluation reads. ``pairs``: by id, the evaluated pairs (gathered
    before reading; ``rows`` is then (0, len)); None: rows [start, stop) of row-aligned
    inputs. ``overlap``: how many of them the transform was fitted on (None: cannot be
    told). ``pairing``: what the result reports ({"by": "rows"}, or the id pairing:
    matched pairs, ids found on one side only, training pairs and how they are known)."""

    rows: tuple
    overlap: Optional[int]
    pairing: dict
    pairs: Optional[Pairs] = None


def pairing_summary(joined: Pairs, policy: str) -> dict:
    """What an evaluation reports of a pairing by id: {"by": "ids", "duplicates": policy,
    "matched": pairs, "source_only" / "target_only": ids found on one side only,
    "duplicates_dropped": {side: rows}}."""
    return {"by": "ids", "duplicates": policy, "matched": joined.matched,
            "source_only": joined.source_only, "target_only": joined.target_only,
            "duplicates_dropped": dict(joined.duplicates)}


def _training_pairs(t, joined: Pairs, policy: str, source_ids, target_ids
                    ) -> tuple[Optional[np.ndarray], str]:
    """Positions in ``joined`` (sorted (k,) int64) of the pairs the transform was fitted on,
    and how that is known; (None, why) when it cannot be told. A fit by id: its recorded
    pairing rebuilt (:func:`bigalign.execution.pairing.training_positions`, with the fit's duplicates
    policy, a second join when ``policy`` differs or the transform is an inverse, whose
    record is marked ``swapped``) and verified by its SHA-256. A fit by rows [a, b): the
    matched pairs (i, i) with a <= i < b."""
    record = fitted_pairing(t.metadata)
    if record is None:
        train = t.options.get("rows")
        if not train:
            return None, "the transform records neither its pairs nor its training rows"
        a, b = int(train[0]), int(train[1])
        s, g = joined.source_rows, joined.target_rows
        return (np.flatnonzero((s == g) & (s >= a) & (s < b)),
                f"fitted row by row on rows {a}:{b}: the matched pairs (i, i) in that range")
    swapped = bool(record.get("swapped"))  # an inverse: the fit's source is our target
    fit_join = joined
    if swapped or record["duplicates"] != policy:
        sides = (target_ids, source_ids) if swapped else (source_ids, target_ids)
        try:
            fit_join = join(*sides, duplicates=record["duplicates"])
        except InputError as e:
            return None, f"its pairs cannot be rebuilt ({e})"
    pos = training_positions(fit_join, record)
    if pos is None:
        return None, ("its recorded pairs are not the pairs of these stores' ids (the stores "
                      "or their ids changed since the fit: sha256 differs)")
    if fit_join is not joined:
        fitted = fit_join.take(pos)
        if swapped:
            fitted = Pairs(fitted.target_rows, fitted.source_rows)
        pos = np.sort(common_positions(fitted, joined))
    how = (f"matched pairs {record['rows'][0]}:{record['rows'][1]}" if record.get("rows") else
           f"a sample of {record['matched']:,}, seed {record['seed']}" if record["sample"]
           and record["matched"] < fit_join.matched else "every matched pair")
    return pos, (f"the fit's pairs ({how}; duplicates {record['duplicates']}), rebuilt from "
                 "its record and verified by their sha256")


def _ids_heldout(t, source_ids, target_ids, arrays: str, rows, duplicates: Optional[str]
                 ) -> HeldOut:
    """Held-out pairs matched by id: the matched pairs (:func:`bigalign.execution.pairing.join`,
    sorted by source row) the transform was not fitted on; all of them on stores it was not
    fitted on. ``rows``: positions START:STOP in the list of matched pairs instead (pairs
    it was fitted on are counted, with a warning). ``duplicates``: None = the fit's policy
    (on its stores), else "error"."""
    record = fitted_pairing(t.metadata)
    policy = duplicates or (record["duplicates"] if record and arrays != "different"
                            else "error")
    joined = join(source_ids, target_ids, duplicates=policy)
    if arrays == "different":
        train, how = np.empty(0, np.int64), ("none: these are not the stores the transform "
                                            "was fitted on")
    else:
        train, how = _training_pairs(t, joined, policy, source_ids, target_ids)
    m = joined.matched
    if rows is not None:
        start, stop = row_range(rows, m, "held-out pairs (positions in the matched pairs)")
        positions = np.arange(start, stop, dtype=np.int64)
        overlap = None
        if train is None:
            log.warning("which matched pairs the transform was fitted on cannot be told (%s): "
                        "pairs %d:%d may include training pairs", how, start, stop)
        else:
            overlap = int(np.count_nonzero((train >= start) & (train < stop)))
            if overlap:
                log.warning("%d of the %d evaluated pairs were used to fit the transform: the "
                            "numbers flatter every fitted method", overlap, stop - start)
    else:
        if train is None:
            raise InputError(f"which of the {m:,} matched pairs the transform was fitted on "
                             f"cannot be told: {how}. Pass --rows START:STOP (positions in "
                             "the list of matched pairs) to evaluate some anyway")
        keep = np.ones(m, dtype=bool)
        keep[train] = False
        positions, overlap = np.flatnonzero(keep), 0
        if not len(positions):
            raise InputError(f"the transform was fitted on all {m:,} pairs matched by id in "
                             "these stores, so none are held out; pass held-out stores, or "
                             "--rows START:STOP (positions in the list of matched pairs; "
                             "pairs it was fitted on flatter every method)")
    pairing = dict(pairing_summary(joined, policy),
               training_pairs=None if train is None else int(len(train)),
               training=how, evaluated=int(len(positions)),
               positions=None if rows is None else [int(positions[0]), int(positions[-1]) + 1])
    log.info("evaluate: paired by id: %d matched pairs (%d source and %d target ids "
             "unmatched); %s pairs held out", m, joined.source_only, joined.target_only,
             f"{len(positions):,}")
    return HeldOut((0, len(positions)), overlap, pairing, joined.take(positions))


def _rows_heldout(t, src: Rows, tgt: Rows, source_ids, target_ids, arrays: str, rows
                  ) -> HeldOut:
    """Held-out rows of row-aligned inputs (row i with row i): ``rows``, else every row of
    arrays the transform was not fitted on, else the rows after (else before) its training
    rows. A transform fitted by id has no training row range: ``rows`` is then required,
    and its overlap is counted from its rebuilt pairs (i, i) when the inputs have ids."""
    validate_pair(src, tgt)
    record = fitted_pairing(t.metadata)
    train = None if record else t.options.get("rows")
    if rows is not None:
        start, stop = row_range(rows, src.rows, "held-out rows")
    elif arrays == "different":
        start, stop = 0, src.rows
    elif record:
        raise InputError("the transform was fitted on pairs matched by id, so its training "
                         "pairs are not a row range: pair by ids (--pair-by ids, the default "
                         "when both inputs are stores with ids), or pass --rows START:STOP")
    else:
        start, stop = _default_heldout(train, src.rows)
    overlap: Optional[int] = 0
    if arrays != "different" and record:
        overlap = _id_fit_overlap_with_rows(t, source_ids, target_ids, start, stop)
    elif train and arrays != "different":
        overlap = max(0, min(stop, int(train[1])) - max(start, int(train[0])))
    if overlap:
        log.warning("%d of the %d evaluated rows were used to fit the transform: the "
                    "numbers flatter every fitted method", overlap, stop - start)
    return HeldOut((start, stop), overlap, {"by": "rows"})


def _id_fit_overlap_with_rows(t, source_ids, target_ids, start: int, stop: int
                              ) -> Optional[int]:
    """How many rows i in [start, stop) a transform fitted by id used as a pair (i, i):
    from its rebuilt pairs; None (with a warning) when they cannot be rebuilt."""
    why = "the inputs have no ids"
    if source_ids is not None and target_ids is not None:
        record = fitted_pairing(t.metadata)
        try:
            joined = join(source_ids, target_ids, duplicates=record["duplicates"])
            pos, why = _training_pairs(t, joined, record["duplicates"], source_ids, target_ids)
        except InputError as e:
            pos, why = None, str(e)
        if pos is not None:
            s, g = joined.source_rows[pos], joined.target_rows[pos]
            return int(np.count_nonzero((s == g) & (s >= start) & (s < stop)))
    log.warning("the transform was fitted on pairs matched by id, and which of rows %d:%d "
                "it used cannot be told (%s)", start, stop, why)
    return None


def _training_summary(t, arrays: str, moments: Optional[Moments], origin: Optional[str]
                      ) -> dict:
    """What an evaluation reports of the transform's training: its rows, whether these are
    its arrays, where the statistics came from, and with statistics their count, whether
    they reproduce the transform and the paper's diagnostics."""
    training = {"rows": t.options.get("rows"), "arrays": arrays, "statistics": origin,
                "fit_diagnostics": t.metadata.get("discrepancy"),
                "pairs": fitted_pairing(t.metadata)}
    if moments is not None:
        training["n"] = int(moments.n)
        training["reproduces_transform"] = _reproduces(t, moments)
        if training["reproduces_transform"] is False:
            log.warning("the training statistics do not reproduce the transform's recorded "
                        "residual: the baselines were fitted on different data")
        if moments.has_gram:
            training["diagnostics"] = fit_diagnostics(moments, center=bool(t.options.get("center")))
    return training


def evaluate(transform, source, target, rows=None, *, pair_by: str = "auto",
             duplicates: Optional[str] = None, scratch: Optional[str] = None,
             baselines: bool = True,
             statistics: Optional[Moments] = None, train_source=None, train_target=None,
             ridge: float = 0.0, ks: Sequence[int] = (1, 10),
             max_queries: Optional[int] = DEFAULT_MAX_QUERIES, seed: int = 0,
             csls: bool = False, csls_k: int = 10, dtype="float32",
             block_rows: Optional[int] = None, storage_options=None,
             check_chunks: bool = True) -> dict:
    """Evaluate ``transform`` on held-out pairs of ``source`` (N, dA) / ``target`` (M, dB):
    Zarr arrays, embedding stores, or numpy arrays.

    pair_by : "rows" (row i with row i), "ids" (rows with equal ids, the inner join
        :func:`bigalign.execution.pairing.join`, as ``bigalign.fit`` pairs; both inputs must be stores
        with ids) or "auto" (ids when both have them).
    duplicates : by ids: "error", "first" or "last", as for fit; default (None): the fit's
        own policy on the stores it was fitted on, else "error".
    scratch : by ids, the folder the held-out pairs are gathered into (as fit's: pairs x
        (dA + dB) x itemsize bytes, removed after).
    rows : row-aligned: the held-out row range. Default: every row when ``source``/
        ``target`` are not the arrays the transform was fitted on (:func:`training_arrays`,
        from the input fingerprints the fit recorded), else the rows after, else before,
        its training rows. By ids: positions START:STOP in the list of matched pairs (sorted
        by source row). Default: the matched pairs the fit did not use (rebuilt from what
        it recorded: its duplicates policy, ``sample``/``seed``, verified by the SHA-256 of
        its pairs); every matched pair on stores it was not fitted on.
    baselines : also evaluate none / least squares / ridge / the other centring, fitted from
        the training statistics: ``statistics`` when given, else those stored with the
        transform, else one streaming pass over the transform's training rows of
        ``train_source``/``train_target`` (default: ``source``/``target``).
    Other options as :func:`evaluate_maps`. Returns a JSON-ready dict ("kind": "evaluate");
    ``pairing`` says how pairs were formed (by ids: matched pairs, ids found on one side
    only, training and held-out pairs), ``overlap_with_training`` how many evaluated pairs
    the transform was fitted on (None: cannot be told).
    """
    t = load_transform(transform, storage_options)
    src, src_ids = open_input(source, "source", storage_options, check_chunks)
    tgt, tgt_ids = open_input(target, "target", storage_options, check_chunks)
    if (src.dim, tgt.dim) != tuple(t.dims):
        raise InputError(f"the transform maps {t.dims[0]} -> {t.dims[1]} dims but source has "
                         f"{src.dim} and target {tgt.dim}")
    arrays = training_arrays(t, src, tgt)
    if arrays == "different":
        log.info("%s and %s are not the arrays the transform was fitted on (%s, %s): all "
                 "their rows are held out", src.url, tgt.url,
                 t.metadata["inputs"]["source"]["url"], t.metadata["inputs"]["target"]["url"])
    if pair_by_ids(pair_by, src_ids, tgt_ids):
        held = _ids_heldout(t, src_ids, tgt_ids, arrays, rows, duplicates)
    else:
        held = _rows_heldout(t, src, tgt, src_ids, tgt_ids, arrays, rows)
    if train_source is None and train_target is None and arrays != "different":
        train_source, train_target = src, tgt  # they hold the training rows
    moments, origin = training_statistics(
        t, statistics, want=baselines, train_source=train_source, train_target=train_target,
        storage_options=storage_options, check_chunks=check_chunks, block_rows=block_rows)
    if moments is None and baselines and train_source is None and arrays == "different":
        log.warning("no baselines: the transform stores no training statistics, and %s / %s "
                    "are not its training arrays (pass --train-source/--train-target)",
                    src.url, tgt.url)
    methods = methods_for(t, moments if baselines else None, ridge)
    with gathered(held.pairs, src, tgt, scratch,
                  normalize=dtype if t.normalize else None) as (a, b):
        result = evaluate_maps(methods, a, b, held.rows, ks=ks, max_queries=max_queries,
                               seed=seed, csls=csls, csls_k=csls_k, dtype=dtype,
                               block_rows=block_rows, normalize_target=t.normalize)
    if held.pairs is not None:
        result["rows"] = held.pairing["positions"]
    training = _training_summary(t, arrays, moments, origin)
    return {"kind": "evaluate", "source": src.url, "target": tgt.url,
            "transform": {"path": None if not isinstance(transform, str) else transform,
                          "dims": list(t.dims), "options": t.options,
                          "n_pairs": t.metadata.get("n_pairs")},
            "pairing": held.pairing, "overlap_with_training": held.overlap,
            "training": training, **result}
