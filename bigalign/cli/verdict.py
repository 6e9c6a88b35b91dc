"""Command line of the migration verdict: ``evaluate-retrieval --old-queries OLDQ --old-docs
OLDD --new-queries NEWQ --new-docs NEWD`` (flags, the call, the table). The rule is
:mod:`bigalign.maths.verdict`; the searches :mod:`bigalign.commands.retrieval_verdict`."""

from __future__ import annotations

from typing import Optional

from ..errors import InputError

VERDICT_HELP = """\
Bridge, re-embed or stay (the verdict): give the old and the new model's embeddings of the
same held-out queries and documents (row-aligned: row i of --old-queries and --new-queries is
one query, row i of --old-docs and --new-docs one document) instead of QUERIES DOCS, and a
TRANSFORM mapping old -> new. Searched by exact cosine among the documents:
  stay      old queries among old documents
  bridge    new queries among old documents mapped by TRANSFORM (no document re-encoded)
  bridge (queries mapped)  old queries mapped among new documents (reported only)
  re-embed  new queries among new documents
Each figure is a mean over the queries with a seeded bootstrap interval (--resamples,
--level, --seed); "bridge - stay", "re-embed - stay" and ARR = bridge / re-embed are
intervals over the same resampled queries. The rule, on --decide-on (default recall@10):
  bridge    if (bridge - stay).lo > --min-gain and ARR.lo >= --arr-threshold (0.95);
  re-embed  else if (re-embed - stay).lo > --min-gain;
  stay      else: no migration is shown to improve search, and staying is free.
.lo is the interval's lower end. Where the intervals cannot tell, the verdict picks the
option that cannot make search worse: re-embed over a doubtful bridge, stay over a doubtful
migration. See docs/evaluation.md."""

_FLAGS = ("old_queries", "old_docs", "new_queries", "new_docs")


def verdict_args(p) -> None:
    """The verdict's flags on the ``evaluate-retrieval`` parser ``p``."""
    g = p.add_argument_group("the verdict: bridge, re-embed or stay (all four inputs)")
    for flag, text in (("old-queries", "the queries embedded by the old model (N, dA)"),
                       ("old-docs", "the documents embedded by the old model (M, dA)"),
                       ("new-queries", "the same queries embedded by the new model (N, dB)"),
                       ("new-docs", "the same documents embedded by the new model (M, dB)")):
        g.add_argument(f"--{flag}", metavar="ARRAY", help=text)
    g.add_argument("--decide-on", default="recall@10", metavar="METRIC",
                   help="recall@K or ndcg@K (K = --ndcg-k) read by the rule (default "
                        "recall@10)")
    g.add_argument("--search", choices=("raw", "centred"), default="raw",
                   help="raw cosine (default, what a vector index does) or centred (each "
                        "query set and document set minus its own mean)")
    g.add_argument("--arr-threshold", type=float, default=0.95, metavar="X",
                   help="bridge only when ARR's lower end >= X (default 0.95)")
    g.add_argument("--min-gain", type=float, default=0.0, metavar="X",
                   help="a migration must beat staying by more than X at the interval's "
                        "lower end (default 0)")
    g.add_argument("--resamples", type=int, default=1000, metavar="N",
                   help="bootstrap resamples of the queries (default 1000)")
    g.add_argument("--level", type=float, default=0.95, metavar="P",
                   help="interval level (default 0.95)")


def verdict_call(args) -> Optional[tuple[tuple, dict]]:
    """((transform, old_queries, old_docs, new_queries, new_docs, qrels), keywords of
    :func:`bigalign.commands.retrieval_verdict.evaluate_verdict`) when the verdict's inputs
    are given, else None. Raises InputError for a partial set or options of the other mode."""
    given = [f for f in _FLAGS if getattr(args, f) is not None]
    if not given:
        return None
    if len(given) < 4:
        missing = ", ".join("--" + f.replace("_", "-") for f in _FLAGS if f not in given)
        raise InputError(f"the verdict needs all four inputs: missing {missing}")
    clash = [name for name, on in (("QUERIES/DOCS", args.queries is not None),
                                   ("--native", args.native), ("--map docs", args.map == "docs"),
                                   ("--ridge", args.ridge), ("--train-source", args.train_source),
                                   ("--train-target", args.train_target), ("--png", args.png))
             if on]
    if clash:
        raise InputError(f"{', '.join(clash)}: not with --old-queries ... (the verdict maps "
                         "old -> new and searches the four inputs, no baselines or PNG)")
    if args.resamples < 1 or not 0 < args.level < 1:
        raise InputError("--resamples must be positive and --level in (0, 1)")
    try:
        from ..maths.verdict import Rule  # numpy: only when a verdict is asked for

        rule = Rule(arr_threshold=args.arr_threshold, min_gain=args.min_gain)
    except ValueError as e:
        raise InputError(str(e)) from None
    inputs = (args.transform, args.old_queries, args.old_docs, args.new_queries,
              args.new_docs, args.qrels)
    return inputs, dict(metric=args.decide_on, search=args.search, rule=rule,
                        resamples=args.resamples, level=args.level)


def _cell(x: Optional[dict], signed: bool = False) -> str:
    if x is None:
        return "-"
    f = "{:+.3f}" if signed else "{:.3f}"
    return f"{f.format(x['estimate'])} [{f.format(x['lo'])}, {f.format(x['hi'])}]"


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [headers] + rows) for i in range(len(headers))]
    line = [("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths)))).rstrip()
            for r in [headers] + rows]
    return "\n".join(line[:1] + ["  ".join("-" * w for w in widths)] + line[1:])


def format_verdict(result: dict) -> str:
    """The human output: what was searched, one row per system and per comparison (each
    metric's estimate [interval]) and the verdict line."""
    metrics = result["metrics"]
    heads = ["system"] + [m.replace("recall", "R").replace("ndcg", "nDCG") for m in metrics]
    rows = [[name] + [_cell(v[m]) for m in metrics] for name, v in result["systems"].items()]
    comp = result["comparisons"]
    for key in ("bridge - stay", "re-embed - stay", "arr", "arr (queries mapped)"):
        rows.append([key if "arr" not in key else key.replace("arr", "ARR = bridge / re-embed"
                                                              if key == "arr" else "ARR")]
                    + [_cell(comp[m][key], signed="-" in key) for m in metrics])
    q0, q1 = result["query_rows"]
    d0, d1 = result["doc_rows"]
    b = result["bootstrap"]
    v = result["verdict"]
    n = result["queries"]
    return "\n".join([
        f"{n:,} {'query' if n == 1 else 'queries'} (rows {q0}:{q1}) searched among "
        f"{result['documents']:,} documents (rows {d0}:{d1}), {result['search']} cosine"
        + (" (queries sampled)" if result["sampled"] else ""),
        f"figures: mean [{round(b['level'] * 100)}% bootstrap interval over the queries, "
        f"{b['resamples']:,} resamples, seed {b['seed']}]", "",
        _table(heads, rows), "",
        f"verdict: {v['decision'].upper()}: {v['reason']}"])
