"""Command line for scheduled re-alignment and the registry: ``realign`` and
``registry list|show|rollback|gc``.

Thin, like cli.py: parse, call :mod:`bigalign.commands.realign` / :mod:`bigalign.storage.registry`, print.
Exit codes as everywhere (:func:`bigalign.errors.exit_code`); ``realign`` exits 4 when the
candidate fails its quality gate (nothing is published), also when a finished run that was
rejected is rerun.
"""

from __future__ import annotations

import json
import sys

from .common import (_describe_transform, add_storage_option, add_where_it_runs,
                     storage_options)
from ..jsonsafe import json_safe
from ..words import counted
from ..errors import GateFailedError

EPILOG = ("Exit codes: 0 published (or already finished); 2 bad configuration or input, a "
          "refused run (another realign holds the registry, or this run id finished with "
          "other inputs); 4 the quality gate failed, nothing published (a retry gives the same "
          "verdict: fail the job); 75 storage or cluster unavailable (retry: it resumes); 130 "
          "interrupted (rerun: it resumes). The README's 'Scheduled re-alignment' and "
          "workflows/ show CronJob, Argo, DaskJob and SLURM set-ups.")


def add_commands(sub) -> dict:
    """Register subcommands on the argparse ``sub`` parsers; return {name: handler(args)}."""
    _add_realign(sub)
    _add_registry(sub)
    return {"realign": _realign, "registry": _registry}


def _add_realign(sub) -> None:
    """``bigalign realign``."""
    r = sub.add_parser(
        "realign", help="refit on fresh pairs, gate on held-out quality, publish to a "
                        "registry (the scheduled job)",
        description="Run the re-alignment job configured by CONFIG (TOML: registry, [pairs], "
                    "[fit], [gate], optional [apply]): split the pairs into training and "
                    "held-out pairs stably by id (or row), fit on the training pairs, "
                    "evaluate the candidate, the current version and no alignment on the "
                    "held-out pairs, and publish the candidate as the registry's next "
                    "version only if it passes the gate; with [apply], map the corpus with "
                    "it; the registry's current pointer moves last. Every step resumes "
                    "when the same run id is rerun; a finished run rerun does nothing.",
        epilog=EPILOG)
    r.add_argument("config", help="the realign configuration (TOML file)")
    r.add_argument("--run-id", metavar="ID",
                   help="names this run: the same id resumes it or, once finished, does "
                        "nothing (use the Job / workflow name). Default: derived from the "
                        "configuration and the inputs' fingerprints")
    r.add_argument("--summary", metavar="PATH",
                   help="write the verdict as JSON here (version, gate figures, candidate vs "
                        "current), also when the gate fails or the run errs: for Argo "
                        "output parameters")
    r.add_argument("--wait", type=float, default=0, metavar="SECONDS",
                   help="while another run holds the registry, keep trying for up to SECONDS "
                        "before refusing (exit 2). A run that crashed on another machine "
                        "holds it until its lease lapses (120 s): a retried pod should pass "
                        "--wait 180. Default 0: refuse at once")
    g = add_where_it_runs(r, scheduler_file=False)
    add_storage_option(g)
    g.add_argument("-q", "--quiet", action="store_true",
                   help="print nothing but warnings and errors")
    g.add_argument("--json", action="store_true", help="print the verdict as JSON on stdout")


def _add_registry(sub) -> None:
    """``bigalign registry list|show|rollback|gc``."""
    reg = sub.add_parser(
        "registry", help="list, show, roll back or collect versions of a registry",
        description="A registry holds numbered, immutable versions of a transform (v0001, "
                    "v0002, ...) and a current pointer that 'bigalign realign' moves when it "
                    "publishes. Anywhere a transform is expected (apply, info, "
                    "Transform.load) a registry stands for its current version.",
        epilog="list and show say DAMAGED and exit 3 when a version's record was edited or "
               "its transform (or mapped corpus) is not the one the record names; rollback "
               "refuses to make a damaged version current (exit 2). rollback and gc take the "
               "registry's lock for a moment: refused (exit 2) while another rollback, gc or "
               "a realign's version write or publish holds it (not for a whole realign).")
    actions = reg.add_subparsers(dest="registry_command", required=True, metavar="ACTION")
    ls = actions.add_parser("list", help="versions, the current one, and the pointer history")
    sh = actions.add_parser("show", help="one version's record (default: the current one)")
    rb = actions.add_parser(
        "rollback", help="make an earlier version current",
        description="Move the current pointer to VERSION (--to), default the newest version "
                    "older than the current one. Versions are not changed or deleted; "
                    "rolling forward is 'rollback --to' a newer one.")
    gc = actions.add_parser(
        "gc", help="delete old versions, keeping the N newest and the current one",
        description="Delete every complete version except the N newest and the current one "
                    "(its record first, then its transform). Folders of a publish cut short "
                    "are left for their realign to finish. The corpus realign mapped with a "
                    "deleted version ([apply] output) is listed, and deleted with --mapped "
                    "only when it is a complete bigalign apply output of that version's "
                    "transform; anything else there is never touched.")
    for p in (ls, sh, rb, gc):
        p.add_argument("registry", help="the registry (path or URL)")
    sh.add_argument("version", nargs="?", help="v0001, v0002, ... (default: the current one)")
    rb.add_argument("--to", metavar="VERSION", help="the version to make current")
    gc.add_argument("--keep", type=int, required=True, metavar="N",
                    help="keep the N newest versions (N >= 1; the current one is always kept)")
    gc.add_argument("--dry-run", action="store_true",
                    help="say what would be deleted (with --mapped: the corpora too, and "
                         "their sizes)")
    gc.add_argument("--mapped", action="store_true",
                    help="also delete the mapped corpora realign wrote with the deleted "
                         "versions (checked: bigalign apply outputs of that version's "
                         "transform; others are listed and left)")
    for p in (ls, sh, rb, gc):
        p.add_argument("--json", action="store_true", help="print JSON")
        add_storage_option(p)


def _print_json(obj) -> None:
    print(json.dumps(json_safe(obj), indent=2))


def _fmt(v) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


def _g(v) -> str:
    """A gate figure with enough digits to see a difference (6 significant)."""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def _iv(iv) -> str:
    return f" [{_g(iv[0])}, {_g(iv[1])}]" if iv else ""


def _held_out(f: dict):
    """The held-out relative residual of a figures dict (also as recorded before the
    rename: ``relative_residual``)."""
    return f.get("heldout_relative_residual", f.get("relative_residual"))


def _criterion(c: dict) -> str:
    """One gate criterion in one line: the figures, the interval that decided, ok/FAILED."""
    mark = "ok" if c["passed"] else "FAILED"
    if "threshold" in c:
        op = ">=" if c["name"].startswith("min") else "<="
        return f"    {c['name']:<30} {_g(c['value'])}{_iv(c.get('interval'))} {op} " \
               f"{_g(c['threshold'])}  {mark}"
    diff = c.get("difference") or {}
    if "current" in c:
        parts = []
        for key, label in (("recall@10", "recall@10"),
                           ("heldout_relative_residual", "held-out residual")):
            d = diff.get(key)
            cand = _held_out(c["value"]) if key != "recall@10" else c["value"][key]
            cur = _held_out(c["current"]) if key != "recall@10" else c["current"][key]
            parts.append(f"{label} {_g(cand)} vs {_g(cur)}" + (
                f" (difference {_g(d['estimate'])}{_iv(d['interval'])})" if d else ""))
        return f"    {c['name']:<30} " + "; ".join(parts) + \
               f" vs {c.get('version')}, tolerance {_g(c.get('tolerance'))}  {mark}"
    if "stay" in c:
        d = diff["recall@10"]
        return (f"    {c['name']:<30} recall@10 bridge {_g(c['value'])} vs stay "
                f"{_g(c['stay'])} (difference {_g(d['estimate'])}{_iv(d['interval'])}), "
                f"tolerance {_g(c.get('tolerance'))}  {mark}")
    return f"    {c['name']:<30} {c.get('note')}  {mark}"


def describe_verdict(v: dict) -> str:
    """The verdict in a few lines for people."""
    if v["status"] == "published":
        head = f"realign {v['run_id']}: published {v['version']} (previous: " \
               f"{v.get('previous') or 'none'})"
    elif v["status"] == "unchanged":
        head = f"realign {v['run_id']}: nothing published: the current version " \
               f"{v['version']} already is this fit ({(v.get('same_as') or {}).get('reason')})"
    else:
        head = f"realign {v['run_id']}: REJECTED by the gate, nothing published (current: " \
               f"{v.get('current') or 'none'})"
    if v.get("already_done"):
        head += " [already finished: nothing done]"
    lines = [head, f"  gate: {'passed' if v['passed'] else 'FAILED'}"]
    lines += [_criterion(c) for c in v["gate"]["criteria"]]
    lines += [f"    note: {n}" for n in v["gate"].get("notes") or []]
    rows = [("candidate", v.get("candidate"))]
    if v.get("current_version"):
        rows.append((f"current {v['current_version'].get('version')}", v["current_version"]))
    if v.get("no_alignment"):
        rows.append(("no alignment", v["no_alignment"]))
    pairs = v.get("pairs") or {}
    if v.get("candidate"):
        boot = v.get("bootstrap") or {}
        lines.append(f"  held-out pairs: {pairs.get('holdout')} ({v.get('held_out_queries')} "
                     f"queries); fitted on {pairs.get('train')} (paired by {pairs.get('by')})"
                     + (f"; [intervals]: {boot['level']:.0%} bootstrap, {boot['resamples']} "
                        "resamples" if boot else ""))
        lines.append(f"    {'':<16} {'recall@1':>9} {'recall@10':>28} "
                     f"{'held-out residual':>30}")
    for name, f in rows:
        if f:
            iv = f.get("intervals") or {}
            r10 = f"{_fmt(f['recall@10'])}{_iv(iv.get('recall@10'))}"
            res = f"{_fmt(_held_out(f))}{_iv(iv.get('heldout_relative_residual'))}"
            lines.append(f"    {name:<16} {_fmt(f['recall@1']):>9} {r10:>28} {res:>30}")
    stay = v.get("stay")
    if stay:
        lines.append(f"  recall@10 over {stay['queries']} held-out queries of both models: "
                     + ", ".join(f"{k} {_fmt(stay[k]['recall@10'])}{_iv(stay[k]['interval'])}"
                                 for k in ("stay", "bridge", "reembed")))
        if stay.get("verdict"):
            lines.append(f"  verdict: {stay['verdict']['decision']}: {stay['verdict']['reason']}")
    if v.get("train_relative_residual") is not None:
        lines.append(f"  train relative residual ||sAQ-B||^2/||B||^2 (on the training pairs): "
                     f"{_fmt(v['train_relative_residual'])}")
    if v.get("apply"):
        lines.append(f"  mapped corpus: {v['apply']['output']} ({v['apply']['rows']:,} rows)")
    if v["status"] == "rejected" and v.get("candidate_transform"):
        lines.append(f"  the rejected candidate: {v['candidate_transform']}")
    return "\n".join(lines)


def _realign(args) -> int:
    from ..errors import exit_code
    from ..options import Execution
    from ..commands.realign import realign, summary, write_summary

    so = storage_options(args)
    run = Execution(args.scheduler, args.workers, args.memory_limit, args.threads,
                    int(args.block_mb * 2**20), not args.quiet, args.device)
    try:
        verdict = realign(args.config, run_id=args.run_id, execution=run, storage_options=so,
                          wait=args.wait)
    except (Exception, KeyboardInterrupt) as e:
        if args.summary:  # Argo reads its output parameter whatever happened
            try:
                write_summary(args.summary, {"kind": "realign", "status": "error",
                                             "run_id": args.run_id, "error": str(e),
                                             "exit_code": exit_code(e)}, so)
            except Exception as write_error:  # noqa: BLE001 - the first error matters
                print(f"bigalign realign: cannot write --summary: {write_error}",
                      file=sys.stderr)
        raise
    out = summary(verdict)
    if args.summary:
        write_summary(args.summary, out, so)
    if args.json:
        _print_json(out)
    elif not args.quiet:
        print(describe_verdict(out))
    if not verdict["passed"]:
        failed = ", ".join(c["name"] for c in verdict["gate"]["criteria"] if not c["passed"])
        raise GateFailedError(f"the candidate of run {verdict['run_id']} failed the gate "
                              f"({failed}); nothing was published")
    return 0


def _registry(args) -> int:
    from ..storage.registry import Registry

    reg = Registry(args.registry, storage_options(args))
    return {"list": _list, "show": _show, "rollback": _rollback, "gc": _gc}[
        args.registry_command](reg, args)


def _integrity(check: dict) -> str:
    """A version's :meth:`~bigalign.storage.registry.Registry.verify` result in words."""
    if check["state"] == "damaged":
        return "DAMAGED: " + "; ".join(check["problems"])
    if check["state"] == "unverified":
        return "unverified (" + "; ".join(check["notes"]) + ")"
    return "verified (record and transform digests match)"


def _list(reg, args) -> int:
    """Exit 3 when a version is damaged (as ``info`` on a damaged output)."""
    info = reg.describe()
    damaged = [r["version"] for r in info["versions"] if r["integrity"]["state"] == "damaged"]
    if args.json:
        _print_json(dict(info, damaged=damaged))
        return 3 if damaged else 0
    print(f"registry {reg.url}: {counted(len(info['versions']), 'version')}, current "
          f"{info['current'] or 'none'}")
    if info["versions"]:
        print(f"  {'version':<9} {'created':<26} {'pairs':>8} {'recall@10':>10} "
              f"{'held-out resid':>14}  run")
    for r in reversed(info["versions"]):
        cand = ((r.get("gate") or {}).get("figures") or {}).get("candidate") or {}
        mark = "*" if r["version"] == info["current"] else " "
        print(f"{mark} {r['version']:<9} {str(r.get('created')):<26} "
              f"{str((r.get('fit') or {}).get('n_pairs')):>8} "
              f"{_fmt(cand.get('recall@10')):>10} {_fmt(_held_out(cand)):>14}  "
              f"{r.get('run_id')}" + {"damaged": "  DAMAGED", "unverified": "  unverified"}.get(
                  r["integrity"]["state"], ""))
    for r in info["versions"]:
        if r["integrity"]["state"] == "damaged":
            print(f"  {r['version']} {_integrity(r['integrity'])}")
    if info["history"]:
        print("  pointer history (newest last):")
        for p in info["history"][-10:]:
            print(f"    {p.get('generation'):>4} {p.get('time')} {p.get('action'):<8} "
                  f"{p.get('previous') or '-'} -> {p.get('version')}"
                  + (f" (run {p['run_id']})" if p.get("run_id") else ""))
    return 3 if damaged else 0


def _show(reg, args) -> int:
    """Exit 3 when the version is damaged: its record edited, another transform in its
    place, its arrays changed, or its mapped corpus written by another transform."""
    version = args.version or reg.require_current()
    record = reg.record(version)
    check = reg.verify(version, deep=True)
    damaged = check["state"] == "damaged"
    t = None if damaged else reg.load(version)
    if args.json:
        _print_json({"version": version, "current": version == reg.current(),
                     "transform": reg.transform_url(version), "record": record,
                     "integrity": check, "damaged": "; ".join(check["problems"]) or None,
                     "dims": list(t.dims) if t else None, "options": t.options if t else None})
        return 3 if damaged else 0
    print(f"version {version} of {reg.url}" + (" (current)" if version == reg.current() else "")
          + f": {_integrity(check)}")
    print(f"  published by run {record.get('run_id')} at {record.get('created')} (bigalign "
          f"{record.get('bigalign_version')}); previous {record.get('previous') or 'none'}")
    models = record.get("models") or {}
    print(f"  models: {models.get('source') or '?'} -> {models.get('target') or '?'}")
    pairs = record.get("pairs") or {}
    print(f"  pairs: {pairs.get('train')} fitted, {pairs.get('holdout')} held out (by "
          f"{pairs.get('by')}, holdout {pairs.get('holdout_fraction')})")
    for side, fp in (record.get("inputs") or {}).items():
        print(f"  {side}: {fp.get('canonical_url') or fp.get('url')} shape {fp.get('shape')}")
    g = record.get("gate") or {}
    for c in g.get("criteria", []):
        print(f"  gate {c['name']}: {'passed' if c['passed'] else 'FAILED'}")
    cand = (g.get("figures") or {}).get("candidate") or {}
    if cand:
        iv = cand.get("intervals") or {}
        print(f"  held-out: recall@10 {_fmt(cand.get('recall@10'))}"
              f"{_iv(iv.get('recall@10'))}, heldout_relative_residual "
              f"{_fmt(_held_out(cand))}{_iv(iv.get('heldout_relative_residual'))} "
              "(what the gate reads)")
    if check["mapped_corpus"]:
        print(f"  mapped corpus: {check['mapped_corpus']['output']} "
              f"({check['mapped_corpus']['state']})")
    if damaged:
        print(f"  restore {reg.transform_url(version)} and its record.json from a backup, or "
              "roll back to another version and leave this one to gc")
        return 3
    print(_describe_transform(t, reg.transform_url(version)))
    return 0


def _rollback(reg, args) -> int:
    out = reg.rollback(args.to)
    if args.json:
        _print_json(out)
    elif out["changed"]:
        print(f"{reg.url}: current version {out['from']} -> {out['to']}")
    else:
        print(f"{reg.url}: {out['to']} is already current: nothing to do")
    return 0


def _gc(reg, args) -> int:
    out = reg.gc(args.keep, dry_run=args.dry_run, mapped=args.mapped)
    if args.json:
        _print_json(out)
        return 0
    verb = "would delete" if args.dry_run else "deleted"
    print(f"{reg.url}: {verb} {counted(len(out['deleted']), 'version')}"
          + (f" ({', '.join(out['deleted'])})" if out["deleted"] else "")
          + f"; kept {', '.join(out['kept']) or 'none'} (current {out['current'] or 'none'})")
    if out["incomplete"]:
        print(f"  left alone: unfinished publishes {', '.join(out['incomplete'])} (rerun their "
              "realign to finish them)")
    for c in out["mapped"]:
        print("  " + _mapped_line(c, args))
    return 0


def _mapped_line(c: dict, args) -> str:
    """What gc did (or would do) with one deleted version's mapped corpus, in words."""
    what = f"mapped corpus of {c['version']}: {c['output']}"
    if not c["ours"]:
        return f"{what}: left ({c['why']}: not bigalign's to delete)"
    size = f" ({c['bytes'] / 2**30:,.2f} GiB)" if c.get("bytes") is not None else ""
    if c["deleted"]:
        return f"{what}{size}: deleted"
    if args.mapped:  # a dry run
        return f"{what}{size}: would delete"
    return f"{what}{size}: left (pass --mapped to delete it as well)"
