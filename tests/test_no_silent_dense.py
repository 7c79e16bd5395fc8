"""A sparse policy never turns into a quiet dense decode (issue 16).

When a transformers release changes how attention layers get the cache, or a model's attention does not
go through transformers' attention interface, the runtime cannot sketch or select: each such decode step
whose context exceeds sinks + window + budget must raise a ButlerError naming the installed transformers
and the supported range, never return dense logits."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
import torch

from butler_zoo import ButlerError, attach_butler
from butler_zoo.compat import CACHE_ARGUMENTS, SUPPORTED_TRANSFORMERS
from butler_zoo.runtime import DecodeStats
from tiny_models import left_padded_batch, tiny_model, tiny_predictor

REPO = Path(__file__).resolve().parents[1]


def _generate(model, ids, mask, steps=3):
    return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps,
                          do_sample=False, pad_token_id=0)


def _rename_cache_argument(model, new_name: str):
    """Emulate a transformers release that hands attention layers the cache under ``new_name``.

    Hooks run in registration order: one registered before attach renames the argument (what the butler
    pre-hook then sees), one registered after attach renames it back so that the model's own forward still
    writes K/V, as the hypothetical release would."""
    layers = model.model.layers

    def hide(module, args, kwargs):
        kwargs = dict(kwargs)
        for name in CACHE_ARGUMENTS:
            if name in kwargs:
                kwargs[new_name] = (name, kwargs.pop(name))
        return args, kwargs

    def restore(module, args, kwargs):
        kwargs = dict(kwargs)
        if new_name in kwargs:
            name, cache = kwargs.pop(new_name)
            kwargs[name] = cache
        return args, kwargs

    for layer in layers:
        layer.self_attn.register_forward_pre_hook(hide, with_kwargs=True)
    return lambda: [layer.self_attn.register_forward_pre_hook(restore, with_kwargs=True) for layer in layers]


@pytest.mark.parametrize("name", ["llama-gqa", "mistral-gqa"])
def test_unknown_cache_argument_raises(name):
    model = tiny_model(name)
    ids, mask = left_padded_batch()
    after_attach = _rename_cache_argument(model, "kv_store")
    attach_butler(model, tiny_predictor(model), budget=9)
    after_attach()
    with pytest.raises(ButlerError) as err:
        _generate(model, ids, mask)
    msg = str(err.value)
    assert "would have run dense" in msg and "kv_store" in msg
    assert re.search(r"installed transformers \d+\.\d+", msg)
    assert f"supports transformers{SUPPORTED_TRANSFORMERS}" in msg


def test_unknown_cache_argument_is_fine_when_the_context_fits():
    """A context inside sinks + window + budget is dense by design: nothing to refuse."""
    model = tiny_model("llama-gqa")
    ids, mask = left_padded_batch()
    after_attach = _rename_cache_argument(model, "kv_store")
    attach_butler(model, tiny_predictor(model), budget=1.0)
    after_attach()
    dense = _generate(model, ids, mask, steps=2)
    assert dense.shape[1] == ids.shape[1] + 2


def test_attention_bypassing_the_interface_raises():
    """A layer whose attention calls sdpa directly (not the registered implementation) skips the runtime."""
    model = tiny_model("llama-gqa")
    ids, mask = left_padded_batch()
    attach_butler(model, tiny_predictor(model), budget=9)
    attn = model.model.layers[2].self_attn
    attn.config = copy.copy(attn.config)
    attn.config._attn_implementation = "sdpa"
    with pytest.raises(ButlerError, match=r"layer 2: .*did not call transformers' attention interface"):
        _generate(model, ids, mask)


def test_disabled_policy_never_raises():
    model = tiny_model("llama-gqa")
    ids, mask = left_padded_batch()
    after_attach = _rename_cache_argument(model, "kv_store")
    attach_butler(model, tiny_predictor(model), budget=9)
    after_attach()
    model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0,
                   butler_enabled=False)


def test_fraction_read_with_nothing_recorded_is_none():
    stats = DecodeStats()
    assert stats.fraction_read is None
    assert stats.layer_steps == 0 and stats.sparse_layer_steps == 0


def test_stats_count_sparse_and_dense_steps():
    model = tiny_model("llama-gqa")
    ids, mask = left_padded_batch()
    attach_butler(model, tiny_predictor(model), budget=9)
    stats = model.butler.track_stats()
    _generate(model, ids, mask)
    assert stats.sparse_layer_steps == stats.layer_steps > 0
    assert 0.0 < stats.fraction_read < 1.0
    with model.butler.policy_override(budget=1.0):
        stats = model.butler.track_stats()
        _generate(model, ids, mask, steps=2)
    assert stats.sparse_layer_steps == 0 and stats.layer_steps > 0 and stats.fraction_read == 1.0


def test_declared_transformers_range_is_the_supported_one():
    """pyproject.toml's transformers requirement and the range error messages quote are one and the same."""
    text = (REPO / "pyproject.toml").read_text()
    declared = re.search(r'^\s*"transformers([<>=!~][^"]*)",', text, re.M).group(1)
    assert declared == SUPPORTED_TRANSFORMERS


def test_generate_says_when_no_step_was_sparse():
    """--compare-dense on a prompt that fits sinks + window + budget says so, instead of '100% of dense'."""
    from butler_zoo.cli.generate import _read_summary
    from butler_zoo.policy import SparsePolicy

    stats = DecodeStats()
    stats.add(torch.tensor(10.0), torch.tensor(10.0), sparse=False)
    text = _read_summary(stats, SparsePolicy(sinks=4, window=8, budget=64))
    assert text.startswith("no decode step was sparse") and "smaller --budget" in text
    assert _read_summary(DecodeStats(), SparsePolicy()).startswith("no decode step was recorded")
