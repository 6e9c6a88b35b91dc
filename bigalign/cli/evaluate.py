"""Command line for evaluation: ``evaluate``, ``evaluate-retrieval`` and ``curve``.

Thin, like cli.py: parse, call :mod:`bigalign.commands.evaluate`, :mod:`bigalign.commands.retrieval` or
:mod:`bigalign.commands.curve`, print a table to stdout (or JSON with ``--json``), optionally write a
PNG (:mod:`bigalign.commands.report`); log lines go to stderr. Bad input raises
:class:`bigalign.InputError` (exit code 2). See docs/evaluation.md for what every number
means.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import textwrap

from .common import _bound_lines, add_storage_option, nonnegative_int, storage_options
from ..jsonsafe import json_safe as _plain
from ..errors import InputError
from ..planning.plan import DEFAULT_MAX_QUERIES, MIN_CENTRED_QUERIES
from ..words import counted
from .verdict import VERDICT_HELP, format_verdict, verdict_args as _verdict_args, verdict_call

log = logging.getLogger("bigalign")

RESID_HELP = ("resid: sum ||f(x)-y||^2 / sum ||y - mean y||^2 on the held-out pairs (0 = "
              "perfect, 1 = no better than answering the target mean); fit: the same on the "
              "training pairs")


def _ints(text: str, what: str) -> list[int]:
    try:
        out = [int(v.replace("_", "")) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise InputError(f"{what} {text!r}: expected comma-separated integers, e.g. 1,10") from None
    if not out or min(out) < 1:
        raise InputError(f"{what} {text!r}: expected positive integers")
    return out


EPILOG = "What each number means: docs/evaluation.md"
TRANSFORM = ("transform", "a transform saved by 'bigalign fit'")
SOURCE = ("source", "Zarr array (N, dA) of source-model vectors, or an embedding store")
TARGET = ("target", "Zarr array (N, dB) of target-model vectors, same rows; or an embedding "
                    "store whose ids pair with the source's")


def _command(sub, name: str, summary: str, description: str, *positionals):
    """A subcommand and its positional arguments, (name, help) each."""
    p = sub.add_parser(name, help=summary, description=description, epilog=EPILOG)
    for arg, text in positionals:
        p.add_argument(arg, help=text)
    return p


def _io_args(p, ks: str) -> None:
    """Recall cut-offs ``--k`` (default ``ks``) and the options every evaluation shares:
    the query sample, output, precision, storage."""
    p.add_argument("--k", default=ks, metavar="K,K", help=f"recall cut-offs (default {ks})")
    p.add_argument("--max-queries", type=nonnegative_int, default=DEFAULT_MAX_QUERIES,
                   metavar="N",
                   help=f"search at most N queries, a seeded random sample (default "
                        f"{DEFAULT_MAX_QUERIES}; 0 = all). The searched set is always complete")
    p.add_argument("--seed", type=int, default=0, help="seed of the query sample (default 0)")
    p.add_argument("--json", action="store_true", help="print the full result as JSON")
    p.add_argument("--png", metavar="PATH", help="also write a PNG report here")
    p.add_argument("--float64", action="store_true",
                   help="compute maps and scores in float64 (default float32)")
    add_storage_option(p)
    p.add_argument("--allow-missing-chunks", action="store_true",
                   help="do not refuse inputs with unstored chunks")
    p.add_argument("-q", "--quiet", action="store_true", help="no log lines on stderr")


def _baseline_args(p) -> None:
    g = p.add_argument_group("baselines (fitted from the training statistics, no extra fit)")
    g.add_argument("--ridge", type=float, default=0.0, metavar="LAMBDA",
                   help="also evaluate ridge regression W = (A'A + LAMBDA I)^-1 A'B")
    g.add_argument("--train-source", metavar="ARRAY",
                   help="source array holding the transform's training rows (default: SOURCE)")
    g.add_argument("--train-target", metavar="ARRAY",
                   help="target array holding the transform's training rows (default: TARGET)")


def _pairing_args(p, duplicates_default: str) -> None:
    g = p.add_argument_group("pairs by id (embedding stores with ids)")
    g.add_argument("--pair-by", choices=("auto", "rows", "ids"), default="auto",
                   help="rows: row i with row i; ids: rows with equal ids (inner join, as fit "
                        "pairs); auto (default): ids when both inputs are stores with ids")
    g.add_argument("--duplicates", choices=("error", "first", "last"), default=None,
                   help="an id occurring twice on one side: refuse, or keep its first / last "
                        f"row (default: {duplicates_default})")
    g.add_argument("--scratch", metavar="DIR",
                   help="local folder for the gathered pairs (default: the system's temporary "
                        "folder; needs pairs x (dA + dB) x 4 bytes, removed after)")


def add_commands(sub) -> dict:
    """Register subcommands on the argparse ``sub`` parsers; return {name: handler(args)}."""
    _add_evaluate(sub)
    _add_evaluate_retrieval(sub)
    _add_curve(sub)
    return {"evaluate": _evaluate, "evaluate-retrieval": _evaluate_retrieval, "curve": _curve}


def _add_evaluate(sub) -> None:
    """``bigalign evaluate``: its arguments and flags."""
    e = _command(
        sub, "evaluate", "held-out quality of a transform next to its baselines",
        "Evaluate TRANSFORM on held-out pairs (row i of SOURCE with row i of TARGET, or rows "
        "with equal ids when both are embedding stores with ids: then the matched pairs the "
        "fit did not use, rebuilt from what it recorded), "
        "streaming: relative residual, cosine per pair, and cross-model retrieval (each "
        "aligned source row searched, by exact cosine, among all held-out target rows; "
        "recall@k), in the raw target space and with each side's mean removed. Baselines "
        "(none, least squares, ridge, orthogonal with the other centring) are fitted from the "
        "training statistics. Also prints the paper's bound on the training set.",
        TRANSFORM, SOURCE, TARGET)
    e.add_argument("--rows", metavar="START:STOP",
                   help="held-out rows (default: all rows when SOURCE/TARGET are not the arrays "
                        "the transform was fitted on, else the rows after, else before, its "
                        "training rows). Paired by id: positions in the list of matched pairs "
                        "(sorted by source row; default: the matched pairs the fit did not "
                        "use)")
    e.add_argument("--csls", action="store_true",
                   help="also rank with CSLS (penalises 'hub' targets near many queries)")
    e.add_argument("--csls-k", type=int, default=10, metavar="K",
                   help="CSLS neighbourhood size (default 10)")
    e.add_argument("--no-baselines", action="store_true",
                   help="evaluate only the transform (and none); skips the pass over the "
                        "training rows that baselines need when the transform does not store "
                        "its statistics")
    _baseline_args(e)
    _pairing_args(e, "the fit's own policy on the stores it was fitted on, else error")
    _io_args(e, ks="1,10")


def _add_evaluate_retrieval(sub) -> None:
    """``bigalign evaluate-retrieval``: its arguments and flags (the verdict's in
    :mod:`bigalign.cli.verdict`)."""
    r = _command(
        sub, "evaluate-retrieval", "query -> document retrieval across two models (nDCG@10)",
        "Queries embedded by one model, documents by another, relevance judgements as a table "
        "(query_id, doc_id, relevance; parquet or CSV; ids are row indices of QUERIES and "
        "DOCS, or their ids when both are embedding stores with ids). Reports nDCG and "
        "recall@k for native (with --native), none, the baselines and the aligned "
        "transform, searched raw and centred (centred: queries minus their own mean, so "
        f"only with at least {MIN_CENTRED_QUERIES} queries). --map queries (default): "
        "TRANSFORM maps the query model into the document model's space (upgrade the query model "
        "without re-indexing); --map docs: it maps documents into the query space.",
        TRANSFORM)
    r.formatter_class = argparse.RawDescriptionHelpFormatter
    r.description = textwrap.fill(r.description, 92) + "\n\n" + VERDICT_HELP
    r.add_argument("queries", nargs="?", help="Zarr array of query embeddings (not with "
                   "--old-queries ...)")
    r.add_argument("docs", nargs="?",
                   help="Zarr array of document embeddings (the other model)")
    r.add_argument("--qrels", metavar="FILE",
                   help="relevance judgements: .parquet, .csv or .tsv with columns query_id, "
                        "doc_id[, relevance] (required with QUERIES DOCS; with --old-queries "
                        "..., default: query row i is relevant to document row i)")
    r.add_argument("--map", choices=("queries", "docs"), default="queries",
                   help="which side TRANSFORM maps (default queries)")
    r.add_argument("--native", metavar="ARRAY",
                   help="the mapped side's texts embedded by the other model (the "
                        "no-migration ceiling)")
    r.add_argument("--query-rows", metavar="START:STOP", help="evaluate queries in these rows")
    r.add_argument("--doc-rows", metavar="START:STOP", help="search documents in these rows")
    r.add_argument("--ndcg-k", type=int, default=10, metavar="K", help="nDCG cut-off (default 10)")
    _baseline_args(r)
    _verdict_args(r)
    _pairing_args(r, "error")
    _io_args(r, ks="1,10,100")


def _add_curve(sub) -> None:
    """``bigalign curve``: its arguments and flags."""
    c = _command(
        sub, "curve", "quality against the number of training pairs",
        "Fit on the first n training rows for each n in --sizes (one streaming pass snapshots "
        "the statistics at each n) and evaluate every fit on the same held-out rows: shows "
        "where more pairs stop helping.",
        SOURCE, TARGET)
    c.add_argument("--train-rows", required=True, metavar="START:STOP",
                   help="rows to fit on (prefixes of it for each size); paired by id: "
                        "positions in the list of matched pairs (sorted by source row)")
    c.add_argument("--eval-rows", required=True, metavar="START:STOP",
                   help="held-out rows (must not overlap --train-rows); paired by id: "
                        "positions in the list of matched pairs")
    c.add_argument("--sizes", metavar="N,N",
                   help="training sizes (default 100,300,1000,3000,... and all training rows)")
    c.add_argument("--center", action=argparse.BooleanOptionalAction, default=True,
                   help="fit with centring (default, as fit; --no-center opts out)")
    c.add_argument("--normalize", action="store_true", help="as fit --normalize")
    c.add_argument("--scale", action="store_true", help="as fit --scale")
    c.add_argument("--no-least-squares", action="store_true",
                   help="only the orthogonal fit (no least-squares curve)")
    c.add_argument("--ridge", type=float, default=0.0, metavar="LAMBDA",
                   help="ridge penalty for the least-squares curve (default 0)")
    _pairing_args(c, "error")
    _io_args(c, ks="1,10")


def _common(args) -> dict:
    return dict(max_queries=args.max_queries or None, seed=args.seed,
                dtype="float64" if args.float64 else "float32",
                storage_options=storage_options(args),
                check_chunks=not args.allow_missing_chunks)


def _evaluate(args) -> int:
    from ..commands.evaluate import evaluate  # Dask and Zarr load here, not for --help

    if args.csls_k < 1:
        raise InputError("--csls-k must be positive")
    result = evaluate(args.transform, args.source, args.target, args.rows,
                      pair_by=args.pair_by, duplicates=args.duplicates, scratch=args.scratch,
                      baselines=not args.no_baselines, train_source=args.train_source,
                      train_target=args.train_target, ridge=args.ridge,
                      ks=_ints(args.k, "--k"), csls=args.csls, csls_k=args.csls_k,
                      **_common(args))
    result["transform"]["path"] = args.transform
    return _finish(args, result, format_evaluation)


def _evaluate_retrieval(args) -> int:
    from ..commands.retrieval import evaluate_retrieval

    call = verdict_call(args)
    if call is not None:
        from ..commands.retrieval_verdict import evaluate_verdict

        inputs, keywords = call
        result = evaluate_verdict(*inputs, query_rows=args.query_rows, doc_rows=args.doc_rows,
                                  ks=_ints(args.k, "--k"), ndcg_k=args.ndcg_k,
                                  pair_by=args.pair_by, duplicates=args.duplicates or "error",
                                  **_common(args), **keywords)
        return _finish(args, result, format_verdict)
    if args.queries is None or args.docs is None or args.qrels is None:
        raise InputError("evaluate-retrieval needs QUERIES, DOCS and --qrels, or the four "
                         "--old-queries --old-docs --new-queries --new-docs for the verdict")
    result = evaluate_retrieval(args.transform, args.queries, args.docs, args.qrels,
                                map_side=args.map, native=args.native,
                                train_source=args.train_source, train_target=args.train_target,
                                ridge=args.ridge, query_rows=args.query_rows,
                                doc_rows=args.doc_rows, ks=_ints(args.k, "--k"),
                                ndcg_k=args.ndcg_k, pair_by=args.pair_by,
                                duplicates=args.duplicates or "error", scratch=args.scratch,
                                **_common(args))
    return _finish(args, result, format_retrieval)


def _curve(args) -> int:
    from ..commands.curve import learning_curve

    sizes = _ints(args.sizes, "--sizes") if args.sizes else None
    result = learning_curve(args.source, args.target, args.train_rows, args.eval_rows,
                            sizes=sizes, center=args.center, normalize=args.normalize,
                            scale=args.scale, least_squares=not args.no_least_squares,
                            ridge=args.ridge, ks=_ints(args.k, "--k"), pair_by=args.pair_by,
                            duplicates=args.duplicates or "error", scratch=args.scratch,
                            **_common(args))
    return _finish(args, result, format_curve)


def _finish(args, result: dict, formatter) -> int:
    if args.png:
        from ..commands.report import write_png

        try:
            write_png(result, args.png)
        except OSError as e:
            raise InputError(f"--png {args.png!r}: cannot write it ({e})") from None
        log.info("wrote the PNG report to %s", args.png)
    if args.json:
        print(json.dumps(_plain(result), indent=2))
    else:
        print(formatter(result))
    return 0


# ---- tables ------------------------------------------------------------------------------

def _fmt(v, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) >= 1000 else f"{v:.{digits}f}"
    return f"{v:,}" if isinstance(v, int) else str(v)


def table(headers: list[str], rows: list[list]) -> str:
    """A plain aligned table: text columns left-aligned, numbers right-aligned."""
    cells = [headers] + [[_fmt(v) for v in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    text = [bool(rows) and all(isinstance(r[i], str) and not _numeric(r[i]) for r in rows)
            for i in range(len(headers))]
    lines = []
    for j, r in enumerate(cells):
        lines.append("  ".join(c.ljust(w) if text[i] else c.rjust(w)
                               for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _numeric(text: str) -> bool:
    try:
        float(text.replace(",", ""))
        return True
    except ValueError:
        return False


def _variants(result: dict) -> list[str]:
    names = list(result["methods"][0]["retrieval"]) if result["methods"] else []
    return [v for v in ("raw", "centred", "raw+csls", "centred+csls") if v in names]


def format_evaluation(result: dict) -> str:
    ks, variants = result["ks"], _variants(result)
    headers = ["method", "fit", "resid", "cos mean", "cos p5", "cos p50"]
    headers += [f"{v} R@{k}" for v in variants for k in ks]
    rows = []
    for m in result["methods"]:
        row = [m["name"] + (" *" if m["this"] else ""), m["train"].get("relative_residual"),
               m["relative_residual"], m["cosine"]["mean"], m["cosine"]["p5"], m["cosine"]["p50"]]
        row += [m["retrieval"][v][f"recall@{k}"] for v in variants for k in ks]
        rows.append(row)
    tr = result.get("training") or {}
    pairing = result.get("pairing") or {"by": "rows"}
    by_ids = pairing["by"] == "ids"
    out = [_held_out_line(result, pairing) + f"; {counted(result['queries'], 'query', 'queries')} "
           f"searched by exact cosine among all {result['targets']:,} held-out targets"
           + (" (queries sampled)" if result["sampled"] else "")
           + f"; chance recall@1 = {result['chance'][f'recall@{ks[0]}']:.4f}" * (ks[0] == 1)]
    if by_ids:
        out.append(pairing_line(pairing))
        known = pairing.get("training_pairs")
        out.append(f"training pairs: {known:,}, {pairing['training']}" if known is not None
                   else f"training pairs: cannot be told ({pairing['training']})")
    if tr.get("arrays") == "different":
        out.append("SOURCE/TARGET are not the arrays the transform was fitted on: no row of "
                   "them was used to fit it")
    if result.get("normalized_targets"):
        out.append("target rows L2-normalised, as the fit normalised them")
    what = "pairs" if by_ids else "rows"
    if result.get("overlap_with_training"):
        out.append(f"WARNING: {result['overlap_with_training']:,} of these {what} were used to "
                   "fit the transform")
    elif result.get("overlap_with_training", 0) is None:
        out.append(f"WARNING: how many of these {what} were used to fit the transform cannot "
                   "be told")
    if tr.get("statistics"):
        fitted = (f"the transform's {tr['n']:,} training pairs" if tr.get("pairs") and
                  tr.get("n") else f"training rows {tr['rows'][0]}:{tr['rows'][1]}")
        out.append(f"baselines fitted on {fitted} (statistics {tr['statistics']})")
    out += ["", table(headers, rows), "",
            "* this transform.  " + RESID_HELP + ".",
            "cos: cosine between each aligned source row and its own target row.  R@k: share of "
            "queries whose own pair ranks in the top k; raw = cosine search in the target "
            "space, centred = each side's mean removed first" +
            (", +csls = CSLS re-ranking" if any("csls" in v for v in variants) else "") + "."]
    d = tr.get("diagnostics") or tr.get("fit_diagnostics")
    if d:
        out += ["", _bound_lines(d, tr)]
    return "\n".join(out)


def _held_out_line(result: dict, pairing: dict) -> str:
    """"held-out pairs: ...": a row range, or pairs matched by id (all the fit did not use,
    or positions in the list of matched pairs)."""
    if pairing["by"] != "ids":
        a, b = result["rows"]
        return f"held-out pairs: rows {a}:{b} ({result['pairs']:,})"
    n, m = result["pairs"], pairing["matched"]
    if pairing.get("positions"):
        a, b = pairing["positions"]
        return f"held-out pairs: positions {a}:{b} of the {m:,} pairs matched by id ({n:,})"
    if n == m:
        return f"held-out pairs: all {m:,} pairs matched by id"
    return f"held-out pairs: the {n:,} of the {m:,} pairs matched by id that the fit did not use"


def pairing_line(pairing: dict) -> str:
    """One line on a pairing by id: matched pairs, ids on one side only, duplicates."""
    dropped = pairing.get("duplicates_dropped") or {}
    return (f"paired by id: {pairing['matched']:,} matched pairs; ids on one side only: "
            f"{pairing['source_only']:,} source, {pairing['target_only']:,} target; duplicate "
            f"ids: {pairing['duplicates']}" +
            (" (rows dropped: " + ", ".join(f"{k} {v:,}" for k, v in dropped.items()) + ")"
             if dropped else ""))


def format_retrieval(result: dict) -> str:
    ks, nk = result["ks"], result["ndcg_k"]
    variants = ("raw", "centred")
    metrics = [f"ndcg@{nk}"] + [f"recall@{k}" for k in ks]
    headers = ["method"] + [f"{v} {m.replace('recall', 'R').replace('ndcg', 'nDCG')}"
                            for v in variants for m in metrics]
    rows = [[m["name"] + (" *" if m["this"] else "")] +
            [m["retrieval"][v][mt] for v in variants for mt in metrics]
            for m in result["methods"]]
    q0, q1 = result["query_rows"]
    d0, d1 = result["doc_rows"]
    pairing = result.get("pairing") or {"by": "rows"}
    lines = [f"{counted(result['queries'], 'query', 'queries')} (rows {q0}:{q1}) searched "
             f"among {counted(result['documents'], 'document', 'documents')} (rows {d0}:{d1}); "
             f"{result['map']} mapped by "
             "the transform"]
    if pairing["by"] == "ids":
        lines.append(f"qrels by id: {pairing['qrels_queries']:,} judged query ids "
                     f"({pairing['queries_missing']:,} not in QUERIES, left out), "
                     f"{pairing['qrels_documents']:,} judged document ids; duplicate ids: "
                     f"{pairing['duplicates']}")
        if pairing.get("native"):
            nat = pairing["native"]
            lines.append(f"native paired by id: {nat['matched']:,} matched; ids on one side "
                         f"only: {nat['mapped_only']:,} mapped side, {nat['native_only']:,} "
                         "native")
    if not result.get("centred_computed", True):
        lines.append(f"centred: not computed (-): fewer than {MIN_CENTRED_QUERIES} queries, "
                     "too few to estimate the queries' own mean that it removes")
    return "\n".join(lines + [
        "", table(headers, rows), "",
        f"* this transform.  nDCG@{nk}: ranking quality of the top {nk} against the relevance "
        "judgements (1 = ideal order).  R@k: share of a query's relevant documents in its "
        "top k.  raw: cosine search; centred: query side minus the queries' mean, documents "
        "minus the collection's mean."])


def format_curve(result: dict) -> str:
    ks = result["ks"]
    headers = ["pairs", "method", "fit", "resid", "cos mean"]
    headers += [f"{v} R@{k}" for v in ("raw", "centred") for k in ks]
    headers += ["eps", "bound", "achieved"]
    rows = []
    for p in result["points"]:
        d = p.get("diagnostics") or {}
        row = [p["pairs"], p["name"], p["train"].get("relative_residual"),
               p["relative_residual"], p["cosine"]["mean"]]
        row += [p["retrieval"][v][f"recall@{k}"] for v in ("raw", "centred") for k in ks]
        row += [_g(d, "epsilon"), _g(d, "bound_residual"), _g(d, "achieved_residual")]
        rows.append(row)
    sat = result["saturation"]
    a, b = result["train_rows"]
    c, d = result["rows"]
    verdict = (f"saturates near {sat['pairs']:,} pairs ({sat['metric']} within 0.01 of its value "
               f"{sat['value']:.3f} at {result['sizes'][-1]:,})" if sat["pairs"] else
               f"still improving at {result['sizes'][-1]:,} pairs ({sat['metric']} "
               f"{sat['value']:.3f}): more training pairs would help")
    pairing = result.get("pairing") or {"by": "rows"}
    what = "positions" if pairing["by"] == "ids" else "rows"
    return "\n".join([
        f"training {what} {a}:{b} (prefixes), held-out {what} {c}:{d} ({result['pairs']:,} "
        f"pairs, {counted(result['queries'], 'query', 'queries')}); fit options: "
        + ", ".join(f"{k}={v}" for k, v in result["options"].items())]
        + ([pairing_line(pairing)] if pairing["by"] == "ids" else []) + [
        "", table(headers, rows), "", verdict,
        RESID_HELP + ".  eps / bound / achieved: the paper's discrepancy, its bound on "
        "||AQ-B||_F and the value reached (orthogonal, training pairs); '<=x': below the "
        "round-off of the statistics, '+-': their round-off (docs/evaluation.md)."])


def _g(d: dict, key: str):
    """A curve cell: the figure with its round-off ("<=x" when unresolved)."""
    if d.get(key) is None:
        return None
    from ..maths.metrics import figure

    return figure(d[key], d.get(f"{key}_interval")).removeprefix("= ").replace(" ", "")
