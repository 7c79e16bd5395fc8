"""Real sparse decode in transformers on tiny random Llama and Mistral models (GQA and MHA).

* a budget covering the context gives the dense logits (tight tolerance), batch 2 with left padding;
* a small budget attends exactly sinks + window + top-B of the predictor's scores, checked against
  an independent re-computation from the recorded hidden states and cached keys;
* a small budget changes the output; padding and tokens outside Mistral's window are never read.
"""

from __future__ import annotations

import math
from collections import defaultdict

import pytest
import torch
import torch.nn.functional as F
from transformers import DynamicCache

from butler_zoo import attach_butler, detach_butler
from butler_zoo.compat import cache_kwarg
from tiny_models import TINY_SPECS, left_padded_batch, tiny_model, tiny_predictor

STEPS = 6
ALL = list(TINY_SPECS)


def _generate(model, ids, mask, steps=STEPS, **kw):
    return model.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=steps, min_new_tokens=steps, do_sample=False,
        output_logits=True, return_dict_in_generate=True, pad_token_id=0, **kw,
    )


def _max_logit_diff(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a.logits, b.logits))


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("dense_fallback", [False, True])
def test_full_budget_equals_dense(name, dense_fallback):
    model = tiny_model(name)
    ids, mask = left_padded_batch()
    dense = _generate(model, ids, mask)
    attach_butler(model, tiny_predictor(model), budget=1.0)
    # with the fallback off the budgeted gather path itself runs, and must equal dense attention
    model.butler.dense_fallback = dense_fallback
    with model.butler.record() as rec:
        sparse = _generate(model, ids, mask)
    assert rec, "no decode step went through the butler runtime"
    assert all((sel is None) == dense_fallback for _, sel, *_ in rec)
    assert torch.equal(dense.sequences, sparse.sequences)
    tol = 0.0 if dense_fallback else 2e-5
    assert _max_logit_diff(dense, sparse) <= tol


@pytest.mark.parametrize("name", ALL)
def test_small_budget_changes_output_and_reads_less(name):
    model = tiny_model(name)
    ids, mask = left_padded_batch()
    dense = _generate(model, ids, mask)
    attach_butler(model, tiny_predictor(model), budget=9)
    stats = model.butler.track_stats()
    sparse = _generate(model, ids, mask)
    assert _max_logit_diff(dense, sparse) > 1e-3
    assert 0.0 < stats.fraction_read < 0.8


def _independent_queries(predictor, producer, hidden):
    """The producer MLP written out with functional ops (not the module's forward)."""
    p = predictor.producers[producer]
    x = F.layer_norm(hidden.double(), (hidden.shape[-1],), p.norm.weight.double(), p.norm.bias.double(), p.norm.eps)
    x = F.silu(x @ p.fc1.weight.double().T) @ p.fc2.weight.double().T
    return x.view(hidden.shape[0], *p.out_shape)


def _rotate_pairs_by_hand(x, cos, sin, pairs):
    """Rotate pair ``(j, j + d'/2)`` of ``x [..., d']`` by the base angle of frequency ``pairs[j]`` (-1: none);
    ``cos``/``sin`` ``[..., D]`` as the model computed them (transformers' layout repeats the D/2 angles)."""
    out = x.clone()
    h = x.shape[-1] // 2
    for j, p in enumerate(pairs):
        if p < 0:
            continue
        c, s = cos[..., p], sin[..., p]
        out[..., j] = x[..., j] * c - x[..., j + h] * s
        out[..., j + h] = x[..., j + h] * c + x[..., j] * s
    return out


def _expected_selection(q, sketch, lo, hi, sinks, window, budget):
    """Top-``budget`` candidates of one (row, KV head), in plain Python."""
    valid = list(range(lo, hi))
    forced = set(valid[:sinks]) | set(valid[-window:])
    cand = [p for p in valid if p not in forced]
    score = {p: max(float(qq @ sketch[p]) for qq in q) for p in cand}
    return set(sorted(cand, key=lambda p: -score[p])[:budget])


@pytest.mark.parametrize("name", ["llama-gqa", "llama-mha", "mistral-gqa"])
@pytest.mark.parametrize("query_heads", ["kv", "query"])
@pytest.mark.parametrize("budget", [11, 0.25])
def test_attended_set_is_sinks_window_topb(name, query_heads, budget):
    model = tiny_model(name)
    predictor = tiny_predictor(model, query_heads=query_heads)
    attach_butler(model, predictor, budget=budget)
    cfg = predictor.config
    layers = model.model.layers
    hidden = defaultdict(list)
    hooks = [
        layers[p].register_forward_hook(lambda m, a, o, p=p: hidden[p].append(o[:, -1].detach().clone()) if o.shape[1] == 1 else None)
        for p in cfg.producer_layers
    ]
    # Independent of the runtime: the pre-RoPE keys straight from k_proj, and the angles the model itself
    # computed (layer 0's position_embeddings), for the position-consistent sketch of format 2.
    pre_keys, angles = defaultdict(list), []
    hooks += [layers[l].self_attn.k_proj.register_forward_hook(lambda m, a, o, l=l: pre_keys[l].append(o.detach().double()))
              for l in range(1, cfg.num_hidden_layers)]
    hooks.append(layers[0].register_forward_pre_hook(
        lambda m, a, kw: angles.append(tuple(t.detach().double() for t in kw["position_embeddings"])), with_kwargs=True))
    ids, mask = left_padded_batch(lengths=(40, 31))
    # A cache without sliding layers keeps every token, so Mistral's window must come from the mask alone.
    cache = DynamicCache()
    with model.butler.record() as rec:
        _generate(model, ids, mask, **{cache_kwarg(model): cache})
    for h in hooks:
        h.remove()
    window_limit = getattr(model.config, "sliding_window", None)
    pads = (mask == 0).sum(-1)
    width = ids.shape[1]
    policy = model.butler.policy
    group = cfg.num_query_heads // cfg.num_key_value_heads
    checked = 0
    pairs = cfg.rope_pairs
    assert any(p >= 0 for p in pairs) and any(p < 0 for p in pairs)  # both kinds of pairs are exercised
    cos, sin = (torch.cat([a[i] for a in angles], dim=1) for i in range(2))  # [B, T, D]
    for i, (layer, sel, start, end, pol) in enumerate(rec):
        step = i // (cfg.num_hidden_layers - 1)
        assert layer == 1 + i % (cfg.num_hidden_layers - 1)
        length = width + step + 1
        producer, slot = cfg.producer_of(layer)
        q = _independent_queries(predictor, producer, hidden[cfg.producer_layers[producer]][step])[:, slot]
        q = _rotate_pairs_by_hand(q, cos[:, length - 1, None], sin[:, length - 1, None], pairs)
        keys = torch.cat(pre_keys[layer], dim=1)[:, :length].unflatten(-1, (cfg.num_key_value_heads, cfg.head_dim))
        sketch = torch.einsum("bthd,hde->bhte", keys, predictor.key_proj[layer - 1].double())
        sketch = _rotate_pairs_by_hand(sketch, cos[:, None, :length], sin[:, None, :length], pairs) / math.sqrt(cfg.sketch_dim)
        for b in range(ids.shape[0]):
            lo = int(pads[b]) if window_limit is None else max(int(pads[b]), length - window_limit)
            assert (int(start[b]), int(end[b])) == (lo, length)
            # the budget counts every position read: the predictor picks what sinks and window leave
            total = budget if isinstance(budget, int) else math.ceil(budget * (length - lo))
            n_budget = max(0, total - policy.sinks - policy.window)
            for h in range(cfg.num_key_value_heads):
                expected = _expected_selection(q[b, h * group:(h + 1) * group], sketch[b, h], lo, length,
                                               policy.sinks, policy.window, n_budget)
                got = {int(p) for p in sel[b, h] if p >= 0}
                assert got == expected, (layer, step, b, h)
                assert all(p >= lo for p in got)  # never padding, never outside a sliding window
                checked += 1
    assert checked >= STEPS * (cfg.num_hidden_layers - 1) * 2


def test_static_cache_matches_dynamic_cache():
    model = tiny_model("llama-gqa")
    attach_butler(model, tiny_predictor(model), budget=10)
    ids, mask = left_padded_batch()
    dynamic = _generate(model, ids, mask)
    static = _generate(model, ids, mask, cache_implementation="static")
    assert torch.equal(dynamic.sequences, static.sequences)
    assert _max_logit_diff(dynamic, static) < 1e-5


@pytest.mark.parametrize("name", ["llama-gqa", "mistral-gqa"])
def test_mistral_sliding_window_default_cache(name):
    """Generation through transformers' default (sliding for Mistral) cache, past the window."""
    model = tiny_model(name)
    ids, mask = left_padded_batch(lengths=(40, 31))
    dense = _generate(model, ids, mask, steps=8)
    attach_butler(model, tiny_predictor(model), budget=1.0)
    model.butler.dense_fallback = False
    full = _generate(model, ids, mask, steps=8)
    assert _max_logit_diff(dense, full) < 2e-5
    with model.butler.record() as rec:
        _generate(model, ids, mask, steps=8, butler_budget=9)
    assert all(sel is None or bool(((sel == -1) | (sel >= start[:, None, None])).all()) for _, sel, start, _, _ in rec)


def test_prediction_interval_reuses_selection_with_neighbors():
    model = tiny_model("llama-gqa")
    attach_butler(model, tiny_predictor(model), budget=10, prediction_interval=3)  # 2 sinks + 4 window + 4 predicted
    ids, mask = left_padded_batch(lengths=(48, 40))
    with model.butler.record() as rec:
        _generate(model, ids, mask, steps=7)
    by_layer = defaultdict(list)
    for layer, sel, start, end, pol in rec:
        by_layer[layer].append((sel, start, end))
    for layer, steps in by_layer.items():
        for t, (sel, start, end) in enumerate(steps):
            assert sel.shape[-1] == 8  # top-B plus up to B neighbors
            assert int((sel[..., :4] >= 0).sum(-1).min()) <= 4
            if t % 3:  # reuse step: the previous selection minus what entered the window
                prev = steps[t - 1][0]
                kept = (sel >= 0)
                assert torch.equal(sel[kept], prev[kept])
    # neighbor fetching added positions at prediction steps
    assert any(bool((steps[0][0][..., 4:] >= 0).any()) for steps in by_layer.values())


def test_interval_full_budget_equals_dense():
    model = tiny_model("llama-gqa")
    ids, mask = left_padded_batch()
    dense = _generate(model, ids, mask)
    attach_butler(model, tiny_predictor(model), budget=1.0, prediction_interval=4)
    model.butler.dense_fallback = False
    sparse = _generate(model, ids, mask)
    # a stale selection at full budget still holds every candidate older than the window
    assert _max_logit_diff(dense, sparse) < 2e-5


def test_per_call_budget_and_enabled_flag():
    model = tiny_model("llama-gqa")
    ids, mask = left_padded_batch()
    dense = _generate(model, ids, mask)
    attach_butler(model, tiny_predictor(model), budget=9)
    sparse = _generate(model, ids, mask)
    off = _generate(model, ids, mask, butler_enabled=False)
    full = _generate(model, ids, mask, butler_budget=1.0)
    assert _max_logit_diff(dense, off) == 0.0
    assert _max_logit_diff(dense, full) == 0.0
    assert _max_logit_diff(dense, sparse) > 1e-3
    assert model.butler.policy.budget == 9  # per-call values do not stick
    with model.butler.policy_override(budget=1.0):
        assert _max_logit_diff(dense, _generate(model, ids, mask)) == 0.0


def test_detach_restores_dense_model():
    model = tiny_model("llama-gqa")
    ids, mask = left_padded_batch()
    dense = _generate(model, ids, mask)
    attach_butler(model, tiny_predictor(model), budget=8)
    cache = DynamicCache()
    _generate(model, ids, mask, **{cache_kwarg(model): cache})
    detach_butler(model, cache=cache)
    assert model.config._attn_implementation == "sdpa"
    assert "generate" not in model.__dict__ and not hasattr(model, "butler")
    assert type(cache.layers[1]).__name__ == "DynamicLayer"
    assert _max_logit_diff(dense, _generate(model, ids, mask)) == 0.0


def test_eager_attention_models_are_supported():
    model = tiny_model("llama-gqa", attn_implementation="eager")
    ids, mask = left_padded_batch()
    dense = _generate(model, ids, mask)
    attach_butler(model, tiny_predictor(model), budget=1.0)
    model.butler.dense_fallback = False
    assert model.config._attn_implementation == "tokenbutler_eager"
    assert _max_logit_diff(dense, _generate(model, ids, mask)) < 2e-5


def test_beam_search_reorders_sketches():
    model = tiny_model("llama-gqa")
    attach_butler(model, tiny_predictor(model), budget=1.0)
    model.butler.dense_fallback = False
    ids, mask = left_padded_batch()
    kw = dict(max_new_tokens=5, num_beams=3, do_sample=False, pad_token_id=0)
    sparse = model.generate(input_ids=ids, attention_mask=mask, **kw)
    dense = model.generate(input_ids=ids, attention_mask=mask, butler_enabled=False, **kw)
    assert torch.equal(sparse, dense)
