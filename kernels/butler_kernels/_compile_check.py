"""Build the kernels for an NVIDIA GPU without one: ``python -m butler_kernels._compile_check``.

The Triton interpreter accepts code that the GPU compiler rejects, so CPU-only CI compiles every
kernel for sm_90 (Hopper) with the specialisations of a Llama-3.1-8B launch, and prints what the
hardware would get: registers, spilled bytes, shared memory, and whether the attention loop kept
its tensor cores (``mma``) and its pipelined loads (``cp.async``). Needs Triton's NVIDIA backend
(its bundled ``ptxas``), not a GPU or a driver. Must run in a process where Triton is not in
interpreter mode.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import tempfile
from dataclasses import dataclass

import torch


@dataclass
class Build:
    kernel: str
    variant: str
    registers: int
    spill_bytes: int
    shared_bytes: int
    mma: bool
    cp_async: bool


_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int32: "i32", torch.int64: "i64"}


def _specialise(fn, args, meta):
    """Signature of a real launch, specialised as the JIT does it: tensors are pointers with the
    16-byte alignment hint (meta tensors sit at address 0), ints equal to 1 become constants and
    multiples of 16 carry the divisibility hint."""
    signature, consts, attrs = {}, {k: v for k, v in meta.items() if k not in ("num_warps", "num_stages")}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            signature[name] = "constexpr"
            continue
        value = args[i]
        if isinstance(value, torch.Tensor):
            signature[name] = "*" + _TYPES[value.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(value, float):
            signature[name] = "fp32"
        elif value == 1:
            signature[name], consts[name] = "constexpr", 1
        else:
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, consts, attrs


def _build(mod, launch, variant, arch) -> Build:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(mod, launch.kernel)
    signature, consts, attrs = _specialise(fn, launch.args, launch.meta)
    options = {"num_warps": launch.meta["num_warps"], "num_stages": launch.meta["num_stages"]}
    src = ASTSource(fn=fn, signature=signature, constexprs=consts, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "kernel.cubin")
        with open(path, "wb") as f:
            f.write(compiled.asm["cubin"])
        usage = subprocess.run([cuobjdump, "-res-usage", path], capture_output=True, text=True, check=True).stdout
    ptx = compiled.asm["ptx"]
    return Build(
        launch.kernel, variant,
        int(re.search(r"REG:(\d+)", usage).group(1)), int(re.search(r"STACK:(\d+)", usage).group(1)),
        compiled.metadata.shared, "mma.sync" in ptx or "wgmma" in ptx, "cp.async" in ptx,
    )


def build_all(arch: int = 90, sms: int = 132) -> list[Build]:
    """Every kernel as the launchers configure it for Llama-3.1-8B shapes (H_q 32, H_kv 8, D 128,
    d' 16, bf16, 10% budget) at batch 1 and 16 x 32K: selection with per-KV-head (group 1) and
    per-query-head (group 4) predictors, dense and paged layouts; attention in both layouts."""
    from butler_kernels._triton_loader import kernel_module, triton_interpreted
    from butler_kernels.budgeted_attention import attention_launches, default_attention_config
    from butler_kernels.score_select import default_select_config, select_launches

    if triton_interpreted():
        raise RuntimeError("Triton is in interpreter mode in this process (TRITON_INTERPRET=1): compile in a fresh one")
    sel_mod = kernel_module("_score_select_kernels", "cuda")
    att_mod = kernel_module("_attention_kernels", "cuda")
    meta = torch.device("meta")
    h_q, h_kv, d, dp, t, sinks, window = 32, 8, 128, 16, 32768, 64, 256
    k = t // 10 - sinks - window
    builds: list[Build] = []
    for b in (1, 16):
        start = torch.zeros(b, dtype=torch.int64, device=meta)
        end = torch.full((b,), t, dtype=torch.int64, device=meta)
        table = torch.empty(b, t, dtype=torch.int32, device=meta)
        out_sel = torch.empty(b, h_kv, k, dtype=torch.int32, device=meta)
        cfg = default_select_config(b * h_kv, t, meta, sms=sms)
        for paged in (False, True):
            sketch_shape = (b * t, h_kv, dp) if paged else (b, h_kv, t, dp)
            sketch = torch.empty(sketch_shape, device=meta, dtype=torch.bfloat16)
            for group in (1, 4):
                q_sel = torch.empty(b, h_kv * group, dp, device=meta, dtype=torch.bfloat16)
                bpr = start if paged else None  # paged variants also take a per-row budget
                launches = select_launches(
                    q_sel, sketch, start, end, table if paged else None, bpr, sinks, window, k, out_sel, cfg
                )
                layout = "paged, budget per row" if paged else "dense"
                builds.append(_build(sel_mod, launches[0], f"B {b}, chunk {cfg.chunk_score}, group {group}, {layout}", arch))
                if group == 1:
                    for launch in launches[1:]:
                        builds.append(_build(sel_mod, launch, f"B {b}, chunk {cfg.chunk_compact}, {layout}", arch))
        q = torch.empty(b, h_q, d, device=meta, dtype=torch.bfloat16)
        for paged in (False, True):
            att_cfg = default_attention_config(b * h_kv, sinks + window + k, d, meta, sms=sms, paged=paged)
            shape = (b * t, h_kv, d) if paged else (b, h_kv, t, d)
            kv = torch.empty(shape, device=meta, dtype=torch.bfloat16)
            launches = attention_launches(
                q, kv, kv, out_sel, start, end, table if paged else None, sinks, window, d**-0.5, q, att_cfg
            )
            variant = (f"B {b}, {launches[0].grid[1]} splits, block {att_cfg.block_n}, {att_cfg.num_stages} stages, "
                       f"{'paged' if paged else 'dense'}")
            builds.extend(_build(att_mod, launch, variant, arch) for launch in launches)
    # the other dtypes and GQA shapes, once each (fp32 takes the IEEE, no-TF32 dot)
    for dtype, group, d in ((torch.float16, 8, 64), (torch.float32, 1, 128), (torch.bfloat16, 3, 128)):
        b = 4
        q = torch.empty(b, h_kv * group, d, device=meta, dtype=dtype)
        kv = torch.empty(b, h_kv, t, d, device=meta, dtype=dtype)
        sel = torch.empty(b, h_kv, k, dtype=torch.int64, device=meta)
        start = torch.zeros(b, dtype=torch.int64, device=meta)
        end = torch.full((b,), t, dtype=torch.int64, device=meta)
        att_cfg = default_attention_config(b * h_kv, sinks + window + k, d, meta, sms=sms, dtype=dtype)
        launch = attention_launches(q, kv, kv, sel, start, end, None, sinks, window, d**-0.5, q, att_cfg)[0]
        builds.append(_build(att_mod, launch, f"B {b}, {str(dtype)[6:]}, GQA {group}, D {d}, int64 selection", arch))
    # the sketch write of a decode step (16 new tokens) into a head-major pool
    from butler_kernels.sketch_write import sketch_write_launch

    pool = torch.empty(h_kv, 1 << 20, dp, device=meta, dtype=torch.bfloat16).transpose(0, 1)
    keys = torch.empty(16, h_kv, d, device=meta, dtype=torch.bfloat16)
    weight = torch.empty(h_kv, d, dp, device=meta, dtype=torch.bfloat16)
    loc = torch.empty(16, dtype=torch.int64, device=meta)
    launch = sketch_write_launch(pool, loc, keys, weight)
    builds.append(_build(kernel_module("_sketch_kernels", "cuda"), launch, "16 tokens, bf16, D 128, d' 16, head-major pool", arch))
    # ... of a format-2 predictor: keys un-rotated and sketch pairs rotated, angles halves of one [n, D] table
    angles = torch.empty(16, d, device=meta, dtype=torch.bfloat16)
    pairs = torch.empty(dp // 2, dtype=torch.int64, device=meta)
    launch = sketch_write_launch(pool, loc, keys, weight, (angles[:, : d // 2], angles[:, d // 2 :], pairs))
    builds.append(_build(kernel_module("_sketch_kernels", "cuda"), launch, "16 tokens, bf16, D 128, d' 16, rope", arch))
    # the producer's input norm at decode (Llama-3.1-8B's hidden size)
    from butler_kernels.producer_norm import residual_norm_launch

    hidden = torch.empty(16, 4096, device=meta, dtype=torch.bfloat16)
    norm_w = torch.empty(4096, device=meta, dtype=torch.bfloat16)
    launch = residual_norm_launch(hidden, hidden, norm_w, norm_w, 1e-5, hidden)
    builds.append(_build(kernel_module("_norm_kernels", "cuda"), launch, "16 rows of 4096, bf16, residual and bias", arch))
    return builds


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10 (default 90: H100/H200)")
    args = parser.parse_args(argv)
    print("| kernel | variant | registers | spill bytes | shared bytes | mma | cp.async |")
    print("|---|---|---|---|---|---|---|")
    for b in build_all(args.arch):
        print(f"| {b.kernel} | {b.variant} | {b.registers} | {b.spill_bytes} | {b.shared_bytes} | {b.mma} | {b.cp_async} |")


if __name__ == "__main__":
    main()
