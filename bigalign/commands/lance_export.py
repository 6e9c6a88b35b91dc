"""``bigalign export STORE --format lance -o DATASET.lance``: an embedding store (or a bare
(N, d) Zarr array) out to a Lance dataset, the columnar format LanceDB serves from, out of
core, in parallel on Dask, resumable (needs ``pylance``: ``pip install 'bigalign[lance]'``).

    >>> from bigalign.commands.lance_export import export_lance
    >>> export_lance("corpus.store", "corpus.lance")
    >>> import lancedb; lancedb.connect(".").open_table("corpus")   # serves it

The dataset has two columns, ``id`` (int64, or string: the store's ids; row numbers for a
bare array or an id-less store) and ``embedding`` (a fixed-size list of d float16/32/64,
what LanceDB indexes and searches), and its schema's metadata holds ``bigalign``, a JSON
object with the model stamp (read back by ``bigalign import DATASET.lance``), the source,
the source's provenance (what made it: an apply's transform digest), the rows and the run id.

How it works: the plan, the job and the graph are the Parquet export's
(:func:`bigalign.commands.vector_export.run_export`: files of whole source chunks, ~256 MB,
one task each, bad rows refused or skipped, the same fault points). A task writes its rows
as one Lance fragment with ``lance.fragment.write_fragments`` (data files only, in
``data/``: no manifest, so not part of any dataset) and then its fragment metadata to
``_bigalign/fragment-N.json``, then marks itself done. The last step commits every fragment,
in row order, as the dataset's first version (``LanceDataset.commit`` of one
``LanceOperation.Overwrite``), and only then rewrites bigalign's manifest with "complete".
Before that commit the folder has no ``_versions``: Lance and LanceDB refuse to open it, so an
interrupted export is never readable as a (complete or partial) dataset. A rerun after a kill
removes data files no fragment record lists (writers killed mid-fragment), writes only the
missing fragments and commits; one killed between the commit and the manifest finds its own
commit and does not commit again; a rerun of a finished export is a no-op. The folder's
layout and what bigalign may delete: :mod:`bigalign.storage.lance_folder`.
"""

from __future__ import annotations

import json
from typing import Optional

from .. import faults
from ..planning.plan import ExportPlan
from ..storage.lance_folder import (FORMAT, SIDECARS, LanceTarget, check_folder,
                                    export_damage, export_manifest, fragment_name,
                                    lance_schema)
from .vector_export import ExportFormat, FileSpec, read_group, run_export

__all__ = ["export_lance", "fragment_task", "export_manifest", "LANCE"]


def _batches(source, ids, groups, spec: FileSpec, schema, skipped: list):
    """The rows of ``groups`` as Arrow record batches of ``schema``; the rows left out as
    bad go to ``skipped``."""
    for g in groups:
        frame, left_out = read_group(source, ids, g.start, g.stop, spec)
        skipped.extend(left_out)
        if frame.height:
            yield from frame.to_arrow().cast(schema).to_batches()


def fragment_task(source, ids, plan: ExportPlan, index: int, start: int, stop: int,
                  spec: FileSpec, files: int, job) -> tuple:
    """Write file ``index`` (source rows [start, stop)) as one Lance fragment (data files
    only), then its fragment metadata (``_bigalign/fragment-N.json``), then its marker
    (fenced). Returns (rows written, source numbers of the rows left out)."""
    import pyarrow as pa

    from ..planning.plan import Block
    from ..storage.formats.lance import lance_module, lance_storage_options
    from ..storage.job import Job

    lance = lance_module()
    if job is not None:
        job.check_fence()
    schema = lance_schema(spec.ids_column, spec.ids, spec.vector_column, spec.dtype, spec.dim)
    skipped: list[int] = []
    reader = pa.RecordBatchReader.from_batches(schema, _batches(
        source, ids, plan.groups(Block(index, start, stop)), spec, schema, skipped))
    fragments = lance.fragment.write_fragments(
        reader, spec.url, schema=schema, max_rows_per_file=stop - start + 1,
        max_bytes_per_file=1 << 50, storage_options=lance_storage_options(
            spec.url, spec.storage_options))
    record = {"run_id": spec.metadata["run_id"], "index": index, "rows": [start, stop],
              "written": stop - start - len(skipped),
              "fragments": [f.to_json() for f in fragments]}
    folder = Job(spec.url, spec.storage_options)
    if job is not None:
        job.check_fence()
    folder.put_file(folder._path(SIDECARS, fragment_name(index, files)),
                    json.dumps(record).encode())
    faults.point("export.file-written")
    if job is not None:
        job.mark_done(index, start, stop, bad=skipped)
        faults.point("export.file-done")
    return stop - start - len(skipped), skipped


#: The Lance format as :func:`bigalign.commands.vector_export.run_export` drives it.
LANCE = ExportFormat("lance", "lance-export", "Lance fragment", FORMAT, check_folder,
                     export_damage, LanceTarget, fragment_task)


def export_lance(source, output: str, *, ids_column: str = "id",
                 vector_column: str = "embedding", dtype: Optional[str] = None, rows=None,
                 rows_per_file: Optional[int] = None, bad_rows: str = "fail", job=None,
                 execution=None, storage_options: Optional[dict] = None, **keywords):
    """Export the vectors of ``source`` to the Lance dataset ``output`` (a folder, by
    convention named ``*.lance``: LanceDB lists such folders as tables).

    Parameters are those of :func:`bigalign.commands.parquet_export.export_parquet` (less
    ``compression``): ``rows_per_file`` is the rows of each fragment (one per task). The
    dataset is committed once, at the end; ``output`` must be absent, empty or an earlier
    Lance export of bigalign's.

    Returns a :class:`bigalign.RunReport` (``units_total``: fragments).
    """
    from ..storage.formats.lance import lance_module

    lance_module()  # a clear error before anything is planned or written
    return run_export(LANCE, source, output, ids_column=ids_column,
                      vector_column=vector_column, dtype=dtype, rows=rows,
                      rows_per_file=rows_per_file, bad_rows=bad_rows, job=job,
                      execution=execution, storage_options=storage_options,
                      keywords=keywords, caller="export_lance")
