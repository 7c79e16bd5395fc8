"""Sweep the launch parameters of the budgeted attention kernel on the SGLang decode step's shapes.

    python benchmarks/tune_attention.py                              # batch 8 x 32K, the server's k
    python benchmarks/tune_attention.py --batch 1 8 16 --context 32768 --k 3482

Two places, as ``bench_decode_fusions.py`` sets them up (Llama-3.1-8B shapes, paged K/V behind a
shuffled page table, bf16): the **served layer** (sinks + window + ``k`` selected positions, the
step's sketch write folded in, the backend's persistent split counters) and the **dense layer**
(layer 0: no selection, a window as long as the context). ``--k`` defaults to what the benchmarked
server attends: 10% of its 34816-position table.

Stage 1 times every (block_n, num_warps, num_stages) at the default number of splits; stage 2
sweeps the splits for the three best of stage 1. Every candidate's output is checked against the
default configuration's before it is timed (CUDA graph of 20 calls, median per call). Prints the
default, the best and the ten best of each place, and writes ``$OUT/tune_attention.json`` (or
``--json PATH``).
"""

from __future__ import annotations

import argparse
import dataclasses

import torch

from bench_decode_fusions import (
    DEVICE, dense_layer_case, graph_us, predictor_8b, report_header, served_layer_case, write_report,
)
from butler_kernels import AttentionConfig, NewSketch, budgeted_attention_triton
from butler_kernels.budgeted_attention import default_attention_config


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__)
    p.add_argument("--batch", type=int, nargs="+", default=[8])
    p.add_argument("--context", type=int, nargs="+", default=[32768])
    p.add_argument("--k", type=int, default=3482, help="selected positions per (row, KV head) in the served layer")
    p.add_argument("--sinks", type=int, default=64)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--places", nargs="+", default=["served", "dense"], choices=["served", "dense"])
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def sweep(run, default: AttentionConfig, attended: int) -> list[dict]:
    """Times ``run(config)`` (which returns the output) for the candidates; returns rows sorted by time."""
    want = run(default).clone()
    timed: dict[AttentionConfig, float] = {}

    def time_one(cfg: AttentionConfig) -> None:
        if cfg in timed:
            return
        got = run(cfg)
        err = ((got.float() - want.float()).abs().max() / want.float().abs().max()).item()
        if err > 2e-2:
            raise AssertionError(f"{cfg} changes the output: relative error {err:.2e}")
        timed[cfg] = graph_us(lambda: run(cfg))

    time_one(default)
    for block_n in (16, 32, 64):
        for warps in (2, 4, 8):
            for stages in (2, 3, 4, 5):
                time_one(AttentionConfig(num_splits=default.num_splits, block_n=block_n, num_warps=warps, num_stages=stages))
    top = sorted(timed, key=timed.get)[:3]
    for cfg in top:
        most = max(1, -(-attended // cfg.block_n))
        for splits in sorted({max(1, default.num_splits + d) for d in (-4, -3, -2, -1, 1, 2, 3, 4, 6, 8)} | {2 * default.num_splits}):
            if splits <= most:
                time_one(dataclasses.replace(cfg, num_splits=splits))
    return [{**dataclasses.asdict(c), "us": t, "default": c == default} for c, t in sorted(timed.items(), key=lambda x: x[1])]


def served(pred, batch: int, context: int, args) -> tuple[list[dict], AttentionConfig]:
    c = served_layer_case(pred, batch, context, args.sinks, args.window, args.k)
    out = torch.empty_like(c["q"])
    new_sketch = NewSketch(c["pool"], c["loc"], c["keys"], c["weight"])
    attended = args.sinks + args.window + args.k

    def run(cfg):
        return budgeted_attention_triton(c["q"], c["kbuf"], c["vbuf"], c["sel"], c["start"], c["end"], sinks=args.sinks,
                                         window=args.window, scale=c["q"].shape[-1] ** -0.5, token_table=c["table"],
                                         out=out, config=cfg, split_counters=c["counters"], new_sketch=new_sketch)

    default = default_attention_config(batch * 8, attended, 128, DEVICE, paged=True)
    return sweep(run, default, attended), default


def dense(batch: int, context: int) -> tuple[list[dict], AttentionConfig]:
    c = dense_layer_case(batch, context)
    out = torch.empty_like(c["q"])

    def run(cfg):
        return budgeted_attention_triton(c["q"], c["kbuf"], c["vbuf"], c["no_sel"], c["start"], c["end"], sinks=0,
                                         window=context, scale=c["q"].shape[-1] ** -0.5, token_table=c["table"],
                                         out=out, config=cfg, split_counters=c["counters"])

    default = default_attention_config(batch * 8, context, 128, DEVICE, paged=True)
    return sweep(run, default, context), default


def main(argv=None) -> None:
    args = parse_args(argv)
    env = report_header()
    pred = predictor_8b()
    results = []
    for b in args.batch:
        for t in args.context:
            for place in args.places:
                rows, default = served(pred, b, t, args) if place == "served" else dense(b, t)
                d_us = next(r["us"] for r in rows if r["default"])
                print(f"\n## {place} layer, batch {b} x {t}: default {dataclasses.asdict(default)} {d_us:.1f} us, "
                      f"best {rows[0]['us']:.1f} us ({100 * (1 - rows[0]['us'] / d_us):.1f}% less), {len(rows)} configs")
                print("| splits | block_n | warps | stages | us |\n|---|---|---|---|---|")
                for r in rows[:10]:
                    mark = " (default)" if r["default"] else ""
                    print(f"| {r['num_splits']} | {r['block_n']} | {r['num_warps']} | {r['num_stages']} | {r['us']:.1f}{mark} |")
                results.append({"place": place, "batch": b, "context": t, "k": args.k if place == "served" else None,
                                "default": dataclasses.asdict(default), "rows": rows})
    write_report(args, "tune_attention.json", {"env": env, "args": vars(args), "results": results})


if __name__ == "__main__":
    main()
