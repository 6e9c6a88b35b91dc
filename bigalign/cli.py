"""Command line: parses, calls the API, prints. Exit codes: 0 success, 2 bad input or a
refused run (the message says what and where), 1 an unexpected error, 130 interrupted."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import warnings
from typing import Optional

from . import __version__

CENTER_HELP = ("remove each side's mean before fitting, and map (x - mean_src) Q + mean_tgt. "
               "Use it whenever a model's vectors share a common offset, which real models "
               "often do (e5 -> MiniLM recall@1: 0.27 uncentred, 0.90-0.97 centred); without "
               "it the rotation wastes itself aligning the offsets")


def _run_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("where it runs (default: threads in this process)")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--scheduler", metavar="ADDRESS",
                   help="address of a running dask.distributed scheduler (tcp://host:8786) or "
                        "its scheduler file (.json)")
    x.add_argument("--workers", type=int, metavar="N",
                   help="start a local cluster of N worker processes")
    g.add_argument("--memory-limit", metavar="SIZE", help="per worker with --workers, e.g. 4GiB")
    g.add_argument("--threads", type=int, metavar="N",
                   help="threads for the in-process default (default: one per core)")
    g.add_argument("--block-mb", type=float, default=64, metavar="MB",
                   help="input megabytes per task (default 64)")
    g.add_argument("--checkpoint", metavar="URL",
                   help="where progress is recorded (default: OUTPUT.checkpoint next to the output)")
    g.add_argument("--restart", action="store_true",
                   help="discard recorded progress instead of resuming")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output")
    g.add_argument("--allow-missing-chunks", action="store_true",
                   help="do not refuse inputs with unstored chunks (Zarr reads them as fill)")
    add_storage_option(g)
    g.add_argument("-q", "--quiet", action="store_true", help="no progress bar; only warnings (such as resuming) and errors")


def add_storage_option(parser) -> None:
    """The repeatable --storage-option KEY=VALUE of every command that opens URLs."""
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="fsspec storage option for URLs (repeatable), e.g. anon=true or "
                             "endpoint_url=http://127.0.0.1:9000")


def storage_options(args) -> Optional[dict]:
    """Parse --storage-option values: true/false/null (any case) and numbers become JSON
    values, anything else stays a string. None when none were given."""
    out = {}
    for item in args.storage_option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            from .errors import InputError
            raise InputError(f"--storage-option {item!r}: expected KEY=VALUE")
        try:
            out[key] = json.loads(value.lower() if value.lower() in ("true", "false", "null")
                                  else value)
            if not isinstance(out[key], (bool, int, float, type(None))):
                out[key] = value
        except ValueError:
            out[key] = value
    return out or None


def _common(args) -> dict:
    return dict(scheduler=args.scheduler, workers=args.workers, memory_limit=args.memory_limit,
                threads=args.threads, block_bytes=int(args.block_mb * 2**20),
                checkpoint=args.checkpoint, restart=args.restart, overwrite=args.overwrite,
                progress=not args.quiet, check_chunks=not args.allow_missing_chunks,
                storage_options=storage_options(args))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="bigalign",
        description="Align two embedding models with one orthogonal map (Procrustes), "
                    "streaming chunked Zarr arrays with Dask: fit on paired rows, apply to "
                    "corpora of any size.",
        epilog="Quick start: 'bigalign demo' runs the whole job on generated data.")
    p.add_argument("--version", action="version", version=f"bigalign {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    f = sub.add_parser(
        "fit", help="fit a transform from paired source/target rows",
        description="Fit Q minimising ||s (A - mean_A) Q - (B - mean_B)||_F over paired rows "
                    "(row i of SOURCE with row i of TARGET) in one streaming pass, then one "
                    "SVD. dA != dB works: with dA < dB the source is embedded isometrically in "
                    "a dA-dim subspace of the target space; with dA > dB it is projected to dB "
                    "dims (lossy). A killed fit resumes when rerun with the same command.")
    f.add_argument("source", help="Zarr array (N, dA) of source-model vectors (path or URL)")
    f.add_argument("target", help="Zarr array (N, dB) of target-model vectors, same rows")
    f.add_argument("-o", "--output", required=True, help="where to save the transform (Zarr group)")
    f.add_argument("--center", action="store_true", help=CENTER_HELP)
    f.add_argument("--normalize", action="store_true",
                   help="L2-normalise rows before fitting (and source rows at apply time)")
    f.add_argument("--scale", action="store_true", help="also fit a similarity scale s")
    f.add_argument("--no-reflection", action="store_true",
                   help="force det(Q) = +1, a proper rotation (equal dimensions only)")
    f.add_argument("--rows", metavar="START:STOP",
                   help="fit on this contiguous row range only (a training split)")
    f.add_argument("--no-diagnostics", action="store_true",
                   help="skip the Gram matrices A^T A, B^T B: about 2x faster, but no "
                        "dot-product discrepancy or bound in the metadata")
    f.add_argument("--precision", choices=("auto", "float32", "float64"), default="auto",
                   help="GEMM dtype per block; sums are float64 either way (default auto: "
                        "float64 only for float64 input)")
    f.add_argument("--keep-checkpoint", action="store_true",
                   help="keep per-unit statistics after success")
    _run_args(f)

    a = sub.add_parser(
        "apply", help="map every row of a source array into the target space",
        description="Write OUTPUT[i] = (SOURCE[i] - mean_A) s Q + mean_B for every row, one "
                    "task per whole-chunk region. OUTPUT is marked complete only after its "
                    "last region; a killed apply resumes when rerun with the same command.")
    a.add_argument("transform", help="a transform saved by 'bigalign fit'")
    a.add_argument("source", help="Zarr array (N, dA) to map")
    a.add_argument("-o", "--output", required=True, help="new Zarr array (N, dB)")
    a.add_argument("--dtype", choices=("float32", "float16", "float64"), default="float32",
                   help="output dtype (default float32)")
    a.add_argument("--renormalize", action="store_true", help="L2-normalise each output row")
    a.add_argument("--target-centred", action="store_true",
                   help="write (x - mean_A) s Q without + mean_B: vectors in the target's "
                        "centred space; search them among native target vectors minus the "
                        "transform's target_mean (better retrieval when the target model has "
                        "a large common offset)")
    a.add_argument("--compression", choices=("none", "lz4", "zstd"), default="none",
                   help="output compression (default none: embeddings compress ~1.05-1.1x and "
                        "zstd halves write speed)")
    a.add_argument("--chunk-rows", type=int, metavar="N",
                   help="rows per output chunk (default: the source's)")
    _run_args(a)

    i = sub.add_parser("info", help="describe a transform, an apply output or progress in flight")
    i.add_argument("path")
    i.add_argument("--json", action="store_true", help="print machine-readable JSON")
    add_storage_option(i)

    st = sub.add_parser("status", help="progress of a fit or apply in flight or interrupted",
                        description="Units done, rows/s and time left, read from the run's "
                                    "checkpoint (works from any machine that sees the storage). "
                                    "Exit code 0: finished; 3: unfinished (rerun to resume).")
    st.add_argument("path", help="the run's output (transform or apply output) or checkpoint")
    st.add_argument("--json", action="store_true", help="print machine-readable JSON")
    add_storage_option(st)

    d = sub.add_parser("demo", help="generate a paired corpus, fit, apply and check (the main "
                                    "job on an embedded default)")
    d.add_argument("--rows", type=int, default=1_000_000, help="pairs to generate (default 1e6)")
    d.add_argument("--dim", type=int, default=256, help="dimension (default 256)")
    d.add_argument("--workdir", help="keep the data here (default: a temporary directory)")
    d.add_argument("--workers", type=int, metavar="N",
                   help="use a local cluster of N worker processes instead of threads")
    d.add_argument("-q", "--quiet", action="store_true")

    from .cli_evaluate import add_commands
    COMMANDS.update(add_commands(sub))
    from .cli_import import add_commands as add_import; COMMANDS.update(add_import(sub))
    return p


def _fit(args) -> int:
    import bigalign

    t = bigalign.fit(args.source, args.target, output=args.output, center=args.center,
                     normalize=args.normalize, scale=args.scale,
                     reflection=not args.no_reflection, rows=args.rows,
                     diagnostics=not args.no_diagnostics, precision=args.precision,
                     keep_checkpoint=args.keep_checkpoint, **_common(args))
    print(_describe_transform(t, args.output))
    return 0


def _apply(args) -> int:
    import bigalign

    r = bigalign.apply(args.transform, args.source, args.output, dtype=args.dtype,
                       renormalize=args.renormalize, target_centred=args.target_centred,
                       compression=args.compression,
                       chunk_rows=args.chunk_rows, **_common(args))
    resumed = f", {r.units_resumed} of {r.units_total} regions were already done" \
        if r.units_resumed else ""
    print(f"wrote {r.rows:,} rows to {args.output} in {r.seconds:.1f}s "
          f"({r.rows_per_second:,.0f} rows/s{resumed}); marked complete")
    return 0


def _describe_transform(t, path) -> str:
    m = t.metadata
    lines = [f"transform {path}",
             f"  maps {t.dims[0]} -> {t.dims[1]} dims, fitted on {m.get('n_pairs', '?'):,} pairs "
             f"(rows {m.get('rows')})",
             "  options: " + ", ".join(f"{k}={v}" for k, v in t.options.items()),
             f"  scale {t.scale:.6g}; relative residual ||sAQ-B||^2/||B||^2 = "
             f"{m.get('relative_residual')}"]
    disc = m.get("discrepancy")
    if disc:
        lines.append(f"  dot-product discrepancy eps = {disc['epsilon']:.4g}; paper bound on "
                     f"||AQ-B||_F: {disc['bound_residual']:.4g} (achieved "
                     f"{disc.get('achieved_residual', float('nan')):.4g})")
    run = m.get("run")
    if run:
        lines.append(f"  fit took {run['seconds']:.1f}s ({run['rows_per_second']:,.0f} rows/s, "
                     f"{run['tasks']} tasks, {run['units_resumed']} of {run['units']} units resumed)")
    return "\n".join(lines)


def _info(args) -> int:
    import bigalign
    from .transform import Transform

    so = storage_options(args)
    status = bigalign.output_status(args.path, so)
    if status is not None:
        info = {"kind": "apply-output", "path": args.path, **status}
        if not status.get("complete"):
            info["progress"] = bigalign.run_status(args.path, so)
        if args.json:
            print(json.dumps(info, indent=2, default=str))
        else:
            state = "complete" if status.get("complete") else "INCOMPLETE (rerun apply to resume)"
            print(f"apply output {args.path}: {state}")
            for k, v in info.items():
                if k not in ("kind", "path", "progress"):
                    print(f"  {k}: {v}")
            if info.get("progress"):
                print("  " + _describe_progress(info["progress"]))
        return 0 if status.get("complete") else 3
    try:
        t = Transform.load(args.path, storage_options=so)
    except bigalign.InputError as e:
        if bigalign.run_status(args.path, so):
            return _status(args)
        raise bigalign.InputError(f"{args.path!r}: not a transform or apply output ({e})") from None
    if args.json:
        print(json.dumps({"kind": "transform", "path": args.path, "scale": t.scale,
                          "options": t.options, "metadata": t.metadata}, indent=2, default=str))
    else:
        print(_describe_transform(t, args.path))
    return 0


def _describe_progress(p: dict) -> str:
    rate = f"{p['rows_per_second']:,.0f} rows/s" if p.get("rows_per_second") else "rate unknown"
    eta = f", about {p['eta_seconds']:.0f}s left" if p.get("eta_seconds") is not None else ""
    state = "running" if p.get("running") else "not running (rerun the command to resume)"
    return (f"{p['kind']}: {p['units_done']} of {p['units_total']} units done, "
            f"{p['rows_done']:,} of {p['rows_total']:,} rows, {rate}{eta}; {state}")


def _status(args) -> int:
    import bigalign

    so = storage_options(args)
    p = bigalign.run_status(args.path, so)
    if p is None:
        status = bigalign.output_status(args.path, so)
        done = bool(status and status.get("complete"))
        try:
            bigalign.Transform.load(args.path, storage_options=so)
            done = True
        except bigalign.InputError:
            pass
        if not done:
            raise bigalign.InputError(f"{args.path!r}: no progress recorded and no finished output")
        p = {"finished": True}
        print(json.dumps(p) if args.json else f"{args.path}: finished, nothing in flight")
        return 0
    print(json.dumps(p, indent=2, default=str) if args.json else _describe_progress(p))
    return 3


def _demo(args) -> int:
    from .demo import run_demo

    if args.workdir:
        run_demo(args.workdir, rows=args.rows, dim=args.dim, workers=args.workers,
                 progress=not args.quiet)
    else:
        with tempfile.TemporaryDirectory(prefix="bigalign-demo-") as tmp:
            run_demo(tmp, rows=args.rows, dim=args.dim, workers=args.workers,
                     progress=not args.quiet)
    print("demo OK")
    return 0


COMMANDS = {"fit": _fit, "apply": _apply, "info": _info, "status": _status, "demo": _demo}  # + cli_evaluate


def main(argv=None) -> int:
    from .errors import BigalignError

    args = build_parser().parse_args(argv)
    quiet = getattr(args, "quiet", False)
    logger = logging.getLogger("bigalign")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("bigalign: %(message)s"))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(logging.WARNING if quiet else logging.INFO)
    warnings.simplefilter("default")
    try:
        return COMMANDS[args.command](args)
    except BigalignError as e:
        print(f"bigalign {args.command}: error: {e}", file=sys.stderr)
        return 2
    except (FileNotFoundError, PermissionError, ConnectionError, TimeoutError) as e:
        print(f"bigalign {args.command}: error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bigalign: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # output piped into head & co.
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
