"""Command line for ``bigalign plan fit|apply|export|import``: a dry run (metadata only).

From real inputs (``plan fit SOURCE TARGET``, ``plan apply TRANSFORM SOURCE``, ``plan export
STORE``, ``plan import FILE...``: their Zarr metadata, the transform's shape, the files'
footers and headers; no chunk is listed or read) or from shapes (``--rows N --dims D[,D2]
[--chunk-rows C] [--shard-rows S] [--dtype T]``, and ``--files F`` for an import) it prints
what the run would do: tasks, checkpoint units or markers, bytes read and written, storage
requests, memory per thread and worker and, with ``--workers``, an estimated time: the
longest of computing at measured per-core rates
(:data:`bigalign.planning.estimates.CORE_RATES`), reading and writing at the storage
bandwidth (:class:`bigalign.planning.estimates.Bandwidth`; ``--read-mb-s``,
``--write-mb-s``, ``--max-read-gb-s``, ``--max-write-gb-s``). ``--json`` for machines.
Thin like cli.py: the arithmetic is :mod:`bigalign.planning.plan`'s and
:mod:`bigalign.planning.estimates`'.
"""

from __future__ import annotations

import json

from .common import add_storage_option, positive_float, storage_options
from ..jsonsafe import json_safe
from ..errors import InputError
from ..planning.estimates import (BANDWIDTH_SOURCE, READ_BYTES_PER_WORKER,
                                  WRITE_BYTES_PER_WORKER, Bandwidth, estimate_apply,
                                  estimate_export, estimate_fit, estimate_import)
from ..planning.plan import (DEFAULT_BLOCK_BYTES, export_row_bytes, make_apply_plan,
                             make_export_plan, make_fit_plan, output_layout)
from ..storage.locations import options_for

DTYPES = ("float16", "float32", "float64")


def add_commands(sub) -> dict:
    """Register ``plan`` on the argparse ``sub`` parsers; return {name: handler(args)}."""
    p = sub.add_parser(
        "plan", help="dry run: tasks, checkpoint files, bytes, requests, memory and time of "
                     "a fit, apply, import or Parquet export (reads metadata only)",
        description="Print what 'bigalign fit', 'bigalign apply', 'bigalign import' or "
                    "'bigalign export STORE --format parquet' would do, without doing "
                    "it: from real inputs (their metadata only) or from --rows/--dims. "
                    "Estimated time needs --workers (and --threads-per-worker); it is the "
                    "longest of computing at measured per-core rates, reading and writing "
                    "at the storage bandwidth (measured on a local disk by default: set "
                    "yours with --read-mb-s/--write-mb-s and --max-read-gb-s/"
                    "--max-write-gb-s).")
    p.add_argument("kind", choices=("fit", "apply", "export", "import"),
                   help="which command to plan "
                   "(export: 'bigalign export STORE --format parquet')")
    p.add_argument("inputs", nargs="*", metavar="INPUT",
                   help="fit: SOURCE TARGET; apply: TRANSFORM SOURCE; export: STORE; "
                        "import: FILE... (leave out to plan from --rows and --dims; an "
                        "export planned from shapes writes row numbers as ids)")
    p.add_argument("--rows", metavar="N|START:STOP",
                   help="without inputs: the number of rows (1e9, 10_000_000_000); with "
                        "inputs: the row range, as fit/apply --rows")
    p.add_argument("--dims", metavar="D[,D2]",
                   help="source (and target) dimensions without inputs (default D2 = D); "
                        "for apply from a source without a transform, the output dimension")
    p.add_argument("--chunk-rows", metavar="C[,C2]",
                   help="rows per (inner) chunk of the inputs (default: 16 MiB of rows); for "
                        "apply from real inputs, the output's chunk rows as apply --chunk-rows")
    p.add_argument("--shard-rows", metavar="S[,S2]",
                   help="rows per shard of sharded inputs (default: not sharded)")
    p.add_argument("--dtype", choices=DTYPES, default="float32",
                   help="input dtype without inputs (default float32)")
    p.add_argument("--out-dtype", choices=DTYPES, default=None,
                   help="apply / export / import: output dtype, as their --dtype (default "
                        "float32 for apply, the store's dtype for export, the inputs' for "
                        "import)")
    p.add_argument("--rows-per-file", type=int, metavar="N",
                   help="export: rows per Parquet file, as export --rows-per-file")
    p.add_argument("--no-diagnostics", action="store_true",
                   help="fit: without the Gram matrices, as fit --no-diagnostics")
    p.add_argument("--precision", choices=("auto", "float32", "float64"), default="auto",
                   help="fit: GEMM dtype, as fit --precision")
    p.add_argument("--block-mb", type=positive_float, default=DEFAULT_BLOCK_BYTES / 2**20,
                   metavar="MB", help="input megabytes per read (default 64), as --block-mb")
    p.add_argument("--workers", type=int, metavar="W",
                   help="Dask workers, for memory per worker and an estimated time")
    p.add_argument("--threads-per-worker", type=int, default=1, metavar="T",
                   help="threads per worker (default 1)")
    p.add_argument("--rate", type=float, metavar="ROWS_PER_S",
                   help="rows/s per core instead of the measured rates (time the real thing "
                        "on your cluster: a small fit prints its rows/s)")
    _add_storage_and_import_flags(p)
    p.add_argument("--json", action="store_true", help="print machine-readable JSON")
    add_storage_option(p)
    return {"plan": _plan}


def _add_storage_and_import_flags(p) -> None:
    """The flags of the storage bandwidth an estimate assumes, and of ``plan import``."""
    p.add_argument("--read-mb-s", type=positive_float, metavar="MB_PER_S",
                   help="storage read bandwidth per worker in MB/s (default: "
                        f"{READ_BYTES_PER_WORKER / 1e6:,.0f}, measured on a local disk by "
                        "benchmarks/io_rates.py)")
    p.add_argument("--write-mb-s", type=positive_float, metavar="MB_PER_S",
                   help="storage write bandwidth per worker in MB/s (default: "
                        f"{WRITE_BYTES_PER_WORKER / 1e6:,.0f}, measured as --read-mb-s)")
    p.add_argument("--max-read-gb-s", type=positive_float, metavar="GB_PER_S",
                   help="the most the storage reads for the whole cluster, GB/s (default: "
                        "no ceiling but the workers')")
    p.add_argument("--max-write-gb-s", type=positive_float, metavar="GB_PER_S",
                   help="the most the storage writes for the whole cluster, GB/s")
    p.add_argument("--files", metavar="N",
                   help="import from shapes: the number of input files (default 1), of "
                        "equal rows")
    p.add_argument("--format", choices=("parquet", "npy"), default="parquet",
                   help="import from shapes: the files' format (default parquet)")
    p.add_argument("--row-group-rows", default="262144", metavar="N",
                   help="import from shapes: rows per Parquet row group (default 262,144, "
                        "polars' default)")
    p.add_argument("--ids", choices=("int64", "string"),
                   help="import from shapes: the ids the files hold (default: none)")
    p.add_argument("--ids-column", metavar="COL",
                   help="import from files: the Parquet id column, as import --ids-column")
    p.add_argument("--vector-column", metavar="COL",
                   help="import from files: the Parquet vector column, as import "
                        "--vector-column")


def _count(text: str, what: str) -> int:
    try:
        value = float(str(text).replace("_", ""))
    except ValueError:
        raise InputError(f"{what} {text!r}: expected a number of rows, e.g. 1e9") from None
    if value < 1 or value != int(value):
        raise InputError(f"{what} {text!r}: expected a positive whole number")
    return int(value)


def _pair(text, what: str, default=None) -> tuple:
    if text is None:
        return (default, default)
    parts = [_count(t, what) for t in str(text).split(",") if t.strip()]
    if not 1 <= len(parts) <= 2:
        raise InputError(f"{what} {text!r}: expected one or two comma-separated numbers")
    return (parts[0], parts[-1])


class _Input:
    """What the planner needs of an input: rows, dim, itemsize, (inner) chunk and shard."""

    def __init__(self, rows, dim, itemsize, chunk, shard):
        self.rows, self.dim, self.itemsize = rows, dim, itemsize
        self.chunk, self.shard = chunk, shard

    @classmethod
    def of(cls, emb) -> "_Input":
        return cls(emb.rows, emb.dim, emb.dtype.itemsize, emb.read_step, emb.shard_rows)


def _synthetic(args, sides: int) -> list[_Input]:
    import numpy as np  # not at import time: --help needs none

    if args.rows is None or args.dims is None:
        raise InputError("plan without inputs needs --rows N and --dims D[,D2]")
    rows = _count(args.rows, "--rows")
    dims = _pair(args.dims, "--dims")
    item = np.dtype(args.dtype).itemsize
    chunks = _pair(args.chunk_rows, "--chunk-rows")
    shards = _pair(args.shard_rows, "--shard-rows")
    out = []
    for i in range(sides):
        chunk = chunks[i] or max(1, (16 * 2**20) // (dims[i] * item))
        shard = shards[i]
        if shard and shard % chunk:
            raise InputError(f"--shard-rows {shard} is not a multiple of the chunk rows {chunk}")
        out.append(_Input(rows, dims[i], item, chunk, shard))
    return out, dims


def _open(url, side, so):
    from ..storage.stores import open_embeddings
    return open_embeddings(url, side=side, storage_options=so, check_chunks=False)


def _rows(args, n: int) -> tuple[int, int]:
    from ..storage.stores import parse_rows
    return parse_rows(args.rows, n)


def _bandwidth(args) -> Bandwidth:
    """The storage bandwidth the estimate assumes: measured defaults, or the flags."""
    given = {k: getattr(args, k, None) for k in ("read_mb_s", "write_mb_s", "max_read_gb_s",
                                                 "max_write_gb_s")}
    if not any(v is not None for v in given.values()):
        return Bandwidth()
    mb = {k: v for k, v in (("read_per_worker", given["read_mb_s"]),
                            ("write_per_worker", given["write_mb_s"])) if v is not None}
    return Bandwidth(**{k: v * 1e6 for k, v in mb.items()},
                     max_read=given["max_read_gb_s"] and given["max_read_gb_s"] * 1e9,
                     max_write=given["max_write_gb_s"] and given["max_write_gb_s"] * 1e9,
                     source="given on the command line" + (
                         "" if len(mb) == 2 else "; the rest " + BANDWIDTH_SOURCE))


def _check_counts(args) -> None:
    for value, flag in ((args.workers, "--workers"), (args.threads_per_worker,
                                                      "--threads-per-worker"),
                        (args.rate, "--rate")):
        if value is not None and not value > 0:
            raise InputError(f"{flag} {value}: expected a positive number")


def _plan(args) -> int:
    so = storage_options(args)
    _check_counts(args)
    block = int(args.block_mb * 2**20)
    timing = dict(workers=args.workers, threads=args.threads_per_worker, rate=args.rate,
                  bandwidth=_bandwidth(args))
    planner = {"fit": _plan_fit, "apply": _plan_apply, "export": _plan_export,
               "import": _plan_import}[args.kind]
    plan, est = planner(args, so, block, timing)
    shown = getattr(plan, "regions", plan)  # an import: its regions (not every file's rows)
    est["plan"] = {k: v for k, v in shown.__dict__.items() if not k.startswith("_")}
    if args.json:
        print(json.dumps(json_safe(est), indent=2))
    else:
        print(describe(est))
    return 0


def _plan_fit(args, so, block: int, timing: dict):
    """(plan, estimate) of ``bigalign fit``: from SOURCE TARGET's metadata or shapes."""
    source_note = "shapes given on the command line"
    if args.inputs:
        if len(args.inputs) != 2:
            raise InputError("plan fit takes SOURCE TARGET (or none, with --rows/--dims)")
        from ..storage.embedding_store import store_parts
        from ..storage.stores import validate_pair
        (src_url, src_ids, _), (tgt_url, tgt_ids, _) = (store_parts(i, so)
                                                        for i in args.inputs)
        src = _Input.of(_open(src_url, "source", so))
        tgt = _Input.of(_open(tgt_url, "target", so))
        if src.rows != tgt.rows and src_ids is not None and tgt_ids is not None:
            raise InputError(
                f"source has {src.rows:,} rows but target has {tgt.rows:,}: 'bigalign "
                "fit' pairs these stores by id, but plan reads metadata only and cannot "
                "match ids. Plan it from shapes instead: bigalign plan fit --rows N "
                f"--dims {src.dim},{tgt.dim}, with N the matched pairs (at most "
                f"{min(src.rows, tgt.rows):,}; a fit logs how many it paired)")
        validate_pair(src, tgt)
        start, stop = _rows(args, src.rows)
        source_note = f"metadata of {args.inputs[0]} and {args.inputs[1]}"
    else:
        (src, tgt), _ = _synthetic(args, 2)
        start, stop = 0, src.rows
    dims, items = (src.dim, tgt.dim), (src.itemsize, tgt.itemsize)
    gram = not args.no_diagnostics or src.dim > tgt.dim
    work = 8 if args.precision == "float64" or (args.precision == "auto" and 8 in items) \
        else 4
    plan = make_fit_plan(start, stop, (src.shard or src.chunk, tgt.shard or tgt.chunk),
                         dims, items, gram, block, read_steps=(src.chunk, tgt.chunk))
    est = estimate_fit(plan, dims, items, gram, (src.chunk, tgt.chunk),
                       (src.shard, tgt.shard), work, **timing)
    est["gram"] = gram
    est["from"] = source_note
    return plan, est


def _apply_source(args, so):
    """(source, output dimension, first, last, output chunk rows given, ids, note) of
    ``plan apply`` with inputs: TRANSFORM SOURCE, or SOURCE with --dims."""
    if len(args.inputs) not in (1, 2):
        raise InputError("plan apply takes TRANSFORM SOURCE (or SOURCE with --dims, "
                         "or none with --rows/--dims)")
    from ..commands.parquet_export import ids_kind
    from ..storage.embedding_store import store_parts
    url, source_ids, _ = store_parts(args.inputs[-1], so)
    src = _Input.of(_open(url, "source", so))
    ids = None
    if url != args.inputs[-1]:  # a store: the output is a store with ids too
        ids = (ids_kind(source_ids), source_ids is not None)
    if len(args.inputs) == 2:
        import zarr
        try:
            shape = zarr.open_group(args.inputs[0], mode="r", storage_options=(
                options_for(args.inputs[0], so)))["rotation"].shape
        except Exception as e:
            raise InputError(f"transform {args.inputs[0]!r}: cannot read its "
                             f"rotation's shape ({e})") from None
        dim_b = int(shape[1])
    elif args.dims:
        dim_b = _pair(args.dims, "--dims")[1]
    else:
        raise InputError("plan apply SOURCE needs the transform (TRANSFORM SOURCE) "
                         "or --dims D,D2 for the output dimension")
    first, last = _rows(args, src.rows)
    user_chunk = _count(args.chunk_rows, "--chunk-rows") if args.chunk_rows else None
    return src, dim_b, first, last, user_chunk, ids, f"metadata of {', '.join(args.inputs)}"


def _plan_apply(args, so, block: int, timing: dict):
    """(plan, estimate) of ``bigalign apply``: from the inputs' metadata or shapes."""
    import numpy as np  # not at import time: --help needs none

    item_out = np.dtype(args.out_dtype or "float32").itemsize
    if args.inputs:
        src, dim_b, first, last, user_chunk, ids, note = _apply_source(args, so)
    else:
        (src,), dims = _synthetic(args, 1)
        dim_b, ids, note = dims[1], None, "shapes given on the command line"
        first, last, user_chunk = 0, src.rows, None
    out_chunk, out_shard = output_layout(src.chunk, src.shard, dim_b, item_out, user_chunk)
    row_bytes = src.dim * src.itemsize + dim_b * item_out
    plan = make_apply_plan(last - first, out_chunk, src.shard or src.chunk, row_bytes,
                           block, offset=first, shard_rows=out_shard,
                           source_read_step=src.chunk)
    est = estimate_apply(plan, (src.dim, dim_b), src.itemsize, item_out, src.chunk,
                         src.shard, out_chunk, out_shard, ids=ids, **timing)
    est["from"] = note
    return plan, est


def _plan_import(args, so, block: int, timing: dict):
    """(plan, estimate) of ``bigalign import``: the plan the import makes
    (:func:`bigalign.commands.ingest.plan_import`) from the files' metadata (their
    footers and headers; no vector is read), or from --rows/--files/--dims (files of
    equal rows, Parquet of --row-group-rows row groups or .npy)."""
    import numpy as np  # not at import time: --help needs none

    from ..commands.ingest import plan_import
    from ..planning.import_plan import choose_chunk_rows, make_import_plan

    chunk = _count(args.chunk_rows, "--chunk-rows") if args.chunk_rows else None
    if args.inputs:
        from ..commands.ingest import expand_inputs, probe_all

        files = probe_all(expand_inputs(args.inputs, so), ids_column=args.ids_column,
                          vector_column=args.vector_column)
        plan, dtype, ids = plan_import(files, chunk_rows=chunk, dtype=args.out_dtype,
                                       block_bytes=block)
        filled = [f for f in files if f.rows]
        fmt = "parquet" if any(f.format == "parquet" for f in filled) else "direct"
        dim, item_in = filled[0].dim, max(np.dtype(f.dtype).itemsize for f in filled)
        note = f"metadata of {len(files):,} file{'s' * (len(files) != 1)}"
    else:
        if args.dims and "," in str(args.dims):
            raise InputError(f"--dims {args.dims}: an import writes one dimension; give one")
        (src,), _ = _synthetic(args, 1)
        n_files = _count(args.files or 1, "--files")
        if n_files > src.rows:
            raise InputError(f"--files {n_files:,}: more files than the {src.rows:,} rows")
        dim, item_in, fmt = src.dim, src.itemsize, args.format
        dtype = np.dtype(args.out_dtype or args.dtype)
        ids = args.ids
        q, r = divmod(src.rows, n_files)
        file_rows = [q + (i < r) for i in range(n_files)]
        group = _count(args.row_group_rows, "--row-group-rows")
        groups = [None] * n_files if fmt != "parquet" else \
            [(group,) * (n // group) + ((n % group,) if n % group else ()) for n in file_rows]
        plan = make_import_plan(file_rows, dim * dtype.itemsize, chunk or choose_chunk_rows(
            dim, dtype.itemsize, src.rows), block, groups)
        note = "shapes given on the command line"
    est = estimate_import(plan, dim, item_in, dtype.itemsize, ids, fmt, **timing)
    est.update({"from": note, "ids": ids or "none", "dtype": dtype.name})
    return plan, est


def _plan_export(args, so, block: int, timing: dict):
    """(plan, estimate) of ``bigalign export STORE --format parquet``: the same plan the
    export makes (:func:`bigalign.planning.plan.make_export_plan`, same row bytes)."""
    import numpy as np  # not at import time: --help needs none

    if args.inputs:
        if len(args.inputs) != 1:
            raise InputError("plan export takes STORE (or none, with --rows/--dims)")
        from ..commands.parquet_export import ids_kind, open_source
        emb, ids, _ = open_source(args.inputs[0], so, False)
        src = _Input.of(emb)
        start, stop = _rows(args, src.rows)
        kind, stored, dtype = ids_kind(ids), ids is not None, emb.dtype
        note = f"metadata of {args.inputs[0]}"
    else:
        if args.dims and "," in str(args.dims):
            raise InputError(f"--dims {args.dims}: an export writes one store's vectors; give "
                             "one dimension")
        (src,), _ = _synthetic(args, 1)
        start, stop = 0, src.rows
        kind, stored, dtype = "int64", False, np.dtype(args.dtype)
        note = "shapes given on the command line"
    out = np.dtype(args.out_dtype) if args.out_dtype else np.dtype(dtype)
    try:
        plan = make_export_plan(start, stop, src.shard or src.chunk,
                                export_row_bytes(src.dim, out.itemsize, kind),
                                read_step=src.chunk, rows_per_file=args.rows_per_file)
    except ValueError as e:
        raise InputError(f"--rows-per-file: {e}") from None
    est = estimate_export(plan, src.dim, src.itemsize, out.itemsize, kind, stored, src.chunk,
                          src.shard, **timing)
    est.update({"from": note, "ids": kind if stored else "row numbers (int64)",
                "dtype": out.name})
    return plan, est


def _b(n: float) -> str:
    """Bytes in the largest unit that keeps the number >= 1 (decimal: as storage bills)."""
    for unit, size in (("PB", 1e15), ("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n:,.0f} B"


def _gib(n: float) -> str:
    return f"{n / 2**30:,.2f} GiB" if n >= 2**28 else f"{n / 2**20:,.0f} MiB"


def _n(x) -> str:
    return f"{x:,}"


def _t(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:,.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:,.0f} min"
    if seconds < 3 * 86400:
        return f"{seconds / 3600:,.1f} h"
    return f"{seconds / 86400:,.1f} days"


def _gets(r: dict) -> str:
    """The reading requests of an estimate's ``requests``."""
    return f"{_n(r['chunk_gets'])} chunk GETs" + (
        f" + {_n(r['shard_index_gets'])} shard-index GETs" if r["shard_index_gets"] else "")


def _renewals(r: dict) -> str:
    return f"; ~{_n(r['lease_renewals'])} for lease renewals" if "lease_renewals" in r else ""


def _fit_lines(est: dict) -> list[str]:
    r, c = est["requests"], est["checkpoint"]
    return [
        f"  tasks             {_n(est['tasks'])}: {_n(est['leaf_tasks'])} reading tasks of "
        f"{_n(est['rows_per_task'])} rows ({_b(est['input_bytes_per_task'])} of input), "
        f"{_n(est['merge_tasks'])} merges (fan-in {est['fan_in']}"
        f"{', Gram matrices on' if est.get('gram') else ''})",
        f"  reads             {_n(est['rows_per_read'])} rows at a time (whole chunks)",
        f"  checkpoint        {_n(c['units'])} units of {_n(c['blocks_per_unit'])} tasks: "
        f"{_n(c['files'])} files, {_b(c['bytes_written'])} written "
        f"({100 * c['fraction_of_input']:.2f} % of the input; 2 % budget" + (
            ", but a job saves at least one unit)" if c["fraction_of_input"] > 0.02
            and c["units"] == 1 else ")"),
        f"  bytes read        {_b(est['bytes_read'])}",
        f"  bytes written     {_b(est['bytes_written'])} (checkpoint units and the transform)",
        f"  storage requests  {_gets(r)}; {_n(r['checkpoint_puts'])} unit PUTs, each "
        "after a fence check (LIST + GET); "
        f"resume reads {_n(r['resume_list_pages'])} listing page(s)" + _renewals(r),
    ]


def _export_lines(est: dict) -> list[str]:
    r, c = est["requests"], est["checkpoint"]
    return [
        f"  files             {_n(est['files'])} Parquet file"
        f"{'s' * (est['files'] != 1)} of up to {_n(min(est['rows_per_file'], est['rows']))} "
        f"rows (~{_b(est['bytes_per_file'] * min(1.0, est['rows'] / est['rows_per_file']))}"
        f" each; ids: {est['ids']}, vectors "
        f"{est['dtype']}), one task each, written in row groups of "
        f"{_n(est['rows_per_group'])} rows; {_n(est['count_tasks'])} count tasks",
        f"  checkpoint        {_n(c['markers'])} done-markers (one per file); resume and "
        f"verify read {_n(c['list_pages'])} listing page(s)",
        f"  bytes read        {_b(est['bytes_read'])}",
        f"  bytes written     {_b(est['bytes_written'])} (before Parquet compression)",
        f"  storage requests  {_gets(r)}; {_n(r['file_puts'])} file uploads; "
        f"{_n(r['marker_puts'])} marker PUTs; "
        f"{_n(r['fence_checks'])} fence checks" + _renewals(r),
    ]


def _apply_lines(est: dict) -> list[str]:
    r, c, o = est["requests"], est["checkpoint"], est["output"]
    shard = f", shards of {_n(o['shard_rows'])} rows" if o["shard_rows"] else ""
    return [
        f"  tasks             {_n(est['tasks'])}: {_n(est['region_tasks'])} regions of "
        f"{_n(est['rows_per_task'])} rows, written {_n(est['rows_per_write'])} rows at a "
        f"time from reads of {_n(est['rows_per_read'])}; {_n(est['count_tasks'])} "
        "count tasks (fan-in 32)",
        f"  output            chunks of {_n(o['chunk_rows'])} rows{shard}" + (
            f"; a store: ids ({est['ids']}) written with the rows" if "ids" in est else ""),
        f"  checkpoint        {_n(c['markers'])} done-markers (one per region); resume, "
        f"verify and status read {_n(c['list_pages'])} listing page(s), no marker files",
        f"  bytes read        {_b(est['bytes_read'])}",
        f"  bytes written     {_b(est['bytes_written'])}",
        f"  storage requests  {_gets(r)}; {_n(r['output_puts'])} output PUTs; " + (
            f"{_n(r['ids_gets'])} ids GETs and {_n(r['ids_puts'])} ids PUTs; "
            if "ids_puts" in r else "") +
        f"{_n(r['marker_puts'])} marker PUTs; "
        f"{_n(r['fence_checks'])} fence checks (LIST + GET each)" + _renewals(r),
    ]


def _import_lines(est: dict) -> list[str]:
    r, c, o = est["requests"], est["checkpoint"], est["output"]
    fmt = "Parquet" if est["format"] == "parquet" else ".npy/.fvecs"
    return [
        f"  tasks             {_n(est['tasks'])}: {_n(est['unit_tasks'])} tasks over "
        f"{_n(est['regions'])} regions of {_n(est['rows_per_region'])} rows (a task streams "
        f"a run of regions: about a row group or file), written {_n(est['rows_per_write'])} "
        f"rows at a time; {_n(est['count_tasks'])} count tasks (fan-in 32)",
        f"  inputs            {_n(est['files'])} {fmt} file{'s' * (est['files'] != 1)}; "
        f"ids: {est['ids']}",
        f"  output            a store of {est['dtype']}, chunks of {_n(o['chunk_rows'])} rows",
        f"  checkpoint        {_n(c['markers'])} done-markers (one per region); resume, "
        f"verify and status read {_n(c['list_pages'])} listing page(s), no marker files",
        f"  bytes read        {_b(est['bytes_read'])}",
        f"  bytes written     {_b(est['bytes_written'])}",
        f"  storage requests  {_n(r['output_puts'])} output PUTs; "
        f"{_n(r['marker_puts'])} marker PUTs; "
        f"{_n(r['fence_checks'])} fence checks (LIST + GET each)" + _renewals(r),
    ]


def _per_s(n: float) -> str:
    return f"{_b(n)}/s"


def _time_lines(est: dict) -> list[str]:
    """Memory, the rates assumed (compute and storage) and the estimated time."""
    m, rate, bw = est["memory"], est["rate"], est["bandwidth"]
    lines = [f"  memory            ~{_gib(m['per_thread'])} per thread; "
             f"~{_gib(m['per_worker'])} per worker with {m['threads_per_worker']} "
             f"thread(s)" + (f"; the client holds ~{_gib(m['client'])}" if m["client"]
                             else ""),
             f"  rate              {_n(round(rate['rows_per_second_per_core']))} rows/s per "
             f"core ({rate['source']})"]
    ceilings = "".join(f"; at most {_per_s(bw[k])} {what} in all" for k, what in
                       (("max_read", "read"), ("max_write", "written")) if bw[k])
    lines.append(f"  storage           {_per_s(bw['read_per_worker'])} read and "
                 f"{_per_s(bw['write_per_worker'])} written per worker{ceilings} "
                 f"({bw['source']})")
    if "time" not in est:
        return lines + ["  estimated time    pass --workers W [--threads-per-worker T]"]
    t = est["time"]
    what = {"compute": "computing", "read": "reading", "write": "writing"}[t["bound"]]
    return lines + [
        f"  estimated time    {_t(t['seconds'])} on {_n(t['workers'])} workers x "
        f"{t['threads_per_worker']} threads ({_n(t['cores'])} cores), bound by {what}: "
        f"compute {_t(t['compute_seconds'])}, reads {_t(t['read_seconds'])} at "
        f"{_per_s(t['read_bytes_per_second'])}, writes {_t(t['write_seconds'])} at "
        f"{_per_s(t['write_bytes_per_second'])}; {_t(t['serial_seconds'])} if nothing "
        "overlaps"]


def describe(est: dict) -> str:
    """The text ``bigalign plan`` prints for an estimate of :mod:`bigalign.planning.estimates`."""
    dims = "x".join(map(str, est["dims"])) if est["kind"] != "fit" else \
        f"{est['dims'][0]} -> {est['dims'][1]}"
    lines = [f"bigalign plan {est['kind']}: {_n(est['rows'])} rows, {dims} dims "
             f"(from {est['from']})"]
    body = {"fit": _fit_lines, "export": _export_lines, "import": _import_lines}
    lines += body.get(est["kind"], _apply_lines)(est)
    return "\n".join(lines + _time_lines(est))
