"""``bigalign import``: vectors from .npy, .fvecs and Parquet files into an embedding store
(:mod:`bigalign.storage.embedding_store`), out of core, in parallel on Dask, resumable.

    >>> from bigalign.commands.ingest import import_vectors
    >>> import_vectors(["shards/part-*.parquet"], "corpus.store", ids_column="doc_id",
    ...                model="intfloat/e5-base-v2")

How it works, in the house style (a plan + a job + a graph):

* **Inputs** are expanded in the order given (a glob expands to its matches in lexicographic
  order) and *probed* up front, reading metadata only: each file's format (by extension),
  rows, dimension and value dtype, the Parquet vector and id columns, and its size and
  modification time or ETag. Everything that can be checked without reading the vectors is
  checked here (missing files, unknown formats, 1-D or non-numeric arrays, a wrong .fvecs
  header or a size that is not a whole number of rows, missing columns, mixed dimensions or
  id types across files), each error naming the file.
* **The plan** (:class:`ImportPlan`, pure) puts the files end to end as global rows, cuts
  the rows into *regions* of whole output chunks, and lists for each region the slices of
  the one, two or more files that cover it. Files rarely end on chunk boundaries, so a
  region may read the tail of one file and the head of the next; no two regions ever
  write the same chunk. Consecutive regions are grouped into *units*, one task each: a
  Parquet read that starts inside a row group decodes that row group from its start, so
  a unit runs on until a row group (or file) starts close to a region boundary, and each
  row group is decoded about once; .npy/.fvecs rows are read directly, so there every
  region is a unit.
* **The job** is :func:`bigalign.storage.job.checkpointed`, exactly as for apply: the
  fingerprint holds every input file (path, size, mtime/ETag, rows, format) and the
  options; a region's marker is written after its data; the store is marked complete only
  after every region is verified done. A rerun after a crash writes the missing regions; a
  rerun of a finished import is a no-op; changed inputs are refused, naming what changed.
* **The graph** has one task per unit: stream the unit's file spans once, in batches of
  about a write; fill one write's buffer at a time, validate (right dimension, no nulls,
  numbers, finite), cast to the store's dtype, write its embeddings (and ids) chunks, and
  mark a region done after its last write. Memory per task: one write (a region, or ~64
  MiB of whole chunks of a region grown to keep the graph within the task budget) plus the
  batch in hand (and, for Parquet, what polars holds while decoding a row group). Any error
  names the file and the row in it (0-based).

Readers: one class per format behind one interface (:mod:`bigalign.storage.formats`: probe,
read a slice, stream batches, restart points), found by extension; this module only calls
:func:`~bigalign.storage.formats.probe`, :func:`~bigalign.storage.formats.iter_rows` and
:func:`~bigalign.storage.formats.restart_points`. Fault points for the crash tests:
``import.begun``, ``import.region-written`` (data stored, marker not yet),
``import.region-done``, ``import.before-complete``.
"""

from __future__ import annotations

import logging
import math
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import datetime, timezone
from typing import Optional

import numpy as np

from ..errors import CheckpointError, InputError, NonFiniteError
from .. import faults
from ..execution.graph import task_count
from ..words import counted
from ..planning.import_plan import ImportPlan, Region, choose_chunk_rows, make_import_plan
from ..planning.plan import DEFAULT_BLOCK_BYTES, ApplyPlan
from ..storage.formats import (FORMATS, SourceFile, expand_inputs, iter_rows, probe,
                               read_slice, restart_points)
from ..storage.output_job import ZarrTarget, classify

log = logging.getLogger("bigalign")

__all__ = ["import_vectors", "SourceFile",
           "expand_inputs", "probe", "probe_all", "read_slice",
           "iter_rows", "import_unit_task", "import_graph", "plan_import", "FORMATS"]

STORE_DTYPES = ("float16", "float32", "float64")

# ==== inputs: found and probed by the reader of each format (storage.formats) ==============

def files_model(files) -> Optional[str]:
    """The model stamp every input names (files written by ``bigalign export``), or None
    when some name none or they disagree."""
    models = {f.model for f in files if f.rows}
    return models.pop() if len(models) == 1 and None not in models else None


def files_mapped(files) -> Optional[dict]:
    """The record of mapped vectors every input carries (exports of an apply's output:
    :mod:`bigalign.storage.provenance`), stamped on the store as ``bigalign.mapped``; None
    when none carries one. Inputs that mix mapped and native vectors (or two maps) get a
    warning and no record: the store's rows are not all of one kind."""
    import json

    from ..storage.provenance import centred_note, sentence

    kinds = {f.mapped for f in files if f.rows}
    if not kinds or kinds == {None}:
        return None
    if len(kinds) == 1:
        return json.loads(kinds.pop())
    records = [json.loads(k) for k in kinds if k is not None]
    notes = [centred_note(r) for r in records if r.get("target_centred")]
    log.warning("the inputs mix vectors %s with %s: the store records no provenance%s",
                sentence(records[0]), "native vectors" if None in kinds else
                "vectors mapped by another transform",
                f"; {notes[0]}" if notes else "")
    return None


def probe_all(expanded: list[tuple], *, vector_column=None, ids_column=None,
              threads: int = 16) -> list[SourceFile]:
    """Probe every file (metadata only; in parallel: object stores answer slowly) and check
    that they agree: one dimension, one kind of ids."""
    def one(item):
        name, url, fs, path, local = item
        return probe(name, url, fs, path, local, vector_column=vector_column,
                     ids_column=ids_column)

    if len(expanded) == 1:
        files = [one(expanded[0])]
    else:
        with ThreadPoolExecutor(max_workers=min(threads, len(expanded))) as pool:
            files = list(pool.map(one, expanded))
    filled = [f for f in files if f.rows > 0]
    if not filled:
        raise InputError("the inputs hold no rows" + (f" ({files[0].name} is empty)"
                                                      if len(files) == 1 else ""))
    first = filled[0]
    for f in filled[1:]:
        if f.dim != first.dim:
            raise InputError(f"{f.name}: vectors of dimension {f.dim}, but {first.name} has "
                             f"{first.dim}: every input must have the same dimension")
        if f.ids_kind != first.ids_kind:
            raise InputError(f"{f.name}: ids are {f.ids_kind} but {first.name} has "
                             f"{first.ids_kind} ids: all files need the same id type")
    return files


# ==== execution: one task per unit of regions ==============================================

class _RegionWriter:
    """Fills one region's rows at a time from batches of rows, in order, and writes them
    ``write_rows`` (whole chunks; 0: the whole region) at a time: each write is validated
    (finite) and written (embeddings, then ids, both fenced); the region is marked done
    after its last write. Memory: one write's buffer (reused) plus the batch in hand."""

    def __init__(self, files, regions: list, embeddings, ids, job, row_ids: bool, url: str,
                 write_rows: int = 0):
        from ..execution.engine import buffer

        self.files, self.regions, self.embeddings, self.ids = files, regions, embeddings, ids
        self.job, self.row_ids, self.url = job, row_ids, url
        self.dtype = np.dtype(embeddings.dtype)
        self.dim = int(embeddings.shape[1])
        self.buffer = buffer
        self.write_rows = int(write_rows or 0)
        self.k = -1
        self.written = 0
        self._next()

    def _next(self) -> None:
        self.k += 1
        self.base = 0  # rows of the region written so far
        self._open_write()

    def _open_write(self) -> None:
        self.filled = 0  # rows in the buffer
        self.id_parts: list = []
        if self.k < len(self.regions):
            r = self.regions[self.k]
            self.cap = r.rows - self.base
            if self.write_rows:
                self.cap = min(self.cap, self.write_rows)
            self.out = self.buffer("import", self.cap, self.dim, self.dtype)

    def add(self, f: SourceFile, file_row: int, values: np.ndarray, found) -> None:
        """Rows [file_row, file_row + len(values)) of ``f``, which land where the current
        region is filled up to."""
        i = 0
        while i < len(values):
            r = self.regions[self.k]
            take = min(len(values) - i, self.cap - self.filled)
            dst = self.out[self.filled:self.filled + take]
            with np.errstate(over="ignore", invalid="ignore"):
                np.copyto(dst, values[i:i + take], casting="unsafe")
            bad = _first_nonfinite(dst)
            if bad is not None:
                cast = "" if np.dtype(f.dtype) == self.dtype else \
                    f" (or a value too large for {self.dtype.name})"
                raise NonFiniteError(f"{f.name} row {file_row + i + bad}: the vector holds "
                                     f"NaN or Inf{cast}; embeddings must be finite")
            if self.ids is not None:
                row = r.start + self.base + self.filled
                self.id_parts.append(np.arange(row, row + take, dtype=np.int64)
                                     if self.row_ids else found[i:i + take])
            self.filled += take
            i += take
            if self.filled == self.cap:
                self._flush(r)

    def _flush(self, r: Region) -> None:
        """Write the buffer (rows [base, base + filled) of region ``r``); after the
        region's last write, mark it done and go on to the next region."""
        from ..storage.stores import write_rows

        if self.job is not None:
            self.job.check_fence()
        row = r.start + self.base
        write_rows(self.embeddings, row, self.out, url=f"{self.url}/embeddings")
        if self.ids is not None:
            parts = self.id_parts
            write_rows(self.ids, row, np.concatenate(parts) if len(parts) > 1
                       else parts[0], url=f"{self.url}/ids")
        self.base += self.filled
        if self.base < r.rows:
            self._open_write()
            return
        faults.point("import.region-written")
        if self.job is not None:
            self.job.mark_done(r.index, r.start, r.stop)
            faults.point("import.region-done")
        self.written += r.rows
        self._next()


def _spans(regions: list) -> list[tuple[int, int, int]]:
    """The file spans (file, file_start, file_stop) that the consecutive ``regions`` read,
    adjacent slices of one file merged: each span is read as one stream."""
    spans: list[list[int]] = []
    for r in regions:
        for sl in r.slices:
            if spans and spans[-1][0] == sl.file and spans[-1][2] == sl.file_start:
                spans[-1][2] = sl.file_stop
            else:
                spans.append([sl.file, sl.file_start, sl.file_stop])
    return [tuple(sp) for sp in spans]


def import_unit_task(files: tuple, regions: tuple, embeddings, ids, job, *, row_ids: bool,
                     url: str, storage_options: Optional[dict] = None,
                     write_rows: int = 0) -> int:
    """Import ``regions`` (the regions of one unit not yet done, in order): stream the file
    spans of each run of consecutive regions once, writing ``write_rows`` rows (whole
    chunks; 0: a whole region) as soon as they are in, each region marked done after its
    last write. Returns the rows written."""
    written = 0
    run: list = []
    for r in list(regions) + [None]:
        if run and (r is None or r.start != run[-1].stop):
            writer = _RegionWriter(files, run, embeddings, ids, job, row_ids, url,
                                   write_rows)
            batch = min(max(region.rows for region in run), write_rows or math.inf)
            for fi, a, b in _spans(run):
                for row, values, found in iter_rows(files[fi], a, b, batch, storage_options):
                    writer.add(files[fi], row, values, found)
            if writer.k != len(run):
                raise CheckpointError(f"regions {run[0].start}:{run[-1].stop} were not "
                                      "filled: the files hold fewer rows than planned")
            written += writer.written
            run = []
        if r is not None:
            run.append(r)
    return written


def _first_nonfinite(x: np.ndarray) -> Optional[int]:
    """Index of the first row holding NaN/Inf, or None. One pass of ``isfinite`` over row
    blocks (no full-size boolean temporary)."""
    step = max(1, (1 << 22) // max(x.shape[1], 1))
    for a in range(0, len(x), step):
        ok = np.isfinite(x[a:a + step])
        if not ok.all():
            return a + int(np.flatnonzero(~ok.all(axis=1))[0])
    return None


def _count(*rows: int) -> int:
    return int(sum(rows))


def import_graph(files: tuple, plan: ImportPlan, embeddings, ids, *, done=frozenset(),
                 job=None, row_ids: bool = False, url: str = "",
                 storage_options: Optional[dict] = None, run_id: str = ""):
    """Dask graph (:func:`bigalign.execution.graph.build`): one :func:`import_unit_task` per unit
    of the plan with regions not in ``done``, summed by a fixed tree of fan-in
    COUNT_FAN_IN; the key holds the rows written. Returns (graph, key, tasks)."""
    from functools import partial

    from ..execution.graph import GraphSpec, Group, Leaf, Shared, build, token
    from ..planning.plan import COUNT_FAN_IN

    task = partial(import_unit_task, row_ids=row_ids, url=url, storage_options=storage_options,
                   write_rows=plan.regions.rows_per_write)
    regions = plan.region_list()
    groups = []
    for u, unit in enumerate(plan.units()):
        todo = tuple(regions[i] for i in unit if i not in done)
        if todo:
            groups.append(Group(u, (Leaf(u, task, (Shared("files"), todo, Shared("store"),
                                                   Shared("ids"), job), label="unit"),)))
    spec = GraphSpec("import", token(asdict(plan.regions), plan.file_rows, run_id,
                                     sorted(done), row_ids),
                     {"files": files, "store": embeddings, "ids": ids}, tuple(groups),
                     _count, COUNT_FAN_IN)
    return build(spec)


# ==== the public face ========================================================================

def _store_dtype(files: list[SourceFile], dtype: Optional[str]) -> np.dtype:
    if dtype is not None:
        if str(dtype) not in STORE_DTYPES:
            raise InputError(f"--dtype must be one of {', '.join(STORE_DTYPES)}, got "
                             f"{dtype!r}")
        return np.dtype(dtype)
    kinds = {np.dtype(f.dtype).newbyteorder("=") for f in files if f.rows}
    if len(kinds) == 1 and next(iter(kinds)).name in STORE_DTYPES:
        return np.dtype(next(iter(kinds)).name)
    return np.dtype(np.float32)


def plan_import(files: list[SourceFile], *, chunk_rows: Optional[int] = None,
                dtype: Optional[str] = None, row_ids: bool = False,
                block_bytes: int = DEFAULT_BLOCK_BYTES):
    """The plan :func:`import_vectors` makes for probed ``files`` (``bigalign plan import``
    shows it): (:class:`ImportPlan`, the store's dtype, its ids kind: "int64", "string"
    or None). ``chunk_rows`` (default ~32 MiB of rows) and ``dtype`` as the import's."""
    dim = next(f.dim for f in files if f.rows)
    store_dtype = _store_dtype(files, dtype)
    total = sum(f.rows for f in files)
    if chunk_rows is not None and int(chunk_rows) <= 0:
        raise InputError(f"--chunk-rows must be positive, got {chunk_rows}")
    chunk = int(chunk_rows or choose_chunk_rows(dim, store_dtype.itemsize, total))
    ids_kind = "int64" if row_ids else next(f.ids_kind for f in files if f.rows)
    plan = make_import_plan([f.rows for f in files], dim * store_dtype.itemsize, chunk,
                            block_bytes, [restart_points(f) for f in files])
    return plan, store_dtype, ids_kind


def import_vectors(inputs, output: str, *, ids_column: Optional[str] = None,
                   vector_column: Optional[str] = None, row_ids: bool = False,
                   model: Optional[str] = None, chunk_rows: Optional[int] = None,
                   dtype: Optional[str] = None, job=None, execution=None,
                   storage_options: Optional[dict] = None, **keywords):
    """Import vectors from files into a new embedding store at ``output``.

    Parameters
    ----------
    inputs : file paths, fsspec URLs or globs (a path or a list), imported in the order
        given; a glob's matches in lexicographic order. Formats by extension: ``.npy``
        (2-D, numeric), ``.fvecs``, ``.parquet`` / ``.pq`` (a list or array column of
        numbers per row).
    output : the embedding store (a Zarr group: ``embeddings`` (N, d), ``ids`` (N,) when
        there are ids, and a ``model`` attribute).
    ids_column : Parquet column holding each row's id (integers -> int64 ids, strings ->
        string ids). Without it (and without ``row_ids``) the store has no ids array and
        row numbers are the ids.
    vector_column : Parquet column of the vectors (default: the only list/array column
        of numbers).
    row_ids : store the store's row numbers as int64 ids (any format).
    model : name of the model that embedded the vectors (the store's ``model`` attribute);
        default: the model Parquet files written by ``bigalign export`` name, when all do.
    chunk_rows : rows per stored chunk (default: about 32 MiB of vectors per chunk).
    dtype : float16/float32/float64 (default: the inputs' float dtype when they all share
        one, else float32).
    job, execution, storage_options : as for :func:`bigalign.apply`: the job protocol
        (:class:`bigalign.options.JobOptions`: overwrite, checkpoint, restart) and where it
        runs (:class:`bigalign.options.Execution`: scheduler, workers, memory_limit,
        threads, block_bytes, progress), or their fields as flat keywords.

    Duplicate ids are counted once the ids are written (:func:`bigalign.execution.pairing.duplicate_ids`,
    polars on Arrow columns): the count is the store's ``bigalign.duplicate_ids`` attribute,
    and a warning names an example and the remedy (``fit --duplicates first|last``). Not an
    error: a fit pairing by id decides.

    Returns a :class:`bigalign.RunReport` (``already_complete`` for a rerun of a finished
    import).
    """
    from ..storage.job import default_checkpoint
    from .runs import RunReport
    from ..options import Execution, JobOptions, keywords_of, requests

    t0 = time.perf_counter()
    so = storage_options
    given = requests("import_vectors", {"job": job, "execution": execution}, keywords,
                     {"job": keywords_of(JobOptions), "execution": keywords_of(Execution)})
    job, run = given["job"], given["execution"]
    if ids_column is not None and row_ids:
        raise InputError("give either an id column (--ids-column) or --row-ids, not both")
    ckpt = default_checkpoint(output) if job.checkpoint is None else (job.checkpoint or None)
    files = _probe_inputs(inputs, output, ckpt, so, vector_column, ids_column)
    if model is None and files_model(files) is not None:
        model = files_model(files)
        log.info("model %r: named by the inputs' bigalign export metadata", model)
    dim = next(f.dim for f in files if f.rows)
    plan, store_dtype, ids_kind = plan_import(files, chunk_rows=chunk_rows, dtype=dtype,
                                              row_ids=row_ids, block_bytes=run.block_bytes)
    fingerprint = {
        "inputs": {f.url: f.fingerprint(i) for i, f in enumerate(files)},
        "options": {"dtype": store_dtype.name, "chunk_rows": plan.chunk_rows, "ids": ids_kind,
                    "ids_column": ids_column, "vector_column": vector_column,
                    "row_ids": bool(row_ids), "model": model}}
    if _already_complete(output, fingerprint, job, ckpt, so):
        log.warning("%s is already complete with the same inputs and options: nothing "
                    "to do", output)
        return RunReport(0, time.perf_counter() - t0, 0, 0, 0, plan.rows, True)
    target = _ImportTarget(output, plan, dim, store_dtype, ids_kind, model, so, {
        "made_by": "import", "inputs": [f.name for f in files[:1000]],
        "input_files": len(files), "mapped": files_mapped(files)})
    return _run(target, files, fingerprint, ckpt, job, run, row_ids, t0)


def _probe_inputs(inputs, output: str, ckpt: Optional[str], so, vector_column,
                  ids_column) -> list[SourceFile]:
    """The input files expanded (globs), checked not to alias the output or checkpoint,
    and probed (metadata only: :func:`probe_all`)."""
    from ..storage.locations import check_disjoint

    expanded = expand_inputs(inputs, so)
    check_disjoint({f"input {name}": url for name, url, *_ in expanded},
                   {"output": output, "checkpoint": ckpt}, so)
    return probe_all(expanded, vector_column=vector_column, ids_column=ids_column)


def _already_complete(output: str, fingerprint: dict, job, ckpt: Optional[str], so) -> bool:
    """True when ``output`` is a complete store of these inputs and options (a rerun is a
    no-op); refuses (InputError) a complete store of others without --overwrite, and an
    incomplete one with no recorded progress."""
    from ..storage.job import Job, finished_or_refuse
    from ..storage.outputs import STORE_KINDS, check_replaceable, chunks_damage

    node = check_replaceable(output, "output", so, kinds=STORE_KINDS)
    if node.kind == "embedding-store" and node.complete:
        return bool(finished_or_refuse(node, fingerprint, output, job.overwrite, job.restart,
                                       ckpt, so, damage=lambda: chunks_damage(output, so)))
    if node.kind == "embedding-store" and not (job.overwrite or job.restart or
                                               (ckpt and Job(ckpt, so).exists())):
        raise InputError(f"output {output!r} is an incomplete embedding store with no "
                         "recorded progress; pass --overwrite to write it again")
    return False


def _run(target: "_ImportTarget", files: list, fingerprint: dict, ckpt: Optional[str], job,
         run, row_ids: bool, t0: float):
    """The import as a region job (:func:`bigalign.storage.output_job.output_job`): create
    or resume the store, run the graph of the regions left, verify, count duplicate ids,
    complete. Returns the :class:`bigalign.RunReport`."""
    from .runs import RunReport
    from ..execution.cluster import session
    from ..storage.output_job import output_job

    output, so, plan = target.url, target.storage_options, target.plan
    dim, store_dtype = target.dim, target.dtype
    with output_job(target, ckpt, "import", fingerprint, asdict(plan.regions),
                    storage_options=so, restart=job.restart, replace=job.overwrite) as region:
        plan = target.plan = ImportPlan(plan.file_rows, ApplyPlan(**region.manifest["plan"]),
                                        plan.row_groups)
        expected = plan.region_rows()
        faults.point("import.begun")
        handle, done = region.open(expected)
        group, embeddings, ids = handle
        graph, key, tasks = import_graph(tuple(files), plan, embeddings, ids, done=done,
                                         job=region.job, row_ids=row_ids, url=str(output),
                                         storage_options=so, run_id=region.run_id)
        log.info("import: %d rows x %d (%s) from %s: %s of ~%.3g MB (chunks of %d rows, "
                 "%.3g MB) in %s", plan.rows, dim, store_dtype.name, counted(len(files), "file"),
                 counted(len(expected), "region"),
                 plan.regions.rows_per_block * dim * store_dtype.itemsize / 2**20,
                 plan.chunk_rows, plan.chunk_rows * dim * store_dtype.itemsize / 2**20,
                 counted(task_count(graph), "task"))
        with session(**run.session_args()) as s:
            written = s.get(graph, key)
        seconds = time.perf_counter() - t0
        faults.point("import.before-complete")
        region.markers(expected)  # verify, then complete (RegionRun.finish)
        record = {}
        if ids is not None:  # row numbers (--row-ids) cannot repeat
            record["duplicate_ids"] = 0 if row_ids else _count_duplicate_ids(ids, output)
        region.finish(handle, expected, dict(
            record, complete=True, seconds=seconds,
            job={"run_id": region.run_id, "fingerprint": fingerprint},
            completed=datetime.now(timezone.utc).isoformat(timespec="seconds")))
    return RunReport(int(written), seconds, tasks, len(expected), len(done), plan.rows)


def _count_duplicate_ids(ids, output) -> int:
    """Distinct ids occurring more than once in the store's ``ids`` array
    (:func:`bigalign.execution.pairing.duplicate_ids`); a warning names one and the remedy. Not an
    error: the fit decides (``--duplicates error|first|last``)."""
    from ..execution.pairing import duplicate_ids

    t0 = time.perf_counter()
    count, example = duplicate_ids(ids)
    log.info("import: duplicate ids counted in %.2fs", time.perf_counter() - t0)
    if count:
        log.warning("%s: %d id%s occur more than once (e.g. id %r, %d times, at rows %s); a "
                    "fit pairing by id will refuse them unless told which row to keep: "
                    "--duplicates first|last", output, count, "s" * (count != 1),
                    example["id"], example["occurrences"],
                    ", ".join(str(r) for r in example["rows"]))
    return count


class _ImportTarget(ZarrTarget):
    """An imported store as the region job writes it (:mod:`bigalign.storage.output_job`):
    (``plan.rows``, ``dim``) of ``dtype`` in chunks of the plan, ids of ``ids_kind``,
    stamped with the run id, ``model`` and ``attributes``."""

    def __init__(self, output, plan, dim, dtype, ids_kind, model, so, attributes: dict):
        super().__init__(output, so)
        self.plan, self.dim, self.dtype, self.ids_kind = plan, dim, dtype, ids_kind
        self.model, self.attributes = model, attributes

    def of_run(self, run_id: str):
        return classify(f"output {self.url!r}",
                        lambda: _store_of_run(self.url, run_id, self.plan, self.dim,
                                              self.dtype, self.ids_kind,
                                              self.storage_options))

    def create(self, run_id: str):
        from ..storage.embedding_store import create_store, open_for_writing

        create_store(self.url, rows=self.plan.rows, dim=self.dim, dtype=self.dtype,
                     chunk_rows=self.plan.chunk_rows, ids_kind=self.ids_kind,
                     model=self.model, storage_options=self.storage_options,
                     attributes=dict(self.attributes, run_id=run_id))
        return open_for_writing(self.url, storage_options=self.storage_options)


def _store_of_run(output, run_id: str, plan: ImportPlan, dim: int, dtype: np.dtype,
                  ids_kind: Optional[str], so):
    """(group, embeddings, ids) of the store at ``output`` when run ``run_id`` created it
    with the planned shape, chunks, dtype and ids (a resume may write into it); None
    otherwise."""
    from ..storage.embedding_store import open_for_writing

    group, emb, ids = open_for_writing(output, storage_options=so)
    attrs = group.attrs.get("bigalign") or {}
    if attrs.get("run_id") != run_id or attrs.get("complete"):
        return None
    want_ids = {"int64": np.dtype(np.int64)}.get(ids_kind)
    if tuple(emb.shape) != (plan.rows, dim) or tuple(emb.chunks) != (plan.chunk_rows, dim) \
            or np.dtype(emb.dtype) != dtype or (ids is None) != (ids_kind is None) or \
            (ids is not None and (tuple(ids.chunks) != (plan.chunk_rows,) or
                                  (want_ids is not None and np.dtype(ids.dtype) != want_ids))):
        log.warning("the store %s does not have the shape, chunks or dtypes this run "
                    "planned: re-creating it", output)
        return None
    return group, emb, ids
