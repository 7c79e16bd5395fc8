#!/usr/bin/env python3
"""Decode-throughput probe against a running SGLang server (/generate).

Copied from shared/gpu-sglang/bench.py (same measurement, so figures compare with the recorded
dense baseline); added: --json-out (append the result line to a file) and --repeat.

Sends B concurrent streaming requests, each with IN random input_ids (distinct
per request, so no prefix sharing) and OUT output tokens (ignore_eos, greedy),
and reports:
  ttft_s        time to first token of each request (includes queueing)
  decode_tok_s  steady-state decode throughput of the whole batch: tokens made
                by all requests between the moment the last one got its first
                token and the moment the first one finished, divided by that
                window (for B=1: (OUT-1) / (t_last_token - t_first_token))
  per_req_tok_s mean over requests of (n-1)/(t_end - t_first)
  e2e_tok_s     B*OUT / wall time of the whole batch (prefill included)
With --repeat N the same batch is sent N times in a row (the later rounds find the prompts in the
radix cache, so they cost little prefill; decode runs over the same contexts): decode_tok_s is then
the median of the rounds, decode_tok_s_runs lists them all, the other fields are the first round's.
usage: bench.py --port 30000 --batch 16 --input-len 8192 --output-len 128 [--repeat 3]
"""
import argparse, json, random, statistics, threading, time

import requests

ap = argparse.ArgumentParser()
ap.add_argument("--host", default="127.0.0.1")
ap.add_argument("--port", type=int, default=30000)
ap.add_argument("--batch", type=int, default=1)
ap.add_argument("--input-len", type=int, default=8192)
ap.add_argument("--output-len", type=int, default=128)
ap.add_argument("--vocab", type=int, default=128000)
ap.add_argument("--seed", type=int, default=0)
ap.add_argument("--tag", default="")
ap.add_argument("--json-out", default="")
ap.add_argument("--repeat", type=int, default=1, help="send the batch this many times; report the median decode_tok_s")
args = ap.parse_args()
url = f"http://{args.host}:{args.port}/generate"
rng = random.Random(args.seed * 7919 + args.batch * 131 + args.input_len)

inputs = [[rng.randrange(1000, args.vocab) for _ in range(args.input_len)]
          for _ in range(args.batch)]

def one(i, res):
    ids = inputs[i]
    body = {"input_ids": ids, "stream": True,
            "sampling_params": {"max_new_tokens": args.output_len, "temperature": 0.0,
                                "ignore_eos": True}}
    marks = []  # (time, completion_tokens)
    t0 = time.perf_counter()
    with requests.post(url, json=body, stream=True, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line or not line.startswith(b"data:"):
                continue
            payload = line[5:].strip()
            if payload == b"[DONE]":
                break
            d = json.loads(payload)
            n = d.get("meta_info", {}).get("completion_tokens")
            if n is None:
                n = len(d.get("output_ids", [])) or (marks[-1][1] + 1 if marks else 1)
            marks.append((time.perf_counter(), n))
    res[i] = (t0, marks)


def count_at(marks, t):
    c = 0
    for tt, n in marks:
        if tt <= t + 1e-9: c = n
        else: break
    return c


def one_round():
    res = [None] * args.batch
    ths = [threading.Thread(target=one, args=(i, res)) for i in range(args.batch)]
    T0 = time.perf_counter()
    for t in ths: t.start()
    for t in ths: t.join()
    T1 = time.perf_counter()
    firsts = [m[0][0] for _, m in res]
    ends = [m[-1][0] for _, m in res]
    t_all = max(firsts); t_end_min = min(ends)
    if args.batch == 1:
        m = res[0][1]
        dec = (m[-1][1] - m[0][1]) / max(m[-1][0] - m[0][0], 1e-9)
    else:
        tok = sum(count_at(m, t_end_min) - count_at(m, t_all) for _, m in res)
        dec = tok / max(t_end_min - t_all, 1e-9)
    per_req = [(m[-1][1] - m[0][1]) / max(m[-1][0] - m[0][0], 1e-9) for _, m in res]
    return {
        "completion_tokens": [m[-1][1] for _, m in res],
        "ttft_s_min": round(min(f - t0 for (t0, _), f in zip(res, firsts)), 3),
        "ttft_s_max": round(max(f - t0 for (t0, _), f in zip(res, firsts)), 3),
        "decode_window_s": round(t_end_min - t_all, 3) if args.batch > 1 else round(ends[0] - firsts[0], 3),
        "decode_tok_s": round(dec, 1),
        "per_req_tok_s": round(sum(per_req) / len(per_req), 1),
        "itl_ms": round(1000.0 / (sum(per_req) / len(per_req)), 2),
        "e2e_wall_s": round(T1 - T0, 3),
        "e2e_tok_s": round(sum(m[-1][1] for _, m in res) / (T1 - T0), 1),
    }


rounds = [one_round() for _ in range(max(args.repeat, 1))]
out = {"tag": args.tag, "batch": args.batch, "input_len": args.input_len, "output_len": args.output_len, **rounds[0]}
if len(rounds) > 1:
    runs = [r["decode_tok_s"] for r in rounds]
    out["decode_tok_s"] = statistics.median(runs)
    out["decode_tok_s_runs"] = runs
print("BENCH " + json.dumps(out), flush=True)
if args.json_out:
    with open(args.json_out, "a") as f:
        f.write(json.dumps(out) + "\n")
