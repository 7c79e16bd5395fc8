"""Every bad input gets a clear error naming the problem and the fix."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

from butler_zoo import (
    BudgetError,
    ButlerConfig,
    ButlerConfigError,
    ButlerError,
    ButlerPredictor,
    PredictorMismatchError,
    PredictorWeightsError,
    SparsePolicy,
    UnsupportedModelError,
    attach_butler,
    get_family,
)
from butler_zoo.compat import cache_kwarg
from tiny_models import left_padded_batch, tiny_model, tiny_predictor


def test_shape_mismatch_names_both_models():
    model = tiny_model("llama-gqa")
    other = tiny_model("llama-mha")
    with pytest.raises(PredictorMismatchError, match=r"num_key_value_heads: predictor 4 vs model 2"):
        attach_butler(model, tiny_predictor(other))


def test_model_type_mismatch():
    with pytest.raises(PredictorMismatchError, match=r"model_type 'mistral'.*model_type 'llama'"):
        attach_butler(tiny_model("llama-gqa"), tiny_predictor(tiny_model("mistral-gqa")))


def test_wrong_base_model_id_with_matching_shapes():
    model = tiny_model("llama-gqa")
    model.config._name_or_path = "org/fine-tune-of-something-else"
    predictor = tiny_predictor(model)
    predictor.config.base_model = "org/the-real-base"
    with pytest.raises(PredictorMismatchError, match=r"org/the-real-base.*org/fine-tune-of-something-else.*allow_other_base"):
        attach_butler(model, predictor)
    attach_butler(model, predictor, allow_other_base=True)


def test_unsupported_model_type_lists_supported():
    with pytest.raises(UnsupportedModelError, match=r"'gpt2' is not supported.*\['llama', 'mistral'\]"):
        get_family("gpt2")
    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64))
    cfg = ButlerConfig(base_model="gpt2", base_model_type="gpt2", num_hidden_layers=2, hidden_size=32,
                       num_attention_heads=2, num_key_value_heads=2, head_dim=16, sketch_dim=8)
    with pytest.raises(UnsupportedModelError, match="not supported"):
        attach_butler(gpt2, ButlerPredictor(cfg))


@pytest.mark.parametrize("kwargs, match", [
    ({"budget": 1.5}, r"fraction.*\(0, 1\]"),
    ({"budget": 0.0}, r"fraction.*\(0, 1\]"),
    ({"budget": -3}, r"token budget must be >= 0"),
    ({"budget": "ten"}, r"'ten' is not a budget"),
    ({"budget": [1]}, r"count of positions \(int\), a fraction"),
    ({"window": 0}, r"window must be >= 1"),
    ({"sinks": -1}, r"sinks must be >= 0"),
    ({"prediction_interval": 0}, r"prediction_interval must be >= 1"),
])
def test_out_of_range_policy(kwargs, match):
    with pytest.raises(BudgetError, match=match):
        SparsePolicy(**kwargs)


def test_one_budget_meaning_everywhere():
    """A budget counts every position a step reads, sinks and window included; text and numbers parse alike
    in the API, the CLI and SGLang (one parser)."""
    from butler_zoo.policy import parse_budget

    assert SparsePolicy(budget="10%").budget == 0.1 == parse_budget("10%") == parse_budget("0.1")
    assert parse_budget("1e3") == 1000 and isinstance(parse_budget("1e3"), int) and parse_budget("512") == 512
    assert parse_budget("1.0") == 1.0 and parse_budget("1") == 1
    with pytest.raises(BudgetError, match="must be whole"):
        parse_budget("1.5")
    p = SparsePolicy(sinks=4, window=8, budget=100)
    assert p.read_budget(1000) == 100 and p.max_budget(1000) == 88  # the predictor picks what sinks + window leave
    assert p.max_budget(50) == 38 and SparsePolicy(sinks=4, window=8, budget=10).max_budget(1000) == 0
    f = SparsePolicy(sinks=4, window=8, budget=0.1)
    assert f.read_budget(1000) == 100 and f.max_budget(1000) == 88
    assert "10% of the context read per step in all" in f.describe()


def test_out_of_range_budget_at_attach_and_per_call():
    model = tiny_model("llama-gqa")
    with pytest.raises(BudgetError):
        attach_butler(model, tiny_predictor(model), budget=8.0)
    attach_butler(model, tiny_predictor(model), budget=9)
    ids, mask = left_padded_batch()
    with pytest.raises(BudgetError, match="fraction"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0, butler_budget=7.5)


def test_missing_weights(tmp_path):
    predictor = tiny_predictor(tiny_model())
    predictor.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(PredictorWeightsError, match=r"weights not found.*model.safetensors"):
        ButlerPredictor.from_pretrained(tmp_path)


def test_missing_config(tmp_path):
    predictor = tiny_predictor(tiny_model())
    predictor.save_pretrained(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(ButlerConfigError, match=r"no predictor config"):
        ButlerPredictor.from_pretrained(tmp_path)


def test_corrupted_weights(tmp_path):
    predictor = tiny_predictor(tiny_model())
    predictor.save_pretrained(tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(PredictorWeightsError, match=r"corrupted or truncated"):
        ButlerPredictor.from_pretrained(tmp_path)


def test_corrupted_config(tmp_path):
    tiny_predictor(tiny_model()).save_pretrained(tmp_path)
    (tmp_path / "config.json").write_text('{"butler_zoo": "predictor", "base_model": ')
    with pytest.raises(ButlerConfigError, match="not valid JSON"):
        ButlerPredictor.from_pretrained(tmp_path)


def test_unknown_and_missing_weight_keys(tmp_path):
    predictor = tiny_predictor(tiny_model())
    predictor.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in predictor.state_dict().items()}
    state["extra.weight"] = torch.zeros(2)
    del state["key_proj"]
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(PredictorWeightsError, match=r"unknown tensors \['extra.weight'\].*missing tensors \['key_proj'\]"):
        ButlerPredictor.from_pretrained(tmp_path)


def test_misshapen_weights(tmp_path):
    predictor = tiny_predictor(tiny_model())
    predictor.save_pretrained(tmp_path)
    state = {k: v.contiguous() for k, v in predictor.state_dict().items()}
    state["key_proj"] = torch.zeros(1, 2, 3, 4)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(PredictorWeightsError, match=r"key_proj: file \(1, 2, 3, 4\)"):
        ButlerPredictor.from_pretrained(tmp_path)


def test_not_a_predictor_config(tmp_path):
    tiny_model().config.save_pretrained(tmp_path)  # a base model's config.json
    with pytest.raises(ButlerConfigError, match="not a butler-zoo predictor config"):
        ButlerPredictor.from_pretrained(tmp_path)


def test_unknown_config_field_and_newer_format(tmp_path):
    predictor = tiny_predictor(tiny_model())
    predictor.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**data, "fancy_new_field": 1}))
    with pytest.raises(ButlerConfigError, match=r"unknown fields \['fancy_new_field'\]"):
        ButlerPredictor.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**data, "format_version": 99}))
    with pytest.raises(ButlerConfigError, match="newer than this butler-zoo"):
        ButlerPredictor.from_pretrained(tmp_path)


def test_invalid_config_values():
    with pytest.raises(ButlerConfigError, match="sketch_dim"):
        ButlerConfig(base_model="x", base_model_type="llama", num_hidden_layers=4, hidden_size=64,
                     num_attention_heads=4, num_key_value_heads=2, head_dim=16, sketch_dim=32)
    with pytest.raises(ButlerConfigError, match="multiple"):
        ButlerConfig(base_model="x", base_model_type="llama", num_hidden_layers=4, hidden_size=64,
                     num_attention_heads=4, num_key_value_heads=3, head_dim=16)


def test_not_a_folder_nor_repo_id(tmp_path, monkeypatch):
    with pytest.raises(ButlerError, match="no such folder: .*does/not/exist; check the path"):
        ButlerPredictor.from_pretrained(tmp_path / "does" / "not" / "exist")
    # ORG/NAME whose ORG is a folder here reads as a mistyped local path: no Hub request
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    (tmp_path / "runs").mkdir()
    with pytest.raises(ButlerError, match="no such folder: runs/my-predictor .*runs/ exists here"):
        ButlerPredictor.from_pretrained("runs/my-predictor")


def test_unsupported_attention_implementation():
    model = tiny_model("llama-gqa")
    model.config._attn_implementation = "flex_attention"
    with pytest.raises(UnsupportedModelError, match="attn_implementation='sdpa'"):
        attach_butler(model, tiny_predictor(model))


def test_double_attach():
    model = tiny_model("llama-gqa")
    attach_butler(model, tiny_predictor(model))
    with pytest.raises(ButlerError, match="already attached"):
        attach_butler(model, tiny_predictor(model))


def test_cache_filled_before_attach():
    model = tiny_model("llama-gqa")
    ids, mask = left_padded_batch()
    cache = DynamicCache()
    model(input_ids=ids, attention_mask=mask, use_cache=True, **{cache_kwarg(model): cache})
    attach_butler(model, tiny_predictor(model), budget=8)
    nxt = torch.ones(ids.shape[0], 1, dtype=torch.long)
    with pytest.raises(UnsupportedModelError, match="without a predictor.*attach the predictor before the prefill"):
        model(input_ids=nxt, attention_mask=torch.cat([mask, torch.ones_like(nxt)], 1), use_cache=True, **{cache_kwarg(model): cache})


def test_mask_with_holes_is_rejected():
    model = tiny_model("llama-gqa")
    attach_butler(model, tiny_predictor(model), budget=8)
    ids, mask = left_padded_batch(lengths=(30, 30))
    mask[:, 10] = 0  # a hole in the middle of the context
    with pytest.raises(ButlerError, match="has holes"):
        model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, pad_token_id=0)
