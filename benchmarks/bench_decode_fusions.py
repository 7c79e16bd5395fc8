"""The launches a budgeted SGLang decode step spends around its kernels, fused and unfused.

    python benchmarks/bench_decode_fusions.py                 # batch 1 / 8 / 16, 32K context
    python benchmarks/bench_decode_fusions.py --batch 8 --context 32768 131072

Two places of the SGLang backend's decode step (``butler_sglang.backend``), each timed both ways
on Llama-3.1-8B shapes (hidden 4096, 32 query / 8 KV heads, D 128, d' 16; the default predictor:
MLP 512, 4 served layers per producer, one predictor head per KV head) in bf16:

* **producer** (once per producer and step): the residual stream ``hidden + residual`` (SGLang
  defers the add), the predictor's LayerNorm + MLP, a copy into the preallocated query buffer
  (``predictor.producer_queries``, three launches more than the MLP) vs
  ``butler_kernels.residual_layer_norm`` and the MLP writing into the buffer
  (``producer_queries_from_normed(out=)``).
* **served layer** (once per served layer and step): ``write_sketch`` of the new tokens, then the
  budgeted attention (paged K/V, the producer's selection) with a counter buffer zeroed per call
  vs the attention launch alone with the backend's persistent ``split_counters`` and the sketch
  write folded in (``new_sketch=``).

* **dense layer** (layer 0 of every step): ``budgeted_attention_triton`` with a window as long
  as the context and no selection (how the backend now runs it) vs SGLang's own Triton decode
  kernels (``decode_attention_fwd``, 64 KV splits for every row: ``--triton-attention-num-kv-splits
  64``), when SGLang is importable.

Each variant is captured in a CUDA graph of 20 calls and replayed (no launch overhead: what the
server's decode graph sees) and timed with ``triton.testing.do_bench`` (median), per call. Both
variants' outputs are checked to agree before timing. Writes ``$OUT/bench_decode_fusions.json``
when ``OUT`` is set (or ``--json PATH``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform

import torch

from butler_kernels import NewSketch, budgeted_attention_triton, residual_layer_norm, select, write_sketch
from butler_kernels.testing import graph_time_ms
from butler_zoo import ButlerConfig, ButlerPredictor

DEVICE = torch.device("cuda")
CALLS = 20


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--context", type=int, nargs="+", default=[32768])
    p.add_argument("--budget", type=float, default=0.1, help="fraction of the context attended (sinks + window + selected)")
    p.add_argument("--sinks", type=int, default=64)
    p.add_argument("--window", type=int, default=128)
    p.add_argument("--json", default=None)
    return p.parse_args(argv)


def graph_us(fn) -> float:
    """Median microseconds of one call, replayed from a CUDA graph of ``CALLS`` calls."""
    return 1000 * graph_time_ms(fn, CALLS)


def predictor_8b() -> ButlerPredictor:
    cfg = ButlerConfig(base_model="llama-3.1-8b-shaped", base_model_type="llama", num_hidden_layers=32, hidden_size=4096,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128)
    return ButlerPredictor(cfg).to(DEVICE, torch.bfloat16).eval().requires_grad_(False)


def bench_producer(pred: ButlerPredictor, batch: int) -> dict:
    gen = torch.Generator(device=DEVICE).manual_seed(batch)
    hidden = torch.randn(batch, 4096, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    residual = 10 * torch.randn(batch, 4096, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    buf = torch.zeros(batch, *pred.producers[0].out_shape, device=DEVICE, dtype=torch.bfloat16)
    norm = pred.producers[0].norm

    def unfused():
        buf.copy_(pred.producer_queries(0, hidden + residual))

    def fused():
        normed = residual_layer_norm(hidden, residual, norm.weight, norm.bias, norm.eps)
        pred.producer_queries_from_normed(0, normed, out=buf.view(batch, -1))

    unfused()
    want = buf.clone()
    fused()
    err = ((buf.float() - want.float()).abs().max() / want.float().abs().max()).item()
    assert err < 2e-2, f"fused producer queries differ: relative error {err:.2e}"
    return {"unfused_us": graph_us(unfused), "fused_us": graph_us(fused), "rel_err": err}


def served_layer_case(pred: ButlerPredictor, batch: int, context: int, sinks: int, window: int, k: int) -> dict:
    """Inputs of one served layer's decode attention on Llama-3.1-8B shapes, laid out as the SGLang
    backend has them: paged K/V ``[slots, H_kv, D]`` behind a shuffled page table, the head-major
    sketch pool, the producer's selection of ``k`` positions per (row, KV head), the step's new keys
    and their slots."""
    gen = torch.Generator(device=DEVICE).manual_seed(batch + context)
    h_kv, group, d, dp = 8, 4, 128, 16
    slots = batch * context + batch
    pages = torch.randperm(batch * context // 16, device=DEVICE, generator=gen)
    table = (pages[:, None] * 16 + torch.arange(16, device=DEVICE)).reshape(batch, context).to(torch.int32)
    kbuf = torch.randn(slots, h_kv, d, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    vbuf = torch.randn(slots, h_kv, d, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    pool = torch.randn(h_kv, slots, dp, device=DEVICE, dtype=torch.bfloat16, generator=gen).transpose(0, 1)
    start = torch.zeros(batch, dtype=torch.int32, device=DEVICE)
    end = torch.full((batch,), context, dtype=torch.int32, device=DEVICE)
    q_sel = torch.randn(batch, h_kv, dp, device=DEVICE, dtype=torch.bfloat16, generator=gen)
    sel = select(q_sel, pool, start, end, sinks=sinks, window=window, budget=k, token_table=table)
    return dict(
        q=torch.randn(batch, h_kv * group, d, device=DEVICE, dtype=torch.bfloat16, generator=gen),
        kbuf=kbuf, vbuf=vbuf, pool=pool, sel=sel, start=start, end=end, table=table,
        keys=torch.randn(batch, h_kv, d, device=DEVICE, dtype=torch.bfloat16, generator=gen),
        loc=table[:, -1].long(),  # the newest position's slot, as out_cache_loc
        weight=pred.key_proj[0],
        counters=torch.zeros(batch * h_kv, dtype=torch.int32, device=DEVICE),
    )


def bench_layer(pred: ButlerPredictor, batch: int, context: int, args) -> dict:
    attended = int(args.budget * context)
    c = served_layer_case(pred, batch, context, args.sinks, args.window, attended - args.sinks - args.window)
    q, kbuf, vbuf, pool, sel, start, end = c["q"], c["kbuf"], c["vbuf"], c["pool"], c["sel"], c["start"], c["end"]
    keys, loc, weight, counters = c["keys"], c["loc"], c["weight"], c["counters"]
    out = torch.empty_like(q)
    kw = dict(sinks=args.sinks, window=args.window, scale=q.shape[-1] ** -0.5, token_table=c["table"], out=out)

    def unfused():
        write_sketch(pool, loc, keys, weight)
        budgeted_attention_triton(q, kbuf, vbuf, sel, start, end, **kw)

    def fused():
        budgeted_attention_triton(q, kbuf, vbuf, sel, start, end, split_counters=counters,
                                  new_sketch=NewSketch(pool, loc, keys, weight), **kw)

    unfused()
    want_out, want_sketch = out.clone(), pool[loc].clone()
    pool[loc] = 0
    fused()
    assert torch.equal(out, want_out), "the attention output changed with the fused launch"
    sk_err = (pool[loc].float() - want_sketch.float()).abs().max().item()
    assert sk_err < 0.05, f"folded sketch write differs by {sk_err}"
    return {"unfused_us": graph_us(unfused), "fused_us": graph_us(fused), "sketch_max_abs_diff": sk_err}


def dense_layer_case(batch: int, context: int) -> dict:
    """Inputs of layer 0's dense decode attention on Llama-3.1-8B shapes (paged, as in SGLang)."""
    gen = torch.Generator(device=DEVICE).manual_seed(7 * batch + context)
    h_kv, h_q, d = 8, 32, 128
    slots = batch * context
    pages = torch.randperm(slots // 16, device=DEVICE, generator=gen)
    table = (pages[:, None] * 16 + torch.arange(16, device=DEVICE)).reshape(batch, context).to(torch.int32)
    return dict(
        kbuf=torch.randn(slots, h_kv, d, device=DEVICE, dtype=torch.bfloat16, generator=gen),
        vbuf=torch.randn(slots, h_kv, d, device=DEVICE, dtype=torch.bfloat16, generator=gen),
        q=torch.randn(batch, h_q, d, device=DEVICE, dtype=torch.bfloat16, generator=gen),
        table=table,
        start=torch.zeros(batch, dtype=torch.int32, device=DEVICE),
        end=torch.full((batch,), context, dtype=torch.int32, device=DEVICE),
        no_sel=torch.empty(batch, h_kv, 0, dtype=torch.int32, device=DEVICE),
        counters=torch.zeros(batch * h_kv, dtype=torch.int32, device=DEVICE),
    )


def bench_dense_layer(batch: int, context: int) -> dict:
    c = dense_layer_case(batch, context)
    kbuf, vbuf, q, table, start, end, no_sel, counters = (c[n] for n in ("kbuf", "vbuf", "q", "table", "start", "end",
                                                                          "no_sel", "counters"))
    h_q, d = q.shape[1], q.shape[2]
    ours = torch.empty_like(q)

    def butler():
        budgeted_attention_triton(q, kbuf, vbuf, no_sel, start, end, sinks=0, window=context, scale=d**-0.5,
                                  token_table=table, split_counters=counters, out=ours)

    row = {"butler_us": graph_us(butler)}
    try:
        from sglang.srt.layers.attention.triton_ops.decode_attention import decode_attention_fwd
    except ImportError as exc:
        row["sglang_us"] = None
        row["sglang_missing"] = str(exc)[:200]
        return row
    splits = 64
    theirs = torch.empty_like(q)
    indptr = torch.arange(0, (batch + 1) * context, context, dtype=torch.int32, device=DEVICE)
    indices = table.reshape(-1).to(torch.int64)
    logits = torch.empty(batch, h_q, splits, d, dtype=torch.float32, device=DEVICE)
    lse = torch.empty(batch, h_q, splits, dtype=torch.float32, device=DEVICE)
    num_splits = torch.full((batch,), splits, dtype=torch.int32, device=DEVICE)

    def sglang():
        decode_attention_fwd(q, kbuf, vbuf, theirs, indptr, indices, logits, lse, num_splits, splits, d**-0.5, 1.0, 1.0)

    butler()
    sglang()
    err = ((ours.float() - theirs.float()).abs().max() / theirs.float().abs().max()).item()
    assert err < 2e-2, f"dense decode differs from SGLang's: relative error {err:.2e}"
    row.update(sglang_us=graph_us(sglang), rel_err=err)
    return row


def report_header() -> dict:
    """Prints the run's header line and returns the machine and versions for the JSON."""
    import triton

    env = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
           "python": platform.python_version()}
    print(f"# {env['gpu']}, torch {env['torch']}, triton {env['triton']}; bf16, Llama-3.1-8B shapes; us per call "
          f"(CUDA graph of {CALLS} calls, median)")
    return env


def write_report(args, name: str, payload: dict) -> None:
    """Writes ``payload`` to ``--json PATH``, else to ``$OUT/name`` when ``OUT`` is set."""
    path = args.json or (os.path.join(os.environ["OUT"], name) if os.environ.get("OUT") else None)
    if path:
        with open(path, "w") as f:
            json.dump(payload, f, indent=1)
        print(f"\nwrote {path}")


def main(argv=None) -> None:
    args = parse_args(argv)
    pred = predictor_8b()
    env = report_header()
    print("\n| place | batch | context | unfused us | fused us | saved us |\n|---|---|---|---|---|---|")
    rows = []
    for b in args.batch:
        r = bench_producer(pred, b)
        rows.append({"place": "producer", "batch": b, "context": None, **r})
        print(f"| producer | {b} | - | {r['unfused_us']:.2f} | {r['fused_us']:.2f} | {r['unfused_us'] - r['fused_us']:.2f} |")
        for t in args.context:
            r = bench_layer(pred, b, t, args)
            rows.append({"place": "served layer", "batch": b, "context": t, **r})
            print(f"| served layer | {b} | {t} | {r['unfused_us']:.2f} | {r['fused_us']:.2f} | "
                  f"{r['unfused_us'] - r['fused_us']:.2f} |")
    print("\n| dense layer | batch | context | SGLang decode_attention_fwd us | butler kernel us | saved us |\n|---|---|---|---|---|---|")
    for b in args.batch:
        for t in args.context:
            r = bench_dense_layer(b, t)
            rows.append({"place": "dense layer", "batch": b, "context": t, **r})
            theirs = "n/a (SGLang not importable)" if r["sglang_us"] is None else f"{r['sglang_us']:.1f}"
            saved = "-" if r["sglang_us"] is None else f"{r['sglang_us'] - r['butler_us']:.1f}"
            print(f"| dense layer | {b} | {t} | {theirs} | {r['butler_us']:.1f} | {saved} |")
    write_report(args, "bench_decode_fusions.json", {"env": env, "args": vars(args), "rows": rows})


if __name__ == "__main__":
    main()
