"""Helpers shared by the baselines: which heads a selection is made for."""

from __future__ import annotations

from ..probe import AttentionProbe, DecodePlan

GRANULARITIES = ("kv", "q")


def selection_heads(probe: AttentionProbe, granularity: str) -> tuple[int, int]:
    """``(H, G)``: one selection per KV head over its ``G`` query heads (``"kv"``, what a GQA
    runtime can gather once per KV head), or one per query head (``"q"``, ``G = 1``)."""
    if granularity == "kv":
        return probe.num_kv_heads, probe.group_size
    if granularity == "q":
        return probe.num_heads, 1
    raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")


def check_plan(probe: AttentionProbe, plan: DecodePlan) -> None:
    if plan.length != probe.length:
        raise ValueError(f"plan covers {plan.length} rows but the probe has L={probe.length}")
