"""Plots of a training log (``loss.png``) and of an evaluation (``eval_ppl.png``).

matplotlib is imported only here, inside the functions, so training and evaluation run without it;
they call these functions only when asked to plot (and say so loudly if matplotlib is missing).
Re-plot later from the JSON files::

    python -m butler_training.plots loss  DIR   # DIR/training_log.json -> DIR/loss.png
    python -m butler_training.plots eval  DIR   # DIR/eval.json         -> DIR/eval_ppl.png
    python -m butler_training.plots length DIR  # DIR/eval_by_length.json -> DIR/eval_by_length.png, recall_by_position.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["require_matplotlib", "plot_loss", "plot_eval", "plot_by_length", "plot_recall_by_position"]

METHOD_STYLE = {
    "tokenbutler": ("tab:blue", "o"),
    "oracle": ("black", "s"),
    "h2o": ("tab:orange", "^"),
    "snapkv": ("tab:green", "v"),
    "quest": ("tab:purple", "D"),
    "streaming_llm": ("tab:brown", "x"),
    "random": ("tab:gray", "+"),
}


def require_matplotlib():
    """Import matplotlib with a headless backend, or raise a clear error."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as e:
        raise RuntimeError(
            "plotting needs matplotlib, which is not installed: `pip install matplotlib` (or the `train` extra), "
            "or pass --no-plot and plot later with `python -m butler_training.plots`"
        ) from e
    return plt


def plot_loss(log: dict, path: str | Path) -> Path:
    """Training loss (and held-out loss, when logged) against tokens seen."""
    plt = require_matplotlib()
    steps = log["steps"]
    fig, ax = plt.subplots(figsize=(6.4, 4.0), dpi=120)
    if steps:
        seq = [s.get("tokens", s["step"]) for s in steps]
        ax.plot(seq, [s["loss"] for s in steps], label="train CE (sampled rows)", lw=1.2)
        if all("kl" in s for s in steps):
            ax.plot(seq, [s["kl"] for s in steps], label="train KL = CE - H(teacher)", lw=1.2)
    val = log.get("validation", [])
    if val:
        ax.plot([v.get("tokens", v["step"]) for v in val], [v["kl"] for v in val], "o--", label="held-out KL")
    ax.set_xlabel("tokens seen" if steps and "tokens" in steps[0] else "step")
    ax.set_ylabel("loss (nats)")
    ax.set_title(log.get("title", "TokenButler distillation"), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_eval(result: dict, path: str | Path) -> Path:
    """Perplexity against budget (fraction of the context), one line per method and interval."""
    plt = require_matplotlib()
    fig, ax = plt.subplots(figsize=(7.0, 4.4), dpi=120)
    dense = result.get("dense_ppl")
    lines: dict[str, list[tuple[float, float]]] = {}
    for r in result["results"]:
        if r["method"] == "dense" or r["budget_kind"] != "fraction":
            continue
        label = r["method"] if r.get("interval") in (None, 1) else f"{r['method']} (interval {r['interval']})"
        lines.setdefault(label, []).append((float(r["budget"]), float(r["ppl"])))
    for label, pts in sorted(lines.items()):
        pts.sort()
        base = label.split(" ")[0]
        color, marker = METHOD_STYLE.get(base, (None, "."))
        style = "-" if "interval" not in label else ":"
        ax.plot([100 * p[0] for p in pts], [p[1] for p in pts], style, color=color, marker=marker, label=label, lw=1.2, ms=4)
    if dense is not None:
        ax.axhline(dense, color="k", lw=0.8, ls="--", label=f"dense ({dense:.2f})")
    ax.set_yscale("log")
    ax.set_xlabel("budget (% of the context attended, sinks and window included)")
    ax.set_ylabel("decode-simulated perplexity")
    ax.set_title(f"{result.get('base_model', '')} on {result.get('split', '')}", fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_by_length(result: dict, path: str | Path) -> Path:
    """Perplexity / dense against context length, one panel per budget, one line per method."""
    plt = require_matplotlib()
    blocks = sorted(((int(L), b) for L, b in result["by_length"].items()), key=lambda x: x[0])
    budgets = sorted({float(r["budget"]) for _, b in blocks for r in b["results"]
                      if r["method"] != "dense" and r["budget_kind"] == "fraction"})
    if not budgets:
        raise ValueError("no fractional budgets in the by-length results")
    fig, axes = plt.subplots(1, len(budgets), figsize=(3.4 * len(budgets), 3.6), dpi=120, squeeze=False)
    for ax, f in zip(axes[0], budgets):
        lines: dict[str, list[tuple[int, float]]] = {}
        for L, b in blocks:
            for r in b["results"]:
                if r["method"] != "dense" and r["budget_kind"] == "fraction" and float(r["budget"]) == f:
                    lines.setdefault(r["method"], []).append((L, float(r["ppl_rel"])))
        for m, pts in lines.items():
            color, marker = METHOD_STYLE.get(m, (None, "."))
            ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color=color, marker=marker, label=m, lw=1.2, ms=4)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xticks([L for L, _ in blocks], [f"{L // 1024}K" if L >= 1024 else str(L) for L, _ in blocks])
        ax.set_title(f"budget {f:.0%} of the context", fontsize=9)
        ax.set_xlabel("context length (tokens)")
        ax.grid(alpha=0.3, which="both")
    axes[0][0].set_ylabel("perplexity / dense")
    axes[0][-1].legend(fontsize=7)
    fig.suptitle(f"{result.get('base_model', '')}: {result.get('split', '')}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_recall_by_position(result: dict, path: str | Path, budget: float = 0.1) -> Path:
    """Attention-mass recall against query position in the longest context, one line per method, at
    ``budget`` (the nearest evaluated budget), and recall against key distance beside it."""
    plt = require_matplotlib()
    L, block = max(((int(k), v) for k, v in result["by_length"].items()), key=lambda x: x[0])
    rows = [r for r in block["results"] if r.get("diagnostics") and r["budget_kind"] == "fraction"]
    if not rows:
        raise ValueError("no diagnostics in the by-length results (evaluate with diagnostics on)")
    f = min({float(r["budget"]) for r in rows}, key=lambda x: abs(x - budget))
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10.0, 3.8), dpi=120)
    for r in rows:
        if float(r["budget"]) != f:
            continue
        color, marker = METHOD_STYLE.get(r["method"], (None, "."))
        pos = r["diagnostics"]["recall_by_position"]
        ax1.plot([(p["from"] + p["to"]) / 2 for p in pos], [p["recall"] for p in pos], "-", color=color, marker=marker,
                 label=r["method"], lw=1.2, ms=4)
        dist = [d for d in r["diagnostics"]["recall_by_distance"] if d["to"] is not None]
        ax2.plot([max(d["from"], 1) for d in dist], [d["recall"] for d in dist], "-", color=color, marker=marker,
                 label=r["method"], lw=1.2, ms=4)
    ax1.set_xlabel("query position in the context (tokens)")
    ax1.set_ylabel("attention-mass recall")
    ax1.set_title(f"{L}-token contexts, budget {f:.0%}", fontsize=9)
    ax2.set_xscale("log", base=2)
    ax2.set_xlabel("key distance to the query (bucket start, tokens)")
    ax2.set_title("recall of the mass at each distance", fontsize=9)
    for ax in (ax1, ax2):
        ax.grid(alpha=0.3)
        ax.set_ylim(0, 1.02)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m butler_training.plots", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["loss", "eval", "length"])
    parser.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    if args.kind == "loss":
        out = plot_loss(json.loads((args.directory / "training_log.json").read_text()), args.directory / "loss.png")
    elif args.kind == "length":
        data = json.loads((args.directory / "eval_by_length.json").read_text())
        out = plot_by_length(data, args.directory / "eval_by_length.png")
        plot_recall_by_position(data, args.directory / "recall_by_position.png")
    else:
        out = plot_eval(json.loads((args.directory / "eval.json").read_text()), args.directory / "eval_ppl.png")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
