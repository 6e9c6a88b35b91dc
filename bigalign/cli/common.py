"""What the command modules of the command line share: argument types, the option groups
(where a run runs, storage options, the stall timeout), what a run's options become for
the API, and printing (JSON, a run's summary, a transform).

:mod:`bigalign.cli.app` builds the parser from the command modules; they import only this
module (and the API), never ``app``.
"""

from __future__ import annotations

import argparse
import json
from typing import Optional

from ..jsonsafe import json_safe
from ..words import counted, significant

__all__ = ["positive_int", "nonnegative_int", "positive_float", "add_stall_timeout",
           "add_storage_option", "parse_storage_value", "storage_options"]


def positive_int(text: str) -> int:
    """argparse type of counts (--threads, --workers, --chunk-rows): a whole number > 0;
    else a usage error naming the flag (exit 2), not a silent default."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive whole number, got {text}")
    return value


def nonnegative_int(text: str) -> int:
    """argparse type of counts where 0 means "all" (--max-queries)."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def positive_float(text: str) -> float:
    """argparse type of sizes (--block-mb): a finite number > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text}")
    return value


def add_where_it_runs(p: argparse.ArgumentParser, *, scheduler_file: bool = True):
    """The group of flags that say where a job runs (``--scheduler`` [``--scheduler-file``]
    ``--workers`` ``--memory-limit`` ``--threads`` ``--stall-timeout`` ``--device``
    ``--block-mb``), which :func:`requests` turns into an :class:`Execution`; returns the
    group, for a command to add its own."""
    g = p.add_argument_group("where it runs (default: threads in this process)")
    x = g.add_mutually_exclusive_group()
    x.add_argument("--scheduler", metavar="ADDRESS",
                   help="address of a running dask.distributed scheduler (tcp://host:8786) or "
                        "its scheduler file (.json)")
    if scheduler_file:
        x.add_argument("--scheduler-file", metavar="FILE",
                       help="the scheduler file of a running dask.distributed scheduler (as "
                            "'dask scheduler --scheduler-file FILE' writes it). With neither "
                            "option, DASK_SCHEDULER_ADDRESS is used when set")
    x.add_argument("--workers", type=positive_int, metavar="N",
                   help="start a local cluster of N worker processes")
    g.add_argument("--memory-limit", metavar="SIZE", help="per worker with --workers, e.g. 4GiB")
    g.add_argument("--threads", type=positive_int, metavar="N",
                   help="threads for the in-process default (default: one per core)")
    add_stall_timeout(g)
    g.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="where the block kernels run: cpu (default) or cuda (a GPU through "
                        "CuPy: pip install 'bigalign[gpu]')")
    g.add_argument("--block-mb", type=positive_float, default=64, metavar="MB",
                   help="input megabytes per task (default 64)")
    return g


def _run_args(p: argparse.ArgumentParser) -> None:
    g = add_where_it_runs(p)
    g.add_argument("--checkpoint", metavar="URL",
                   help="where progress is recorded (default: OUTPUT.checkpoint next to the output)")
    g.add_argument("--restart", action="store_true",
                   help="discard recorded progress (and a finished output of this same job) "
                        "and run anew, instead of resuming or doing nothing")
    g.add_argument("--overwrite", action="store_true",
                   help="replace an existing output made from other inputs or options (only "
                        "outputs bigalign wrote: anything else is always refused). Without "
                        "it the same job resumes, or does nothing when finished (exit 0)")
    g.add_argument("--allow-missing-chunks", action="store_true",
                   help="do not refuse inputs with unstored chunks (Zarr reads them as fill)")
    add_storage_option(g)
    g.add_argument("-q", "--quiet", action="store_true",
                   help="print nothing but warnings (such as resuming) and errors: no "
                        "progress, no log lines, no summary on stdout (--json still prints). "
                        "Without it, progress goes to stderr: a bar on a terminal, else (log "
                        "files) a line per 10%% of the tasks or per 10 s")
    g.add_argument("--json", action="store_true",
                   help="print a machine-readable summary (JSON) on stdout when done")


def _nonnegative_seconds(text: str) -> float:
    """argparse type of --stall-timeout: seconds >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not (0 <= value < float("inf")):
        raise argparse.ArgumentTypeError(f"expected a number of seconds >= 0, got {text!r}")
    return value


def add_stall_timeout(parser) -> None:
    """--stall-timeout SECONDS (:func:`bigalign.execution.cluster.stall_timeout`, set for
    the command by :func:`main`)."""
    parser.add_argument("--stall-timeout", type=_nonnegative_seconds, metavar="SECONDS",
                        help="on a Dask cluster, stop with exit code 75 when the scheduler "
                             "has had no worker (or has not answered) for SECONDS (default "
                             "300, or BIGALIGN_STALL_TIMEOUT; 0: wait for ever)")


def add_storage_option(parser) -> None:
    """--storage-option KEY=VALUE (repeatable) and --storage-options JSON: the fsspec
    options of every command that opens URLs (parsed by :func:`storage_options`)."""
    parser.add_argument("--storage-option", action="append", default=[], metavar="KEY=VALUE",
                        help="fsspec storage option for URLs (repeatable). VALUE: true/false/"
                             "null, a number, a JSON object or list (nested options), a "
                             "\"quoted\" JSON string, else taken as text; e.g. anon=true, "
                             "endpoint_url=http://127.0.0.1:9000, "
                             "client_kwargs='{\"region_name\": \"us-east-1\"}'")
    parser.add_argument("--storage-options", action="append", default=[], metavar="JSON",
                        help="fsspec storage options as one JSON object (repeatable; later "
                             "ones and --storage-option win per key), e.g. "
                             "'{\"anon\": true, \"config_kwargs\": {\"s3\": "
                             "{\"addressing_style\": \"path\"}}}'")


def parse_storage_value(key: str, value: str):
    """One --storage-option value: true/false/null (any case), numbers, JSON objects and
    lists become JSON values, a double-quoted JSON string its text; anything else stays as
    written. A value that starts like a JSON object or list must be valid JSON."""
    from ..errors import InputError

    low = value.strip().lower()
    if low in ("true", "false", "null"):
        return json.loads(low)
    text = value.strip()
    if text[:1] in ("{", "[", '"'):
        try:
            return json.loads(text)
        except ValueError as e:
            raise InputError(f"--storage-option {key}={value}: not valid JSON ({e})") from None
    try:
        parsed = json.loads(text)
    except ValueError:
        return value
    return parsed if isinstance(parsed, (int, float)) else value


def storage_options(args) -> Optional[dict]:
    """The fsspec storage options of ``args``: every --storage-options JSON object merged in
    order, then every --storage-option KEY=VALUE (:func:`parse_storage_value`). None when
    none were given. Bad syntax raises InputError (exit code 2)."""
    from ..errors import InputError

    out: dict = {}
    for blob in getattr(args, "storage_options", None) or []:
        try:
            value = json.loads(blob)
        except ValueError as e:
            raise InputError(f"--storage-options {blob!r}: not valid JSON ({e})") from None
        if not isinstance(value, dict):
            raise InputError(f"--storage-options {blob!r}: expected a JSON object "
                             '({"key": value, ...})')
        out.update(value)
    for item in getattr(args, "storage_option", None) or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--storage-option {item!r}: expected KEY=VALUE")
        out[key.strip()] = parse_storage_value(key.strip(), value)
    if out:  # an option the file system does not take is named now, not at its first request
        from ..storage.locations import check_storage_options

        for protocol in _url_protocols(args):
            check_storage_options(protocol, out)
    return out or None


def _url_protocols(args) -> list:
    """The protocols of the remote URLs among ``args``' values (``s3`` of ``s3://b/k``),
    the scheduler's address left out."""
    import re

    values = [v for k, v in vars(args).items() if k not in ("scheduler", "scheduler_file")]
    found = []
    for v in values:
        for text in (v if isinstance(v, (list, tuple)) else [v]):
            m = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://", text) \
                if isinstance(text, str) and "::" not in text else None
            if m and m.group(1).lower() not in ("file", "local") and m.group(1) not in found:
                found.append(m.group(1).lower())
    return found


def _print_json(obj) -> None:
    print(json.dumps(json_safe(obj), indent=2))


def _run_details(r, *more: str) -> str:
    """The parenthesis of a run's summary line: its rate, then ``more`` (empty ones left
    out), joined by '; '. No rate when the run wrote nothing (everything was resumed):
    RunReport.rows_per_second is NaN then, and "nan rows/s" means nothing."""
    parts = [f"{r.rows_per_second:,.0f} rows/s"] if r.rows and r.seconds > 0 else []
    parts += [m for m in more if m]
    return f" ({'; '.join(parts)})" if parts else ""


def requests(args) -> dict:
    """The job protocol and the execution settings of a streaming command, as the API's
    request objects (:class:`bigalign.options.JobOptions`, :class:`Execution`),
    each validated as it is built, and the storage options: the keywords ``fit`` and
    ``apply`` take."""
    from ..options import Execution, JobOptions

    return {"job": JobOptions(overwrite=args.overwrite, checkpoint=args.checkpoint,
                              restart=args.restart,
                              keep_checkpoint=getattr(args, "keep_checkpoint", False),
                              check_chunks=not args.allow_missing_chunks),
            "execution": Execution(scheduler=args.scheduler or args.scheduler_file,
                                   workers=args.workers, memory_limit=args.memory_limit,
                                   threads=args.threads,
                                   block_bytes=int(args.block_mb * 2**20),
                                   progress=not args.quiet, device=args.device,
                                   stall_timeout=getattr(args, "stall_timeout", None)),
            "storage_options": storage_options(args)}


def _describe_transform(t, path) -> str:
    m = t.metadata
    pairs = m.get("pairs")
    where = (f"paired by id; {pairs['source_only']:,} source and {pairs['target_only']:,} "
             "target ids unmatched" if pairs else f"rows {m.get('rows')}")
    if pairs and pairs.get("joined") and pairs["joined"] > pairs["matched"]:
        where += (f"; a sample of the {pairs['joined']:,} matched pairs, seed "
                  f"{pairs.get('seed')}: 'bigalign evaluate' holds out the others")
    models = f"  models: {m.get('source_model') or '?'} -> {m.get('target_model') or '?'}" \
        if m.get("source_model") or m.get("target_model") else None
    lines = [f"transform {path}",
             f"  maps {t.dims[0]} -> {t.dims[1]} dims, " + (
                 f"fitted on {m['n_pairs']:,} pairs ({where})"
                 if isinstance(m.get("n_pairs"), int) else "not fitted directly (composed)"),
             *([models] if models else []),
             "  options: " + ", ".join(f"{k}={v}" for k, v in t.options.items()),
             f"  scale {t.scale:.6g}" + (
                 "" if m.get("relative_residual") is None else
                 f"; train relative residual ||sAQ-B||^2/||B||^2 on the training pairs (B "
                 f"centred when the fit centres) = {significant(m['relative_residual'])}")]
    from ..commands.select import describe as selection_lines

    lines += ["  " + line for line in selection_lines(m.get("selection"))]
    if m.get("bound"):
        lines.append(f"  paper bound: {m['bound']}")
    disc = m.get("discrepancy")
    if disc:  # each figure with its round-off: never a wrong number (docs/evaluation.md)
        lines += ["  " + line for line in _bound_lines(
            dict(disc, center=t.options.get("center")), {"n": m.get("n_pairs")}).splitlines()]
    run = m.get("run")
    if run:
        rate = f"{run['rows_per_second']:,.0f} rows/s" if run.get("rows_per_second") else \
            "all rows resumed"
        solve = (f"; solve {run['solve_seconds']:.1f}s" if run.get("solve_seconds") is not None
                 else "")
        lines.append(f"  fit took {run['seconds']:.1f}s ({rate}, {counted(run['tasks'], 'task')}"
                     f", {run['units_resumed']} of {counted(run['units'], 'unit')} resumed"
                     f"{solve})")
    return "\n".join(lines)


def _bound_lines(d: dict, tr: dict) -> str:
    """The paper's numbers, each printed with its round-off (:func:`bigalign.maths.metrics.figure`):
    a figure the arithmetic cannot resolve prints as "<= x", never as a wrong number."""
    from ..maths.metrics import figure

    n = d.get("n") or tr.get("n")
    fig = lambda key: figure(d.get(key), d.get(f"{key}_interval"))  # noqa: E731
    centred = "centred" if d.get("center") else "uncentred"
    lines = ["paper bound (arXiv 2510.13406) on the training pairs"
             + (f" (n = {n:,}, {centred})" if n else "") + ":",
             f"  dot-product discrepancy eps = ||AA'-BB'||_F {fig('epsilon')}; "
             f"per pair delta = eps/n {fig('delta')}"]
    if "achieved_residual" in d:
        check = d.get("bound_check") or ("holds" if d.get("bound_holds", True) else "violated")
        if "bound_check" in d:
            tight = d.get("tightness")
        else:  # recorded by a fit, without intervals
            tight = d["achieved_residual"] / d["bound_residual"] if d["bound_residual"] else None
        lines.append(f"  ||AQ-B||_F: achieved {fig('achieved_residual')}; bound (2D)^(1/4) "
                     f"sqrt(eps) {fig('bound_residual')} "
                     f"({'VIOLATED' if check == 'violated' else check}"
                     + (f"; achieved/bound = {tight:.2f}" if tight is not None else "") + ")")
        if "achieved_mean_sq_distance" in d:
            lines.append(f"  per pair: mean squared distance {fig('achieved_mean_sq_distance')}"
                         f"; bound sqrt(2D) delta {fig('bound_mean_sq_distance')}")
    if "epsilon_interval" not in d:
        lines.append("  (as recorded by the fit, without a bound on their round-off: on nearly "
                     "isometric pairs these figures may be off; docs/evaluation.md)")
    elif not all((d.get("resolved") or {}).values()):
        lines.append(f"  '<= x': below the round-off of these {d.get('precision', '')} "
                     "statistics (a difference of nearly equal sums); fit with --precision "
                     "float64 to resolve it")
    return "\n".join(lines)


def _transform_json(t, path) -> dict:
    """What ``info --json`` and ``fit --json`` print for a transform."""
    return {"kind": "transform", "path": str(path), "dims": list(t.dims), "scale": t.scale,
            "options": t.options, "metadata": t.metadata}


def models_text(meta: dict) -> str:
    """", models A -> B" from a metadata dict's model stamps, or "" when it has none."""
    s, t = meta.get("source_model"), meta.get("target_model")
    if s is None and t is None:
        return ""
    show = lambda m: "?" if m is None else (m if isinstance(m, str) else json.dumps(m))  # noqa: E731
    return f", models {show(s)} -> {show(t)}"
