"""Plots of a training log (``loss.png``) and of an evaluation (``eval_ppl.png``).

matplotlib is imported only here, inside the functions, so training and evaluation run without it;
they call these functions only when asked to plot (and say so loudly if matplotlib is missing).
Re-plot later from the JSON files::

    python -m butler_training.plots loss  DIR   # DIR/training_log.json -> DIR/loss.png
    python -m butler_training.plots eval  DIR   # DIR/eval.json         -> DIR/eval_ppl.png
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

__all__ = ["require_matplotlib", "plot_loss", "plot_eval"]

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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m butler_training.plots", description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=["loss", "eval"])
    parser.add_argument("directory", type=Path)
    args = parser.parse_args(argv)
    if args.kind == "loss":
        out = plot_loss(json.loads((args.directory / "training_log.json").read_text()), args.directory / "loss.png")
    else:
        out = plot_eval(json.loads((args.directory / "eval.json").read_text()), args.directory / "eval_ppl.png")
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
