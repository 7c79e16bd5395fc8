"""Selection baselines and the decode-simulation contract (training/butler_training/probe.py).

Hand-made attention patterns where each method's choice is known exactly, plus plain-Python
re-implementations of the two stateful/paged methods (H2O, Quest) compared on random inputs.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from butler_training.baselines import METHODS, H2O, Quest, SnapKV, build, register
from butler_training.probe import (
    AttentionProbe,
    DecodePlan,
    SelectionMethod,
    attended_fraction,
    causal_allowed,
    check_allowed,
    fixed_positions,
    mass_recall,
    masked_attention,
    select_top,
    topk_overlap,
)


class LogitsProbe(AttentionProbe):
    """A probe whose attention logits are given directly (q/k only fix the shapes)."""

    def __init__(self, logits: torch.Tensor, num_kv_heads: int, layer_idx: int = 1):
        b, hq, L, _ = logits.shape
        super().__init__(layer_idx, torch.zeros(b, hq, L, 1), torch.zeros(b, num_kv_heads, L, 1), 1.0)
        self._given = logits.float().masked_fill(~causal_allowed(L), float("-inf"))

    def logits(self) -> torch.Tensor:
        return self._given


def weights_logits(rows: dict[int, dict[int, float]], L: int, eps: float = 1e-9) -> torch.Tensor:
    """Logits [1, 1, L, L] whose causal softmax gives each listed row the listed weights (other
    causal positions ~eps)."""
    w = torch.full((L, L), eps, dtype=torch.float64)
    for i, row in rows.items():
        for j, v in row.items():
            w[i, j] = v
    return w.log().float()[None, None]


def random_probe(b=2, hq=6, hkv=2, L=40, d=8, seed=0, layer_idx=1) -> AttentionProbe:
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, L, d, generator=g)
    k = torch.randn(b, hkv, L, d, generator=g)
    return AttentionProbe(layer_idx, q, k, 1 / math.sqrt(d))


def row_set(mask: torch.Tensor, i: int) -> set[int]:
    return set(mask[i].nonzero().flatten().tolist())


# ----------------------------------------------------------------------------------------------
# The contract: DecodePlan, AttentionProbe, helpers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "prefill, budgets, match",
    [
        (0, [1, 2, 3], "prefill_len"),
        (4, [1, 2, 3], "prefill_len"),
        (1, [1, 0, 3], r"budgets\[1\] = 0"),
        (1, [1, 2, 4], r"budgets\[2\] = 4 is outside \[1, 3\]"),
    ],
)
def test_plan_rejects_out_of_range(prefill, budgets, match):
    with pytest.raises(ValueError, match=match):
        DecodePlan(prefill, torch.tensor(budgets))


def test_plan_rejects_bad_types_and_options():
    with pytest.raises(ValueError, match="1-D integer"):
        DecodePlan(1, torch.tensor([1.0, 2.0]))
    with pytest.raises(ValueError, match="1-D integer"):
        DecodePlan(1, torch.ones(2, 2, dtype=torch.int64))
    with pytest.raises(ValueError, match="window"):
        DecodePlan(1, torch.tensor([1, 2]), window=0)
    with pytest.raises(ValueError, match="fraction"):
        DecodePlan.fraction(8, 2, 0.0)
    # rows inside the prefill are not constrained
    DecodePlan(3, torch.tensor([0, 0, 0, 4]))


def test_plan_constructors():
    p = DecodePlan.fixed(10, 4, 3)
    assert p.budgets.tolist() == [1, 2, 3, 3, 3, 3, 3, 3, 3, 3]
    f = DecodePlan.fraction(8, 2, 0.5)
    assert f.budgets.tolist() == [1, 1, 2, 2, 3, 3, 4, 4]  # ceil(0.5 * (i + 1))


def test_probe_shapes_and_attention():
    with pytest.raises(ValueError, match="group evenly"):
        AttentionProbe(0, torch.zeros(1, 5, 4, 2), torch.zeros(1, 2, 4, 2), 1.0)
    with pytest.raises(ValueError, match="disagree"):
        AttentionProbe(0, torch.zeros(1, 4, 4, 2), torch.zeros(1, 2, 5, 2), 1.0)
    probe = random_probe(b=1, hq=4, hkv=2, L=6, d=3)
    logits = probe.logits()
    assert logits.shape == (1, 4, 6, 6) and logits.dtype == torch.float32
    assert torch.isneginf(logits[..., 0, 1:]).all() and torch.isfinite(logits[..., 5, :]).all()
    # query head 3 belongs to KV head 1 (repeat_kv order)
    expected = probe.q[0, 3] @ probe.k[0, 1].T * probe.scaling
    assert torch.allclose(logits[0, 3].tril(), expected.tril(), atol=1e-6)
    assert torch.allclose(probe.probs().sum(-1), torch.ones(1, 4, 6))
    assert torch.allclose(probe.group_probs()[0, 1], probe.probs()[0, 2:4].mean(0))
    assert probe.logits() is logits  # cached


def test_fixed_positions_policy():
    L = 12
    plan = DecodePlan(4, torch.tensor([1, 2, 3, 4, 5, 6, 7, 1, 2, 3, 10, 12]), sinks=2, window=3)
    fixed = fixed_positions(plan)
    assert torch.equal(fixed[:4], causal_allowed(L)[:4])
    assert row_set(fixed, 6) == {0, 1, 4, 5, 6}  # sinks 0,1 + window 4,5,6 (5 <= budget 7)
    assert row_set(fixed, 7) == {7}  # budget 1: the current token only
    assert row_set(fixed, 8) == {0, 8}  # budget 2: current + first sink
    assert row_set(fixed, 9) == {0, 1, 9}  # budget 3: current + sinks, no room for the window
    assert row_set(fixed, 10) == {0, 1, 8, 9, 10}
    assert row_set(fixed, 11) == {0, 1, 9, 10, 11}


def test_select_top_fills_budget_by_score():
    L = 6
    plan = DecodePlan(2, torch.tensor([1, 2, 3, 3, 3, 4]), sinks=1, window=1)
    scores = torch.zeros(1, 1, L, L)
    scores[..., 3] = 5.0
    scores[..., 2] = 4.0
    scores[..., 4] = float("-inf")  # still a candidate, ranked after every finite score
    out = select_top(scores, fixed_positions(plan), plan)[0, 0]
    assert row_set(out, 2) == {0, 1, 2}
    assert row_set(out, 3) == {0, 2, 3}  # 3 is the current token; best other is 2
    assert row_set(out, 4) == {0, 3, 4}
    assert row_set(out, 5) == {0, 3, 2, 5}
    with pytest.raises(ValueError, match="NaN"):
        select_top(torch.full((1, 1, L, L), float("nan")), fixed_positions(plan), plan)


def test_masked_attention_matches_dense_and_per_head_reference():
    probe = random_probe(b=1, hq=4, hkv=2, L=10, d=4)
    v = torch.randn(1, 2, 10, 5)
    dense = masked_attention(probe.q, probe.k, v, causal_allowed(10), probe.scaling)
    ref = torch.nn.functional.scaled_dot_product_attention(
        probe.q, probe.k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), is_causal=True, scale=probe.scaling
    )
    assert torch.allclose(dense, ref, atol=1e-6)
    # a per-KV-head mask applies to both query heads of the group
    allowed = causal_allowed(10).repeat(1, 2, 1, 1)
    allowed[0, 1, 9, :5] = False
    out = masked_attention(probe.q, probe.k, v, allowed, probe.scaling)
    p = torch.softmax(probe.logits()[0, 3, 9].masked_fill(~allowed[0, 1, 9], float("-inf")), -1)
    assert torch.allclose(out[0, 3, 9], p @ v[0, 1], atol=1e-6)
    assert torch.allclose(out[0, 0], dense[0, 0], atol=1e-6)  # KV head 0 untouched
    with pytest.raises(ValueError, match="group"):
        masked_attention(probe.q, probe.k, v, torch.ones(1, 3, 10, 10, dtype=torch.bool), probe.scaling)


def test_metrics_dense_oracle_and_counts():
    probe = random_probe()
    L = probe.length
    full = DecodePlan(10, torch.arange(1, L + 1))
    dense = build("dense").allowed(probe, full)
    assert mass_recall(dense, probe, full) == pytest.approx(1.0, abs=1e-5)
    assert attended_fraction(dense, full) == pytest.approx(1.0)
    oracle = build("oracle").allowed(probe, full)
    assert torch.equal(oracle, dense)
    assert mass_recall(oracle, probe, full) == pytest.approx(1.0, abs=1e-5)
    assert topk_overlap(oracle, oracle, full) == pytest.approx(1.0)

    plan = DecodePlan.fixed(L, 10, 5)
    stream = build("streaming_llm").allowed(probe, plan)
    expected = torch.tensor([5 / (i + 1) for i in range(10, L)]).mean()
    assert attended_fraction(stream, plan) == pytest.approx(float(expected), rel=1e-6)
    # by hand: the group-mean mass on the kept positions
    gp = probe.group_probs()
    kept = (gp[..., 10:, :] * stream[..., 10:, :]).sum(-1).mean()
    assert mass_recall(stream, probe, plan) == pytest.approx(float(kept), rel=1e-6)
    # the oracle with free choice captures at least what any other selection does
    top = build("oracle_topk").allowed(probe, plan)
    for name in ("streaming_llm", "random", "h2o", "oracle"):
        assert mass_recall(top, probe, plan) >= mass_recall(build(name).allowed(probe, plan), probe, plan) - 1e-6
    # per-query-head masks are scored against each head's own attention
    quest = build("quest").allowed(probe, plan)
    own = (probe.probs()[..., 10:, :] * quest[..., 10:, :]).sum(-1).mean()
    assert mass_recall(quest, probe, plan) == pytest.approx(float(own), rel=1e-6)
    assert 0.0 < topk_overlap(quest, top, plan) <= 1.0


def test_check_allowed_catches_violations():
    L = 8
    plan = DecodePlan.fixed(L, 4, 3)
    good = fixed_positions(dataclasses.replace(plan, window=L)).expand(1, 1, L, L).clone()
    check_allowed(good, plan)
    future = good.clone()
    future[0, 0, 5, 6] = True
    with pytest.raises(ValueError, match="future"):
        check_allowed(future, plan)
    no_self = good.clone()
    no_self[0, 0, 6, 6] = False
    with pytest.raises(ValueError, match="own position"):
        check_allowed(no_self, plan)
    over = good.clone()
    over[0, 0, 7, 3] = True
    with pytest.raises(ValueError, match="row 7"):
        check_allowed(over, plan)
    check_allowed(over, plan, respects_budget=False)
    sparse_prefill = good.clone()
    sparse_prefill[0, 0, 3, 1] = False
    with pytest.raises(ValueError, match="dense causal"):
        check_allowed(sparse_prefill, plan)


# ----------------------------------------------------------------------------------------------
# Every registered method keeps the contract
# ----------------------------------------------------------------------------------------------


PLANS = {
    "fixed": lambda L: DecodePlan.fixed(L, L // 2, 7, sinks=2, window=3),
    "fraction": lambda L: DecodePlan.fraction(L, 12, 0.4),
    "tiny": lambda L: DecodePlan.fixed(L, 5, 1),
    "ragged": lambda L: DecodePlan(8, torch.tensor([1] * 8 + [(i * 7) % (i + 1) + 1 for i in range(8, L)])),
}


@pytest.mark.parametrize("plan_name", sorted(PLANS))
@pytest.mark.parametrize("name", sorted(METHODS))
def test_every_method_keeps_the_contract(name, plan_name):
    probe = random_probe(L=37)
    plan = PLANS[plan_name](probe.length)
    method = build(name)
    assert isinstance(method, SelectionMethod)
    allowed = method.allowed(probe, plan)
    assert allowed.shape[1] in (probe.num_kv_heads, probe.num_heads)
    check_allowed(allowed, plan, respects_budget=method.respects_budget)
    assert torch.equal(allowed, method.allowed(probe, plan))  # deterministic
    with pytest.raises(ValueError, match="plan covers"):
        method.allowed(probe, DecodePlan.fixed(probe.length + 1, 4, 3))


def test_registry():
    assert {"dense", "oracle", "oracle_topk", "h2o", "snapkv", "quest", "streaming_llm", "random"} <= set(METHODS)
    assert build("h2o", heavy_ratio=0.25).heavy_ratio == 0.25
    with pytest.raises(KeyError, match="unknown selection method"):
        build("nope")
    with pytest.raises(ValueError, match="already registered"):

        @dataclasses.dataclass
        class Impostor:
            name = "h2o"

            def allowed(self, probe, plan):
                return None

        register(Impostor)
    with pytest.raises(ValueError, match="granularity"):
        build("oracle", granularity="x").allowed(random_probe(), DecodePlan.fixed(40, 20, 5))


# ----------------------------------------------------------------------------------------------
# Oracle, StreamingLLM, random
# ----------------------------------------------------------------------------------------------


def test_oracle_keeps_sinks_window_and_true_top():
    L = 10
    rows = {i: {0: 1.0, 3: 10.0, 6: 5.0, i: 1.0} for i in range(L)}
    probe = LogitsProbe(weights_logits(rows, L), num_kv_heads=1)
    plan = DecodePlan(7, torch.tensor([1, 2, 3, 4, 5, 6, 7, 4, 4, 3]), sinks=1, window=2)
    out = build("oracle").allowed(probe, plan)[0, 0]
    assert row_set(out, 7) == {0, 6, 7, 3}  # sink 0, window 6-7, best other 3
    assert row_set(out, 8) == {0, 7, 8, 3}
    assert row_set(out, 9) == {0, 8, 9}  # budget 3: no room for a selected token
    top = build("oracle_topk").allowed(probe, plan)[0, 0]
    assert row_set(top, 7) == {0, 3, 6, 7}  # current + the 3 largest weights
    assert row_set(top, 9) == {3, 6, 9}  # no forced sink or window


def test_oracle_uses_group_mean():
    L = 6
    a = weights_logits({5: {1: 0.9, 2: 0.1}}, L)
    b = weights_logits({5: {1: 0.3, 2: 0.7}}, L)
    probe = LogitsProbe(torch.cat([a, b], dim=1), num_kv_heads=1)
    plan = DecodePlan(5, torch.tensor([1, 2, 3, 4, 5, 2]), sinks=0, window=1)
    # head 1 prefers 2, but the group mean (0.6 vs 0.4) prefers 1
    assert row_set(build("oracle").allowed(probe, plan)[0, 0], 5) == {1, 5}
    per_head = build("oracle", granularity="q").allowed(probe, plan)
    assert per_head.shape[1] == 2 and row_set(per_head[0, 1], 5) == {2, 5}


def test_streaming_llm_keeps_sinks_and_recent():
    probe = random_probe(b=1, L=30)
    plan = DecodePlan.fixed(30, 10, 9)  # sinks 4 + 5 most recent
    out = build("streaming_llm").allowed(probe, plan)
    assert out.shape == (1, 2, 30, 30)
    for i in range(10, 30):
        assert row_set(out[0, 1], i) == {0, 1, 2, 3} | set(range(i - 4, i + 1))


def test_random_is_seeded_and_respects_policy():
    probe = random_probe(L=40)
    plan = DecodePlan.fixed(40, 10, 12, sinks=2, window=3)
    a = build("random", seed=1).allowed(probe, plan)
    assert torch.equal(a, build("random", seed=1).allowed(probe, plan))
    assert not torch.equal(a, build("random", seed=2).allowed(probe, plan))
    other_layer = random_probe(L=40, layer_idx=2)
    assert not torch.equal(a, build("random", seed=1).allowed(other_layer, plan))
    fixed = fixed_positions(plan)
    assert (a | fixed == a).all()
    assert (a[..., 10:, :].sum(-1) == plan.budgets[10:]).all()


# ----------------------------------------------------------------------------------------------
# H2O
# ----------------------------------------------------------------------------------------------


def test_h2o_accumulated_scores_and_permanent_eviction():
    # Prefill (P=5) accumulates: tok0 2.8, tok1 1.2, tok2 0.4, tok3 0.4, tok4 0.2.
    rows = {
        0: {0: 1.0},
        1: {0: 0.5, 1: 0.5},
        2: {0: 0.5, 1: 0.3, 2: 0.2},
        3: {0: 0.4, 1: 0.2, 2: 0.1, 3: 0.3},
        4: {0: 0.4, 1: 0.2, 2: 0.1, 3: 0.1, 4: 0.2},
        # row 5 ignores tok0 and would love tok2 (evicted); row 6 too
        5: {1: 0.6, 2: 50.0, 3: 0.1, 4: 0.1, 5: 0.2},
        6: {2: 50.0, 6: 1.0},
    }
    L = 7
    probe = LogitsProbe(weights_logits(rows, L), num_kv_heads=1)
    plan = DecodePlan(5, torch.tensor([1, 2, 3, 4, 5, 5, 5]))  # cache 4 = 2 heavy + 2 recent
    out = build("h2o").allowed(probe, plan)[0, 0]
    # after prefill: recent {3, 4}; heavy = top-2 accumulated of {0, 1, 2} -> tok2 evicted
    assert row_set(out, 5) == {0, 1, 3, 4, 5}
    # row 5 adds 0.6 to tok1, ~0 to tok0; lowest accumulated non-recent is tok3 (0.5), not tok0,
    # which a score from the current row alone would evict
    assert row_set(out, 6) == {0, 1, 4, 5, 6}
    assert not out[5:, 2].any()  # evicted for good, however much later rows attend to it


def naive_h2o(logits: torch.Tensor, h_kv: int, plan: DecodePlan, heavy_ratio: float) -> torch.Tensor:
    """H2O in plain Python: one cache per KV head, scores summed over its query heads."""
    b_, hq, L, _ = logits.shape
    g = hq // h_kv
    P, budgets = plan.prefill_len, plan.budgets.tolist()
    out = causal_allowed(L).repeat(b_, h_kv, 1, 1)
    lg = logits.double()
    for b in range(b_):
        for h in range(h_kv):
            heads = range(h * g, (h + 1) * g)
            score = [0.0] * L
            for r in range(P):
                for hh in heads:
                    for j, p in enumerate(torch.softmax(lg[b, hh, r, : r + 1], -1).tolist()):
                        score[j] += p
            cache = list(range(P))

            def evict(cap):
                recent = cap - int(cap * heavy_ratio)
                protected = set(sorted(cache)[len(cache) - recent :]) if recent > 0 else set()
                while len(cache) > cap:
                    cache.remove(min((j for j in cache if j not in protected), key=lambda j: score[j]))

            evict(budgets[P] - 1)
            for i in range(P, L):
                cache.append(i)
                out[b, h, i] = False
                out[b, h, i, cache] = True
                for hh in heads:
                    for j, p in zip(cache, torch.softmax(lg[b, hh, i, cache], -1).tolist()):
                        score[j] += p
                if i + 1 < L:
                    evict(budgets[i + 1] - 1)
    return out


@pytest.mark.parametrize("heavy_ratio", [0.5, 0.25])
@pytest.mark.parametrize("plan_name", ["fixed", "fraction", "ragged"])
def test_h2o_matches_plain_python(plan_name, heavy_ratio):
    probe = random_probe(b=2, hq=4, hkv=2, L=28, seed=3)
    plan = PLANS[plan_name](probe.length)
    got = H2O(heavy_ratio=heavy_ratio).allowed(probe, plan)
    assert torch.equal(got, naive_h2o(probe.logits(), 2, plan, heavy_ratio))
    per_q = H2O(heavy_ratio=heavy_ratio, granularity="q").allowed(probe, plan)
    assert torch.equal(per_q, naive_h2o(probe.logits(), 4, plan, heavy_ratio))


def test_h2o_is_fast_enough():
    import time

    probe = random_probe(b=1, hq=9, hkv=3, L=1024, d=64)
    probe.logits()
    start = time.perf_counter()
    H2O().allowed(probe, DecodePlan.fraction(1024, 256, 0.5))
    assert time.perf_counter() - start < 5.0  # ~0.1 s here; 30 layers must take seconds, not minutes


# ----------------------------------------------------------------------------------------------
# SnapKV
# ----------------------------------------------------------------------------------------------


def snap_probe(L=48, P=40, voted=10) -> LogitsProbe:
    rows = {i: {voted: 20.0} for i in range(P - 8, P)}  # the observation window votes for `voted`
    rows.update({i: {j: 1.0 for j in range(i + 1)} for i in range(P - 8)})
    return LogitsProbe(weights_logits(rows, L, eps=1e-3), num_kv_heads=1)


def test_snapkv_keeps_pooled_neighbourhood_window_and_decoded_tokens():
    L, P = 48, 40
    probe = snap_probe(L, P, voted=10)
    plan = DecodePlan.fixed(L, P, 16)  # prompt capacity 15 = window 8 + top 7
    method = SnapKV(observation_window=8, kernel_size=7)
    out = method.allowed(probe, plan)[0, 0]
    kept = set(range(7, 14)) | set(range(32, 40))  # max-pooling spreads the vote to 10 +- 3
    for i in range(P, L):
        assert row_set(out, i) == kept | set(range(P, i + 1))
    # it reads its budget at the first decode row, then one more token per row
    assert int(out[P].sum()) == 16 and int(out[L - 1].sum()) == 16 + L - 1 - P
    assert not method.respects_budget
    truth = sum((15 + i - P + 1) / (i + 1) for i in range(P, L)) / (L - P)
    assert attended_fraction(out, plan) == pytest.approx(truth, rel=1e-6)


def test_snapkv_capacity_modes_and_small_prompts():
    L, P = 48, 40
    probe = snap_probe(L, P)
    plan = DecodePlan.fixed(L, P, 16)
    mean = SnapKV(observation_window=8, capacity="mean")
    assert mean.prompt_capacity(plan) == round(16 - 4.5)  # rows read 1..8 decoded tokens
    out = mean.allowed(probe, plan)
    assert out[..., P:, :].sum(-1).float().mean() == pytest.approx(16.0, abs=1.0)
    # capacity below the window: the most recent prompt tokens
    tiny = SnapKV(observation_window=8).allowed(probe, DecodePlan.fixed(L, P, 4))[0, 0]
    assert row_set(tiny, P) == {37, 38, 39, 40}
    # a prompt that fits is not compressed
    roomy = SnapKV(observation_window=8).allowed(probe, DecodePlan.fraction(L, P, 1.0))
    assert torch.equal(roomy, causal_allowed(L).expand_as(roomy))
    with pytest.raises(ValueError, match="pooling"):
        SnapKV(pooling="median")


def test_snapkv_sums_votes_over_the_group():
    L, P = 40, 32
    # head 0 splits its window rows' attention between token 5 and itself, head 1 puts it all on 20
    a = weights_logits({i: {5: 1.0, i: 1.0} for i in range(24, 32)}, L, eps=1e-6)
    b = weights_logits({i: {20: 1.0} for i in range(24, 32)}, L, eps=1e-6)
    probe = LogitsProbe(torch.cat([a, b], 1), num_kv_heads=1)
    plan = DecodePlan.fixed(L, P, 8 + 7 + 1)
    kv = SnapKV(observation_window=8).allowed(probe, plan)
    assert kv.shape[1] == 1 and row_set(kv[0, 0], P) >= set(range(17, 24))
    q = SnapKV(observation_window=8, granularity="q").allowed(probe, plan)
    assert row_set(q[0, 0], P) >= set(range(2, 9)) and row_set(q[0, 1], P) >= set(range(17, 24))


# ----------------------------------------------------------------------------------------------
# Quest
# ----------------------------------------------------------------------------------------------


def quest_probe() -> AttentionProbe:
    """Pages of 4 over 48 tokens, keys in 2 channels. Page 3 has the largest channel-0 maximum,
    page 5 the most negative channel-0 minimum; rows 40-43 query +channel 0, rows 44-47 -channel 0."""
    L, d = 48, 2
    k = torch.zeros(1, 1, L, d)
    k[0, 0, 13, 0] = 5.0  # page 3: max 5
    k[0, 0, 21, 0] = -10.0  # page 5: min -10 (and max 0)
    k[0, 0, 22, 0] = 1.0  # page 5: max 1
    q = torch.zeros(1, 2, L, d)
    q[0, :, :44, 0] = 1.0
    q[0, :, 44:, 0] = -1.0
    return AttentionProbe(1, q, k, 1.0)


def test_quest_page_bound_uses_min_and_max():
    probe = quest_probe()
    bounds = Quest(page_size=4).page_bounds(probe)
    assert bounds[0, 0, 40, 3] == 5.0 and bounds[0, 0, 40, 5] == 1.0
    assert bounds[0, 0, 44, 5] == 10.0 and bounds[0, 0, 44, 3] == 0.0  # -1 * min: the sign matters
    L = 48
    b = [i + 1 for i in range(40)] + [(i % 4) + 1 + 4 for i in range(40, L)]  # current page + one page
    plan = DecodePlan(40, torch.tensor(b))
    out = Quest(page_size=4).allowed(probe, plan)
    assert out.shape == (1, 2, L, L)  # per query head
    assert row_set(out[0, 0], 41) == {12, 13, 14, 15, 40, 41}
    assert row_set(out[0, 1], 46) == {20, 21, 22, 23, 44, 45, 46}


def test_quest_partial_page_and_truncated_current_page():
    probe = quest_probe()
    L = 48
    b = [i + 1 for i in range(40)] + [(i % 4) + 1 + 6 for i in range(40, L)]
    plan = DecodePlan(40, torch.tensor(b))
    out = Quest(page_size=4).allowed(probe, plan)[0, 0]
    # page 3 whole, then the first 2 tokens of the next page by bound (page 5, bound 1)
    assert row_set(out, 40) == {12, 13, 14, 15, 20, 21, 40}
    floor = Quest(page_size=4, partial_page=False).allowed(probe, plan)[0, 0]
    assert row_set(floor, 40) == {12, 13, 14, 15, 40}
    small = Quest(page_size=4).allowed(probe, DecodePlan.fixed(L, 40, 2))[0, 0]
    assert row_set(small, 43) == {42, 43}  # budget below the current page's fill


def naive_quest(probe: AttentionProbe, plan: DecodePlan, ps: int, partial: bool) -> torch.Tensor:
    b_, hq, L, _ = probe.q.shape
    g = probe.group_size
    out = causal_allowed(L).repeat(b_, hq, 1, 1)
    for b in range(b_):
        for h in range(hq):
            k = probe.k[b, h // g].tolist()
            for i in range(plan.prefill_len, L):
                q = probe.q[b, h, i].tolist()
                budget, cur = int(plan.budgets[i]), i // ps
                fill = i - cur * ps + 1
                out[b, h, i] = False
                if budget <= fill:
                    out[b, h, i, i - budget + 1 : i + 1] = True
                    continue
                out[b, h, i, cur * ps : i + 1] = True
                rest = budget - fill
                bounds = []
                for p in range(cur):
                    keys = k[p * ps : (p + 1) * ps]
                    bound = sum(max(qd * min(c), qd * max(c)) for qd, c in zip(q, zip(*keys)))
                    bounds.append((-bound, p))
                for _, p in sorted(bounds):
                    if rest >= ps:
                        out[b, h, i, p * ps : (p + 1) * ps] = True
                        rest -= ps
                    else:
                        if partial and rest:
                            out[b, h, i, p * ps : p * ps + rest] = True
                        break
    return out


@pytest.mark.parametrize("partial", [True, False])
@pytest.mark.parametrize("plan_name", ["fixed", "fraction", "ragged"])
def test_quest_matches_plain_python(plan_name, partial):
    probe = random_probe(b=1, hq=4, hkv=2, L=37, d=4, seed=5)
    plan = PLANS[plan_name](probe.length)
    got = Quest(page_size=4, partial_page=partial).allowed(probe, plan)
    assert torch.equal(got, naive_quest(probe, plan, 4, partial))
