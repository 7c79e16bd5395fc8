"""End-to-end decode throughput in transformers: dense vs TokenButler.

A random-initialised model of a real shape (default: Llama-3.1-8B), bf16, a static cache,
``torch.compile`` of the decode step; the same loop for both, timed with CUDA events after warm-up.
Random weights and a random predictor change no timing: the work per step is the same as with
trained ones (the selection size is fixed by the budget).

    python benchmarks/bench_e2e_transformers.py --batch 1 4 --context 32768 --budget 0.1

Prints a markdown table; writes JSON to ``$OUT/bench_e2e_transformers.json`` when ``OUT`` is set.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

SHAPES = {
    "llama-3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256, rope_theta=500000.0, max_position_embeddings=131072,
                         rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                       "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    "tiny": dict(hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=2, vocab_size=1024, max_position_embeddings=8192),
}


def build_model(shape: str, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(**SHAPES[shape], attn_implementation="sdpa")
    torch.manual_seed(0)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


@torch.no_grad()
def decode_rate(model, batch: int, context: int, steps: int, warmup: int, compile_mode: str | None):
    """Prefill eagerly, then time ``steps`` compiled decode steps; returns (tokens/s, ms/step, compile s)."""
    from transformers import StaticCache

    from butler_zoo.compat import cache_kwarg

    device = next(model.parameters()).device
    g = torch.Generator(device="cpu").manual_seed(1)
    lo = min(1000, model.config.vocab_size // 4)
    ids = torch.randint(lo, model.config.vocab_size - lo, (batch, context), generator=g).to(device)
    cache_len = context + warmup + steps + 8
    cache = StaticCache(config=model.config, max_cache_len=cache_len)
    mask = torch.ones(batch, cache_len, dtype=torch.long, device=device)
    out = model(input_ids=ids, attention_mask=mask[:, :context], use_cache=True, logits_to_keep=1, **{cache_kwarg(model): cache})
    tok = out.logits[:, -1:].argmax(-1)
    del out
    step = model.forward
    if compile_mode is not None:
        step = torch.compile(model.forward, fullgraph=True, mode=None if compile_mode == "default" else compile_mode)
    pos = torch.full((batch, 1), context, device=device)

    def one(i):
        nonlocal tok
        o = step(input_ids=tok, attention_mask=mask, use_cache=True, position_ids=pos + i, logits_to_keep=1, **{cache_kwarg(model): cache})
        tok = o.logits[:, -1:].argmax(-1)

    t0 = time.perf_counter()
    for i in range(warmup):
        one(i)
    torch.cuda.synchronize()
    compile_s = time.perf_counter() - t0
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for i in range(warmup, warmup + steps):
        one(i)
    end.record()
    torch.cuda.synchronize()
    ms = start.elapsed_time(end) / steps
    return batch * 1000.0 / ms, ms, compile_s


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--budget", type=float, default=0.1, help="fraction of the context (predicted tokens)")
    ap.add_argument("--sinks", type=int, default=64)
    ap.add_argument("--window", type=int, default=256)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=4)
    ap.add_argument("--compile", default="reduce-overhead", choices=["none", "default", "reduce-overhead"])
    ap.add_argument("--modes", nargs="+", default=["dense", "butler"], choices=["dense", "butler"])
    args = ap.parse_args()

    from butler_zoo import ButlerConfig, ButlerPredictor, attach_butler, detach_butler
    import transformers

    model = build_model(args.shape, "cuda", torch.bfloat16)
    cfg = ButlerConfig.for_model(model.config, base_model=f"random-{args.shape}")
    predictor = ButlerPredictor(cfg)
    compile_mode = None if args.compile == "none" else args.compile
    rows = []
    for batch in args.batch:
        for mode in args.modes:
            torch._dynamo.reset()
            if mode == "butler":
                attach_butler(model, predictor, budget=args.budget, sinks=args.sinks, window=args.window)
            try:
                tps, ms, cs = decode_rate(model, batch, args.context, args.steps, args.warmup, compile_mode)
            finally:
                if mode == "butler":
                    detach_butler(model)
            torch.cuda.empty_cache()
            rows.append(dict(mode=mode, batch=batch, context=args.context, tokens_per_s=tps, ms_per_step=ms, warmup_s=cs))
            print(f"{mode:6s} batch {batch} ctx {args.context}: {tps:8.1f} tok/s  {ms:7.2f} ms/step  (warm-up+compile {cs:.0f}s)", flush=True)
    info = dict(gpu=torch.cuda.get_device_name(), torch=torch.__version__, transformers=transformers.__version__,
                python=platform.python_version(), shape=args.shape, budget=args.budget, sinks=args.sinks,
                window=args.window, compile=args.compile, steps=args.steps)
    print("\n| batch | context | dense tok/s | TokenButler tok/s | speed-up |")
    print("|---|---|---|---|---|")
    for batch in args.batch:
        d = next((r for r in rows if r["batch"] == batch and r["mode"] == "dense"), None)
        b = next((r for r in rows if r["batch"] == batch and r["mode"] == "butler"), None)
        sp = f"{b['tokens_per_s'] / d['tokens_per_s']:.2f}x" if d and b else "-"
        print(f"| {batch} | {args.context} | {d['tokens_per_s']:.1f} | {b['tokens_per_s']:.1f} | {sp} |" if d and b else f"| {batch} | {args.context} | {d and round(d['tokens_per_s'], 1)} | {b and round(b['tokens_per_s'], 1)} | - |")
    print(json.dumps(info))
    if os.environ.get("OUT"):
        with open(os.path.join(os.environ["OUT"], "bench_e2e_transformers.json"), "w") as f:
            json.dump(dict(info=info, rows=rows), f, indent=2)


if __name__ == "__main__":
    main()
