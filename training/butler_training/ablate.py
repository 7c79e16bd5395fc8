"""Ablations in one process: train several predictor variants and evaluate each briefly.

    python -m butler_training.ablate --recipe smollm2-135m-instruct --tokens 4000000 --out runs/ablate \\
        --variants default query_heads=query producer_stride=2 producer_stride=8 sketch_dim=8 sketch_dim=32 \\
                   mlp_dim=256 mlp_dim=1024 tail_fraction=0.875 tokens=1000000 tokens=16000000

The base model, the tokenized windows and the held-out evaluation windows are loaded once. A variant
is ``default`` or comma-separated ``field=value`` overrides of :class:`~butler_training.train.TrainConfig`
(``producer_stride``, ``sketch_dim``, ``mlp_dim``, ``query_heads``, ``tail_fraction``, ``tokens``,
``lr``, ``batch_size``, ``rows``, ``format_version``, ``seq_lens`` with ``;`` between lengths...). Each is
trained on windows of ``--seq-len`` tokens (default: the recipe's; ``seq_lens`` cuts them shorter) into
``OUT/<variant>/`` (predictor + training log), then evaluated with TokenButler (interval 1) at
``--fractions`` on ``--eval-windows`` held-out windows of each ``--eval-seq-lens`` length (perplexity ratio
to dense, mass recall, top-k overlap); the oracle at the same budgets and lengths is measured once as the
reference. ``OUT/ablate.json`` is rewritten after every variant and variants already in it
are skipped, so the command can be re-run after a time limit.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from butler_training.common import DTYPES, describe_machine, load_base, locate_base, resolve_device, utc_now, versions
from butler_training.evaluate import DEFAULT_DATA, DecodeSimulator, build_method, make_plan, windows_ppl
from butler_training.train import TrainConfig, build_windows, evenly_spaced, make_butler_config, train

__all__ = ["main", "parse_variant"]


def parse_variant(text: str) -> dict:
    if text == "default":
        return {}
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    out = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        if not sep or key not in fields:
            raise SystemExit(f"bad variant {text!r}: expected 'default' or field=value[,field=value] with fields of TrainConfig")
        default = getattr(TrainConfig(out=""), key)
        if key == "seq_lens":
            out[key] = [int(v) for v in value.split(";")]
        elif isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, int) or key in ("tokens", "producer_stride", "sketch_dim", "mlp_dim", "seq_len", "format_version"):
            out[key] = int(float(value))
        elif isinstance(default, float):
            out[key] = float(value)
        else:
            out[key] = value
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m butler_training.ablate", description=__doc__.split("\n\n")[0])
    p.add_argument("--recipe", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--variants", nargs="+", default=["default"])
    p.add_argument("--base-model")
    p.add_argument("--gguf-file")
    p.add_argument("--data-dir")
    p.add_argument("--tokens", type=int, default=4_000_000, help="training tokens per variant (a variant may override)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="auto")
    p.add_argument("--base-dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--val-windows", type=int, default=16, help="held-out windows for the training-loss validation")
    p.add_argument("--eval-windows", type=int, default=16, help="held-out windows per length for the decode-simulated evaluation")
    p.add_argument("--seq-len", type=int, help="training window length (default: the recipe's)")
    p.add_argument("--eval-seq-lens", type=int, nargs="+", help="evaluation context lengths (default: the training window length)")
    p.add_argument("--eval-batch-size", type=int, default=4)
    p.add_argument("--fractions", nargs="+", type=float, default=[0.1, 0.25, 0.5])
    p.add_argument("--prefill", type=int, default=128)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=8)
    args = p.parse_args(argv)

    from butler_zoo.recipes import get_recipe
    from butler_zoo.predictor import ButlerPredictor

    recipe = get_recipe(args.recipe)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    loc = locate_base(args.base_model, args.gguf_file, recipe)
    print(f"loading base {loc['description']} ...", file=sys.stderr)
    model, tokenizer = load_base(loc, DTYPES[args.base_dtype])
    model.to(device)
    seq_len = args.seq_len or recipe.seq_len
    tw = build_windows(tokenizer, list(recipe.data), seq_len, "train", args.data_dir)
    train_windows = torch.stack([tw[i] for i in range(len(tw))])
    vw = build_windows(tokenizer, list(recipe.data), seq_len, "heldout", args.data_dir)
    val_windows = torch.stack([vw[i] for i in evenly_spaced(len(vw), args.val_windows)])
    from butler_training.data import TokenWindows

    eval_lens = args.eval_seq_lens or [seq_len]
    eval_windows = {}
    for L in eval_lens:
        ew = TokenWindows(tokenizer, list(DEFAULT_DATA), L, "all", seed=0, root=args.data_dir, cache=True)
        eval_windows[L] = torch.stack([ew[i] for i in evenly_spaced(len(ew), args.eval_windows)])

    path = out / "ablate.json"
    report = json.loads(path.read_text()) if path.is_file() else {
        "recipe": args.recipe, "command": "python -m butler_training.ablate " + " ".join(argv or sys.argv[1:]),
        "machine": describe_machine(device), "versions": versions(), "date": utc_now(),
        "eval": {"split": "+".join(DEFAULT_DATA), "windows": args.eval_windows, "seq_lens": eval_lens,
                 "train_seq_len": seq_len, "prefill_len": args.prefill, "sinks": args.sinks, "window": args.window,
                 "fractions": args.fractions},
        "reference": {}, "variants": [],
    }

    def save():
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(report, indent=1) + "\n")
        tmp.replace(path)

    def plan_fn(f):
        return lambda L, P: make_plan(L, P, f, "fraction", args.sinks, args.window)

    with DecodeSimulator(model) as sim:
        if not report["reference"]:
            for L, windows in eval_windows.items():
                dense = windows_ppl(sim, windows, None, plan_fn(1.0), args.prefill, args.eval_batch_size, device, metrics=False)
                ref = {"dense_ppl": dense["ppl"]}
                for f in args.fractions:
                    r = windows_ppl(sim, windows, build_method("oracle"), plan_fn(f), args.prefill, args.eval_batch_size, device)
                    ref[f"oracle@{f}"] = {"ppl_rel": r["ppl"] / dense["ppl"], "mass_recall": r["mass_recall"]}
                report["reference"][str(L)] = ref
            save()
    done = {v["variant"] for v in report["variants"]}
    for variant in args.variants:
        if variant in done:
            continue
        over = parse_variant(variant)
        t0 = time.perf_counter()
        cfg = TrainConfig(out=str(out / variant.replace("=", "-").replace(",", "_")), recipe=args.recipe,
                          tokens=args.tokens, batch_size=args.batch_size, device=str(device), plot=False, progress=False,
                          log_every=50, base_dtype=args.base_dtype)
        cfg = dataclasses.replace(cfg, **over)
        bcfg = make_butler_config(cfg, model, recipe)
        log = train(cfg, model=model, tokenizer=tokenizer, train_windows=train_windows, val_windows=val_windows,
                    butler_config=bcfg)
        pred = ButlerPredictor.from_pretrained(cfg.out).to(device).eval().requires_grad_(False)
        entry = {"variant": variant, "overrides": over, "parameters": pred.num_parameters(),
                 "tokens": log["tokens_seen"], "train_time_s": log["train_time_s"],
                 "heldout_kl": log["validation"][-1]["kl"] if log["validation"] else None}
        with DecodeSimulator(model) as sim:
            for L, windows in eval_windows.items():
                dense_ppl = report["reference"][str(L)]["dense_ppl"]
                for f in args.fractions:
                    r = windows_ppl(sim, windows, build_method("tokenbutler", 1, pred), plan_fn(f), args.prefill,
                                    args.eval_batch_size, device)
                    entry[f"{L}@{f}"] = {"ppl_rel": r["ppl"] / dense_ppl, "mass_recall": r["mass_recall"],
                                         "topk_overlap": r["topk_overlap"]}
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        report["variants"].append(entry)
        save()
        cells = "  ".join(f"{k}: {v['ppl_rel']:.4f}x r={v['mass_recall']:.3f}" for k, v in entry.items() if "@" in k)
        print(f"== {variant}: KL {entry['heldout_kl']:.4f}  {cells}  [{entry['seconds']}s]", file=sys.stderr, flush=True)
    print(format_ablation(report))
    return 0


def format_ablation(report: dict) -> str:
    """Markdown table: a row per variant (and the oracle), a column per (length, budget): ppl ratio (recall)."""
    cols = [(int(L), f) for L in report["reference"] for f in report["eval"]["fractions"]]
    head = "| variant | held-out KL | " + " | ".join(f"{L} @ {f:.0%}" for L, f in cols) + " |"
    lines = [head, "|" + "---|" * (2 + len(cols))]
    ref = report["reference"]
    lines.append("| oracle | | " + " | ".join(
        f"{ref[str(L)][f'oracle@{f}']['ppl_rel']:.4f} ({ref[str(L)][f'oracle@{f}']['mass_recall']:.3f})" for L, f in cols) + " |")
    for v in report["variants"]:
        cells = [f"{v[f'{L}@{f}']['ppl_rel']:.4f} ({v[f'{L}@{f}']['mass_recall']:.3f})" if f"{L}@{f}" in v else "–" for L, f in cols]
        kl = f"{v['heldout_kl']:.4f}" if v.get("heldout_kl") is not None else "–"
        lines.append(f"| {v['variant']} | {kl} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
