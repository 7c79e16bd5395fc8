"""Where does a tokenbutler decode step spend its time? One served layer, SGLang's own pools.

Times ``forward_decode`` of one layer for SGLang's dense Triton backend and for the tokenbutler
backend (CUDA-graph captured, like the server), then the pieces of the tokenbutler step on their own,
and prints the top kernels of one profiled step.

    PYTHONPATH=/tmp/site:. python integrations/sglang/gpu/profile_decode.py --bs 1 8 --context 32768

Needs the SGLang wheels installed (device.sh install) and a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import types
from pathlib import Path

import torch

HQ, HKV, D, LAYERS = 32, 8, 128, 4


def _timed(fn, iters=50):
    """Median-free simple mean over a CUDA graph replay (launch overhead out, as in the server)."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    for _ in range(5):
        g.replay()
    a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    a.record()
    for _ in range(iters):
        g.replay()
    b.record()
    torch.cuda.synchronize()
    return a.elapsed_time(b) / iters * 1000.0  # us


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bs", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--budget", default="0.1")
    ap.add_argument("--model-dir", default=os.environ.get("MODEL_8B", "/tmp/sgl-model-8b"))
    ap.add_argument("--cpu-smoke", action="store_true", help="run each piece once on CPU (Triton interpreter), no timing")
    args = ap.parse_args()

    from sglang.srt.plugins import load_plugins

    load_plugins()
    import sglang.srt.layers.attention.triton_backend as tb
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from butler_kernels import sparse_decode
    from butler_sglang import backend as bb
    from butler_zoo import ButlerConfig, ButlerPredictor

    tb.get_attention_tp_size = lambda: 1
    dtype, dev = (torch.float32, "cpu") if args.cpu_smoke else (torch.bfloat16, "cuda")
    timed = (lambda fn: (fn(), 0.0)[1]) if args.cpu_smoke else _timed
    tmp = Path(tempfile.mkdtemp())
    # a predictor shaped like Llama-3.1-8B but with LAYERS layers, and the matching model config
    cfg_json = json.loads((Path(args.model_dir) / "config.json").read_text())
    cfg_json["num_hidden_layers"] = LAYERS
    mdir = tmp / "model"
    mdir.mkdir()
    (mdir / "config.json").write_text(json.dumps(cfg_json))
    for f in Path(args.model_dir).iterdir():
        if f.name != "config.json":
            (mdir / f.name).write_bytes(f.read_bytes())
    pcfg = ButlerConfig(base_model=str(mdir), base_model_type="llama", num_hidden_layers=LAYERS, hidden_size=4096,
                        num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=D)
    ButlerPredictor(pcfg).save_pretrained(tmp / "pred")

    rows = []
    for bs in args.bs:
        ctx = args.context
        slots = bs * (ctx + 64) + 16
        from sglang.srt.server_args import prepare_server_args

        common = ["--model-path", str(mdir), "--skip-tokenizer-init", "--attention-backend", "triton",
                  *(["--device", "cpu"] if args.cpu_smoke else []),
                  "--triton-attention-num-kv-splits", "64", "--context-length", str(ctx + 1024)]
        sa = prepare_server_args(common)
        sa_tb = prepare_server_args([*common, "--decode-attention-backend", "tokenbutler", "--tokenbutler-predictor",
                                     str(tmp / "pred"), "--tokenbutler-budget", args.budget])
        r2t = ReqToTokenPool(size=bs + 1, max_context_len=ctx + 1024, device=dev, enable_memory_saver=False)
        pool = MHATokenToKVPool(slots, page_size=1, dtype=dtype, head_num=HKV, head_dim=D, layer_num=LAYERS, device=dev,
                                enable_memory_saver=False)
        layers = torch.nn.ModuleList([torch.nn.Identity() for _ in range(LAYERS)])
        mr = types.SimpleNamespace(
            server_args=sa, model_config=sa.get_model_config(), req_to_token_pool=r2t, token_to_kv_pool=pool,
            token_to_kv_pool_allocator=None, sliding_window_size=None, hybrid_gdn_config=None, kimi_linear_config=None,
            linear_attn_model_spec=None, device=dev, gpu_id=0, dtype=dtype, model=types.SimpleNamespace(model=types.SimpleNamespace(layers=layers)),
            is_draft_worker=False, start_layer=0, end_layer=LAYERS,
        )
        dense = tb.TritonAttnBackend(mr)
        mr.server_args = sa_tb
        backend = bb.create_backend(mr)
        state = mr._tokenbutler_state
        rpi = torch.arange(1, bs + 1, device=dev)
        lens = torch.full((bs,), ctx, dtype=torch.int32, device=dev)
        for i in range(bs):
            r2t.req_to_token[rpi[i], :ctx] = torch.arange(1 + i * (ctx + 64), 1 + i * (ctx + 64) + ctx, dtype=torch.int32, device=dev)
        for l in range(LAYERS):
            pool.k_buffer[l].normal_()
            pool.v_buffer[l].normal_()
            if l in state.sketch:
                state.sketch[l].normal_()
        state.queries[0].normal_()
        radix = [RadixAttention(HQ, D, D ** -0.5, num_kv_heads=HKV, layer_id=l) for l in range(LAYERS)]
        out_loc = r2t.req_to_token[rpi, ctx - 1].long()
        fb = types.SimpleNamespace(batch_size=bs, forward_mode=ForwardMode.DECODE, spec_info=None, seq_lens=lens.clone(),
                                   seq_lens_sum=int(lens.sum()), seq_lens_cpu=lens.cpu(), req_pool_indices=rpi,
                                   out_cache_loc=out_loc, token_to_kv_pool=pool)
        q = torch.randn(bs, HQ * D, dtype=dtype, device=dev)
        kn, vn = torch.randn(bs, HKV, D, dtype=dtype, device=dev), torch.randn(bs, HKV, D, dtype=dtype, device=dev)
        dense.init_forward_metadata(fb)
        backend.init_forward_metadata(fb)
        step = backend._step
        t_dense = timed(lambda: dense.forward_decode(q, kn, vn, radix[1], fb))
        t_tb = timed(lambda: backend.forward_decode(q, kn, vn, radix[1], fb))
        t_sparse = timed(lambda: sparse_decode(
            q.view(bs, HQ, D), pool.get_key_buffer(1), pool.get_value_buffer(1), state.layer_queries(1, bs), state.sketch[1],
            step.start, step.sparse_end, sinks=backend.sinks, window=backend.window, budget=backend.budget,
            scale=D ** -0.5, token_table=step.token_table, budget_per_row=step.budget_per_row))
        t_write = timed(lambda: pool.set_kv_buffer(radix[1], out_loc, kn, vn))
        full = backend.forward_metadata
        backend.forward_metadata = step.dense_metadata
        t_dense_rows = timed(lambda: tb.TritonAttnBackend.forward_decode(backend, q, kn, vn, radix[1], fb))
        backend.forward_metadata = full
        row = dict(bs=bs, context=ctx, budget=args.budget, static_budget=backend.budget, table_len=backend.table_len,
                   dense_us=t_dense, tokenbutler_us=t_tb, sparse_decode_us=t_sparse, kv_and_sketch_write_us=t_write,
                   parent_dense_rows_us=t_dense_rows)
        rows.append(row)
        print(json.dumps(row), flush=True)
        from torch.profiler import ProfilerActivity, profile

        if args.cpu_smoke:
            state.remove()
            continue
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                backend.forward_decode(q, kn, vn, radix[1], fb)
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=14), flush=True)
        state.remove()
        del pool, r2t, dense, backend, state
        torch.cuda.empty_cache()
    print("\n| bs | context | dense layer (us) | tokenbutler layer (us) | sparse_decode (us) | K/V+sketch write (us) | parent on dense rows (us) |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['bs']} | {r['context']} | {r['dense_us']:.1f} | {r['tokenbutler_us']:.1f} | {r['sparse_decode_us']:.1f} | "
              f"{r['kv_and_sketch_write_us']:.1f} | {r['parent_dense_rows_us']:.1f} |")
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "profile_decode.json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    sys.exit(main())
