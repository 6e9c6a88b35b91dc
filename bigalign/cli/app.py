"""Command line: parses, calls the API, prints.

Exit codes (one mapping, :func:`bigalign.errors.exit_code`): 0 done or already done; 1 an
unexpected error (a bug: traceback); 2 usage, bad input or a refused run (the message says
what and where); 3 unfinished (``status``/``info``); 4 ``realign``'s quality gate
rejected the candidate (nothing published); 75 a transient failure
after retries (storage or the Dask scheduler unreachable, the cluster's workers lost: a
scheduler should retry, the rerun resumes); 130
interrupted by SIGINT or SIGTERM. Output cut short by its reader (``| head``) is not an
error: the rest of stdout is discarded and the exit code is the command's own.
"""

from __future__ import annotations

import argparse
import contextlib
import difflib
import logging
import os
import signal
import sys
import tempfile
import threading
import traceback
import warnings

from .. import __version__
from .common import (_describe_transform, _print_json, _run_args, _run_details,
                     _transform_json, add_storage_option, positive_int, requests,
                     storage_options)
from .info import _add_info, _add_status, _info, _status
from ..words import counted

CENTER_HELP = ("remove each side's mean before fitting, and map (x - mean_src) Q + mean_tgt "
               "(default: on). Real models' vectors share a common offset (e5 -> MiniLM "
               "recall@1: 0.22 uncentred, 0.80 centred); --no-center opts out, and a fit "
               "without it warns when the means carry much of the vectors' energy")
METHOD_HELP = ("the map family: orthogonal (default; Procrustes, with the paper's bound), "
               "similarity (orthogonal with a fitted scale: the same as --scale), affine "
               "(least squares), ridge (least squares with a penalty, --ridge or chosen on "
               "held-out pairs), reduced-rank (least squares of rank --rank, or chosen), or "
               "auto: fit all from the one pass, score them on held-out pairs (--holdout) "
               "and keep the best (see README, 'Which family'). Only the orthogonal ones "
               "preserve distances and carry the Procrustes bound")


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser that reports arguments no parser recognised (``fit ... --centre``)
    with the usage of the (sub)command that was parsing them, not the top level's
    ``usage: bigalign COMMAND ...``, and suggests the option meant. argparse leaves them
    to the top level; subcommand parsers are of this class too (add_subparsers' default)."""

    def parse_args(self, args=None, namespace=None):
        parsed, extra = self.parse_known_args(args, namespace)
        if extra:
            parser = self._innermost(parsed)
            options = [o for a in parser._actions for o in a.option_strings]
            hints = [f"{x} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(
                x.split("=", 1)[0], options, n=1)) and x.startswith("-") else x
                for x in extra]
            parser.error(f"unrecognized arguments: {' '.join(hints)}")
        return parsed

    def _innermost(self, parsed) -> argparse.ArgumentParser:
        """The parser of the innermost subcommand named in ``parsed`` (or this one)."""
        parser = self
        while True:
            sub = next((a for a in parser._actions
                        if isinstance(a, argparse._SubParsersAction)), None)
            name = getattr(parsed, sub.dest, None) if sub else None
            if name not in (sub.choices if sub else {}):
                return parser
            parser = sub.choices[name]


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="bigalign",
        description="Align two embedding models with one orthogonal map (Procrustes), "
                    "streaming chunked Zarr arrays with Dask: fit on paired rows, apply to "
                    "corpora of any size.",
        epilog="Quick start: 'bigalign demo' runs the whole job on generated data. Exit codes: "
               "0 done or already done; 1 unexpected error (a bug); 2 usage, bad input or a "
               "refused run; 3 unfinished (status, info); 4 realign's quality gate failed "
               "(nothing published); 75 storage or cluster unavailable "
               "after retries (retry later: the rerun resumes); 130 interrupted by SIGINT or "
               "SIGTERM (rerun to resume).")
    p.add_argument("--version", action="version", version=f"bigalign {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    for add in (_add_fit, _add_apply, _add_info, _add_status, _add_demo, _add_sample):
        add(sub)
    from .evaluate import add_commands
    COMMANDS.update(add_commands(sub))
    from .ingest import add_commands as add_import
    from .plan import add_commands as add_plan
    from .registry import add_commands as add_registry
    from .compose import add_commands as add_compose
    from .export import add_commands as add_export
    for add in (add_import, add_export, add_compose, add_registry, add_plan):
        COMMANDS.update(add(sub))
    return p



def _add_family_args(f) -> None:
    """``fit``'s choice of map family (``--method`` and what auto and its parameters read)."""
    from ..options import METHODS, SELECT

    f.add_argument("--method", choices=METHODS, default="orthogonal", help=METHOD_HELP)
    f.add_argument("--ridge", type=float, metavar="LAMBDA",
                   help="--method ridge: the penalty (default: chosen on held-out pairs)")
    f.add_argument("--rank", type=int, metavar="R",
                   help="--method reduced-rank: the rank (default: chosen on held-out pairs)")
    f.add_argument("--holdout", type=float, default=0.2, metavar="SHARE",
                   help="share of pairs held out to choose a family or parameter (auto, "
                        "ridge and reduced-rank without theirs; default 0.2, at most "
                        "--max-holdout rows); the final map is refitted on all pairs")
    f.add_argument("--select", choices=SELECT, default="mapped-queries",
                   help="what --method auto maximises on the held-out pairs: mapped-queries "
                        "(default: recall@1 of mapped rows searching the native target rows), "
                        "mapped-docs (native target rows searching mapped rows), both (their "
                        "mean) or residual. No one map is best for every use (docs/results.md, "
                        "section 4): choose the one you serve")
    f.add_argument("--select-search", choices=("raw", "centred"), default="raw",
                   help="the search --select scores: raw cosine (default; vectors as "
                        "stored) or centred (each side's mean removed)")
    f.add_argument("--max-holdout", type=int, default=10_000, metavar="ROWS",
                   help="at most this many held-out pairs (default 10,000), read in a few "
                        "random windows of rows")


def _add_fit(sub) -> None:
    """``bigalign fit``: its arguments and flags."""
    f = sub.add_parser(
        "fit", help="fit a transform from paired source/target rows",
        description="Fit Q minimising ||s (A - mean_A) Q - (B - mean_B)||_F over paired rows "
                    "(row i of SOURCE with row i of TARGET) in one streaming pass, then one "
                    "SVD. dA != dB works: with dA < dB the source is embedded isometrically in "
                    "a dA-dim subspace of the target space; with dA > dB it is projected to dB "
                    "dims (lossy). Inputs that are embedding stores with ids are paired by "
                    "id (an inner join) instead of by row. A killed fit resumes when rerun "
                    "with the same command; a finished one rerun does nothing (exit 0).")
    f.add_argument("source", help="source-model vectors (N, dA): a Zarr array, or an "
                                  "embedding store (a group with embeddings, ids, model)")
    f.add_argument("target", help="target-model vectors (N, dB): same rows, or a store "
                                  "whose ids pair with the source's")
    f.add_argument("-o", "--output", required=True, help="where to save the transform (Zarr group)")
    f.add_argument("--center", action=argparse.BooleanOptionalAction, default=True,
                   help=CENTER_HELP)
    _add_family_args(f)
    f.add_argument("--normalize", action="store_true",
                   help="L2-normalise rows before fitting (and source rows at apply time)")
    f.add_argument("--scale", action="store_true", help="also fit a similarity scale s")
    f.add_argument("--no-reflection", action="store_true",
                   help="force det(Q) = +1, a proper rotation (equal dimensions only)")
    f.add_argument("--rows", metavar="START:STOP",
                   help="fit on this contiguous range only (a training split): rows of both "
                        "inputs (they may differ in length: the range must lie in both), or, "
                        "for stores paired by id, positions in the list of matched pairs "
                        "(sorted by source row, as 'evaluate --rows'); bounds past the end "
                        "are an error; negative ones count from the end (write --rows=-1000: "
                        "for a leading minus)")
    f.add_argument("--no-diagnostics", action="store_true",
                   help="skip the Gram matrices A^T A, B^T B: about 2x faster, but no "
                        "dot-product discrepancy or bound in the metadata")
    f.add_argument("--precision", choices=("auto", "float32", "float64"), default="auto",
                   help="GEMM dtype per block; sums are float64 either way (default auto: "
                        "float64 only for float64 input)")
    f.add_argument("--keep-checkpoint", action="store_true",
                   help="keep per-unit statistics after success")
    g = f.add_argument_group("pairs by id (embedding stores with ids)")
    g.add_argument("--pair-by", choices=("auto", "rows", "ids"), default="auto",
                   help="rows: row i with row i; ids: rows with equal ids (inner join); "
                        "auto (default): ids when both inputs are stores with ids")
    g.add_argument("--duplicates", choices=("error", "first", "last"), default="error",
                   help="an id occurring twice on one side: refuse (default), or keep its "
                        "first / last row")
    g.add_argument("--sample", type=int, metavar="N",
                   help="fit on a reproducible random subset of N matched pairs (all of "
                        "them, with a warning, when N is not fewer)")
    g.add_argument("--seed", type=int, default=0, help="seed of --sample (default 0)")
    g.add_argument("--scratch", metavar="DIR",
                   help="local folder for the gathered pairs (default: the system's temporary "
                        "folder; needs pairs x (dA + dB) x 4 bytes, removed after)")
    g = f.add_argument_group("model stamps")
    g.add_argument("--source-model", metavar="NAME",
                   help="model of the source vectors (default: the store's model attribute)")
    g.add_argument("--target-model", metavar="NAME",
                   help="model of the target vectors (default: the store's model attribute)")
    _run_args(f)


def _add_apply(sub) -> None:
    """``bigalign apply``: its arguments and flags."""
    a = sub.add_parser(
        "apply", help="map every row of a source array into the target space",
        description="Write OUTPUT[i] = (SOURCE[i] - mean_A) s Q + mean_B for every row, one "
                    "task per whole-chunk region. When SOURCE is an embedding store (a "
                    "Zarr group holding 'embeddings'), OUTPUT is an embedding store too: "
                    "OUTPUT/embeddings (N, dB), OUTPUT/ids (the source's ids of those rows; "
                    "with --rows and a source without ids, its row numbers) and the "
                    "transform's target model as its 'model' attribute; when SOURCE is a "
                    "bare Zarr array, OUTPUT is a bare (N, dB) array. OUTPUT is marked "
                    "complete only after its last region; a killed apply resumes when "
                    "rerun with the same command. An imported store or anything bigalign "
                    "did not write is never replaced, even with --overwrite.")
    a.add_argument("transform", help="a transform saved by 'bigalign fit'")
    a.add_argument("source", help="Zarr array (N, dA) to map, or an embedding store")
    a.add_argument("-o", "--output", required=True,
                   help="new embedding store (for a store SOURCE: embeddings, ids, model) or "
                        "Zarr array (N, dB) (for an array SOURCE)")
    a.add_argument("--dtype", choices=("float32", "float16", "float64"), default="float32",
                   help="output dtype (default float32); float16 refuses rows whose "
                        "mapped values exceed its range (65504), naming the first one "
                        "(--renormalize keeps them within it)")
    a.add_argument("--renormalize", action="store_true", help="L2-normalise each output row")
    a.add_argument("--target-centred", action="store_true",
                   help="write (x - mean_A) s Q without + mean_B: vectors in the target's "
                        "centred space; search them among native target vectors minus the "
                        "transform's target_mean (better retrieval when the target model has "
                        "a large common offset)")
    a.add_argument("--compression", choices=("none", "lz4", "zstd"), default="none",
                   help="output compression (default none: embeddings compress ~1.05-1.1x and "
                        "zstd halves write speed)")
    a.add_argument("--chunk-rows", type=positive_int, metavar="N",
                   help="rows per output chunk (default: the source's)")
    a.add_argument("--rows", metavar="START:STOP",
                   help="map only these source rows; the output holds STOP - START rows "
                        "(output row r is source row START + r) and, for a store, their ids")
    a.add_argument("--bad-rows", choices=("fail", "nan", "zero"), default="fail",
                   help="a source row holding NaN/Inf (or of zero norm when the transform "
                        "normalises): stop naming it (default), or write a NaN / zero row and "
                        "go on; their row numbers go into the output's bigalign.bad_rows "
                        "attribute. A run stopped by a bad row resumes with nan or zero")
    a.add_argument("--allow-model-mismatch", action="store_true",
                   help="map a source store stamped with another model than the transform's "
                        "source model (refused by default)")
    _run_args(a)


def _add_demo(sub) -> None:
    """``bigalign demo``."""
    d = sub.add_parser("demo", help="generate a paired corpus, fit, apply and check (the main "
                                    "job on an embedded default)")
    d.add_argument("--rows", type=int, default=1_000_000, help="pairs to generate (default 1e6)")
    d.add_argument("--dim", type=int, default=256, help="dimension (default 256)")
    d.add_argument("--workdir", help="keep the data here (default: a temporary directory)")
    d.add_argument("--workers", type=positive_int, metavar="N",
                   help="use a local cluster of N worker processes instead of threads")
    d.add_argument("-q", "--quiet", action="store_true",
                   help="print nothing but warnings and errors: no progress, no report on "
                        "stdout (the exit code says whether the rotation was recovered)")


def _add_sample(sub) -> None:
    """``bigalign sample``."""
    sm = sub.add_parser(
        "sample", help="choose which items to re-embed with the new model",
        description="Write a reproducible sample of a corpus's rows (and ids, for a store) "
                    "to a Parquet file: the items to embed with the new model before a fit by "
                    "id. --method uniform (default): every row equally likely; gathering "
                    "their old vectors later reads up to one stored chunk per row. --method "
                    "chunks: whole stored chunks at random, spread over the corpus; the "
                    "gather reads only N / rows-per-chunk chunks, but the sample is "
                    "clustered (prefer uniform when storage order follows content).")
    sm.add_argument("corpus", help="the old corpus: a Zarr array or an embedding store")
    sm.add_argument("--pairs", type=int, required=True, metavar="N", help="rows to sample")
    sm.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    sm.add_argument("--method", choices=("uniform", "chunks"), default="uniform",
                    help="uniform (default) or chunks (see above)")
    sm.add_argument("-o", "--output", required=True, help="Parquet file to write (local)")
    sm.add_argument("--overwrite", action="store_true", help="replace an existing file")
    add_storage_option(sm)


def _fit(args) -> int:
    import bigalign

    from ..options import FitOptions, Pairing

    options = FitOptions(center=args.center, normalize=args.normalize, scale=args.scale,
                         reflection=not args.no_reflection,
                         diagnostics=not args.no_diagnostics, precision=args.precision,
                         method=args.method, ridge=args.ridge, rank=args.rank,
                         holdout=args.holdout, max_holdout=args.max_holdout,
                         select=args.select, select_search=args.select_search)
    pairing = Pairing(by=args.pair_by, rows=args.rows, duplicates=args.duplicates,
                      sample=args.sample, seed=args.seed, scratch=args.scratch)
    t = bigalign.fit(args.source, args.target, options, pairing=pairing, output=args.output,
                     source_model=args.source_model, target_model=args.target_model,
                     **requests(args))
    if args.json:
        _print_json(_transform_json(t, args.output))
    elif not args.quiet:
        print(_describe_transform(t, args.output))
    return 0


def _apply(args) -> int:
    import bigalign

    from ..options import ApplyOptions

    options = ApplyOptions(dtype=args.dtype, renormalize=args.renormalize,
                           target_centred=args.target_centred, compression=args.compression,
                           chunk_rows=args.chunk_rows, bad_rows=args.bad_rows)
    r = bigalign.apply(args.transform, args.source, args.output, options, rows=args.rows,
                       allow_model_mismatch=args.allow_model_mismatch, **requests(args))
    if args.json:
        from ..storage.outputs import inspect

        kind = inspect(args.output, storage_options(args)).kind  # apply-output or apply-store
        _print_json({"kind": kind, "path": args.output, "complete": True,
                     "already_complete": r.already_complete, "rows": r.rows_total,
                     "rows_written": r.rows, "seconds": r.seconds,
                     "rows_per_second": r.rows_per_second, "tasks": r.tasks,
                     "regions": r.units_total, "regions_resumed": r.units_resumed,
                     "bad_rows": len(r.bad_rows)})
    elif not args.quiet:
        if r.already_complete:  # said on stderr by apply's warning: once is enough
            return 0
        resumed = f"{r.units_resumed} of {counted(r.units_total, 'region')} were already done" \
            if r.units_resumed else ""
        bad = f"{counted(len(r.bad_rows), 'bad row')} written as {args.bad_rows}" \
            if r.bad_rows else ""
        print(f"wrote {r.rows:,} rows to {args.output} in {r.seconds:.1f}s"
              f"{_run_details(r, resumed, bad)}; marked complete")
    return 0


def _demo(args) -> int:
    from ..commands.demo import run_demo

    echo = (lambda line: None) if args.quiet else print
    run = dict(rows=args.rows, dim=args.dim, workers=args.workers, progress=not args.quiet,
               echo=echo)
    if args.workdir:
        run_demo(args.workdir, **run)
    else:
        with tempfile.TemporaryDirectory(prefix="bigalign-demo-") as tmp:
            run_demo(tmp, **run)
    echo("demo OK")
    return 0


def _sample(args) -> int:
    from ..commands.sampling import sample_corpus

    s = sample_corpus(args.corpus, args.pairs, args.output, method=args.method, seed=args.seed,
                      overwrite=args.overwrite, storage_options=storage_options(args))
    if s["already_complete"]:  # said on stderr by the sample's warning
        return 0
    print(f"wrote {s['rows']:,} sampled rows to {args.output} ({s['method']}, seed "
          f"{s['seed']}; they lie in {s['chunks_touched']:,} of {s['chunks_total']:,} stored "
          "chunks)")
    return 0


COMMANDS = {"fit": _fit, "apply": _apply, "info": _info, "status": _status, "demo": _demo,
            "sample": _sample}  # + cli_evaluate


class _StderrHandler(logging.StreamHandler):
    """Log lines to whatever ``sys.stderr`` is when they are written (main() may run many
    times in one process, each time with its own guarded stderr)."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, value):
        pass


class _Interrupted(KeyboardInterrupt):
    """SIGTERM, raised in the main thread like SIGINT's KeyboardInterrupt."""


@contextlib.contextmanager
def _sigterm_interrupts():
    """While a command runs, SIGTERM (Kubernetes, SLURM and Argo stop jobs with it) unwinds
    like Ctrl-C: leases are released and in-flight work is abandoned, and the exit code is
    130. Later SIGTERMs during that unwinding are ignored (the orchestrator's SIGKILL after
    its grace period still ends a stuck process). The previous handler is restored after."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise _Interrupted()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


class _ClosedPipeGuard:
    """A text stream that survives its reader going away (``bigalign info T | head -1``).

    On EPIPE it points the file descriptor at /dev/null, as Python's documentation of
    SIGPIPE recommends, so that this and every later write (and the interpreter's last flush)
    succeed silently: no traceback, and the command still finishes and exits with its own
    code. Exit 0 rather than 141 (128 + SIGPIPE) because the reader closing early is not a
    failure of the command: a 141 would fail ``set -o pipefail`` scripts and look like an
    error to schedulers, though the work was done."""

    def __init__(self, stream):
        self._stream = stream
        self.closed_by_reader = False

    def _redirect(self) -> None:
        self.closed_by_reader = True
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, self._stream.fileno())
            os.close(devnull)
        except (OSError, ValueError, AttributeError):
            pass  # no file descriptor (captured in tests): writes are dropped below

    def write(self, text):
        if self.closed_by_reader:
            return len(text)
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            self._redirect()
            return len(text)

    def flush(self):
        if self.closed_by_reader:
            with contextlib.suppress(OSError, ValueError):
                self._stream.flush()  # to /dev/null now, or the data is dropped
            return
        try:
            self._stream.flush()
        except BrokenPipeError:
            self._redirect()
            with contextlib.suppress(OSError, ValueError):
                self._stream.flush()

    def __getattr__(self, name):
        return getattr(self._stream, name)


@contextlib.contextmanager
def _warnings_as_lines():
    """While a command runs, Python warnings (the fit's NotUniqueWarning, a library's) are
    printed as one line, ``bigalign: warning: MESSAGE``, like the log's, not as
    ``FILE:LINE: CATEGORY: MESSAGE`` plus the source line; the previous hook is restored
    after (the library, used from Python, leaves warnings to the caller)."""
    def show(message, category, filename, lineno, file=None, line=None):
        what = str(message) if category.__module__.startswith("bigalign") else \
            f"{category.__name__}: {message}"
        print(f"bigalign: warning: {what}", file=file or sys.stderr)

    saved = warnings.showwarning
    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = saved


@contextlib.contextmanager
def _guarded_streams():
    """stdout and stderr wrapped in :class:`_ClosedPipeGuard` while a command runs."""
    saved = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _ClosedPipeGuard(saved[0]), _ClosedPipeGuard(saved[1])
    try:
        yield
    finally:
        for stream in (sys.stdout, sys.stderr):  # a last EPIPE here, not at interpreter exit
            with contextlib.suppress(Exception):
                stream.flush()
        sys.stdout, sys.stderr = saved


def _report_error(command: str, e: BaseException) -> int:
    """Print what went wrong for ``e`` and return its exit code (errors.exit_code)."""
    from ..errors import EXIT_BUG, EXIT_INTERRUPTED, EXIT_TEMPFAIL, BigalignError, exit_code

    code = exit_code(e)
    if code == EXIT_INTERRUPTED:
        print("bigalign: interrupted; rerun the same command to resume", file=sys.stderr)
    elif code == EXIT_BUG:
        traceback.print_exc(file=sys.stderr)
        print(f"bigalign {command}: unexpected error (a bug; please report it with the "
              f"traceback above): {type(e).__name__}: {e}", file=sys.stderr)
    else:
        what = str(e) if isinstance(e, BigalignError) else f"{type(e).__name__}: {e}"
        print(f"bigalign {command}: error: {what}", file=sys.stderr)
        if code == EXIT_TEMPFAIL:
            print(f"bigalign {command}: storage or cluster unavailable (exit {code}); rerun "
                  "the same command later to resume", file=sys.stderr)
    return code


def main(argv=None) -> int:
    """Run one command; return its exit code (module doc). Usage errors exit 2 through
    argparse (SystemExit), --help and --version exit 0 the same way."""
    with _guarded_streams(), _sigterm_interrupts(), _warnings_as_lines():
        command = "?"
        try:
            if list(sys.argv[1:] if argv is None else argv) == ["--version"]:
                print(f"bigalign {__version__}")  # without the parser and what it imports
                return 0
            args = build_parser().parse_args(argv)
            command = args.command
            quiet = getattr(args, "quiet", False)
            logger = logging.getLogger("bigalign")
            if not logger.handlers:
                handler = _StderrHandler()
                handler.setFormatter(logging.Formatter("bigalign: %(message)s"))
                logger.addHandler(handler)
                logger.propagate = False
            logger.setLevel(logging.WARNING if quiet else logging.INFO)
            warnings.simplefilter("default")
            if getattr(args, "stall_timeout", None) is None:
                return COMMANDS[args.command](args)
            from ..execution.cluster import stall_timeout_set
            with stall_timeout_set(args.stall_timeout):
                return COMMANDS[args.command](args)
        except (Exception, KeyboardInterrupt) as e:
            return _report_error(command, e)


if __name__ == "__main__":
    sys.exit(main())
