"""One paged selection (score + select) at a decode shape, for Nsight Compute.

The selection kernels are latency- and issue-bound rather than bandwidth-bound; ``ncu`` says where::

    ncu -k regex:"_score_hist|_compact" --launch-skip 2 --launch-count 2 \\
        --section SpeedOfLight --section WarpStateStats --section InstructionStats --section Occupancy \\
        python benchmarks/ncu_select.py --batch 8 --context 32768

(three selections run; skipping the first two launches profiles the third call's kernels). Inputs are
those of ``bench_kernels.py --layout paged`` (random predictor queries and sketch, one predictor head
per KV head, 8 KV heads, d' 16, sinks 64, window 128, 10% budget). Needs a CUDA GPU.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_kernels as bk  # noqa: E402

from butler_kernels.score_select import score_select_triton  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=32768)
    p.add_argument("--budget", type=float, default=0.1)
    p.add_argument("--calls", type=int, default=3)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("ncu_select.py needs a CUDA GPU")
    sinks, window, kv_heads = 64, 128, 8
    k = math.ceil(args.budget * args.context)
    shape = bk.Shape(args.batch, args.context, args.budget, sinks, window, k, sinks + window + k, 32, kv_heads, kv_heads, 128, 16)
    x = bk.Inputs(shape, torch.bfloat16, "paged", torch.Generator(device="cuda").manual_seed(0))
    for _ in range(args.calls):
        score_select_triton(x.q_sel, x.sketch_ours, x.start, x.end, sinks=sinks, window=window, k=k, token_table=x.table)
    torch.cuda.synchronize()
    print(f"{args.calls} selections of batch {args.batch} x {args.context}, k {k}")


if __name__ == "__main__":
    main()
