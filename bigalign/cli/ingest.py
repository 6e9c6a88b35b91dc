"""Command line for ``bigalign import``: files of vectors into an embedding store.

Thin, like cli.py: parse, call :func:`bigalign.commands.ingest.import_vectors`, print a summary to
stdout; log lines (and the progress bar) go to stderr. Bad input raises
:class:`bigalign.InputError` (exit code 2), naming the file and the row.
"""

from __future__ import annotations

import argparse

from ..words import counted
from .common import _print_json, _run_args, _run_details, positive_int, requests

DESCRIPTION = """\
Import vectors into an embedding store: a Zarr group holding 'embeddings' (N x d, chunked by
whole rows), optionally 'ids' (N, int64 or string) and a 'model' attribute. Inputs are
.npy (2-D; memory-mapped, so files larger than RAM work), .fvecs, or Parquet (one list or
array column of numbers per row, and optionally an id column), given as files or globs and
imported in the order given (a glob's matches in lexicographic order). Runs out of core in
parallel; a killed import resumes when rerun with the same command, and a rerun of a
finished one does nothing. Every file is checked before the import starts (dimensions,
types, columns); bad rows (ragged or null vectors, NaN/Inf) stop it with an error naming
the file and the row (0-based)."""

EPILOG = """\
examples:
  bigalign import 'shards/part-*.parquet' -o corpus.store --ids-column doc_id --model e5-base-v2
  bigalign import base.fvecs -o sift.store --row-ids
  bigalign fit corpus_old.store/embeddings corpus_new.store/embeddings -o old2new.t"""


def add_commands(sub) -> dict:
    """Register ``import`` on the argparse ``sub`` parsers; return {name: handler(args)}."""
    p = sub.add_parser("import", help="import .npy, .fvecs or Parquet vectors into an "
                                      "embedding store",
                       description=DESCRIPTION, epilog=EPILOG,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="files or globs (quote globs), local paths or fsspec URLs")
    p.add_argument("-o", "--output", required=True, metavar="STORE",
                   help="the embedding store to create (a Zarr group)")
    p.add_argument("--ids-column", metavar="C",
                   help="Parquet column of row ids (integers or strings); without it the "
                        "store has no ids and row numbers are the ids")
    p.add_argument("--vector-column", metavar="V",
                   help="Parquet column of the vectors (default: the only list/array column "
                        "of numbers)")
    p.add_argument("--row-ids", action="store_true",
                   help="store the row numbers as int64 ids (any format)")
    p.add_argument("--model", metavar="NAME",
                   help="name of the model that embedded the vectors (stored as the 'model' "
                        "attribute)")
    p.add_argument("--chunk-rows", type=positive_int, metavar="N",
                   help="rows per stored chunk (default: about 32 MiB of vectors per chunk)")
    p.add_argument("--dtype", choices=("float16", "float32", "float64"),
                   help="stored dtype (default: the inputs' float dtype when they share "
                        "one, else float32)")
    _run_args(p)
    for action in p._actions:  # inputs are files, not Zarr arrays; no GEMM to put on a GPU
        if action.dest in ("allow_missing_chunks", "device"):
            action.help = argparse.SUPPRESS
    return {"import": _import}


def _import(args) -> int:
    from ..commands.ingest import import_vectors

    r = import_vectors(args.inputs, args.output, ids_column=args.ids_column,
                       vector_column=args.vector_column, row_ids=args.row_ids,
                       model=args.model, chunk_rows=args.chunk_rows, dtype=args.dtype,
                       **requests(args))
    if args.json:
        _print_json({"kind": "embedding-store", "path": args.output, "complete": True,
                     "already_complete": r.already_complete, "rows": r.rows_total,
                     "rows_written": r.rows, "regions_resumed": r.units_resumed,
                     "regions": r.units_total, "seconds": r.seconds,
                     "rows_per_second": r.rows_per_second, "tasks": r.tasks})
        return 0
    if args.quiet:
        return 0
    if r.already_complete:  # said on stderr by import's warning: once is enough
        return 0
    resumed = f"{r.units_resumed} of {counted(r.units_total, 'region')} were already done" \
        if r.units_resumed else ""
    print(f"imported {r.rows:,} rows into {args.output} in {r.seconds:.1f}s"
          f"{_run_details(r, resumed)}; {r.rows_total:,} rows in the store, "
          "marked complete")
    return 0
