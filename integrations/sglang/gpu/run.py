#!/usr/bin/env python3
"""GPU checks of the SGLang plugin (run on the lent H100 through device.sh, which sets the env).

  run.py functional   dense and tokenbutler servers (8B shape, dummy weights): OpenAI /v1/models,
                      /v1/completions (text, token ids, streaming), 64 concurrent mixed-length
                      requests; plus two launches that must be refused at startup.
  run.py bench NAMES  decode throughput (bench.py) of servers NAMES (comma list of dense8, dense64,
                      tb, tb8) at 32K context, batch 1 / 8 / 12, and batch 16 at 24K; each batch
                      sent $BENCH_REPEAT times (default 3: the later rounds hit the radix cache),
                      the median decode tok/s reported.
  run.py smollm2      SmolLM2-135M-Instruct (converted from the carried GGUF): greedy outputs of a
                      prompt set, dense vs tokenbutler at full budget (must be identical) and at 25%.

Each writes $OUT/<name>.json and prints a compact table at the end. PARALLEL="--tp-size 2" (or
"--dp-size 2") runs every server of functional and bench in that layout (not run yet: no multi-GPU
machine has been lent). Servers run in their own
process group (killed at the end, also on errors) from /tmp, with logs in $OUT/server-*.log.
"""
from __future__ import annotations

import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import requests

HERE = Path(__file__).resolve().parent
OUT = Path(os.environ.get("OUT", "/tmp/sgl-out"))
OUT.mkdir(parents=True, exist_ok=True)
PY = sys.executable
PORT = int(os.environ.get("PORT", "30000"))
MODEL_8B = Path(os.environ.get("MODEL_8B", "/tmp/sgl-model-8b"))
PRED_8B = Path(os.environ.get("PRED_8B", "/tmp/tb-pred-8b"))
RESULTS = Path(os.environ.get("RESULTS", "/tmp/tb-results"))
COMMON = ["--attention-backend", "triton", "--sampling-backend", "pytorch", "--grammar-backend", "none",
          "--skip-server-warmup", "--host", "127.0.0.1", "--port", str(PORT)]
EAGER = ["--disable-cuda-graph", "--disable-piecewise-cuda-graph"]
# Decode CUDA graphs on (the configuration of the dense baseline); the piecewise *prefill* graph is
# off to save ~70 s of torch.compile per server: it does not change decode throughput.
GRAPHS = ["--cuda-graph-max-bs", "16", "--disable-piecewise-cuda-graph"]
# Parallel layout of every server, dense and tokenbutler alike (issue 23), e.g. PARALLEL="--tp-size 2" or
# PARALLEL="--dp-size 2" on a 2-GPU machine. NOT RUN YET: no multi-GPU machine has been lent; written for
# the first one (docs/sglang.md, Parallelism). The result files get the layout as a suffix (functional-tp2.json).
PARALLEL = os.environ.get("PARALLEL", "").split()
SUFFIX = "".join(f"-{flag.lstrip('-').split('-')[0]}{value}" for flag, value in zip(PARALLEL[::2], PARALLEL[1::2]))
COMMON += PARALLEL


def log(*a):
    print(f"[{time.strftime('%H:%M:%S')}]", *a, flush=True)


# ----- servers ---------------------------------------------------------------------------------
class Server:
    def __init__(self, name: str, model: Path, flags: list[str], timeout: float = 420, expect_fail: bool = False):
        self.name, self.log_path = name, OUT / f"server-{name}.log"
        # the 8B-shaped folder has a config and a tokenizer only: SGLang fills it with random weights
        dummy = ["--load-format", "dummy"] if model == MODEL_8B else []
        cmd = [PY, "-m", "sglang.launch_server", "--model-path", str(model), *COMMON, *dummy, *flags]
        self.cmd = " ".join(cmd[1:])
        t0 = time.time()
        self.proc = subprocess.Popen(cmd, stdout=open(self.log_path, "w"), stderr=subprocess.STDOUT, cwd="/tmp",
                                     start_new_session=True)
        self.ready = False
        while time.time() - t0 < timeout:
            if self.proc.poll() is not None:
                break
            try:
                if requests.get(f"http://127.0.0.1:{PORT}/health", timeout=2).status_code == 200:
                    self.ready = True
                    break
            except requests.RequestException:
                pass
            time.sleep(0.5)
        self.start_s = round(time.time() - t0, 1)
        log(f"[{name}] ready={self.ready} after {self.start_s} s: {self.cmd}")
        if not self.ready and not expect_fail:
            log(f"[{name}] server not ready; last log lines:\n" + self.tail(60))
            self.stop()
            raise RuntimeError(f"server {name} did not start")

    def tail(self, n=40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def grep(self, pattern: str) -> list[str]:
        return [l for l in self.log_path.read_text(errors="replace").splitlines() if re.search(pattern, l)]

    def stop(self):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            for _ in range(40):
                if self.proc.poll() is not None:
                    break
                time.sleep(0.25)
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        time.sleep(1.0)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()


def kv_tokens(server: Server) -> int | None:
    for line in server.grep(r"KV Cache is allocated|max_total_num_tokens"):
        m = re.search(r"#tokens: (\d+)", line) or re.search(r"max_total_num_tokens=(\d+)", line)
        if m:
            return int(m.group(1))
    return None


def ensure_8b_model():
    if not (MODEL_8B / "config.json").is_file():
        subprocess.run([PY, str(HERE / "make_model_dir.py"), str(MODEL_8B)], check=True)
    if not (PRED_8B / "config.json").is_file():
        subprocess.run([PY, str(HERE / "make_predictor.py"), str(MODEL_8B), str(PRED_8B), "--sinks", "64", "--window", "128",
                        "--budget", "0.1", "--name", "llama-3.1-8b-shape (dummy weights)"], check=True)


def tb_flags(pred: Path, budget: str = "0.1", *extra: str) -> list[str]:
    return ["--decode-attention-backend", "tokenbutler", "--tokenbutler-predictor", str(pred), "--tokenbutler-budget", budget, *extra]


def table(rows: list[dict], cols: list[str]) -> str:
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    line = lambda r: "| " + " | ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols) + " |"  # noqa: E731
    return "\n".join([line({c: c for c in cols}), "|" + "|".join("-" * (widths[c] + 2) for c in cols) + "|", *map(line, rows)])


# ----- 1. functional ------------------------------------------------------------------------------
def openai_checks(n_concurrent: int = 64, seed: int = 0) -> dict:
    base = f"http://127.0.0.1:{PORT}"
    res: dict = {}
    models = requests.get(f"{base}/v1/models", timeout=30)
    res["v1_models"] = models.status_code
    model = models.json()["data"][0]["id"]
    r = requests.post(f"{base}/v1/completions", json={"model": model, "prompt": "Hello world, the quick brown fox",
                                                      "max_tokens": 8, "temperature": 0, "ignore_eos": True}, timeout=120)
    j = r.json()
    res["text_completion"] = {"status": r.status_code, "completion_tokens": j.get("usage", {}).get("completion_tokens"),
                              "text": j.get("choices", [{}])[0].get("text", "")[:60]}
    rng = random.Random(seed)
    ids = [rng.randrange(1000, 128000) for _ in range(3000)]
    r = requests.post(f"{base}/v1/completions", json={"model": model, "prompt": ids, "max_tokens": 16, "temperature": 0,
                                                      "ignore_eos": True}, timeout=120)
    res["token_id_completion"] = {"status": r.status_code, "completion_tokens": r.json().get("usage", {}).get("completion_tokens")}
    chunks, done = 0, False
    with requests.post(f"{base}/v1/completions", json={"model": model, "prompt": ids[:1500], "max_tokens": 16, "temperature": 0,
                                                       "ignore_eos": True, "stream": True}, stream=True, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith(b"data:"):
                if line[5:].strip() == b"[DONE]":
                    done = True
                else:
                    chunks += 1
    res["streaming"] = {"chunks": chunks, "done": done}

    # n concurrent requests of mixed lengths (dense and sparse rows in the same decode batches)
    lengths = [16, 100, 300, 1000, 2000, 4000, 8000, 12000]
    jobs = [(i, lengths[i % len(lengths)] + rng.randrange(0, 50), 8 + (i * 7) % 57) for i in range(n_concurrent)]
    rng.shuffle(jobs)

    def one(job):
        i, n, out = job
        prompt = [rng.randrange(1000, 128000) for _ in range(n)]
        t = time.time()
        try:
            r = requests.post(f"{base}/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": out,
                                                              "temperature": 0, "ignore_eos": True}, timeout=600)
            got = r.json().get("usage", {}).get("completion_tokens") if r.status_code == 200 else None
            return {"i": i, "status": r.status_code, "ok": r.status_code == 200 and got == out, "prompt": n, "want": out,
                    "got": got, "s": round(time.time() - t, 2)}
        except Exception as e:  # noqa: BLE001
            return {"i": i, "status": None, "ok": False, "error": f"{type(e).__name__}: {e}"[:200]}

    t0 = time.time()
    with ThreadPoolExecutor(n_concurrent) as ex:
        results = list(ex.map(one, jobs))
    res["concurrent"] = {
        "requests": n_concurrent,
        "completed_ok": sum(r["ok"] for r in results),
        "failed": [r for r in results if not r["ok"]][:8],
        "wall_s": round(time.time() - t0, 1),
        "prompt_tokens": sum(r.get("prompt", 0) for r in results),
        "completion_tokens": sum(r.get("got") or 0 for r in results),
    }
    res["health_after"] = requests.get(f"{base}/health", timeout=30).status_code
    return res


def functional() -> None:
    ensure_8b_model()
    small_pred = Path("/tmp/tb-pred-small-shape")
    if not (small_pred / "config.json").is_file():
        small = Path("/tmp/sgl-model-small")
        subprocess.run([PY, str(HERE / "make_model_dir.py"), str(small), "--small"], check=True)
        subprocess.run([PY, str(HERE / "make_predictor.py"), str(small), str(small_pred)], check=True)
    report: dict = {"servers": {}, "refused": {}}
    # tokenbutler with SGLang's default graphs: decode CUDA graphs AND the piecewise prefill graph
    # (torch.compile traces the producer hooks; they must stay out of the traced extend graph)
    for name, flags in (("dense", EAGER), ("tokenbutler", ["--cuda-graph-max-bs", "16", *tb_flags(PRED_8B, "0.1")])):
        # 16K positions: the longest prompt (12K) fits, and the static top-k (10%) stays 1.6K
        with Server(f"func-{name}", MODEL_8B, ["--mem-fraction-static", "0.85", "--context-length", "16384", *flags]) as s:
            r = openai_checks()
            r.update(start_s=s.start_s, kv_tokens=kv_tokens(s), cmd=s.cmd,
                     tokenbutler_log=[l[-300:] for l in s.grep(r"TokenButler")][:4],
                     errors_in_log=[l[-300:] for l in s.grep(r"Traceback|Error|exception")][:6])
            report["servers"][name] = r
    # launches that must stop at startup, with the message
    for name, flags, needle in (
        ("mismatched-predictor", tb_flags(small_pred), "does not fit the served model"),
        ("fp8-kv", [*tb_flags(PRED_8B), "--kv-cache-dtype", "fp8_e5m2"], "--kv-cache-dtype fp8_e5m2 is not supported"),
    ):
        s = Server(f"refuse-{name}", MODEL_8B, flags, timeout=240, expect_fail=True)
        rc = s.proc.wait(timeout=240) if not s.ready else None
        s.stop()
        text = s.log_path.read_text(errors="replace")
        msg = next((l for l in text.splitlines() if needle in l), "")
        report["refused"][name] = {"refused": (not s.ready) and rc not in (0, None), "rc": rc, "message_found": bool(msg),
                                   "message": msg[-400:], "s": s.start_s}
    (OUT / f"functional{SUFFIX}.json").write_text(json.dumps(report, indent=2))
    rows = []
    for name, r in report["servers"].items():
        c = r["concurrent"]
        rows.append({"server": name, "start_s": r["start_s"], "kv_tokens": r["kv_tokens"], "/v1/models": r["v1_models"],
                     "text": r["text_completion"]["status"], "ids": r["token_id_completion"]["status"],
                     "stream_done": r["streaming"]["done"], f"{c['requests']} concurrent ok": c["completed_ok"],
                     "wall_s": c["wall_s"], "health_after": r["health_after"]})
    print("\nFUNCTIONAL (Llama-3.1-8B shape, dummy weights)\n" + table(rows, list(rows[0])))
    rows = [{"launch": k, "refused": v["refused"], "rc": v["rc"], "message": v["message"][-110:]} for k, v in report["refused"].items()]
    print("\nREFUSED AT STARTUP\n" + table(rows, list(rows[0])))


# ----- 2. throughput ------------------------------------------------------------------------------
BENCH_SERVERS = {
    "dense8": ["--triton-attention-num-kv-splits", "8"],
    "dense64": ["--triton-attention-num-kv-splits", "64"],
    "tb": ["--triton-attention-num-kv-splits", "64", "TB"],
    "tb8": ["--triton-attention-num-kv-splits", "8", "TB"],
}
BENCH_RUNS = os.environ.get("BENCH", "b1x32768 b8x32768 b12x32768 b16x24576").split()


def bench(names: str) -> None:
    ensure_8b_model()
    budget = os.environ.get("TB_BUDGET", "0.1")
    # $OUT is new for every `run` call: results accumulate in /tmp (kept while the machine is warm), so
    # the table of the last call compares every server measured so far
    RESULTS.mkdir(parents=True, exist_ok=True)
    out_file = RESULTS / f"bench{SUFFIX}.json"
    report = json.loads(out_file.read_text()) if out_file.is_file() else {}
    for name in names.split(","):
        flags = [f for f in BENCH_SERVERS[name] if f != "TB"]
        if "TB" in BENCH_SERVERS[name]:
            flags += tb_flags(PRED_8B, budget)
        # 34816 positions: 32K prompts + 128 new tokens fit; the static top-k is 10% of it
        flags += [*GRAPHS, "--context-length", "34816", "--mem-fraction-static", os.environ.get("MEM_FRAC", "0.88")]
        results = []
        with Server(f"bench-{name}", MODEL_8B, flags) as s:
            jl = OUT / f"bench-{name}.jsonl"
            jl.unlink(missing_ok=True)
            for tag, b, n, o in (("warm1", 1, 1024, 16), ("warm16", 16, 1024, 16)):
                subprocess.run([PY, str(HERE / "bench.py"), "--port", str(PORT), "--batch", str(b), "--input-len", str(n),
                                "--output-len", str(o), "--tag", tag], check=True, capture_output=True, timeout=300)
            for run in BENCH_RUNS:
                b, n = run[1:].split("x")
                p = subprocess.run([PY, str(HERE / "bench.py"), "--port", str(PORT), "--batch", b, "--input-len", n,
                                    "--output-len", "128", "--tag", f"{name}-{run}", "--json-out", str(jl),
                                    "--repeat", os.environ.get("BENCH_REPEAT", "3")],
                                   capture_output=True, text=True, timeout=400)
                line = next((l for l in p.stdout.splitlines() if l.startswith("BENCH ")), None)
                if line is None:
                    log(f"[{name}] {run} failed:\n{p.stdout[-1500:]}{p.stderr[-1500:]}\n{s.tail(30)}")
                    results.append({"run": run, "error": (p.stderr or p.stdout)[-300:]})
                else:
                    results.append({"run": run, **json.loads(line[6:])})
                    log(line)
            report[name] = {"cmd": s.cmd, "start_s": s.start_s, "kv_tokens": kv_tokens(s), "runs": results,
                            "gen_throughput_log": [l[-160:] for l in s.grep(r"gen throughput")][-6:],
                            "tokenbutler_log": [l[-300:] for l in s.grep(r"TokenButler")][:4]}
        out_file.write_text(json.dumps(report, indent=2))
        (OUT / f"bench{SUFFIX}.json").write_text(json.dumps(report, indent=2))
    baseline = {"b1x8192": 105.7, "b16x8192": 1107, "b1x32768": (53.0, 115.7)}
    rows = []
    for name, r in report.items():
        row = {"server": name, "kv_tokens": r["kv_tokens"]}
        for x in r["runs"]:
            row[x["run"]] = x.get("decode_tok_s", "ERR")
        rows.append(row)
    cols = ["server", "kv_tokens", *BENCH_RUNS]
    print("\nDECODE tok/s (bench.py, 128 output tokens, CUDA graphs on, H100; recorded dense b1x32768: "
          f"{baseline['b1x32768'][0]} with 8 splits, {baseline['b1x32768'][1]} with 64)\n" + table(rows, cols))
    if "tb" in report and "dense64" in report:
        sp = {}
        for run in BENCH_RUNS:
            t = next((x.get("decode_tok_s") for x in report["tb"]["runs"] if x["run"] == run), None)
            for d in ("dense64", "dense8"):
                if d in report:
                    v = next((x.get("decode_tok_s") for x in report[d]["runs"] if x["run"] == run), None)
                    if t and v:
                        sp.setdefault(run, {})[f"tb/{d}"] = round(t / v, 2)
        print("\nSPEEDUP " + json.dumps(sp))


# ----- 3. SmolLM2 quality -------------------------------------------------------------------------
PASSAGE = (
    "The old lighthouse keeper, Mara Velde, kept a ledger of every ship that passed the northern cape. "
    "In the spring of 1887 she recorded the schooner Halcyon, carrying salt and copper wire to the mainland, "
    "and noted that its captain, a man named Ilias Brandt, waved a green flag twice before rounding the rocks. "
    "Three weeks later the steamer Corvina anchored in the bay for repairs; its engineer, Tomas Reyes, came ashore "
    "to buy lamp oil and told Mara about a storm forming far to the west. "
)
QUESTIONS = [
    "Who was the captain of the Halcyon?", "What did the Halcyon carry?", "Who kept the ledger?",
    "What color was the flag?", "What was the name of the steamer?", "Who was the engineer of the Corvina?",
    "What did the engineer buy?", "Where was the storm forming?", "In which year did this happen?",
    "Summarize the story in one sentence.",
]


def smollm2_prompts(tokenizer) -> list[str]:
    filler = [
        "Waves broke against the rocks while gulls circled the tower. ",
        "The keeper trimmed the wick, polished the lens and wrote the weather in the margin. ",
        "Fishing boats returned at dusk, their lanterns swaying above the dark water. ",
    ]
    prompts = []
    for i, q in enumerate(QUESTIONS * 2):
        reps = 4 + 6 * i  # contexts from ~220 to ~1930 tokens (SmolLM2 tokenizer, chat template)
        body = PASSAGE + "".join(filler[(i + k) % 3] for k in range(reps))
        msgs = [{"role": "user", "content": body + "\n\nQuestion: " + q}]
        prompts.append(tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True))
    return prompts


def generate_all(prompts: list[str], max_new: int) -> list[list[int]]:
    outs = []
    for p in prompts:  # one at a time: the same batch shapes in every server, so dense is reproducible
        r = requests.post(f"http://127.0.0.1:{PORT}/generate", json={"text": p, "sampling_params": {
            "max_new_tokens": max_new, "temperature": 0, "ignore_eos": True}}, timeout=300)
        r.raise_for_status()
        outs.append(r.json()["output_ids"])
    return outs


def smollm2() -> None:
    from transformers import AutoTokenizer

    gguf_dir, name, hf = Path("/tmp/smollm2-gguf"), "SmolLM2-135M-Instruct.Q4_1.gguf", Path("/tmp/smollm2-hf")
    if not (hf / "config.json").is_file():
        t = time.time()
        subprocess.run([PY, str(HERE / "gguf_to_hf.py"), str(gguf_dir), name, str(hf)], check=True)
        log(f"converted the GGUF in {time.time() - t:.0f} s")
    pred = os.environ.get("PREDICTOR", "")
    shipped = Path(__file__).resolve().parents[3] / "butler_zoo" / "predictors" / "SmolLM2-135M-Instruct-butler"
    pred_kind = "given"
    if not pred:
        if (shipped / "config.json").is_file():
            pred, pred_kind = str(shipped), "shipped"
        else:
            pred, pred_kind = "/tmp/tb-pred-smollm2-random", "RANDOM (no shipped predictor in this checkout)"
            subprocess.run([PY, str(HERE / "make_predictor.py"), str(hf), pred, "--sinks", "4", "--window", "64",
                            "--budget", "0.25", "--name", "HuggingFaceTB/SmolLM2-135M-Instruct"], check=True)
    tok = AutoTokenizer.from_pretrained(hf)
    prompts = smollm2_prompts(tok)
    lens = [len(tok(p)["input_ids"]) for p in prompts]
    max_new = int(os.environ.get("MAX_NEW", "64"))
    base = ["--dtype", "bfloat16", *GRAPHS, "--mem-fraction-static", "0.5"]
    outs, meta = {}, {}
    for label, flags in (("dense", []), ("tb-100%", tb_flags(Path(pred), "1.0")), ("tb-25%", tb_flags(Path(pred), "0.25"))):
        with Server(f"smollm2-{label}", hf, [*base, *flags]) as s:
            outs[label] = generate_all(prompts, max_new)
            meta[label] = {"cmd": s.cmd, "start_s": s.start_s, "tokenbutler_log": [l[-300:] for l in s.grep(r"TokenButler")][:3]}

    def agree(a, b):
        first = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        return first
    report = {"predictor": pred, "predictor_kind": pred_kind, "prompt_tokens": lens, "max_new_tokens": max_new, "servers": meta,
              "comparisons": {}}
    for label in ("tb-100%", "tb-25%"):
        firsts = [agree(a, b) for a, b in zip(outs["dense"], outs[label])]
        report["comparisons"][label] = {
            "identical_outputs": sum(f == max_new for f in firsts), "prompts": len(prompts),
            "mean_tokens_before_first_divergence": round(sum(firsts) / len(firsts), 1),
            "token_agreement": round(sum(sum(x == y for x, y in zip(a, b)) for a, b in zip(outs["dense"], outs[label]))
                                     / sum(len(a) for a in outs["dense"]), 4),
            "first_divergence": firsts,
        }
    report["samples"] = {k: tok.decode(v[0])[:200] for k, v in outs.items()}
    (OUT / "smollm2.json").write_text(json.dumps(report, indent=2))
    rows = [{"vs dense": k, "identical": f"{v['identical_outputs']}/{v['prompts']}", "token agreement": v["token_agreement"],
             "mean prefix": v["mean_tokens_before_first_divergence"]} for k, v in report["comparisons"].items()]
    print(f"\nSMOLLM2-135M-Instruct (bf16, from the Q4_1 GGUF), {len(prompts)} prompts of {min(lens)}-{max(lens)} tokens, "
          f"{max_new} greedy tokens; predictor: {pred_kind}\n" + table(rows, list(rows[0])))


if __name__ == "__main__":
    cmd = sys.argv[1]
    if cmd == "functional":
        functional()
    elif cmd == "bench":
        bench(sys.argv[2] if len(sys.argv) > 2 else "dense8,dense64,tb")
    elif cmd == "smollm2":
        smollm2()
    else:
        sys.exit(__doc__)
