"""Profile decode steps of a real tokenbutler server (SGLang's /start_profile, torch.profiler).

Starts the 8B-shaped dummy-weight server with CUDA graphs, sends one long request, profiles a few
decode steps and prints, per step: wall time, GPU busy time and the largest GPU kernels and CPU
ranges, so a per-step cost outside the attention kernels shows up.

    PYTHONPATH=/tmp/site:. python integrations/sglang/gpu/profile_server.py [--dense] [--context 32768]
"""

from __future__ import annotations

import argparse
import glob
import gzip
import json
import sys
import threading
import time
from collections import defaultdict
from pathlib import Path

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
import run  # noqa: E402  (the GPU script's Server and model helpers)


def _print_top(title: str, events: list, limit: int) -> None:
    """Total duration and count per event name (first 70 characters), largest first."""
    by_name = defaultdict(lambda: [0.0, 0])
    for e in events:
        by_name[e["name"][:70]][0] += e["dur"]
        by_name[e["name"][:70]][1] += 1
    print(title)
    for name, (dur, n) in sorted(by_name.items(), key=lambda kv: -kv[1][0])[:limit]:
        print(f"  {dur:10.0f}  {n:5d}  {name}")


def summarize(trace_path: str) -> None:
    opener = gzip.open if trace_path.endswith(".gz") else open
    with opener(trace_path, "rt") as f:
        events = json.load(f)["traceEvents"]
    kernels = [e for e in events if e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset") and "dur" in e]
    cpu = [e for e in events if e.get("cat") in ("cpu_op", "python_function", "user_annotation") and "dur" in e]
    if not kernels:
        print("no GPU events in", trace_path)
        return
    t0 = min(e["ts"] for e in kernels)
    t1 = max(e["ts"] + e["dur"] for e in kernels)
    busy = sum(e["dur"] for e in kernels)
    print(f"trace {Path(trace_path).name}: GPU span {(t1 - t0) / 1000:.2f} ms, GPU busy {busy / 1000:.2f} ms, {len(kernels)} kernels")
    _print_top("top GPU kernels (total us, count):", kernels, 15)
    _print_top("top CPU ranges (total us, count):", cpu, 25)
    # gaps on the GPU timeline longer than 0.5 ms: time the GPU waited for the host
    ks = sorted(kernels, key=lambda e: e["ts"])
    gaps = [(b["ts"] - (a["ts"] + a["dur"])) for a, b in zip(ks, ks[1:]) if b["ts"] - (a["ts"] + a["dur"]) > 500]
    print(f"GPU idle gaps > 0.5 ms: {len(gaps)}, total {sum(gaps) / 1000:.2f} ms, largest {max(gaps, default=0) / 1000:.2f} ms")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dense", action="store_true", help="profile the dense triton server instead")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=6)
    args = ap.parse_args()
    run.ensure_8b_model()
    out = Path("/tmp/sgl-prof-dense" if args.dense else "/tmp/sgl-prof-tb")
    flags = ["--triton-attention-num-kv-splits", "64", *run.GRAPHS, "--context-length", str(args.context + 2048),
             "--mem-fraction-static", "0.85"]
    if not args.dense:
        flags += run.tb_flags(run.PRED_8B, "0.1")
    import os

    os.environ["SGLANG_TORCH_PROFILER_DIR"] = str(out)
    with run.Server("profile-" + ("dense" if args.dense else "tb"), run.MODEL_8B, flags):
        url = f"http://127.0.0.1:{run.PORT}"
        ids = [1000 + (i * 7919) % 120000 for i in range(args.context)]
        body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 400, "temperature": 0, "ignore_eos": True}}
        t = threading.Thread(target=lambda: requests.post(f"{url}/generate", json=body, timeout=600))
        t.start()
        time.sleep(8.0)  # past the prefill, into decode
        r = requests.post(f"{url}/start_profile", json={"output_dir": str(out), "num_steps": args.steps, "activities": ["CPU", "GPU"]}, timeout=300)
        print("start_profile:", r.status_code, r.text[:200])
        t.join()
        time.sleep(2.0)
    traces = sorted(glob.glob(str(out / "**" / "*.json*"), recursive=True))
    print("traces:", traces)
    for p in traces[-1:]:
        summarize(p)


if __name__ == "__main__":
    main()
