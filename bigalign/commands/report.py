"""PNG reports of evaluation results (matplotlib, Agg backend: no display needed).

Each function takes the JSON-ready dict that :mod:`bigalign.commands.evaluate` returns (or that
``bigalign evaluate/curve/evaluate-retrieval --json`` printed) and writes one PNG:

* :func:`evaluation_png`: cosine histograms before/after alignment (raw and centred),
  recall per method (raw and centred search), and the paper's bound in numbers;
* :func:`curve_png`: recall and residual against the number of training pairs;
* :func:`retrieval_png`: nDCG and recall per method for query -> document retrieval.
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from .evaluate import counted

__all__ = ["evaluation_png", "curve_png", "retrieval_png", "write_png"]

#: Colours by method name, so a method looks the same in every figure.
_COLOURS = {"none": "#9e9e9e", "native": "#2e7d32", "least squares": "#ef6c00",
            "orthogonal": "#7b1fa2", "orthogonal + centring": "#1565c0"}
_FALLBACK = ["#c62828", "#00838f", "#6d4c41", "#ad1457"]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(plt, fig, path: str, title: str, fontsize: int) -> str:
    """Title the figure, write it as a PNG (110 dpi) to ``path``, close it; returns path."""
    fig.suptitle(title, fontsize=fontsize)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _colour(name: str, i: int) -> str:
    return _COLOURS.get(name) or _FALLBACK[i % len(_FALLBACK)]


def _label(m: dict) -> str:
    return m["name"] + (" (this transform)" if m.get("this") else "")


def _histograms(ax, methods, key: str, title: str) -> None:
    for i, m in enumerate(methods):
        h = m[key]
        edges, counts = np.asarray(h["edges"]), np.asarray(h["counts"], dtype=float)
        share = counts / max(counts.sum(), 1)
        lw = 2.4 if m.get("this") else 1.4
        ax.stairs(share, edges, color=_colour(m["name"], i), linewidth=lw,
                  label=f"{_label(m)}: mean {m[key.replace('histogram', 'cosine')]['mean']:.2f}",
                  fill=bool(m.get("this")), alpha=0.25 if m.get("this") else 1.0)
        if m.get("this"):
            ax.stairs(share, edges, color=_colour(m["name"], i), linewidth=lw)
    ax.set_title(title, fontsize=11)
    ax.set_xlabel("cosine(aligned source row, its own target row)")
    ax.set_ylabel("share of held-out pairs")
    ax.set_xlim(-0.5, 1.0)
    ax.legend(fontsize=8, loc="upper left", frameon=False)
    ax.grid(alpha=0.3)


def _bars(ax, labels, groups: dict, title: str, ylabel: str, colours=None) -> None:
    """Grouped bars: groups {series name: [value per label]}."""
    n = len(groups)
    width = 0.8 / max(n, 1)
    x = np.arange(len(labels))
    shades = ["#90caf9", "#1565c0", "#ffcc80", "#ef6c00", "#a5d6a7", "#2e7d32"]
    for j, (series, values) in enumerate(groups.items()):
        vals = [np.nan if v is None else v for v in values]
        bars = ax.bar(x + (j - (n - 1) / 2) * width, vals, width,
                      label=series, color=(colours or shades)[j % len(colours or shades)],
                      edgecolor="white")
        for b, v in zip(bars, vals):
            if np.isfinite(v):
                ax.text(b.get_x() + b.get_width() / 2, v + 0.01, f"{v:.2f}", ha="center",
                        va="bottom", fontsize=7, rotation=90 if n >= 4 else 0)
    ax.set_xticks(x, labels, fontsize=8, rotation=15 if len(labels) > 3 else 0, ha="right"
                  if len(labels) > 3 else "center")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=11)
    ax.set_ylim(0, 1.3)
    ax.legend(fontsize=8, ncols=2, loc="upper left", frameon=False)
    ax.grid(axis="y", alpha=0.3)


def _bound_text(result: dict) -> str:
    tr = result.get("training") or {}
    d = tr.get("diagnostics") or tr.get("fit_diagnostics")
    lines = [f"held-out rows {result['rows'][0]}:{result['rows'][1]} "
             f"({result['pairs']:,} pairs)",
             f"{counted(result['queries'], 'query', 'queries')} searched among "
             f"{counted(result['targets'], 'target', 'targets')}"
             + (" (sampled)" if result.get("sampled") else ""),
             f"chance recall@1 = {result['chance'].get('recall@1', float('nan')):.4f}", ""]
    this = next((m for m in result["methods"] if m.get("this")), None)
    if this:
        r = this["retrieval"]
        lines += [f"this transform ({this['name']}):",
                  f"  recall@1  raw {r['raw']['recall@1']:.3f}   centred {r['centred']['recall@1']:.3f}",
                  f"  mean cosine {this['cosine']['mean']:.3f}",
                  f"  relative residual {this['relative_residual']:.3f}", ""]
    if d:
        from ..maths.metrics import figure  # each figure with its round-off: "<= x" when unresolved

        iv = lambda key: d.get(f"{key}_interval")  # noqa: E731
        check = d.get("bound_check") or {True: "holds",
                                          False: "violated"}.get(d.get("bound_holds"))
        lines += [f"paper bound (training, n = {d.get('n', tr.get('n', '?'))}):",
                  f"  eps = ||AA'-BB'||_F {figure(d['epsilon'], iv('epsilon'))}",
                  f"  delta = eps/n {figure(d['delta'], iv('delta'))}",
                  f"  ||AQ-B||_F: achieved "
                  f"{figure(d.get('achieved_residual'), iv('achieved_residual'))}",
                  f"  bound {figure(d['bound_residual'], iv('bound_residual'))}"
                  + ("" if check is None else
                     f"  ({'VIOLATED' if check == 'violated' else check})")]
    return "\n".join(lines)


def evaluation_png(result: dict, path: str, title: Optional[str] = None) -> str:
    """Write the evaluation report of ``bigalign evaluate`` to ``path``; returns it."""
    plt = _pyplot()
    methods = result["methods"]
    fig, axes = plt.subplots(2, 2, figsize=(13, 9), constrained_layout=True)
    _histograms(axes[0, 0], methods, "histogram", "Cosine per held-out pair, raw space")
    _histograms(axes[0, 1], methods, "histogram_centred",
                "Cosine per held-out pair, both sides' means removed")
    labels = [m["name"] for m in methods]
    groups = {}
    for variant in ("raw", "centred"):
        for k in result["ks"][:2]:
            groups[f"recall@{k}, {variant} search"] = [m["retrieval"][variant][f"recall@{k}"]
                                                      for m in methods]
    _bars(axes[1, 0], labels, groups,
          "Cross-model retrieval: own pair found among all held-out targets", "recall")
    axes[1, 1].axis("off")
    axes[1, 1].text(0.0, 1.0, _bound_text(result), va="top", ha="left", family="monospace",
                    fontsize=10, transform=axes[1, 1].transAxes)
    return _save(plt, fig, path, title or "bigalign evaluate: is this alignment good enough?",
                 fontsize=14)


def curve_png(result: dict, path: str, title: Optional[str] = None) -> str:
    """Write the learning curve of ``bigalign curve`` to ``path``; returns it."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True)
    ks = result["ks"][:2]
    names = list(dict.fromkeys(p["name"] for p in result["points"]))
    for i, name in enumerate(names):
        pts = [p for p in result["points"] if p["name"] == name]
        x = [p["pairs"] for p in pts]
        colour = _colour(name + (" + centring" if result["options"]["center"] and
                                 name == "orthogonal" else ""), i)
        for k, marker in zip(ks, ("o", "s")):
            left.plot(x, [p["retrieval"]["centred"][f"recall@{k}"] for p in pts], marker=marker,
                      color=colour, label=f"{name} recall@{k} (centred search)")
            left.plot(x, [p["retrieval"]["raw"][f"recall@{k}"] for p in pts], marker=marker,
                      color=colour, linestyle=":", alpha=0.7, label=f"{name} recall@{k} (raw)")
        right.plot(x, [p["relative_residual"] for p in pts], marker="o", color=colour,
                   label=f"{name}: held-out")
        right.plot(x, [p["train"].get("relative_residual", np.nan) for p in pts], marker="x",
                   color=colour, linestyle="--", label=f"{name}: training")
    sat = result.get("saturation") or {}
    sizes = sorted({p["pairs"] for p in result["points"]})
    for ax in (left, right):
        ax.set_xscale("log")
        ax.set_xticks(sizes, [f"{s:,}" for s in sizes], fontsize=8)
        ax.minorticks_off()
        ax.set_xlabel("training pairs")
        ax.grid(alpha=0.3, which="both")
        if sat.get("pairs"):
            ax.axvline(sat["pairs"], color="#616161", linestyle="--", linewidth=1)
    left.set_ylim(0, 1.3)
    left.set_yticks(np.linspace(0, 1, 6))
    left.set_ylabel("recall on held-out pairs")
    left.set_title(f"Retrieval against training pairs (saturates near {sat['pairs']:,} pairs)"
                   if sat.get("pairs") else "Retrieval against training pairs (not saturated "
                   "at the largest size)", fontsize=11)
    left.legend(fontsize=7, loc="upper left", ncols=2, frameon=False)
    right.set_ylabel("relative residual (0 perfect, 1 = target mean)")
    right.set_title("Residual: held-out vs training (a gap = overfitting)", fontsize=11)
    top = max([p["relative_residual"] for p in result["points"]] + [1.0])
    right.set_ylim(0, min(top * 1.05, 3.0))
    right.legend(fontsize=8, frameon=False)
    return _save(plt, fig, path, title or
                 f"bigalign curve: held-out rows {result['rows'][0]}:{result['rows'][1]}",
                 fontsize=14)


def retrieval_png(result: dict, path: str, title: Optional[str] = None) -> str:
    """Write the query -> document retrieval report to ``path``; returns it."""
    plt = _pyplot()
    methods = result["methods"]
    labels = [m["name"] for m in methods]
    metrics = [f"ndcg@{result['ndcg_k']}"] + [f"recall@{k}" for k in result["ks"]][:2]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), constrained_layout=True, sharey=True)
    for ax, variant in zip(axes, ("raw", "centred")):
        groups = {mt: [m["retrieval"][variant][mt] for m in methods] for mt in metrics}
        _bars(ax, labels, groups, f"{variant} search", "score",
              colours=["#1565c0", "#90caf9", "#ef6c00"])
    return _save(plt, fig, path, title or
                 f"bigalign evaluate-retrieval: {counted(result['queries'], 'query', 'queries')}, "
                 f"{counted(result['documents'], 'document', 'documents')}, {result['map']} "
                 "mapped", fontsize=13)


def write_png(result: dict, path: str, title: Optional[str] = None) -> str:
    """Dispatch on ``result["kind"]``."""
    kind = result.get("kind")
    fn = {"evaluate": evaluation_png, "curve": curve_png, "retrieval": retrieval_png}.get(kind)
    if fn is None:
        raise ValueError(f"no PNG report for a result of kind {kind!r}")
    return fn(result, path, title)
