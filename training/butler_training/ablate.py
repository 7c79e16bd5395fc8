"""Ablations in one process: train several predictor variants and evaluate each briefly.

    python -m butler_training.ablate --recipe smollm2-135m-instruct --tokens 4000000 --out runs/ablate \\
        --variants default query_heads=query producer_stride=2 producer_stride=8 sketch_dim=8 sketch_dim=32 \\
                   mlp_dim=256 mlp_dim=1024 tail_fraction=0.875 tokens=1000000 tokens=16000000

The base model, the tokenized windows and the held-out evaluation windows are loaded once. A variant
is ``default`` or comma-separated ``field=value`` overrides of :class:`~butler_training.train.TrainConfig`
(``producer_stride``, ``sketch_dim``, ``mlp_dim``, ``query_heads``, ``tail_fraction``, ``tokens``,
``lr``, ``batch_size``, ``rows``...). Each is trained (``OUT/<variant>/``: predictor + training log), then
evaluated with TokenButler (interval 1) at ``--fractions`` on ``--eval-windows`` held-out windows
(perplexity ratio to dense, mass recall, top-k overlap); the oracle at the same budgets is measured
once as the reference. ``OUT/ablate.json`` is rewritten after every variant and variants already in it
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
        if isinstance(default, bool):
            out[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, int) or key in ("tokens", "producer_stride", "sketch_dim", "mlp_dim", "seq_len"):
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
    p.add_argument("--eval-windows", type=int, default=16, help="held-out windows for the decode-simulated evaluation")
    p.add_argument("--eval-batch-size", type=int, default=4)
    p.add_argument("--fractions", nargs="+", type=float, default=[0.1, 0.25, 0.5])
    p.add_argument("--prefill", type=int, default=128)
    p.add_argument("--sinks", type=int, default=4)
    p.add_argument("--window", type=int, default=8)
    args = p.parse_args(argv)

    from butler_training.recipes import get_recipe
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
    seq_len = recipe.seq_len
    tw = build_windows(tokenizer, list(recipe.data), seq_len, "train", args.data_dir)
    train_windows = torch.stack([tw[i] for i in range(len(tw))])
    vw = build_windows(tokenizer, list(recipe.data), seq_len, "heldout", args.data_dir)
    val_windows = torch.stack([vw[i] for i in evenly_spaced(len(vw), args.val_windows)])
    from butler_training.data import TokenWindows

    ew = TokenWindows(tokenizer, list(DEFAULT_DATA), seq_len, "all", seed=0, root=args.data_dir, cache=True)
    eval_windows = torch.stack([ew[i] for i in evenly_spaced(len(ew), args.eval_windows)])

    path = out / "ablate.json"
    report = json.loads(path.read_text()) if path.is_file() else {
        "recipe": args.recipe, "command": "python -m butler_training.ablate " + " ".join(argv or sys.argv[1:]),
        "machine": describe_machine(device), "versions": versions(), "date": utc_now(),
        "eval": {"split": "+".join(DEFAULT_DATA), "windows": args.eval_windows, "seq_len": seq_len,
                 "prefill_len": args.prefill, "sinks": args.sinks, "window": args.window, "fractions": args.fractions},
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
            dense = windows_ppl(sim, eval_windows, None, plan_fn(1.0), args.prefill, args.eval_batch_size, device, metrics=False)
            ref = {"dense_ppl": dense["ppl"]}
            for f in args.fractions:
                r = windows_ppl(sim, eval_windows, build_method("oracle"), plan_fn(f), args.prefill, args.eval_batch_size, device)
                ref[f"oracle@{f}"] = {"ppl_rel": r["ppl"] / dense["ppl"], "mass_recall": r["mass_recall"]}
            report["reference"] = ref
            save()
    dense_ppl = report["reference"]["dense_ppl"]
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
            for f in args.fractions:
                r = windows_ppl(sim, eval_windows, build_method("tokenbutler", 1, pred), plan_fn(f), args.prefill,
                                args.eval_batch_size, device)
                entry[f"@{f}"] = {"ppl_rel": r["ppl"] / dense_ppl, "mass_recall": r["mass_recall"],
                                  "topk_overlap": r["topk_overlap"]}
        entry["seconds"] = round(time.perf_counter() - t0, 1)
        report["variants"].append(entry)
        save()
        cells = "  ".join(f"{f:.0%}: {entry[f'@{f}']['ppl_rel']:.4f}x r={entry[f'@{f}']['mass_recall']:.3f}" for f in args.fractions)
        print(f"== {variant}: KL {entry['heldout_kl']:.4f}  {cells}  [{entry['seconds']}s]", file=sys.stderr, flush=True)
    ref = report["reference"]
    print("variant | params | held-out KL | " + " | ".join(f"ppl_rel@{f:.0%} (recall)" for f in args.fractions))
    print("oracle | | | " + " | ".join(f"{ref[f'oracle@{f}']['ppl_rel']:.4f} ({ref[f'oracle@{f}']['mass_recall']:.3f})"
                                        for f in args.fractions if f"oracle@{f}" in ref))
    for v in report["variants"]:
        print(f"{v['variant']} | {v['parameters']:,} | {v['heldout_kl']:.4f} | "
              + " | ".join(f"{v[f'@{f}']['ppl_rel']:.4f} ({v[f'@{f}']['mass_recall']:.3f})" for f in args.fractions if f"@{f}" in v))
    return 0


if __name__ == "__main__":
    sys.exit(main())
