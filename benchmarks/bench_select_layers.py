"""Selection of the layers one predictor producer serves: one launch per layer vs one launch over all.

    python benchmarks/bench_select_layers.py                        # batch 1/8/16 x 32K, 4 layers, 10 %
    python benchmarks/bench_select_layers.py --batch 8 --context 32768 131072 --layers 2 4

The SGLang backend selects, right after a producer layer, for every layer that producer serves
(``butler_sglang.backend.ButlerState.select_served_layers``): the same kernels over L times the rows
in one set of launches instead of L sets. This times both ways on the backend's storage (one
``[H_kv, L, slots, d']`` sketch tensor, read as a head-major paged pool through a token table of
shuffled 16-slot pages; Llama-3.1-8B shapes: 8 KV heads, one predictor head per KV head, d' 16),
each replayed as a CUDA graph holding one producer's selections (no launch overhead: what the
server's decode graph sees), timed with ``triton.testing.do_bench`` (median) over rotated copies
of the inputs larger than L2. Before timing, every layer's selection of the batched call is
checked to be the set the per-layer call selects.

Writes ``$OUT/bench_select_layers.json`` when ``OUT`` is set (or ``--json PATH``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform

import torch

from butler_kernels import select

DEVICE = torch.device("cuda")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--context", type=int, nargs="+", default=[32768])
    p.add_argument("--layers", type=int, nargs="+", default=[4], help="layers served by one producer")
    p.add_argument("--budget", type=float, default=0.1, help="fraction of the context attended (sinks + window + selected)")
    p.add_argument("--sinks", type=int, default=64)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--sketch-dim", type=int, default=16)
    p.add_argument("--l2-flush-mb", type=float, default=200.0)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


class Copy:
    """One producer's inputs: queries [L, B, H, d'] and the stacked head-major sketch pool."""

    def __init__(self, batch, context, layers, kv_heads, dp, gen):
        slots = batch * context
        pages = torch.randperm(slots // 16, device=DEVICE, generator=gen)
        self.table = (pages[:, None] * 16 + torch.arange(16, device=DEVICE)).reshape(batch, context).to(torch.int32)
        self.store = torch.randn(kv_heads, layers, slots, dp, device=DEVICE, dtype=torch.bfloat16, generator=gen)
        self.q = torch.randn(batch, layers, kv_heads, dp, device=DEVICE, dtype=torch.bfloat16, generator=gen)
        self.start = torch.zeros(batch, dtype=torch.int32, device=DEVICE)
        self.end = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)

    def batched(self, **kw):
        return select(self.q.transpose(0, 1), self.store.permute(1, 2, 0, 3), self.start, self.end,
                      token_table=self.table, impl="triton", **kw)

    def per_layer(self, **kw):
        return [select(self.q[:, j], self.store[:, j].transpose(0, 1), self.start, self.end,
                       token_table=self.table, impl="triton", **kw) for j in range(self.q.shape[1])]


def graph_ms(fn, copies) -> float:
    import triton

    for c in copies[:2]:
        fn(c)  # compile outside the capture
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for c in copies:
            fn(c)
    return triton.testing.do_bench(g.replay, warmup=25, rep=200) / len(copies)


def main(argv=None) -> None:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_select_layers.py needs a CUDA GPU")
    import triton

    gen = torch.Generator(device=DEVICE).manual_seed(0)
    props = torch.cuda.get_device_properties(0)
    head = (f"# {props.name}, torch {torch.__version__}, triton {triton.__version__}; H_kv {args.kv_heads}, d' "
            f"{args.sketch_dim}, sinks {args.sinks}, window {args.window}, budget {args.budget:.0%} of the context")
    print(head, flush=True)
    rows = []
    for layers in args.layers:
        for context in args.context:
            for batch in args.batch:
                k = max(0, math.ceil(args.budget * context) - args.sinks - args.window)
                per_copy = batch * context * args.kv_heads * args.sketch_dim * 2 * layers
                n = max(2, min(16, math.ceil(args.l2_flush_mb * 2**20 / per_copy)))
                copies = [Copy(batch, context, layers, args.kv_heads, args.sketch_dim, gen) for _ in range(n)]
                kw = dict(sinks=args.sinks, window=args.window, budget=k)
                c = copies[0]
                together, alone = c.batched(**kw), c.per_layer(**kw)
                for j in range(layers):
                    a, b = torch.sort(together[j].long(), -1).values, torch.sort(alone[j].long(), -1).values
                    if not torch.equal(a, b):
                        raise SystemExit(f"batch {batch} x {context}: layer {j} of the batched selection differs from its own call")
                t_alone = graph_ms(lambda c: c.per_layer(**kw), copies)
                t_together = graph_ms(lambda c: c.batched(**kw), copies)
                row = dict(layers=layers, batch=batch, context=context, k=k, per_layer_ms=t_alone, batched_ms=t_together,
                           per_layer_us_each=1e3 * t_alone / layers, batched_us_each=1e3 * t_together / layers)
                rows.append(row)
                print(f"L {layers} B {batch} ctx {context} k {k} ({n} copies): {layers} launches {t_alone:.3f} ms, one "
                      f"launch {t_together:.3f} ms ({row['per_layer_us_each']:.1f} -> {row['batched_us_each']:.1f} us per "
                      "layer); selections equal", flush=True)
                del copies
                torch.cuda.empty_cache()
    print("\n| layers | batch | context | k | one call per layer (ms) | one call for all (ms) | us per layer |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layers']} | {r['batch']} | {r['context']} | {r['k']} | {r['per_layer_ms']:.3f} | {r['batched_ms']:.3f} | "
              f"{r['per_layer_us_each']:.1f} -> {r['batched_us_each']:.1f} |")
    path = args.json or (os.path.join(os.environ["OUT"], "bench_select_layers.json") if os.environ.get("OUT") else None)
    if path:
        with open(path, "w") as f:
            json.dump(dict(header=head, python=platform.python_version(), rows=rows), f, indent=1)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
