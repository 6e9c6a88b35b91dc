"""Command line for ``bigalign export``: a transform as plain arrays (npz, JSON,
safetensors), or an embedding store's vectors out to Parquet files.

Thin: parse, call :func:`bigalign.commands.map_export.export` (or
:func:`bigalign.commands.parquet_export.export_parquet`), print what was written to stdout;
log lines go to stderr. Bad input raises :class:`bigalign.InputError` (exit code 2). See
docs/transforms.md.
"""

from __future__ import annotations

import argparse
import json
from typing import Optional

from .common import (_print_json, _run_args, _run_details, add_storage_option, models_text,
                     requests, storage_options)
from ..errors import InputError
from ..words import counted
from ..storage.parquet_folder import BAD_ROWS, COMPRESSIONS

EXPORT_DESCRIPTION = """\
Two uses, told apart by SOURCE:

A transform: write its map in both directions as plain arrays: 'forward' (source -> target,
old -> new model: for documents) and, where one exists, 'inverse' (target -> source, new ->
old: for queries in a dual-read). Each direction is matrix M = scale * rotation,
source_mean, target_mean and a normalize flag; y = (normalize(x) - source_mean) @ M +
target_mean reproduces 'bigalign apply' / Transform.transform. The inverse is exact when
dA == dB, a left inverse (a projection onto the fitted subspace) when dA < dB, and left out
with the reason recorded when it would be lossy (dA > dB, or a --normalize fit) unless
--allow-lossy. Written under a temporary name and renamed into place.

An embedding store or a bare (N, d) Zarr array, with --format parquet: write its vectors to
the folder OUTPUT as Parquet files part-00000.parquet, ... (one per task, ~256 MB each,
ready for a vector database's bulk loader) with an id column (the store's ids, int64 or
string; row numbers for a bare array) and a fixed-size list column of d floats, and last
the manifest OUTPUT/_bigalign_export.json that says the export is complete. Runs in
parallel as a checkpointed job: a killed export resumes when rerun with the same command
(writing only the missing files), and a rerun of a finished one does nothing. OUTPUT must
be absent, empty or an earlier export: a folder holding other files is refused, even with
--overwrite (which removes only the files bigalign wrote). An interrupted export leaves its
parts under OUTPUT/_in_progress/ (no glob of OUTPUT/*.parquet sees them) until the last
step moves them into OUTPUT and writes OUTPUT/_SUCCESS and the manifest.

With --format lance (needs pylance: pip install 'bigalign[lance]'): write them as the Lance
dataset OUTPUT (a folder, conventionally DATASET.lance: what LanceDB serves from) with the
same two columns and the model stamp in its schema metadata. Tasks write Lance fragments;
the last step commits them all as the dataset's first version, so an interrupted export is
never a readable dataset; a rerun resumes the same way."""

EXPORT_EPILOG = """\
examples:
  bigalign export old2new.transform -o old2new.npz
  bigalign export corpus.store --format parquet -o corpus.parquet
  bigalign export corpus.store --format parquet -o s3://bucket/corpus/ --dtype float16
  bigalign export corpus.store --format lance -o lancedb/corpus.lance

Transforms at query time, with the numpy lines that apply an export: docs/transforms.md"""

#: Options of one use that the other refuses (the argparse dest, and the flag).
_PARQUET_ONLY = (("ids_column", "--ids-column"), ("vector_column", "--vector-column"),
                 ("rows", "--rows"), ("rows_per_file", "--rows-per-file"),
                 ("compression", "--compression"), ("bad_rows", "--bad-rows"))
_TRANSFORM_ONLY = (("no_inverse", "--no-inverse"), ("allow_lossy", "--allow-lossy"))


def add_output_args(p, what: str) -> None:
    p.add_argument("-o", "--output", required=True, help=what)
    p.add_argument("--overwrite", action="store_true",
                   help="replace an existing output written by bigalign (never anything "
                        "else); a rerun with the same inputs and options is a no-op anyway")
    add_storage_option(p)
    p.add_argument("-q", "--quiet", action="store_true",
                   help="print nothing but warnings and errors (on stderr): no summary on "
                        "stdout")



def add_commands(sub) -> dict:
    """Register ``export`` on the argparse ``sub`` parsers; return {name: handler(args)}."""
    e = sub.add_parser(
        "export", help="write a transform as plain arrays (npz, JSON, safetensors), or an "
                       "embedding store's vectors as Parquet files or a Lance dataset for a "
                       "vector database",
        description=EXPORT_DESCRIPTION, epilog=EXPORT_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    e.add_argument("source", metavar="SOURCE",
                   help="a transform saved by 'bigalign fit' (or compose/invert), or an "
                        "embedding store / (N, d) Zarr array with --format parquet or lance")
    e.add_argument("-o", "--output", required=True,
                   help="the file to write (a transform: .npz, .json or .safetensors; .npy "
                        "gets the npz archive, which np.load reads), the folder of Parquet "
                        "files (--format parquet) or the Lance dataset folder (--format "
                        "lance)")
    e.add_argument("--format", choices=("npz", "npy", "json", "safetensors", "parquet",
                                        "lance"),
                   help="a transform: npz (alias npy), numpy's archive of arrays; json, plain "
                        "lists (about 20 bytes a number: ~700 MB at d = 4096); safetensors, "
                        "raw tensors with a JSON header; default: from the output's suffix. "
                        "A store or array: parquet or lance (required)")
    e.add_argument("--dtype", choices=("float16", "float32", "float64"),
                   help="a transform: float64 (default, exact) or float32 (half the size, "
                        "equal to apply's float32 arithmetic); not float16. Parquet, Lance: the "
                        "vectors' dtype, any of the three (default: the source's)")
    g = e.add_argument_group("transforms")
    g.add_argument("--no-inverse", action="store_true",
                   help="write the forward direction only")
    g.add_argument("--allow-lossy", action="store_true",
                   help="also write the inverse when it is only a pseudo-inverse (dA > dB: "
                        "the map lost dims; --normalize fits: the norm is lost)")
    g = e.add_argument_group("vectors (--format parquet or lance)")
    g.add_argument("--ids-column", metavar="NAME",
                   help="name of the id column (default: id): the store's ids, int64 or "
                        "string; row numbers (int64) for a bare array or a store without ids")
    g.add_argument("--vector-column", metavar="NAME",
                   help="name of the vector column (default: embedding), a fixed-size list "
                        "of d floats")
    g.add_argument("--rows", metavar="START:STOP",
                   help="export only these source rows (negative values count from the end; "
                        "write --rows=-1000: for a leading minus)")
    g.add_argument("--rows-per-file", type=int, metavar="N",
                   help="rows per file (Lance: per fragment), a multiple of the source's "
                        "chunk rows (default: whole chunks making about 256 MB per file)")
    g.add_argument("--bad-rows", choices=BAD_ROWS, default=None,
                   help="a row a vector database cannot index: NaN/Inf (what 'apply "
                        "--bad-rows nan' writes for its bad rows) or, in the output of "
                        "'apply --bad-rows zero', all zeros. fail (default): stop at the "
                        "first and name it; skip: leave them out of the files and list their "
                        "row numbers in the manifest's bad_rows")
    g.add_argument("--compression", choices=tuple(COMPRESSIONS),
                   help="Parquet compression (default snappy: as fast as none, read by "
                        "every loader; zstd is ~9%% smaller and ~1.4x slower to write)")
    _run_args(e)
    for action in e._actions:  # no GEMM to put on a GPU; a file, not a block, is a task
        if action.dest in ("device", "block_mb"):
            action.help = argparse.SUPPRESS
    return {"export": _export}


def _export(args) -> int:
    """A transform to plain arrays, or a store's vectors to Parquet: by what SOURCE is."""
    from ..storage.outputs import inspect

    so = storage_options(args)
    kind = inspect(args.source, so).kind
    if kind == "absent":
        raise InputError(f"no transform, embedding store or Zarr array at {args.source!r}")
    is_transform = kind in ("transform", "partial-transform")
    if args.format in ("parquet", "lance") or not is_transform:
        if is_transform:
            raise InputError(f"{args.source!r} is a transform, which has no vectors to write "
                             f"as {args.format}: export it with --format npz, json or "
                             "safetensors")
        if args.format not in ("parquet", "lance"):
            raise InputError(f"{args.source!r} is not a transform (an embedding store or a "
                             "Zarr array): its vectors export as Parquet files or a Lance "
                             f"dataset, 'bigalign export {args.source} --format parquet -o "
                             f"DIR' or '--format lance -o DATASET.lance'")
        _refuse(args, _TRANSFORM_ONLY, "a transform export")
        if args.format == "lance":
            _refuse(args, (("compression", "--compression"),), "--format parquet")
        return _export_vectors(args)
    _refuse(args, _PARQUET_ONLY, "--format parquet or lance")
    return _export_transform(args, so)


def _refuse(args, options, belongs_to: str) -> None:
    given = [flag for dest, flag in options if getattr(args, dest) not in (None, False)]
    if given:
        raise InputError(f"{', '.join(given)}: only for {belongs_to}")


def _export_vectors(args) -> int:
    common = requests(args)
    kw = dict(ids_column=args.ids_column or "id",
              vector_column=args.vector_column or "embedding", dtype=args.dtype,
              rows=args.rows, rows_per_file=args.rows_per_file,
              bad_rows=args.bad_rows or "fail", **common)
    if args.format == "lance":
        from ..commands.lance_export import export_lance, export_manifest

        r = export_lance(args.source, args.output, **kw)
    else:
        from ..commands.parquet_export import export_manifest, export_parquet

        r = export_parquet(args.source, args.output, compression=args.compression or "snappy",
                           **kw)
    m = export_manifest(args.output, common["storage_options"]) or {}
    files = m.get("files", [])
    size = sum(f.get("bytes", 0) for f in files) or \
        sum(b for f in files for _, b in f.get("data", []))
    if args.json:
        _print_json({"kind": f"{args.format or 'parquet'}-export", "path": args.output, "complete": True,
                     "already_complete": r.already_complete, "rows": r.rows_total,
                     "rows_written": r.rows, "files": len(files), "bytes": size,
                     "bad_rows": (m.get("bad_rows") or {}).get("count", 0),
                     "files_resumed": r.units_resumed, "seconds": r.seconds,
                     "rows_per_second": r.rows_per_second, "tasks": r.tasks,
                     "columns": {m.get("ids_column"): m.get("ids"),
                                 m.get("vector_column"): f"{m.get('dtype')}[{m.get('dim')}]"}})
    elif not args.quiet:
        if r.already_complete:  # said on stderr by the export's warning: once is enough
            return 0
        resumed = f"{r.units_resumed} of {counted(r.units_total, 'file')} were already " \
            "written" \
            if r.units_resumed else ""
        left_out = (m.get("bad_rows") or {}).get("count", 0)
        rows = f"{counted(r.rows_total - left_out, 'row')} ({counted(left_out, 'bad row')} " \
            "left out, listed in the manifest's bad_rows)" if left_out else \
            counted(r.rows_total, "row")
        print(f"wrote {rows} to {args.output} as {_files(len(files), args.format)} "
              f"({size / 2**20:,.1f} MiB; columns {m.get('ids_column')}: {m.get('ids')}, "
              f"{m.get('vector_column')}: {m.get('dtype')}[{m.get('dim')}]) in "
              f"{r.seconds:.1f}s{_run_details(r, resumed)}; "
              + (f"committed as Lance version {m.get('lance_version')}; " if
                 args.format == "lance" else "")
              + "marked complete in _bigalign_export.json")
    return 0


def _files(n: int, fmt: Optional[str] = None) -> str:
    what = "fragment of a Lance dataset" if fmt == "lance" else "Parquet file"
    if n != 1:
        what = what.replace("fragment", "fragments") if fmt == "lance" else what + "s"
    return f"{n:,} {what}"


def _export_transform(args, so) -> int:
    from ..commands.map_export import SNIPPETS, export  # numpy, Zarr: not for --help

    r = export(args.source, args.output, args.format, dtype=args.dtype or "float64",
               inverse=not args.no_inverse, allow_lossy=args.allow_lossy,
               overwrite=args.overwrite, storage_options=so)
    d_a, d_b = r.dims
    if args.json:
        _print_json({"kind": "transform-export", "path": args.output, "format": r.format,
                     "dtype": r.dtype, "bytes": r.bytes, "dims": [d_a, d_b],
                     "inverse": r.inverse, "inverse_omitted": r.inverse_omitted,
                     "already_complete": r.nothing_to_do})
        return 0
    if args.quiet:
        return 0
    head = "already there, nothing to do:" if r.nothing_to_do else "wrote"
    print(f"{head} {args.output} ({r.format}, {r.dtype}, {r.bytes:,} bytes{models_text(r.metadata)})")
    print(f"  forward: {d_a} -> {d_b} (old -> new: documents)")
    if r.inverse:
        print(f"  inverse: {d_b} -> {d_a} (new -> old: queries), "
              f"{r.metadata['inverse']['meaning']}")
    else:
        print(f"  inverse: none ({r.inverse_omitted})")
    snippet, placeholder = SNIPPETS[r.format]
    snippet = snippet.replace(json.dumps(placeholder), json.dumps(str(args.output)))
    snippet = snippet.replace(placeholder, str(args.output)).replace(
        "old2new.transform", str(args.source))
    print("apply it with plain numpy (x: rows of the source model):\n")
    print("\n".join(("    " + line).rstrip() for line in snippet.splitlines()))
    return 0


__all__ = ["add_commands", "add_output_args"]
