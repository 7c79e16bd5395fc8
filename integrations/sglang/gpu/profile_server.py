"""Profile decode steps of a real tokenbutler server (SGLang's /start_profile, torch.profiler).

Starts the 8B-shaped dummy-weight server with CUDA graphs, sends one long request, profiles a few
decode steps and prints, per step: wall time, GPU busy time and the largest GPU kernels and CPU
ranges, so a per-step cost outside the attention kernels shows up.

    PYTHONPATH=/tmp/site:. python integrations/sglang/gpu/profile_server.py [--dense] [--both] [--batch 8] [--context 32768]

With ``--batch N`` it sends N requests of the same length at once and starts the profile once the
server log shows a decode batch of N. Each run ends with a table of GPU kernel time per decode step;
``--table TRACE LABEL`` prints that table for a saved trace without starting a server.
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


_GPU = ("kernel", "gpu_memcpy", "gpu_memset")
_CPU = ("cpu_op", "python_function", "user_annotation")


def load_trace(trace_path: str) -> tuple[list, list]:
    """(GPU events in time order, CPU ranges) of a torch.profiler trace (``.json`` or ``.json.gz``)."""
    opener = gzip.open if trace_path.endswith(".gz") else open
    with opener(trace_path, "rt") as f:
        events = json.load(f)["traceEvents"]
    gpu = sorted((e for e in events if e.get("cat") in _GPU and "dur" in e), key=lambda e: e["ts"])
    cpu = [e for e in events if e.get("cat") in _CPU and "dur" in e]
    return gpu, cpu


def _totals(events: list, width: int) -> list[tuple[str, float, int]]:
    """(name truncated to ``width``, total duration, count) per event name, largest total first."""
    by_name = defaultdict(lambda: [0.0, 0])
    for e in events:
        by_name[e["name"][:width]][0] += e["dur"]
        by_name[e["name"][:width]][1] += 1
    return sorted(((name, dur, n) for name, (dur, n) in by_name.items()), key=lambda row: -row[1])


def _print_top(title: str, events: list, limit: int) -> None:
    print(title)
    for name, dur, n in _totals(events, 70)[:limit]:
        print(f"  {dur:10.0f}  {n:5d}  {name}")


def summarize(name: str, kernels: list, cpu: list) -> None:
    if not kernels:
        print("no GPU events in", name)
        return
    t0 = kernels[0]["ts"]
    t1 = max(e["ts"] + e["dur"] for e in kernels)
    busy = sum(e["dur"] for e in kernels)
    print(f"trace {name}: GPU span {(t1 - t0) / 1000:.2f} ms, GPU busy {busy / 1000:.2f} ms, {len(kernels)} kernels")
    _print_top("top GPU kernels (total us, count):", kernels, 30)
    _print_top("top CPU ranges (total us, count):", cpu, 25)
    # gaps on the GPU timeline longer than 0.5 ms: time the GPU waited for the host
    gaps = [(b["ts"] - (a["ts"] + a["dur"])) for a, b in zip(kernels, kernels[1:]) if b["ts"] - (a["ts"] + a["dur"]) > 500]
    print(f"GPU idle gaps > 0.5 ms: {len(gaps)}, total {sum(gaps) / 1000:.2f} ms, largest {max(gaps, default=0) / 1000:.2f} ms")


def step_table(kernels: list, label: str, step_kernel: str | None = None, rows: int = 24) -> str:
    """Markdown table of GPU kernel time per decode step (``kernels`` in time order). Steps are cut
    at a kernel that runs once per step: ``step_kernel`` (a substring of its name) or, by default,
    the kernel with the longest single call among those that run at most 16 times in the trace
    (the LM head's GEMM)."""
    if step_kernel is None:
        calls = defaultdict(list)
        for e in kernels:
            calls[e["name"]].append(e["dur"])
        step_kernel = max((n for n, d in calls.items() if len(d) <= 16), key=lambda n: max(calls[n]))
    marks = [i for i, e in enumerate(kernels) if step_kernel in e["name"]]
    if len(marks) < 2:
        raise SystemExit(f"{label}: fewer than two calls of {step_kernel!r}: no whole step to measure")
    steps = len(marks) - 1
    seg = kernels[marks[0] + 1 : marks[-1] + 1]
    period = (kernels[marks[-1]]["ts"] - kernels[marks[0]]["ts"]) / steps / 1000
    busy = sum(e["dur"] for e in seg) / steps / 1000
    lines = [f"## {label}: {steps} decode steps between calls of {step_kernel[:40]}; step period {period:.3f} ms, "
             f"GPU busy {busy:.3f} ms, {len(seg) // steps} kernels per step",
             "| kernel | us per step | calls per step |", "|---|---|---|"]
    for name, dur, n in _totals(seg, 60)[:rows]:
        lines.append(f"| {name} | {dur / steps:.1f} | {n / steps:g} |")
    stream = kernels[marks[0]].get("args", {}).get("stream")
    on_stream = [e for e in kernels[marks[0] : marks[-1] + 1] if e.get("args", {}).get("stream") == stream]
    lines.append("\n" + gap_line(on_stream, steps))
    return "\n".join(lines) + "\n"


def gap_line(seg: list, steps: int) -> str:
    """Where the step's stream idles: the time between one kernel's end and the next one's start on
    the stream of the step kernel (the overlap scheduler runs its own small kernels on a second
    stream meanwhile), bucketed by size. In a CUDA graph it is mostly the per-launch gap, so it
    grows with the kernel count."""
    buckets = {"< 1 us": [0.0, 0], "1-5 us": [0.0, 0], "5-20 us": [0.0, 0], ">= 20 us": [0.0, 0]}
    overlap = 0.0
    for a, b in zip(seg, seg[1:]):
        g = b["ts"] - (a["ts"] + a["dur"])
        if g < 0:
            overlap -= g
            continue
        key = "< 1 us" if g < 1 else "1-5 us" if g < 5 else "5-20 us" if g < 20 else ">= 20 us"
        buckets[key][0] += g
        buckets[key][1] += 1
    parts = [f"{k}: {t / steps:.1f} us in {n / steps:g}" for k, (t, n) in buckets.items()]
    return (f"idle between kernels of the step's stream, per step: {', '.join(parts)}; "
            f"overlapping kernels: {overlap / steps:.1f} us")


def profile(name: str, dense: bool, batch: int, context: int, steps: int, step_kernel: str | None = None) -> None:
    out = Path(f"/tmp/sgl-prof-{name}")
    flags = ["--triton-attention-num-kv-splits", "64", *run.GRAPHS, "--context-length", str(context + 2048),
             "--mem-fraction-static", "0.88"]
    if not dense:
        flags += run.tb_flags(run.PRED_8B, "0.1")
    import os

    os.environ["SGLANG_TORCH_PROFILER_DIR"] = str(out)
    with run.Server("profile-" + name, run.MODEL_8B, flags) as server:
        url = f"http://127.0.0.1:{run.PORT}"
        threads = []
        for r in range(batch):
            ids = [1000 + (i * 7919 + r * 104729) % 120000 for i in range(context)]
            body = {"input_ids": ids, "sampling_params": {"max_new_tokens": 600, "temperature": 0, "ignore_eos": True}}
            threads.append(threading.Thread(target=lambda b=body: requests.post(f"{url}/generate", json=b, timeout=900)))
            threads[-1].start()
        t0 = time.time()
        # profile only once every request decodes (the log line SGLang prints every 40 decode steps)
        while not server.grep(rf"Decode batch, #running-req: {batch},") and time.time() - t0 < 300:
            time.sleep(0.5)
        time.sleep(1.0)
        r = requests.post(f"{url}/start_profile", json={"output_dir": str(out), "num_steps": steps, "activities": ["CPU", "GPU"]}, timeout=300)
        print(f"[{name}] batch {batch} x {context}: start_profile", r.status_code, r.text[:200])
        for t in threads:
            t.join()
        time.sleep(2.0)
        print(f"[{name}] decode lines:", *server.grep(r"Decode batch")[-3:], sep="\n  ")
    traces = sorted(glob.glob(str(out / "**" / "*.json*"), recursive=True))
    print("traces:", traces)
    for p in traces[-1:]:
        kernels, cpu = load_trace(p)  # parsed once: the summary and the step table read the same events
        summarize(Path(p).name, kernels, cpu)
        print(step_table(kernels, f"{name}: batch {batch} x {context}", step_kernel))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--dense", action="store_true", help="profile the dense triton server instead")
    ap.add_argument("--both", action="store_true", help="profile the dense server, then the tokenbutler server")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--table", nargs=2, metavar=("TRACE", "LABEL"), action="append",
                    help="only print the per-step kernel table of a saved trace (repeatable); starts no server")
    ap.add_argument("--step-kernel", default=None,
                    help="substring of a kernel that runs once per decode step (default: the LM head's GEMM, found by timing)")
    args = ap.parse_args()
    if args.table:
        for trace, label in args.table:
            print(step_table(load_trace(trace)[0], label, args.step_kernel))
        return
    run.ensure_8b_model()
    runs = [("dense", True), ("tb", False)] if args.both else [("dense" if args.dense else "tb", args.dense)]
    for name, dense in runs:
        profile(name, dense, args.batch, args.context, args.steps, args.step_kernel)


if __name__ == "__main__":
    main()
