"""``bigalign realign``: the scheduled re-alignment job, gated and published to a registry.

A scheduler (Kubernetes CronJob, Argo CronWorkflow, SLURM) runs it after each retraining::

    bigalign realign realign.toml --run-id "$JOB_NAME" --summary /tmp/summary.json

with a TOML file (:func:`bigalign.commands.realign_config.load_config`; relative local
paths are relative to the file)::

    registry = "s3://bucket/align/registry"
    [pairs]
    source = "s3://bucket/pairs/old.zarr"    # embedding stores (pairs by id) or bare arrays
    target = "s3://bucket/pairs/new.zarr"
    holdout = 0.1                            # held out for the gate, chosen stably by id/row
    [fit]
    center = true                            # any fit option
    [gate]
    min_recall_at_10 = 0.9                   # held-out recall@10, mapped source -> native target
    max_heldout_relative_residual = 0.8      # not the training residual info prints
    not_worse_than_current = true            # the current version, on the same held-out pairs
    # queries_old / queries_new + not_worse_than_stay = true: refuse a map worse than staying
    [apply]                                  # optional: map the corpus with the new version
    corpus = "s3://bucket/corpus/old.zarr"
    output = "s3://bucket/corpus/mapped-{version}.zarr"

The steps, each resumable, with their progress under ``REG/runs/<run id>/``:

1. **split** the pairs into training and held-out pairs
   (:func:`bigalign.commands.realign_pairs.holdout_mask`): pair *k*
   (its id when both inputs are stores with ids and are paired by id, else its row number)
   is held out when ``u(k) < holdout``, with ``u`` a 64-bit hash of the key mapped to
   [0, 1) (splitmix64 for integer keys, BLAKE2b for strings). The choice depends on the key
   alone: adding pairs never moves an existing pair between the sets, raising ``holdout``
   only moves pairs into the held-out set, and every run on the same pair set holds out
   the same pairs, so the current version (fitted by an earlier run) never trained on
   this run's held-out pairs.
2. **gather** both sets into Zarr arrays in the run folder (``pairs/train-source.zarr``,
   ...): each stored chunk of an input is read once, into a local memory-mapped scratch
   (:func:`bigalign.execution.pairing.gather`; ``--scratch``-like ``scratch`` key), then written out.
   The fit, the evaluation and a resume then read these row-aligned copies, on a cluster too.
3. **fit** the candidate on the training copies with :func:`bigalign.fit` (its own
   checkpointed job: a killed fit resumes unit by unit).
   Before any of it, a run whose inputs and options (but ``[gate]``) are those of the run
   that published the current version stops (status "unchanged", exit 0); after the fit, so
   does one whose candidate has the current version's transform digest: nothing is
   published or mapped again.
4. **evaluate** the candidate, the current version and no alignment (equal dimensions) on
   the held-out copies (:func:`bigalign.commands.realign_gate.evaluate`): recall@1/@10
   (cosine, mapped source rows searched among every held-out native target row) and the
   held-out relative residual, each with a seeded bootstrap interval from the per-query
   values of the one search, the paired differences candidate - current, and with
   ``[gate] queries_old/new`` stay vs bridge (:mod:`bigalign.commands.realign_stay`).
   Recorded in ``evaluation.json``.
5. **gate** (:func:`bigalign.commands.realign_gate.gate`): thresholds on the estimates; "not
   worse than current" / "than stay" fail only when the paired difference's interval lies
   wholly beyond ``tolerance`` (0.005). A failed gate publishes nothing: the verdict says
   why, and the command exits 4.
6. **publish**: the candidate becomes the next version (transform, then its record);
7. **apply** (optional): the corpus is mapped with that version into ``output``
   (``{version}`` replaced), resumable as any apply;
8. the registry's ``current`` pointer moves to the version (last, atomically), the run's
   scratch copies are removed and ``verdict.json`` is written.

The corpus is mapped before the pointer moves, so a reader that sees version vN current
finds ``mapped-vN`` complete. The whole run holds the registry's *realign lease*
(:meth:`~bigalign.storage.registry.Registry.realign_lock`): a second realign on the same
registry is refused (exit 2) while it runs. The registry lock itself is held only to write
the version (step 6) and to move the pointer (step 8), waiting up to :data:`LOCK_WAIT`
seconds for a rollback or gc that holds it; so a ``registry rollback`` or ``gc`` runs
during the fit, the evaluation or the corpus apply. The pointer moves only to the version
this run wrote, checked under the lock (its record names this run and the candidate's
digest, and the version is not damaged). Rerunning a run id
resumes it; once finished it does nothing and reports the recorded verdict (exit 0 when it
published, 4 when its gate failed); with other inputs or options it is refused naming what
changed (exit 2). Without ``--run-id`` the run id is derived from the configuration and the
inputs' fingerprints, so the same command on unchanged data is the same run.

Fault points (``BIGALIGN_FAULTS``, :mod:`bigalign.faults`): ``realign.split`` (both sets
gathered), ``realign.fitted``, ``realign.evaluated``, ``realign.version-written``,
``realign.applied``, ``realign.published`` (pointer moved, verdict not yet written).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import tempfile
import time
from datetime import datetime, timezone
from typing import Optional


from .. import __version__

from .. import faults
from ..storage.job import Job, checkpointed, describe_changes
from ..errors import InputError
from ..storage.locations import check_disjoint
from ..options import Execution
from ..execution.pairing import pair_by_ids
from ..storage.registry import Registry
from .realign_config import ApplyConfig, RealignConfig, load_config
from .realign_gate import evaluate as _evaluate, gate
from .realign_pairs import RunFiles, Side, copy_chunk_rows, copy_complete, gather_side, \
    open_side, split_pairs

log = logging.getLogger("bigalign")

__all__ = ["realign", "gate", "summary", "write_summary"]

VERDICT_FORMAT = "bigalign.realign-verdict/1"
_RUN_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
#: seconds the version write and the publish wait for the registry lock (a rollback or gc
#: holds it for seconds; a holder that died on another machine until its lease lapses, 120 s)
LOCK_WAIT = 180.0


# ---------------------------------------------------------------------------------------
# the job
# ---------------------------------------------------------------------------------------

def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _finished(reg: Registry, run_id: str, fingerprint: dict) -> Optional[dict]:
    """The recorded verdict when run ``run_id`` finished with this fingerprint; refuses
    (InputError, exit 2) when it finished with other inputs or options; None otherwise."""
    verdict = reg.verdict(run_id)
    if verdict is None:
        return None
    changes = describe_changes(verdict.get("fingerprint") or {}, fingerprint)
    if changes:
        raise InputError(f"realign run {run_id!r} already finished ({verdict.get('status')}) "
                         "with other inputs or options:\n  " + "\n  ".join(changes) +
                         "\nUse another --run-id for a new run.")
    log.warning("realign run %s already finished (%s%s): nothing to do", run_id,
                verdict.get("status"), f", {verdict['version']}" if verdict.get("version") else "")
    return dict(verdict, already_done=True)


def _refuse_changed(reg: Registry, run_id: str, fingerprint: dict, so) -> None:
    """An unfinished run ``run_id`` started with other inputs or options is refused in
    realign's own terms (the job protocol would suggest --restart, which realign has not):
    resume it with its configuration, or start another run."""
    old = Job(f"{reg.run_url(run_id)}/job", so).manifest()
    changes = describe_changes((old or {}).get("fingerprint") or {}, fingerprint) \
        if old is not None else []
    if changes:
        raise InputError(f"realign run {run_id!r} was started with other inputs or options "
                         "and has not finished:\n  " + "\n  ".join(changes) +
                         "\nRerun it with its original configuration and inputs to finish "
                         "it, or use another --run-id for a new run.")


def _lease_held(e: BaseException) -> bool:
    """Was ``e`` a refusal because another run holds a lease (the registry's, this run's or
    its fit's)? Those are the only errors :func:`realign`'s ``wait`` retries."""
    from ..storage.lease import LeaseHeldError

    return isinstance(e, LeaseHeldError)


def realign(config, *, run_id: Optional[str] = None, execution: Optional[Execution] = None,
            storage_options: Optional[dict] = None, wait: float = 0.0) -> dict:
    """Run (or resume) one scheduled re-alignment; see the module doc.

    config : a TOML file path or a :class:`RealignConfig`.
    run_id : names the run (e.g. the Kubernetes Job or Argo workflow name): rerunning it
        resumes it, or does nothing once it finished. Default: derived from the
        configuration and the inputs' fingerprints.
    execution : where fit and apply run (:class:`bigalign.options.Execution`; default
        in-process threads).
    storage_options : fsspec options, over the configuration's ``storage_options``.
    wait : seconds to keep trying while another run holds the registry (or this run's
        progress): a holder that crashed on another machine keeps its lease until it
        lapses (120 s after its last renewal), so a retried pod should wait ~180 s. 0
        (default): refuse at once (CheckpointError, exit 2).

    Returns the verdict (a JSON-ready dict): status "published" or "rejected", passed,
    version, previous / current versions, the gate's criteria and figures, exit_code (0 or
    4), already_done. A rejected candidate is not an exception here; the CLI exits 4.
    """
    cfg = config if isinstance(config, RealignConfig) else load_config(config)
    run = execution or Execution()
    so = {**cfg.storage_options, **(storage_options or {})} or None
    check_disjoint({"source": cfg.source, "target": cfg.target,
                    "corpus": cfg.apply.corpus if cfg.apply else None},
                   {"registry": cfg.registry,
                    "apply output": cfg.apply.output.format(version="v0001")
                    if cfg.apply else None}, so)
    src, tgt = open_side("source", cfg.source, so), open_side("target", cfg.target, so)
    by_ids = pair_by_ids(cfg.pair_by, src.ids, tgt.ids, option="[pairs] pair_by")
    fingerprint = {"config": cfg.identity(),
                   "inputs": {"source": src.fingerprint(), "target": tgt.fingerprint()}}
    for key in ("queries_old", "queries_new"):  # the stay check's inputs
        if getattr(cfg.gate, key) is not None:
            fingerprint["inputs"][key] = open_side(key, getattr(cfg.gate, key), so).fingerprint()
    if run_id is None:
        blob = json.dumps(fingerprint, sort_keys=True, default=str).encode()
        run_id = "auto-" + hashlib.sha256(blob).hexdigest()[:16]
    if not _RUN_ID.match(run_id):
        raise InputError(f"--run-id {run_id!r}: use letters, digits, '.', '_' and '-' (at "
                         "most 128, starting with a letter or digit)")
    reg = Registry(cfg.registry, so)
    deadline = time.monotonic() + max(float(wait), 0.0)
    said = -1e9
    while True:
        try:
            return _realign_locked(cfg, reg, run_id, src, tgt, by_ids, fingerprint, run, so)
        except Exception as e:
            left = deadline - time.monotonic()
            if not _lease_held(e) or left <= 0:
                raise
            if time.monotonic() - said >= 30:  # a line per 30 s, not per try
                log.warning("realign %s: %s\nwaiting for it (%.0fs left)", run_id, e, left)
                said = time.monotonic()
            time.sleep(min(2.0, left))


def _realign_locked(cfg: RealignConfig, reg: Registry, run_id: str, src: Side, tgt: Side,
                    by_ids: bool, fingerprint: dict, run: Execution, so) -> dict:
    """One attempt: the finished check, then the run under the realign lease (the registry
    lock only for creating the registry, writing the version and publishing)."""
    done = _finished(reg, run_id, fingerprint)
    if done is not None:
        return done
    with reg.realign_lock(run_id):
        if not reg.exists():
            with reg.lock("realign", wait=LOCK_WAIT) as lock:
                reg.create(lock)
        done = _finished(reg, run_id, fingerprint)  # finished while we waited for the lease
        if done is not None:
            return done
        _refuse_changed(reg, run_id, fingerprint, so)
        with checkpointed(f"{reg.run_url(run_id)}/job", "realign", fingerprint,
                          {"run_id": run_id}, storage_options=so) as (job, _):
            files = RunFiles(reg, run_id, job)
            return _run(cfg, reg, files, src, tgt, by_ids, fingerprint, run, so)


def _run(cfg: RealignConfig, reg: Registry, files: RunFiles, src: Side,
         tgt: Side, by_ids: bool, fingerprint: dict, run: Execution, so) -> dict:
    """The run's steps in order, each resumed from what the run folder records: split and
    gather, fit, evaluate (skipped once ``evaluation.json`` is written); the gate; then,
    when it passed, the version, the corpus and the pointer. Returns the verdict."""
    evaluation = files.read("evaluation.json")
    split = files.read("split.json")
    if evaluation is None:
        same = _same_as_current(reg, fingerprint)
        if same is not None:  # unchanged inputs and options: nothing to fit or map
            return _unchanged(reg, files, fingerprint, same, "its inputs and options are "
                              f"those of run {same[1].get('run_id')!r}, which published it")
        split, rows = _split_and_gather(cfg, files, src, tgt, by_ids, split, run, so)
        faults.point("realign.split")
        _fit(cfg, files, src, tgt, run, so)
        faults.point("realign.fitted")
        same = _same_transform(reg, files, so)
        if same is not None:  # the same map again (e.g. the inputs moved, not changed)
            files.remove("pairs")
            files.remove("candidate.transform")
            return _unchanged(reg, files, fingerprint, same, "the candidate fitted is the "
                              f"same map (transform sha256 {same[1]['transform_sha256']})")
        stay_inputs = None
        if cfg.gate.queries_old is not None:
            if rows is None:
                rows = split_pairs(cfg, src, tgt, by_ids)["rows"]
            stay_inputs = (rows, by_ids, src)
        evaluation = _evaluate(cfg, reg, files, so, run.threads, stay_inputs)
        files.write("evaluation.json", evaluation)
        faults.point("realign.evaluated")
    decision = gate(cfg.gate, evaluation)
    verdict = _verdict(reg, files.run_id, decision, evaluation, split, fingerprint)
    if not decision["passed"]:
        return _reject(reg, files, decision, verdict)

    # ---- publish: the version, the corpus, then the pointer ----------------------------
    # the registry lock is held for the version write and the pointer move only
    version, digest = _write_version(cfg, reg, files, fingerprint, split, evaluation,
                                     decision, so)
    faults.point("realign.version-written")
    applied = None if cfg.apply is None else _apply_corpus(cfg.apply, reg, files.run_id,
                                                           version, run, so)
    pointer = _publish(reg, files.run_id, version, digest, evaluation)
    faults.point("realign.published")
    files.remove("pairs")
    files.remove("candidate.transform")  # the version holds it now
    verdict.update(status="published", version=version, previous=pointer.get("previous"),
                   current=reg.current(), apply=applied, finished=_now(), exit_code=0)
    files.write("verdict.json", verdict)
    log.info("realign %s: published %s (%s)", files.run_id, version,
             f"was {pointer['previous']}" if pointer.get("previous") else "the first version")
    return dict(verdict, already_done=False)


def _split_and_gather(cfg: RealignConfig, files: RunFiles, src: Side, tgt: Side,
                      by_ids: bool, split: Optional[dict], run: Execution, so
                      ) -> tuple[dict, Optional[dict]]:
    """Steps 1-2: the split's summary (``split.json``) and its rows (None when not
    recomputed); the split is made and both sides gathered again unless ``split`` is
    recorded and its four copies are complete."""
    if split is not None and all(copy_complete(files.array(p), split["sha256"], so) for p in
                                 ("train_source", "train_target", "holdout_source",
                                  "holdout_target")):
        return split, None
    s = split_pairs(cfg, src, tgt, by_ids)
    split = s["summary"]
    log.info("realign %s: %d pairs (by %s): %d to fit, %d held out", files.run_id,
             split["pairs"], split["by"], split["train"], split["holdout"])
    rows = s["rows"]
    for side, prefix in ((src, "source"), (tgt, "target")):
        gather_side(side, {f"train_{prefix}": rows[f"train_{prefix}"],
                           f"holdout_{prefix}": rows[f"holdout_{prefix}"]},
                    files, split["sha256"], so, cfg.scratch, run.threads,
                    copy_chunk_rows(src, tgt))
    files.write("split.json", split)
    return split, rows


def _fit(cfg: RealignConfig, files: RunFiles, src: Side, tgt: Side, run: Execution,
         so) -> None:
    """Step 3: the candidate fitted on the training copies (its own checkpointed job)."""
    import bigalign

    bigalign.fit(files.array("train_source"), files.array("train_target"),
                 output=files.candidate, source_model=src.model, target_model=tgt.model,
                 storage_options=so, scheduler=run.scheduler, workers=run.workers,
                 memory_limit=run.memory_limit, threads=run.threads,
                 block_bytes=run.block_bytes, progress=run.progress, device=run.device,
                 **cfg.fit)


def _canonical(value) -> str:
    from ..jsonsafe import json_safe

    return json.dumps(json_safe(value), sort_keys=True, default=str)


def _same_as_current(reg: Registry, fingerprint: dict) -> Optional[tuple[str, dict]]:
    """(current version, its record) when it was published by a run with these inputs
    (source and target fingerprints) and this configuration but for ``[gate]`` (the gate
    judges candidates; it does not change the map): the same fit again. Else None."""
    current = reg.current()
    record = reg.record(current, missing_ok=True) if current else None
    if not record or not record.get("inputs") or not record.get("config"):
        return None
    mine = {k: v for k, v in fingerprint["config"].items() if k != "gate"}
    theirs = {k: v for k, v in record["config"].items() if k != "gate"}
    pairs = ("source", "target")  # the queries of the stay check do not change the map
    if _canonical({k: record["inputs"].get(k) for k in pairs}) == \
            _canonical({k: fingerprint["inputs"].get(k) for k in pairs}) and \
            _canonical(theirs) == _canonical(mine):
        return current, record
    return None


def _same_transform(reg: Registry, files: RunFiles, so) -> Optional[tuple[str, dict]]:
    """(current version, its record) when the candidate computes exactly the current
    version's map (equal transform digests), else None."""
    from ..transform import Transform

    current = reg.current()
    record = reg.record(current, missing_ok=True) if current else None
    if not record or not record.get("transform_sha256"):
        return None
    digest = Transform.load(files.candidate, storage_options=so).digest()
    return (current, record) if digest == record["transform_sha256"] else None


def _unchanged(reg: Registry, files: RunFiles, fingerprint: dict, same: tuple[str, dict],
               why: str) -> dict:
    """Nothing new to publish: the current version already is this run's fit. Exit 0, no
    version written, no corpus mapped, the pointer unmoved; the verdict says so."""
    version, record = same
    log.warning("realign %s: the current version %s already is this fit (%s): nothing "
                "published, nothing mapped", files.run_id, version, why)
    verdict = {"kind": "realign", "format": VERDICT_FORMAT, "run_id": files.run_id,
               "registry": reg.url, "status": "unchanged", "passed": True,
               "gate": {"passed": True, "criteria": [], "notes": [
                   f"not evaluated: {version} already is this fit ({why})"]},
               "version": version, "previous": version, "current": version,
               "same_as": {"version": version, "run_id": record.get("run_id"),
                           "transform_sha256": record.get("transform_sha256"),
                           "reason": why},
               "candidate": None, "current_version": None, "no_alignment": None,
               "pairs": record.get("pairs"), "apply": None, "finished": _now(),
               "exit_code": 0, "fingerprint": fingerprint, "bigalign_version": __version__}
    files.write("verdict.json", verdict)
    return dict(verdict, already_done=False)


def _verdict(reg: Registry, run_id: str, decision: dict, evaluation: dict, split: dict,
             fingerprint: dict) -> dict:
    """The verdict's parts known once the gate has judged (status and versions follow)."""
    figures = evaluation["methods"]
    return {"kind": "realign", "format": VERDICT_FORMAT, "run_id": run_id,
            "registry": reg.url, "passed": decision["passed"], "gate": decision,
            "candidate": figures["candidate"],
            "candidate_minus_current": evaluation.get("candidate_minus_current"),
            "stay": evaluation.get("stay"), "bootstrap": evaluation.get("bootstrap"),
            "current_version": dict(figures["current"], version=evaluation["compared_with"])
            if "current" in figures else None,
            "no_alignment": figures.get("none"),
            "pairs": split, "held_out_queries": evaluation["queries"],
            "train_relative_residual": evaluation.get("train_relative_residual"),
            "fingerprint": fingerprint, "bigalign_version": __version__}


def _reject(reg: Registry, files: RunFiles, decision: dict, verdict: dict) -> dict:
    """A failed gate: nothing published, the candidate kept, the verdict written (exit 4)."""
    failed = [c["name"] for c in decision["criteria"] if not c["passed"]]
    log.warning("realign %s: the gate failed (%s): nothing published; the candidate "
                "stays at %s", files.run_id, ", ".join(failed), files.candidate)
    files.remove("pairs")
    verdict.update(status="rejected", version=None, candidate_transform=files.candidate,
                   previous=reg.current(), current=reg.current(), apply=None,
                   finished=_now(), exit_code=4)
    files.write("verdict.json", verdict)
    return dict(verdict, already_done=False)


def _write_version(cfg: RealignConfig, reg: Registry, files: RunFiles, fingerprint: dict,
                   split: dict, evaluation: dict, decision: dict, so) -> tuple[str, str]:
    """Step 6: the candidate written as the next version under the registry lock, unless
    this run already wrote it (``publish.json`` names the version and its digest). Returns
    (version, transform digest)."""
    run_id = files.run_id
    published = files.read("publish.json") or {}
    version, digest = published.get("version"), published.get("transform_sha256")
    if version and not digest:  # a run begun before publish.json named the digest
        record = reg.record(version, missing_ok=True) or {}
        digest = record.get("transform_sha256") if record.get("run_id") == run_id else None
    if version and digest and _ours(reg, version, run_id, digest, missing_ok=True):
        return version, digest
    from ..transform import Transform

    cand = Transform.load(files.candidate, storage_options=so)
    with reg.lock(f"version write of realign run {run_id!r}", wait=LOCK_WAIT) as lock:
        if version:
            record = reg.record(version, missing_ok=True)
            if record is not None and record.get("run_id") != run_id:
                version = None  # its number was taken meanwhile (gc'd and reused)
        if not version:
            version = reg.next_version()
        digest = cand.digest()
        files.write("publish.json", {"version": version, "transform_sha256": digest})
        if reg.record(version, missing_ok=True) is None:
            if cfg.apply is not None:  # apply runs after this write: its output must be free
                _check_apply_output(cfg.apply.output.format(version=version), version, so)
            record = {"run_id": run_id, "created": _now(), "bigalign_version": __version__,
                      "previous": reg.current(),
                      "inputs": fingerprint["inputs"], "config": fingerprint["config"],
                      "models": {"source": cand.metadata.get("source_model"),
                                 "target": cand.metadata.get("target_model")},
                      "dims": list(cand.dims), "pairs": split,
                      "fit": {"options": cand.options,
                              "n_pairs": cand.metadata.get("n_pairs"),
                              "train_relative_residual":
                                  cand.metadata.get("relative_residual")},
                      "gate": dict(decision, figures=evaluation["methods"],
                                   compared_with=evaluation["compared_with"]),
                      "transform_sha256": digest}
            if cfg.apply is not None:
                record["mapped_corpus"] = {
                    "corpus": cfg.apply.corpus,
                    "output": cfg.apply.output.format(version=version)}
            reg.write_version(lock, version, cand, record)
            log.info("realign %s: wrote version %s", run_id, version)
        _ours(reg, version, run_id, digest)
    return version, digest


def _apply_corpus(apply: ApplyConfig, reg: Registry, run_id: str, version: str,
                  run: Execution, so) -> dict:
    """Step 7: the corpus mapped with ``version`` (resumable as any apply); what the
    verdict records of it."""
    import bigalign

    output = apply.output.format(version=version)
    try:
        report = bigalign.apply(reg.transform_url(version), apply.corpus, output,
                                storage_options=so, scheduler=run.scheduler,
                                workers=run.workers, memory_limit=run.memory_limit,
                                threads=run.threads, block_bytes=run.block_bytes,
                                progress=run.progress, device=run.device,
                                **apply.options)
    except InputError as e:  # an output taken meanwhile: apply's remedies
        if "--overwrite" not in str(e) and "--restart" not in str(e):  # are not realign's
            raise
        raise InputError(f"realign {run_id}: [apply] of {version} into {output!r}: {e}\n"
                         f"(realign has no such option) {version} is written but not "
                         "current: remove what is at the output, then rerun this "
                         "--run-id to finish it") from None
    applied = {"corpus": apply.corpus, "output": output, "rows": report.rows_total}
    faults.point("realign.applied")
    return applied


def _publish(reg: Registry, run_id: str, version: str, digest: str, evaluation: dict
             ) -> dict:
    """Step 8: the registry's ``current`` pointer moved to ``version`` under the lock,
    checked still to be the version this run wrote; the pointer's record."""
    pointer = reg.published_by(run_id, version)
    if pointer is None:
        with reg.lock(f"publish of realign run {run_id!r}", wait=LOCK_WAIT) as lock:
            pointer = reg.published_by(run_id, version)
            if pointer is None:
                _ours(reg, version, run_id, digest)  # still the version this run wrote
                if reg.current() != evaluation.get("current_version"):
                    log.warning("realign %s: the current version changed during the run "
                                "(%s when evaluated, %s now: a rollback?); publishing %s",
                                run_id, evaluation.get("current_version"), reg.current(),
                                version)
                pointer = reg.set_current(lock, version, action="publish", run_id=run_id)
    return pointer


def _ours(reg: Registry, version: str, run_id: str, digest: str, *,
          missing_ok: bool = False) -> bool:
    """Is ``version`` still the one run ``run_id`` wrote: its record names the run and the
    candidate's transform digest ``digest``? With ``missing_ok`` (before the write) a
    missing record or another run's is False; otherwise either raises CheckpointError
    (exit 2) saying what changed (the rerun of the run id writes its version again). A
    record of this run naming another digest always raises."""
    from ..errors import CheckpointError

    record = reg.record(version, missing_ok=True)
    if record is None:
        why = "its record is gone"
    elif record.get("run_id") != run_id:
        why = f"it now holds run {record.get('run_id')!r}'s version"
    elif record.get("transform_sha256") != digest:
        why = (f"its record names transform sha256 {record.get('transform_sha256')}, this "
               f"run wrote {digest}")
        missing_ok = False
    else:
        return True
    if missing_ok:
        return False
    raise CheckpointError(f"realign {run_id}: {reg.url} {version} is no longer the version "
                          f"this run wrote ({why}); nothing was made current. Rerun this "
                          "--run-id to write its version again.")


def _check_apply_output(output: str, version: str, so) -> None:
    """Refuse (InputError) before version ``version`` is written when its ``[apply]`` output
    is taken: the apply runs after the version is written, and would otherwise leave a
    version that can never become current under this run id."""
    from ..storage.outputs import inspect

    node = inspect(output, so)
    if node.kind != "absent":
        what = f"a bigalign {node.kind}" if node.ours else "something bigalign did not write"
        raise InputError(f"[apply] output {output!r} for the next version {version} already "
                         f"holds {what}; nothing was written or published. Remove it, or "
                         "point [apply] output elsewhere, then rerun.")


def summary(verdict: dict) -> dict:
    """The verdict without its fingerprint: what ``--summary`` writes and ``--json`` prints."""
    return {k: v for k, v in verdict.items() if k != "fingerprint"}


def write_summary(path: str, value: dict, storage_options: Optional[dict] = None) -> None:
    """Write a JSON summary to a local path (atomically: temporary file, then rename) or
    an fsspec URL (one PUT)."""
    from ..jsonsafe import json_safe

    data = json.dumps(json_safe(value), indent=2) + "\n"
    if "://" in str(path):
        import fsspec
        with fsspec.open(str(path), "w", **(storage_options or {})) as f:
            f.write(data)
        return
    path = os.path.abspath(os.fspath(path))
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".summary-", dir=os.path.dirname(path))
    try:
        with os.fdopen(fd, "w") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)

