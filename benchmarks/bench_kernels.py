"""Kernel benchmark of one decode step of one layer: dense SDPA vs the naive torch sparse path vs
butler_kernels (score + select, attention, both).

    python benchmarks/bench_kernels.py                   # Llama-3.1-8B shapes, batch 1/8/16, 8K/32K/128K, 5/10/20 %
    python benchmarks/bench_kernels.py --batch 1 --context 32768 --budget 0.1 --tune
    python benchmarks/bench_kernels.py --batch 1 8 --context 32768 --budget 0.1 --score-scale 1e-8 1 1e8

Every configuration is first checked against the reference (selection as a set of scores,
attention output relative error); then timed with ``triton.testing.do_bench`` (median; it also
clears L2 before each call) over enough rotated copies of the inputs to exceed the 50 MB L2.
"graph" columns replay a CUDA graph holding one step per copy (no launch overhead: what SGLang
and a compiled transformers step see). Budget is the fraction of the context attended (sinks +
window + selected, as in PERF.md) unless ``--budget-mode selected``. Bytes floor: the sketch plus
the attended K/V rows (the dense floor: all of K and V) at ``--peak-tbps``.

``--score-scale`` multiplies the predictor scores (the query and the sketch each by its square
root) so that the selection can be timed on scores of any magnitude: its cost must not depend on it
(SGLang's ``--load-format dummy`` weights give scores of ~1e-8). The selection's work counters
(``butler_kernels.testing.selection_work``) are reported next to its check: the share of
candidates that reached the serial boundary stage, and that the boundary pass split in parallel.

Writes ``$OUT/bench_kernels.json`` when ``OUT`` is set (or ``--json PATH``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

import butler_kernels
from butler_kernels import (
    AttentionConfig,
    budgeted_attention_triton,
    default_attention_config,
    default_select_config,
    reference,
    score_select_triton,
    sparse_decode,
)
from butler_kernels.testing import check_selection, selection_work

GB = 1024**3
DEVICE = torch.device("cuda")


@dataclass
class Shape:
    batch: int
    context: int
    budget: float  # fraction of the context
    sinks: int
    window: int
    k: int  # selected positions per KV head (the static budget)
    attended: int  # sinks + window + k
    heads: int
    kv_heads: int
    sel_heads: int
    head_dim: int
    sketch_dim: int
    score_scale: float = 1.0  # predictor scores multiplied by this


@dataclass
class Result:
    shape: Shape
    copies: int
    check_select: str = ""
    work: str = ""  # selection work counters (serial / parallel share of the candidates)
    attn_rel_err: float = float("nan")
    ms: dict = field(default_factory=dict)  # name -> median milliseconds per step
    bytes: dict = field(default_factory=dict)
    tuned: dict = field(default_factory=dict)
    kernels: dict = field(default_factory=dict)  # GPU kernel name -> microseconds per step (--profile)
    skipped: str = ""


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__
    )
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 16])
    p.add_argument("--context", type=int, nargs="+", default=[8192, 32768, 131072])
    p.add_argument("--budget", type=float, nargs="+", default=[0.05, 0.10, 0.20])
    p.add_argument("--score-scale", type=float, nargs="+", default=[1.0],
                   help="multiply the predictor scores by this (query and sketch each by its square root)")
    p.add_argument("--budget-mode", choices=["total", "selected"], default="total",
                   help="total: sinks + window + selected = budget x context (PERF.md); selected: k = budget x context")
    p.add_argument("--sinks", type=int, default=64)
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--heads", type=int, default=32, help="query heads")
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--sel-heads", type=int, default=None, help="predictor heads (default: one per KV head)")
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--sketch-dim", type=int, default=16)
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--layout", choices=["dense", "paged"], default="dense", help="K/V and sketch layout of our kernels")
    p.add_argument("--sketch-storage", choices=["head", "slot"], default="head",
                   help="paged sketch pool storage: head-major (the SGLang backend's) or slot-major (the K/V pool's)")
    p.add_argument("--mem-limit-gb", type=float, default=70.0, help="skip configurations whose estimate exceeds this")
    p.add_argument("--l2-flush-mb", type=float, default=200.0, help="rotate copies until one round touches this much")
    p.add_argument("--max-copies", type=int, default=32)
    p.add_argument("--peak-tbps", type=float, default=None,
                   help="bandwidth the floor is computed at, TB/s (default: measured on this GPU by a device-to-device "
                        "copy, see measure_copy_tbps; H100 ~3.0, H200 ~4.3)")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph timings")
    p.add_argument("--profile", action="store_true",
                   help="also list the GPU time of every kernel of one step (torch.profiler over CUDA-graph replays)")
    p.add_argument("--tune", action="store_true", help="also sweep kernel configurations; report the best next to the default")
    p.add_argument("--json", default=None, help="JSON output path (default: $OUT/bench_kernels.json when OUT is set)")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def make_shape(args, batch, context, budget, score_scale=1.0) -> Shape:
    if args.budget_mode == "total":
        k = max(0, math.ceil(budget * context) - args.sinks - args.window)
    else:
        k = math.ceil(budget * context)
    return Shape(batch, context, budget, args.sinks, args.window, k, args.sinks + args.window + k, args.heads,
                 args.kv_heads, args.sel_heads or args.kv_heads, args.head_dim, args.sketch_dim, score_scale)


def check_score_scale(scale: float, dtype) -> None:
    """The query and the sketch are each multiplied by sqrt(scale): both must stay normal numbers
    of ``dtype`` (bf16 has fp32's exponent range; fp16 does not reach 1e-8 or 1e12)."""
    if not scale > 0 or not math.isfinite(scale):
        raise SystemExit(f"--score-scale must be positive and finite, got {scale}")
    root, info = math.sqrt(scale), torch.finfo(dtype)
    if root * 1e-2 < info.smallest_normal or root * 10 > info.max:
        raise SystemExit(f"--score-scale {scale:g} does not fit {dtype} inputs (sqrt {root:.1e} per factor); use --dtype bf16")


def input_bytes(s: Shape, elt: int) -> int:
    kv = 2 * s.batch * s.kv_heads * s.context * s.head_dim * elt
    sketch = s.batch * s.kv_heads * s.context * s.sketch_dim * elt
    return kv + sketch + s.batch * (s.heads * s.head_dim + s.sel_heads * s.sketch_dim) * elt + s.batch * s.context * 4


def floor_bytes(s: Shape, elt: int) -> dict:
    kv_row = 2 * s.kv_heads * s.head_dim * elt  # K + V of one position, all KV heads
    sketch = s.batch * s.kv_heads * s.context * s.sketch_dim * elt
    attended = s.batch * min(s.attended, s.context) * kv_row
    return {"dense": s.batch * s.context * kv_row, "select": sketch, "attend": attended, "total": sketch + attended}


def estimate_peak(s: Shape, elt: int, copies: int) -> int:
    """Inputs of every copy, plus the largest transient (reference check or naive path)."""
    rows = s.batch * s.kv_heads
    n = min(s.attended, s.context)
    ref_check = 2 * rows * n * s.head_dim * 4 + s.batch * s.sel_heads * s.context * 4 * 3  # fp32 gathers, scores
    naive = s.batch * s.sel_heads * s.context * (elt + 4) + 2 * rows * n * s.head_dim * elt + rows * n * 8
    workspace = rows * s.context * 12
    return copies * input_bytes(s, elt) + max(ref_check, naive) + workspace + (1 << 30)


class Inputs:
    """One copy of a decode step's tensors."""

    def __init__(self, s: Shape, dtype, layout: str, gen: torch.Generator, sketch_storage: str = "head"):
        dev = DEVICE
        self.q = torch.randn(s.batch, s.heads, s.head_dim, device=dev, dtype=dtype, generator=gen)
        self.k = torch.randn(s.batch, s.kv_heads, s.context, s.head_dim, device=dev, dtype=dtype, generator=gen)
        self.v = torch.randn(s.batch, s.kv_heads, s.context, s.head_dim, device=dev, dtype=dtype, generator=gen)
        self.q_sel = torch.randn(s.batch, s.sel_heads, s.sketch_dim, device=dev, dtype=dtype, generator=gen)
        self.sketch = torch.randn(s.batch, s.kv_heads, s.context, s.sketch_dim, device=dev, dtype=dtype, generator=gen)
        if s.score_scale != 1.0:  # scores = <q_sel, sketch> scale by root^2
            root = math.sqrt(s.score_scale)
            self.q_sel = (self.q_sel.float() * root).to(dtype)
            self.sketch = (self.sketch.float() * root).to(dtype)
        self.start = torch.zeros(s.batch, dtype=torch.int64, device=dev)
        self.end = torch.full((s.batch,), s.context, dtype=torch.int64, device=dev)
        self.table = None
        # The kernels' view: dense as is, or SGLang's pool (slots in shuffled pages of 16).
        self.k_ours, self.v_ours, self.sketch_ours = self.k, self.v, self.sketch
        if layout == "paged":
            pages = torch.randperm(s.batch * s.context // 16, device=dev, generator=gen)
            slots = (pages[:, None] * 16 + torch.arange(16, device=dev)).reshape(s.batch, s.context)
            self.table = slots.to(torch.int32)
            flat = slots.reshape(-1)

            def pool(dense, head_major=False):
                shape = (s.batch * s.context, s.kv_heads, dense.shape[-1])
                if head_major:  # the SGLang backend's sketch pool: [slot, head] view of [head, slot] storage
                    out = torch.empty(shape[1], shape[0], shape[2], device=dev, dtype=dtype).transpose(0, 1)
                else:
                    out = torch.empty(shape, device=dev, dtype=dtype)
                out[flat] = dense.permute(0, 2, 1, 3).reshape(-1, s.kv_heads, dense.shape[-1])
                return out

            self.k_ours, self.v_ours, self.sketch_ours = pool(self.k), pool(self.v), pool(self.sketch, head_major=sketch_storage == "head")
            del self.k, self.v  # the dense baselines read the pool through the table instead
            self.k = self.v = None


def dense_sdpa(x: Inputs, s: Shape, scale: float):
    if x.k is None:  # paged: SDPA needs the dense view; time only what a dense cache would cost
        raise RuntimeError("dense SDPA runs on the dense layout")
    return F.scaled_dot_product_attention(x.q[:, :, None], x.k, x.v, scale=scale, enable_gqa=True)[:, :, 0]


def naive_sparse(x: Inputs, s: Shape, scale: float):
    """The straightforward torch path: score einsum, top-k, gather, SDPA (full rows: no masks)."""
    b, hkv, g = s.batch, s.kv_heads, s.sel_heads // s.kv_heads
    scores = torch.einsum("bhgd,bhtd->bhgt", x.q_sel.view(b, hkv, g, -1), x.sketch).amax(2)
    scores[..., : s.sinks] = float("-inf")
    scores[..., s.context - s.window :] = float("-inf")
    top = scores.topk(s.k, dim=-1).indices
    fixed = torch.cat([torch.arange(s.sinks, device=DEVICE), torch.arange(s.context - s.window, s.context, device=DEVICE)])
    idx = torch.cat([fixed.expand(b, hkv, -1), top], -1)
    bi = torch.arange(b, device=DEVICE)[:, None, None]
    hi = torch.arange(hkv, device=DEVICE)[None, :, None]
    k_sel, v_sel = x.k[bi, hi, idx], x.v[bi, hi, idx]
    return F.scaled_dot_product_attention(x.q[:, :, None], k_sel, v_sel, scale=scale, enable_gqa=True)[:, :, 0]


def ours_select(x: Inputs, s: Shape):
    return torch.ops.butler.score_select(
        x.q_sel, x.sketch_ours, x.start, x.end, x.table, None, s.sinks, s.window, s.k, torch.int32
    )


def ours_attend(x: Inputs, s: Shape, sel, scale: float):
    return torch.ops.butler.budgeted_attention(x.q, x.k_ours, x.v_ours, sel, x.start, x.end, x.table, s.sinks, s.window, scale)


def ours_total(x: Inputs, s: Shape, scale: float):
    return sparse_decode(x.q, x.k_ours, x.v_ours, x.q_sel, x.sketch_ours, x.start, x.end, sinks=s.sinks, window=s.window,
                         budget=s.k, scale=scale, token_table=x.table)


def bench(fn, copies: int) -> float:
    """Median ms of one call, rotating over the copies (do_bench clears L2 before each call too)."""
    import triton.testing

    state = {"i": 0}

    def step():
        fn(state["i"] % copies)
        state["i"] += 1

    return triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")


def capture_steps(fn, copies: int) -> "torch.cuda.CUDAGraph":
    """A CUDA graph holding one step per copy, warmed up (compiled, allocator primed) first on a side stream."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for i in range(copies):
            fn(i)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for i in range(copies):
            fn(i)
    return graph


def bench_graph(fn, copies: int) -> float:
    """Median ms of one step replayed from a CUDA graph that runs one step per copy."""
    import triton.testing

    graph = capture_steps(fn, copies)
    ms = triton.testing.do_bench(graph.replay, warmup=10, rep=100, return_mode="median") / copies
    del graph
    return ms


def profile_kernels(fn, copies: int, replays: int = 20) -> dict:
    """Microseconds per step of each GPU kernel, from torch.profiler over replays of a CUDA graph
    that holds one step per copy (the launch sequence SGLang and a compiled step see)."""
    from torch.profiler import ProfilerActivity, profile

    graph = capture_steps(fn, copies)
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            graph.replay()
        torch.cuda.synchronize()
    per: dict[str, float] = {}
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            per[ev.name] = per.get(ev.name, 0.0) + ev.device_time
    del graph
    steps = replays * copies
    return {name: us / steps for name, us in sorted(per.items(), key=lambda kv: -kv[1])}


def verify(x: Inputs, s: Shape, scale: float) -> tuple[str, float, str]:
    sel = ours_select(x, s)
    check = check_selection(
        sel, x.q_sel, x.sketch_ours, x.start, x.end, sinks=s.sinks, window=s.window, k=s.k, token_table=x.table
    )
    out = ours_attend(x, s, sel, scale)
    ref = reference.budgeted_attention(x.q, x.k_ours, x.v_ours, sel, x.start, x.end, s.sinks, s.window, scale, x.table)
    rel = float((out.float() - ref.float()).abs().max() / ref.float().abs().max())
    _, work = selection_work(x.q_sel, x.sketch_ours, x.start, x.end, sinks=s.sinks, window=s.window, k=s.k, token_table=x.table)
    cand = work.candidates.clamp(min=1).double()
    work_str = (f"serial max {work.serial_fraction():.1%}, parallel max {float((work.parallel / cand).max()):.1%}, "
                f"windowed min {float((work.windowed / cand).min()):.1%}")
    del sel, out, ref, work
    return str(check), rel, work_str


def tune(xs: list[Inputs], s: Shape, scale: float, copies: int, graph: bool = True) -> dict:
    """Sweep a few launch configurations of each kernel; keep the fastest next to the default.
    Timed from CUDA graphs unless ``graph`` is false: eager timings of small shapes are mostly
    launch overhead, which would hide the differences between configurations."""
    bench_fn = bench_graph if graph else bench
    rows = s.batch * s.kv_heads
    sel_default = default_select_config(rows, s.context, DEVICE)
    sel_cands = {sel_default}
    # scoring chunk and warps (registers per thread decide how many programs an SM holds), programs
    # per row (the default aims at 5 per SM: 3 and 8 around it), compaction chunk
    sms = torch.cuda.get_device_properties(DEVICE).multi_processor_count
    for chunk, warps in ((128, 2), (256, 2), (256, 4), (512, 4), (512, 8), (1024, 8)):
        for programs in (0, -(-3 * sms // rows), -(-8 * sms // rows)):
            sel_cands.add(dataclasses.replace(sel_default, chunk_score=chunk, warps_score=warps, programs_per_row=programs))
    sel_cands.add(dataclasses.replace(sel_default, chunk_compact=4096))
    # boundary pass never / always / for bins above other sizes than the default's
    for cap in (None, 0, 512, 2048, 8192):
        for chunk_boundary in (256, 2048):
            sel_cands.add(dataclasses.replace(sel_default, serial_cap=cap, chunk_boundary=chunk_boundary))
    sel_times = {}
    for cfg in sel_cands:
        def run_select(i, c=cfg):
            x = xs[i]
            score_select_triton(
                x.q_sel, x.sketch_ours, x.start, x.end, sinks=s.sinks, window=s.window, k=s.k, token_table=x.table, config=c
            )

        sel_times[cfg] = bench_fn(run_select, copies)
    sels = [ours_select(x, s) for x in xs]
    att_default = default_attention_config(rows, s.attended, s.head_dim, DEVICE, dtype=xs[0].q.dtype,
                                           paged=xs[0].table is not None)
    att_cands = {att_default}
    for splits in {max(1, att_default.num_splits // 2), att_default.num_splits, att_default.num_splits * 2}:
        for block_n in (32, 64):
            for stages in (2, 3):
                att_cands.add(AttentionConfig(num_splits=splits, block_n=block_n, num_stages=stages))
    att_times = {}
    for cfg in att_cands:
        def run_attend(i, c=cfg):
            x = xs[i]
            budgeted_attention_triton(
                x.q, x.k_ours, x.v_ours, sels[i], x.start, x.end, sinks=s.sinks, window=s.window, scale=scale,
                token_table=x.table, config=c,
            )

        att_times[cfg] = bench_fn(run_attend, copies)
    best_sel = min(sel_times, key=sel_times.get)
    best_att = min(att_times, key=att_times.get)
    return {
        "select_default": [asdict(sel_default), sel_times[sel_default]], "select_best": [asdict(best_sel), sel_times[best_sel]],
        "attend_default": [asdict(att_default), att_times[att_default]], "attend_best": [asdict(best_att), att_times[best_att]],
    }


def run_one(args, s: Shape, dtype, elt: int) -> Result:
    fb = floor_bytes(s, elt)
    per_round = fb["total"]
    copies = max(1, min(args.max_copies, math.ceil(args.l2_flush_mb * 2**20 / max(per_round, 1))))
    while copies > 1 and estimate_peak(s, elt, copies) > args.mem_limit_gb * GB:
        copies -= 1
    res = Result(s, copies, bytes=fb)
    if estimate_peak(s, elt, copies) > args.mem_limit_gb * GB:
        res.skipped = f"needs ~{estimate_peak(s, elt, copies) / GB:.0f} GB > --mem-limit-gb {args.mem_limit_gb:g}"
        return res
    if s.k <= 0:
        res.skipped = f"budget {s.budget:g} x {s.context} leaves no selected tokens after sinks + window"
        return res
    gen = torch.Generator(device=DEVICE).manual_seed(args.seed)
    xs = [Inputs(s, dtype, args.layout, gen, args.sketch_storage) for _ in range(copies)]
    scale = 1.0 / math.sqrt(s.head_dim)
    res.check_select, res.attn_rel_err, res.work = verify(xs[0], s, scale)
    sels = [ours_select(x, s) for x in xs]

    if args.layout == "dense":
        res.ms["dense"] = bench(lambda i: dense_sdpa(xs[i], s, scale), copies)
        res.ms["naive"] = bench(lambda i: naive_sparse(xs[i], s, scale), copies)
    res.ms["select"] = bench(lambda i: ours_select(xs[i], s), copies)
    res.ms["attend"] = bench(lambda i: ours_attend(xs[i], s, sels[i], scale), copies)
    res.ms["total"] = bench(lambda i: ours_total(xs[i], s, scale), copies)
    res.ms["total_again"] = bench(lambda i: ours_total(xs[i], s, scale), copies)  # noise estimate
    if not args.no_graph:
        if args.layout == "dense":
            res.ms["dense_graph"] = bench_graph(lambda i: dense_sdpa(xs[i], s, scale), copies)
        res.ms["total_graph"] = bench_graph(lambda i: ours_total(xs[i], s, scale), copies)
        res.ms["select_graph"] = bench_graph(lambda i: ours_select(xs[i], s), copies)
        res.ms["attend_graph"] = bench_graph(lambda i: ours_attend(xs[i], s, sels[i], scale), copies)
    if args.profile:
        res.kernels = profile_kernels(lambda i: ours_total(xs[i], s, scale), copies)
    if args.tune:
        res.tuned = tune(xs, s, scale, copies, graph=not args.no_graph)
    del xs, sels
    torch.cuda.empty_cache()
    return res


def fmt_ms(v):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.3f}"


def table(results: list[Result], peak: float) -> str:
    scaled = any(r.shape.score_scale != 1.0 for r in results)
    head = ("| batch | context | budget | k | dense | naive | select | attend | total | total graph | floor | TB/s | "
            "x dense | x dense (graph) | check |")
    if scaled:
        head = "| score scale " + head
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in results:
        s = r.shape
        lead = f"| {s.score_scale:g} " if scaled else ""
        if r.skipped:
            lines.append(f"{lead}| {s.batch} | {s.context} | {s.budget:.0%} | {s.k} | skipped: {r.skipped} |" + " |" * 10)
            continue
        ms = r.ms
        floor_ms = r.bytes["total"] / (peak * 1e12) * 1e3
        tbps = r.bytes["total"] / (ms["total"] * 1e-3) / 1e12
        dense = ms.get("dense")
        sp = f"{dense / ms['total']:.2f}" if dense else "-"
        dg, tg = ms.get("dense_graph"), ms.get("total_graph")
        spg = f"{dg / tg:.2f}" if dg and tg else "-"
        ok = "ok" if r.check_select.startswith("ok") and r.attn_rel_err < 2e-2 else "FAIL"
        lines.append(
            f"{lead}| {s.batch} | {s.context} | {s.budget:.0%} | {s.k} | {fmt_ms(dense)} | {fmt_ms(ms.get('naive'))} | "
            f"{fmt_ms(ms['select'])} | {fmt_ms(ms['attend'])} | {fmt_ms(ms['total'])} | {fmt_ms(tg)} | {floor_ms:.3f} | "
            f"{tbps:.2f} | {sp} | {spg} | {ok} (sel {r.check_select.split(' ')[0]}, attn {r.attn_rel_err:.1e}) |"
        )
    return "\n".join(lines)


def scale_table(results: list[Result]) -> str:
    """Selection time per score scale, for every shape timed at more than one scale."""
    groups: dict[tuple, list[Result]] = {}
    for r in results:
        if not r.skipped:
            s = r.shape
            groups.setdefault((s.batch, s.context, s.budget), []).append(r)
    lines = ["| batch | context | budget | select ms per score scale | slowest / fastest | work per scale |", "|---|---|---|---|---|---|"]
    for (batch, context, budget), rs in groups.items():
        if len(rs) < 2:
            continue
        times = [r.ms["select"] for r in rs]
        per = ", ".join(f"{r.shape.score_scale:g}: {r.ms['select']:.3f}" for r in rs)
        work = "; ".join(f"{r.shape.score_scale:g}: {r.work}" for r in rs)
        lines.append(f"| {batch} | {context} | {budget:.0%} | {per} | {max(times) / min(times):.2f} | {work} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def kernel_table(results: list[Result], top: int = 6) -> str:
    """The GPU kernels of one step (--profile), the costliest first."""
    lines = ["| batch | context | budget | select / attend alone (graph, ms) | kernels, us per step |", "|---|---|---|---|---|"]
    for r in results:
        if not r.kernels:
            continue
        s = r.shape
        ks = "; ".join(f"{name[:40]} {us:.1f}" for name, us in list(r.kernels.items())[:top])
        alone = f"{fmt_ms(r.ms.get('select_graph'))} / {fmt_ms(r.ms.get('attend_graph'))}"
        lines.append(f"| {s.batch} | {s.context} | {s.budget:.0%} | {alone} | {ks} |")
    return "\n".join(lines)


def tuned_table(results: list[Result]) -> str:
    lines = [
        "| batch | context | budget | select default -> best (ms, config) | attend default -> best (ms, config) |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        if not r.tuned:
            continue
        t, s = r.tuned, r.shape
        sb, ab = t["select_best"][0], t["attend_best"][0]
        lines.append(
            f"| {s.batch} | {s.context} | {s.budget:.0%} | {t['select_default'][1]:.3f} -> {t['select_best'][1]:.3f} "
            f"(chunk {sb['chunk_score']}/{sb['chunk_compact']}, warps {sb['warps_score']}, programs/row {sb['programs_per_row']}, "
            f"serial cap {sb['serial_cap']}, boundary steps {sb['chunk_boundary']}) | "
            f"{t['attend_default'][1]:.3f} -> "
            f"{t['attend_best'][1]:.3f} (splits {ab['num_splits']}, block {ab['block_n']}, stages {ab['num_stages']}) |"
        )
    return "\n".join(lines)


def measure_copy_tbps(nbytes: int = 2 << 30, reps: int = 20) -> float:
    """The GPU's achievable memory bandwidth in TB/s: the median of ``reps`` device-to-device copies of
    ``nbytes`` (each reads and writes ``nbytes``), timed with CUDA events. The floor column uses it so that
    "within Nx of the bytes floor" means the same on every GPU (a fixed 3.0 TB/s, the H100's, flattered
    every kernel on an H200)."""
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)  # warm up
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1e-3)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / statistics.median(times) / 1e12


def main(argv=None) -> int:
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    import triton

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    for score_scale in args.score_scale:
        check_score_scale(score_scale, dtype)
    elt = 2
    if args.peak_tbps is None:
        args.peak_tbps = round(measure_copy_tbps(), 2)
        print(f"# bytes floor at {args.peak_tbps} TB/s: this GPU's device-to-device copy, measured now", flush=True)
    env = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "cuda": torch.version.cuda, "python": platform.python_version(), "command": " ".join([sys.executable] + sys.argv),
        "butler_kernels": os.path.dirname(butler_kernels.__file__), "args": vars(args),
    }
    print(f"# {env['gpu']}, torch {env['torch']}, triton {env['triton']}, {args.dtype}, layout {args.layout}" + (f" (sketch {args.sketch_storage}-major)" if args.layout == "paged" else "") + ", "
          f"H_q {args.heads} / H_kv {args.kv_heads} / D {args.head_dim} / d' {args.sketch_dim}, "
          f"sinks {args.sinks}, window {args.window}, budget mode {args.budget_mode}", flush=True)
    results = []
    t0 = time.time()
    for batch in args.batch:
        for context in args.context:
            for budget in args.budget:
                for score_scale in args.score_scale:
                    s = make_shape(args, batch, context, budget, score_scale)
                    r = run_one(args, s, dtype, elt)
                    results.append(r)
                    status = r.skipped or (f"check {r.check_select}, attn rel err {r.attn_rel_err:.1e}; work {r.work}; "
                                           + ", ".join(f"{k} {v:.3f} ms" for k, v in r.ms.items()))
                    scale_note = f" scale {score_scale:g}" if len(args.score_scale) > 1 or score_scale != 1.0 else ""
                    print(f"B {batch} ctx {context} budget {budget:.0%}{scale_note} (k {s.k}, {r.copies} copies): {status}",
                          flush=True)
    print(f"\n# done in {time.time() - t0:.0f} s; medians in ms; floor = (sketch + attended K/V bytes) / {args.peak_tbps} TB/s; "
          "TB/s = those bytes / total time\n")
    print(table(results, args.peak_tbps))
    noise = [abs(r.ms["total"] - r.ms["total_again"]) / r.ms["total"] for r in results if not r.skipped]
    if noise:
        print(f"\nnoise: total timed twice differs by median {statistics.median(noise):.1%}, max {max(noise):.1%}")
    scales = scale_table(results)
    if scales:
        print("\n" + scales)
    if args.tune:
        print("\n" + tuned_table(results))
    if args.profile:
        print("\n" + kernel_table(results))
    path = args.json or (os.path.join(os.environ["OUT"], "bench_kernels.json") if os.environ.get("OUT") else None)
    if path:
        with open(path, "w") as f:
            json.dump({"env": env, "results": [asdict(r) for r in results]}, f, indent=1, default=str)
        print(f"\nwrote {path}")
    failed = [r for r in results if not r.skipped and not (r.check_select.startswith("ok") and r.attn_rel_err < 2e-2)]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
