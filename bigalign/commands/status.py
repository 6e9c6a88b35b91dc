"""What storage says of a run or an output, from any process: progress in flight
(:func:`run_status`), an apply output's record (:func:`output_status`), what a finished
output has lost (:func:`output_damage`), and all of it as one record of the same keys in
every state (:func:`status_report`: what ``bigalign status --json`` prints)."""

from __future__ import annotations

from typing import Optional

from ..storage.job import Job, default_checkpoint
from ..storage.locations import options_for
from ..storage.outputs import chunks_damage
from .fit import _transform_damage

__all__ = ["run_status", "output_status", "output_damage", "status_report", "STATUS_KEYS",
           "STATUS_STATES"]

#: The keys of :func:`status_report`, present in every state (None where unknown).
STATUS_KEYS = ("path", "state", "finished", "kind", "run_id", "running", "units_done",
               "units_total", "rows_done", "rows_total", "rows_per_second", "eta_seconds",
               "started", "damaged", "checkpoint")
#: Its states: ``running`` (a live lease), ``interrupted`` (progress recorded, no live
#: process: rerun to resume), ``finished``, ``damaged`` (marked complete, lost a file or chunk
#: since), ``not-started`` (nothing recorded at the path).
STATUS_STATES = ("running", "interrupted", "finished", "damaged", "not-started")


def run_status(path, storage_options: Optional[dict] = None) -> Optional[dict]:
    """Progress of a fit or apply in flight (or interrupted), from storage alone: ``path`` is
    the run's output (transform or apply output) or its checkpoint URL. Returns
    {kind, run_id, units_done, units_total, rows_done, rows_total, started, rows_per_second,
    eta_seconds, running, checkpoint} or None when no progress is recorded there.
    ``eta_seconds`` is None unless a process runs the job now: a dead one has no time left."""
    for url in (str(path), default_checkpoint(path)):
        summary = Job(url, storage_options).summary()
        if summary is not None:
            if not summary.get("running"):
                summary["eta_seconds"] = None
            return dict(summary, checkpoint=url)
    return None


def output_status(output, storage_options: Optional[dict] = None) -> Optional[dict]:
    """The ``bigalign`` attribute of an apply output (a bare array, or an embedding store
    written by apply): {"complete": bool, ...}, or None when there is no such output at
    ``output``. Storage that does not answer raises (a transient error: "nothing there"
    would be a lie)."""
    import zarr

    from ..errors import is_transient

    try:
        node = zarr.open(output, mode="r", storage_options=options_for(output, storage_options))
    except Exception as e:
        if is_transient(e):
            raise
        return None
    attrs = node.attrs.get("bigalign")
    if not isinstance(attrs, dict) or not attrs:
        return None
    if isinstance(node, zarr.Group) and attrs.get("made_by") != "apply":
        return None
    if isinstance(node, zarr.Array) and "complete" not in attrs:  # demo data (outputs.inspect)
        return None
    return dict(attrs)


def output_damage(path, storage_options: Optional[dict] = None) -> Optional[str]:
    """What a finished bigalign output at ``path`` has lost since it was marked complete,
    in words (``"1 of 5 files listed in its manifest are missing or changed (first:
    part-00003.parquet, missing)"``), or None: intact, unfinished, or not an output. A rerun
    of the job that wrote it refuses it (DamagedOutputError, exit 2) unless --overwrite;
    ``info`` and ``status`` report it (exit 3). Cost: a Parquet export, one listing of its
    folder; an apply output or embedding store, one listing of its arrays' chunk (shard)
    objects; a transform, reading it (its SHA-256 is checked)."""
    from ..storage.parquet_folder import export_damage, export_manifest
    from ..storage.outputs import inspect

    so = storage_options
    export = export_manifest(path, so)
    if export is not None:
        return export_damage(path, export, so) if export.get("complete") else None
    node = inspect(path, so)
    if node.kind == "transform":
        return _transform_damage(path, so, [])
    if node.complete:  # an apply output or embedding store marked complete
        return chunks_damage(path, so)
    return None


def status_report(path, storage_options: Optional[dict] = None) -> dict:
    """Where the job writing ``path`` (an output, or a run's checkpoint) stands, as one
    record with every key of :data:`STATUS_KEYS` in every state:

    - ``state``: one of :data:`STATUS_STATES`; ``finished``: state == "finished";
    - ``kind``: fit, apply, import or export (None when not started); ``run_id``: the run's;
    - ``running``: a process holds the job's lease now;
    - ``units_done``/``units_total``, ``rows_done``/``rows_total`` (ints), ``rows_per_second``
      (float, the rate measured so far), ``eta_seconds`` (float; None unless running: a dead
      job has no time left, only work), ``started`` (UNIX seconds): from the checkpoint while
      unfinished; a finished output gives its rows (done = total) and no units or rate;
    - ``damaged``: what a finished output lost, in words, or None; ``checkpoint``: its URL.

    Cost: one checkpoint listing; for a finished output, :func:`output_damage`'s."""
    report = dict.fromkeys(STATUS_KEYS)
    report.update(path=str(path), finished=False, running=False)
    progress = run_status(path, storage_options)
    if progress is not None and progress.get("running"):
        report.update({k: progress.get(k) for k in STATUS_KEYS[4:] if k in progress},
                      state="running", kind=progress["kind"], run_id=progress.get("run_id"))
        return report
    output = _output_record(path, storage_options)
    if output is not None and output.pop("complete"):
        lost = output_damage(path, storage_options)
        report.update(output, state="damaged" if lost else "finished", finished=not lost,
                      damaged=lost)
        return report
    if progress is not None:
        report.update({k: progress.get(k) for k in STATUS_KEYS[4:] if k in progress},
                      state="interrupted", kind=progress["kind"],
                      run_id=progress.get("run_id"), running=False, eta_seconds=None)
        return report
    if output is not None:  # an unfinished output without a checkpoint (killed at its start)
        report.update(output, state="interrupted", rows_done=None)
        return report
    report["state"] = "not-started"
    return report


def _output_record(path, so) -> Optional[dict]:
    """{complete, kind, run_id, rows_done, rows_total} of the bigalign output at ``path``
    (a transform, an apply output or embedding store, a Parquet export), from its record
    alone; None when there is none."""
    from ..storage.parquet_folder import export_manifest
    from ..storage.outputs import inspect

    export = export_manifest(path, so)
    if export is not None:
        a, b = export.get("rows") or (0, 0)
        return {"complete": bool(export.get("complete")), "kind": "export",
                "run_id": export.get("run_id"), "rows_done": b - a, "rows_total": b - a}
    node = inspect(path, so)
    attrs = node.attrs or {}
    if node.kind in ("transform", "partial-transform"):  # a partial one: a save cut short
        meta = attrs.get("metadata") or {}
        n = meta.get("n_pairs")
        return {"complete": node.kind == "transform", "kind": "fit",
                "run_id": (meta.get("job") or {}).get("run_id"), "rows_done": n, "rows_total": n}
    if node.kind in ("apply-output", "apply-store", "embedding-store"):
        n = attrs.get("rows")
        return {"complete": bool(attrs.get("complete")),
                "kind": "import" if node.kind == "embedding-store" else "apply",
                "run_id": attrs.get("run_id") or (attrs.get("job") or {}).get("run_id"),
                "rows_done": n, "rows_total": n}
    return None
