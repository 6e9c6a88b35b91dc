"""What storage says of a run or an output, from any process: progress in flight
(:func:`run_status`), an apply output's record (:func:`output_status`) and what a finished
output has lost (:func:`output_damage`)."""

from __future__ import annotations

from typing import Optional

from ..storage.job import Job, default_checkpoint
from ..storage.locations import options_for
from ..storage.outputs import chunks_damage
from .fit import _transform_damage

__all__ = ["run_status", "output_status", "output_damage"]


def run_status(path, storage_options: Optional[dict] = None) -> Optional[dict]:
    """Progress of a fit or apply in flight (or interrupted), from storage alone: ``path`` is
    the run's output (transform or apply output) or its checkpoint URL. Returns
    {kind, units_done, units_total, rows_done, rows_total, rows_per_second, eta_seconds,
    running, checkpoint} or None when no progress is recorded there."""
    for url in (str(path), default_checkpoint(path)):
        summary = Job(url, storage_options).summary()
        if summary is not None:
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
