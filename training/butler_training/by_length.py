"""Quality by context length: the decode-simulated evaluation at several window lengths, with recall
broken down by query position, layer and key distance, plus pass-key retrieval and co-reference at length.

    butler-zoo eval --seq-lens 1024 2048 4096 8192 --out DIR [--predictor P] [--windows 8]
    python -m butler_training.by_length --seq-lens 1024 2048 4096 8192 --out DIR      # same options
    python -m butler_training.by_length --seq-lens --needle-lengths 4096 --out DIR  # the tasks alone
    python -m butler_training.by_length --merge OUT_DIR FILE... [--tasks-from FILE]  # one eval_by_length.json

For each length ``L`` it runs :func:`butler_training.evaluate.evaluate` on ``--windows`` held-out windows of
``L`` tokens (evenly spaced; prefill ``--prefill``; sinks/window as given; every method at every
fractional budget, budgets counting every position read), with ``diagnostics`` on, into ``DIR/len-L/``.
Then the pass-key task (:mod:`butler_training.needle`) at ``--needle-lengths`` and depths, and the
co-reference task at ``--coref-tokens``, for ``--task-methods`` at ``--task-fractions``. Everything goes
to ``DIR/eval_by_length.json`` (rewritten after each piece; ``--resume`` keeps finished pieces), with the
plots ``DIR/eval_by_length.png`` (perplexity ratio against context length, a panel per budget) and
``DIR/recall_by_position.png``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from butler_training.common import config_from_args, describe_machine, git_commit, resolve_device, utc_now, versions
from butler_training.evaluate import (
    ALL_METHODS,
    DEFAULT_DATA,
    DecodeSimulator,
    EvalConfig,
    EvalInputs,
    add_input_arguments,
    build_method,
    coref_accuracy,
    evaluate,
    load_for_eval,
    make_plan,
)
from butler_training.needle import KEY_KINDS

__all__ = ["LengthEvalConfig", "evaluate_by_length", "main", "format_length_table", "merge_results"]

TASK_METHODS = ("dense", "oracle", "tokenbutler", "streaming_llm", "h2o")


@dataclasses.dataclass
class LengthEvalConfig(EvalInputs):
    seq_lens: list[int] = dataclasses.field(default_factory=lambda: [1024, 2048, 4096, 8192])
    windows: int = 8
    prefill: int = 128
    batch_size: int = 1
    sinks: int = 4
    window: int = 8
    methods: list[str] = dataclasses.field(default_factory=lambda: list(ALL_METHODS))
    fractions: list[float] = dataclasses.field(default_factory=lambda: [0.05, 0.1, 0.25, 0.5])
    needle_lengths: list[int] = dataclasses.field(default_factory=lambda: [2048, 4096, 8192])
    needle_depths: list[float] = dataclasses.field(default_factory=lambda: [0.1, 0.3, 0.5, 0.7, 0.9])
    needle_per_depth: int = 4
    needle_key: str = "words"
    coref_tokens: int = 4096
    coref_samples: int = 40
    coref_prefill: int = 32
    task_methods: list[str] = dataclasses.field(default_factory=lambda: list(TASK_METHODS))
    task_fractions: list[float] = dataclasses.field(default_factory=lambda: [0.1, 0.25])


def _plan_fn(budget: float, sinks: int, window: int):
    return lambda length, prefill: make_plan(length, prefill, budget, "fraction", sinks, window)


@torch.no_grad()
def _needle_accuracy(sim, batches, method, plan_fn, device) -> dict:
    """Needle scores over batches ``(ids, spans, prefill, cells)``, overall and by ``length@depth`` cell.

    The key's first token is predicted by the prompt's last row, which is prefilled densely for every
    method, so it says nothing about the method: it is reported apart (``first_token_accuracy``). A sample
    is *correct* (``accuracy``) when every later key token, each predicted by a decode row under the
    method's policy, is right (teacher-forced, so a wrong first token does not spoil the rest); the
    decode rows must find the needle thousands of tokens back to copy it. ``token_accuracy`` is the
    fraction of those decoded tokens right."""
    by: dict[str, list[int]] = {}
    tokens_right = tokens = first_right = 0
    for ids, spans, prefill, cells in batches:
        hidden = sim.forward(ids.to(device), method, plan_fn(ids.shape[1], prefill))
        for b, ((s, e), cell) in enumerate(zip(spans, cells)):
            if e - s < 2:
                raise ValueError(f"a needle key of {e - s} token leaves no token to decode; use a longer key")
            pred = sim.logits(hidden[b, s - 1 : e - 1]).argmax(-1).cpu()
            want = ids[b, s:e]
            first_right += int(pred[0] == want[0])
            acc = by.setdefault(cell, [0, 0])
            acc[0] += int(torch.equal(pred[1:], want[1:]))
            acc[1] += 1
            tokens_right += int((pred[1:] == want[1:]).sum())
            tokens += e - s - 1
    correct, total = sum(v[0] for v in by.values()), sum(v[1] for v in by.values())
    return {"accuracy": correct / max(total, 1), "token_accuracy": tokens_right / max(tokens, 1),
            "first_token_accuracy": first_right / max(total, 1), "samples": total,
            "by_cell": {k: round(v[0] / v[1], 4) for k, v in sorted(by.items())}}


def evaluate_by_length(cfg: LengthEvalConfig, *, model=None, tokenizer=None, predictor=None) -> dict:
    """Run everything; returns the ``eval_by_length.json`` dict (also written to ``cfg.out``)."""
    from butler_training.coref import coref_batch, make_coref_samples
    from butler_training.data import TokenWindows
    from butler_training.needle import make_needle_samples, needle_batches
    from butler_training.train import evenly_spaced

    t0 = time.perf_counter()
    if not cfg.out:
        raise SystemExit("--out is required: the folder for eval_by_length.json and its plots")
    if cfg.plot:
        from butler_training.plots import require_matplotlib

        require_matplotlib()
    bad = [n for n in cfg.seq_lens if n <= cfg.prefill + 1]
    if bad:
        raise SystemExit(f"--seq-lens {bad} must exceed --prefill {cfg.prefill} + 1")
    device = resolve_device(cfg.device)
    model, tokenizer, predictor, base_desc = load_for_eval(cfg, model=model, tokenizer=tokenizer, predictor=predictor)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "eval_by_length.json"
    sources = list(cfg.data or DEFAULT_DATA)
    result = {
        "base_model": predictor.config.base_model,
        "predictor": str(cfg.predictor) if cfg.predictor else "given predictor object",
        "predictor_format": predictor.config.format_version,
        "split": "+".join(sources),
        "seq_lens": list(cfg.seq_lens),
        "prefill_len": cfg.prefill,
        "windows": cfg.windows,
        "settings": {"sinks": cfg.sinks, "window": cfg.window, "fractions": cfg.fractions, "dtype": cfg.dtype,
                     "budget": "positions read per decode row, sinks + window + current token + selected, as a fraction "
                               "of the row's context (ceil)"},
        "command": cfg.command,
        "machine": describe_machine(device),
        "versions": {**versions(), "git_commit": git_commit()},
        "base_weights": base_desc,
        "by_length": {},
        "needle": None,
        "coref": None,
        "date": utc_now(),
    }
    if cfg.resume and path.is_file():
        old = json.loads(path.read_text())
        if old.get("settings") != result["settings"] or old.get("split") != result["split"] or old.get("windows") != cfg.windows:
            raise SystemExit(f"{path} was written with other settings; remove it or drop --resume")
        for k in ("by_length", "needle", "coref"):
            result[k] = old.get(k) or result[k]

    def save() -> None:
        result["wall_time_s"] = round(time.perf_counter() - t0, 1)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(result, indent=1) + "\n")
        tmp.replace(path)

    # ----- perplexity, recall and their breakdowns, length by length ------------------------------
    for L in cfg.seq_lens:
        if str(L) in result["by_length"]:
            continue
        tw = TokenWindows(tokenizer, sources, L, "all", seed=cfg.seed, root=cfg.data_dir, cache=True)
        if len(tw) == 0:
            raise SystemExit(f"the held-out sources {sources} hold no window of {L} tokens")
        idx = evenly_spaced(len(tw), cfg.windows)
        windows = torch.stack([tw[i] for i in idx])
        print(f"== length {L}: {len(idx)} windows of {len(tw)}", file=sys.stderr, flush=True)
        sub = EvalConfig(
            out=str(out / f"len-{L}"), predictor=cfg.predictor, data=sources, data_dir=cfg.data_dir, seq_len=L,
            prefill=cfg.prefill, windows=len(idx), batch_size=cfg.batch_size, sinks=cfg.sinks, window=cfg.window,
            methods=list(cfg.methods), intervals=[1], fractions=list(cfg.fractions), token_budgets=[], diagnostics=True,
            coref_samples=0, gen_prompts=0, device=cfg.device, dtype=cfg.dtype, seed=cfg.seed, plot=False,
            command=cfg.command,
        )
        r = evaluate(sub, model=model, tokenizer=tokenizer, predictor=predictor, windows=windows, base_desc=base_desc)
        result["by_length"][str(L)] = {"dense_ppl": r["dense_ppl"], "windows": len(idx), "windows_available": len(tw),
                                       "results": r["results"]}
        save()

    # ----- tasks: pass-key retrieval and co-reference ---------------------------------------------
    methods = [m for m in cfg.task_methods if m == "dense" or m in ALL_METHODS]
    configs = [(m, 1.0 if m == "dense" else f) for m in methods for f in ([1.0] if m == "dense" else cfg.task_fractions)]
    with DecodeSimulator(model) as sim:
        def run_task(key: str, spec: dict, score) -> None:
            """Every (method, budget) of a task, saved after each, so that --resume keeps what was done."""
            old = result[key]
            if old is not None and {k: v for k, v in old.items() if k != "results"} != spec:
                raise SystemExit(f"the {key} results in {path} were made with other settings; remove them or drop --resume")
            block = old if old is not None else {**spec, "results": []}
            result[key] = block
            done = {(r["method"], float(r["budget"])) for r in block["results"]}
            for m, f in configs:
                if (m, float(f)) in done:
                    continue
                method = build_method(m, 1, predictor) if m != "dense" else None
                r = score(method, _plan_fn(f, cfg.sinks, cfg.window))
                block["results"].append({"method": m, "budget": f, **r})
                print(f"{key:6s} {m:14s} {f:>5.0%}  " + "  ".join(f"{k} {v:.3f}" for k, v in r.items() if k.endswith("accuracy")),
                      file=sys.stderr, flush=True)
                save()

        if cfg.needle_lengths and cfg.needle_per_depth > 0:
            hay = TokenWindows(tokenizer, sources, max(cfg.needle_lengths), "all", seed=cfg.seed, root=cfg.data_dir, cache=True)
            haystack = torch.cat([hay[i] for i in range(len(hay))]).tolist()
            samples = [s for L in cfg.needle_lengths
                       for s in make_needle_samples(tokenizer, haystack, L, cfg.needle_depths, cfg.needle_per_depth, seed=cfg.seed,
                                                     key_kind=cfg.needle_key)]
            batches = needle_batches(samples, cfg.batch_size)
            spec = {"lengths": cfg.needle_lengths, "depths": cfg.needle_depths, "per_depth": cfg.needle_per_depth,
                    "key": cfg.needle_key, "prompt": "haystack with the needle + question, prefilled densely; the key decoded"}
            run_task("needle", spec, lambda method, plan_fn: _needle_accuracy(sim, batches, method, plan_fn, device))
        if cfg.coref_samples > 0:
            samples = make_coref_samples(tokenizer, cfg.coref_samples, cfg.coref_tokens, seed=cfg.seed)
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
            cbatches = [coref_batch(samples[i : i + cfg.batch_size], pad) for i in range(0, len(samples), cfg.batch_size)]
            spec = {"tokens": cfg.coref_tokens, "samples": cfg.coref_samples, "prefill_len": cfg.coref_prefill}
            run_task("coref", spec, lambda method, plan_fn: {
                "accuracy": coref_accuracy(sim, cbatches, method, plan_fn, cfg.coref_prefill, device)})
    save()
    if cfg.plot and result["by_length"]:
        from butler_training.plots import plot_by_length, plot_recall_by_position

        plot_by_length(result, out / "eval_by_length.png")
        plot_recall_by_position(result, out / "recall_by_position.png")
    if result["by_length"]:
        print(format_length_table(result), file=sys.stderr)
    return result


def format_length_table(result: dict, metric: str = "ppl_rel", methods: Sequence[str] | None = None) -> str:
    """Markdown table: one row per (context length, budget), one column per method."""
    names = list(methods or dict.fromkeys(r["method"] for L in result["by_length"].values() for r in L["results"]
                                          if r["method"] != "dense"))
    head = ["context", "budget", *names]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    spec = ".4f" if metric == "ppl_rel" else ".3f"
    for L, block in sorted(result["by_length"].items(), key=lambda kv: int(kv[0])):
        cells: dict[tuple, dict] = {(r["method"], float(r["budget"])): r for r in block["results"] if r["budget_kind"] == "fraction"}
        for f in sorted({b for (m, b) in cells if m != "dense"}):
            vals = [format(cells[(m, f)][metric], spec) if (m, f) in cells and cells[(m, f)].get(metric) is not None else "–"
                    for m in names]
            lines.append(f"| {int(L):,} | {f:.0%} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def merge_results(paths: Sequence[str | Path], out: str | Path, tasks_from: str | Path | None = None) -> dict:
    """One ``eval_by_length.json`` from the lengths of several runs: each path is an ``eval_by_length.json``
    (its lengths, pass-key and co-reference results) or the ``eval.json`` of one length (what a run that
    stopped early left, ``DIR/len-L/eval.json``). Every length keeps the command, machine, versions and
    windows of the run it came from (``sources``, kept from a merged file given again); a length given twice
    is an error. With ``tasks_from``
    (an ``eval_by_length.json``), the pass-key and co-reference results are that file's; those of ``paths``
    are kept under ``superseded``, with their provenance, so that nothing measured is lost."""
    merged: dict = {"by_length": {}, "needle": None, "coref": None, "sources": {}}
    superseded: dict = {}
    task_paths = [] if tasks_from is None else [Path(tasks_from)]
    for path in [*map(Path, paths), *task_paths]:
        data = json.loads(path.read_text())
        prov = {"file": path.name, "command": data.get("command"), "machine": data.get("machine"),
                "versions": data.get("versions"), "windows": data.get("windows")}
        is_tasks = path in task_paths
        if "by_length" in data:
            blocks = {} if is_tasks else data["by_length"]
            for key in ("needle", "coref"):
                if not data.get(key):
                    continue
                if tasks_from is not None and not is_tasks:
                    superseded.setdefault(key, []).append({**data[key], "source": data[key].get("source", prov)})
                    continue
                if merged[key]:
                    raise SystemExit(f"{path}: a second {key} result (--tasks-from FILE says which to keep)")
                merged[key] = {**data[key], "source": data[key].get("source", prov)}
        else:  # one length's eval.json
            blocks = {str(data["seq_len"]): {"dense_ppl": data["dense_ppl"], "windows": data["windows"],
                                             "results": data["results"]}}
        for L, block in blocks.items():
            if L in merged["by_length"]:
                raise SystemExit(f"{path}: length {L} is already given by {merged['sources'][L]['file']}")
            merged["by_length"][L] = block
            # a merged file passed again keeps the provenance of each of its lengths
            merged["sources"][L] = (data.get("sources") or {}).get(L) or prov
        for key in ("base_model", "predictor", "predictor_format", "split", "prefill_len", "settings", "base_weights"):
            if key in data and key not in merged:
                merged[key] = data[key]
            elif key in data and merged[key] != data[key] and key in ("split", "prefill_len"):
                raise SystemExit(f"{path}: {key} {data[key]!r} differs from the other runs' {merged[key]!r}")
    if superseded:
        merged["superseded"] = superseded
    merged["seq_lens"] = sorted(int(L) for L in merged["by_length"])
    merged["by_length"] = {str(L): merged["by_length"][str(L)] for L in merged["seq_lens"]}
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval_by_length.json").write_text(json.dumps(merged, indent=1) + "\n")
    return merged


def build_parser() -> argparse.ArgumentParser:
    d = LengthEvalConfig()
    p = argparse.ArgumentParser(prog="butler-zoo eval --seq-lens", description=__doc__.split("\n\n")[0])
    p.add_argument("--seq-lens", type=int, nargs="*", required=True,
                   help="context lengths (window sizes) to evaluate; none (a bare --seq-lens) runs only the two tasks")
    p.add_argument("--out", required=True, help="folder for eval_by_length.json, the per-length eval.json and the plots")
    add_input_arguments(p, d)
    p.add_argument("--windows", type=int, default=d.windows, help=f"windows per length, evenly spaced (default {d.windows})")
    p.add_argument("--prefill", type=int, default=d.prefill, help=f"dense prefill rows (default {d.prefill})")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help=f"windows per forward (default {d.batch_size})")
    p.add_argument("--sinks", type=int, default=d.sinks, help=f"(default {d.sinks})")
    p.add_argument("--window", type=int, default=d.window, help=f"local window incl. the current token (default {d.window})")
    p.add_argument("--methods", nargs="+", default=d.methods, choices=list(ALL_METHODS), help="(default: all)")
    p.add_argument("--fractions", nargs="+", type=float, default=d.fractions,
                   help=f"budgets, fractions of the context read (default {' '.join(map(str, d.fractions))})")
    p.add_argument("--needle-lengths", nargs="*", type=int, default=d.needle_lengths, help="pass-key haystack lengths (none: skip)")
    p.add_argument("--needle-depths", nargs="+", type=float, default=d.needle_depths, help="needle depths, fractions")
    p.add_argument("--needle-per-depth", type=int, default=d.needle_per_depth, help=f"samples per length and depth (default {d.needle_per_depth})")
    p.add_argument("--needle-key", choices=list(KEY_KINDS), default=d.needle_key,
                   help="the key: an invented word of random syllables, or a five-digit number (SmolLM2-135M fails "
                        f"digits even densely from 4K tokens on) (default {d.needle_key})")
    p.add_argument("--coref-tokens", type=int, default=d.coref_tokens, help=f"co-reference sample length (default {d.coref_tokens})")
    p.add_argument("--coref-samples", type=int, default=d.coref_samples, help=f"0 skips it (default {d.coref_samples})")
    p.add_argument("--coref-prefill", type=int, default=d.coref_prefill, help=f"(default {d.coref_prefill})")
    p.add_argument("--task-methods", nargs="+", default=d.task_methods, choices=["dense", *ALL_METHODS],
                   help=f"methods of the two tasks (default {' '.join(d.task_methods)})")
    p.add_argument("--task-fractions", nargs="+", type=float, default=d.task_fractions, help="budgets of the two tasks")
    p.add_argument("--resume", action="store_true", help="keep the pieces already in OUT/eval_by_length.json")
    return p


def main(argv: Sequence[str] | None = None, prog_command: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--merge"]:
        tasks_from = None
        if "--tasks-from" in argv:
            i = argv.index("--tasks-from")
            if i + 1 >= len(argv):
                raise SystemExit("--tasks-from needs a file: --tasks-from DIR/eval_by_length.json")
            tasks_from = argv[i + 1]
            argv = argv[:i] + argv[i + 2 :]
        if len(argv) < 3:
            raise SystemExit("usage: python -m butler_training.by_length --merge OUT_DIR FILE [FILE ...] [--tasks-from FILE]")
        merged = merge_results(argv[2:], argv[1], tasks_from=tasks_from)
        print(format_length_table(merged))
        return 0
    args = build_parser().parse_args(argv)
    cfg = config_from_args(LengthEvalConfig, args, prog_command or ("python -m butler_training.by_length " + " ".join(argv)))
    evaluate_by_length(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
