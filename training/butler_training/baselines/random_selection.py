"""Random selection: TokenButler's policy shape (sinks + window) with uniformly random other tokens.

A control, not a published method (the TokenButler reference has a ``random`` ablation): the gap
between it and the oracle shows how much the choice of tokens matters at a given budget. One
independent draw per (batch row, KV head, decode row, layer), seeded by ``seed`` and the layer
index, so runs are reproducible and layers do not share picks.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ..probe import AttentionProbe, DecodePlan, fixed_positions, select_top
from ._common import check_plan


@dataclasses.dataclass
class RandomSelection:
    name: ClassVar[str] = "random"
    respects_budget: ClassVar[bool] = True
    seed: int = 0

    def allowed(self, probe: AttentionProbe, plan: DecodePlan) -> torch.Tensor:
        check_plan(probe, plan)
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + probe.layer_idx)
        L = probe.length
        scores = torch.rand(probe.batch, probe.num_kv_heads, L, L, generator=g).to(probe.q.device)
        return select_top(scores, fixed_positions(plan, probe.q.device), plan)
