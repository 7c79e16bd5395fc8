"""Dense attention: the reference every method is measured against (no selection at all)."""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ..probe import AttentionProbe, DecodePlan, causal_allowed
from ._common import check_plan


@dataclasses.dataclass
class Dense:
    """Every row attends its whole causal context, whatever the budget (so ``respects_budget`` is
    False: it is the upper reference, not a contender)."""

    name: ClassVar[str] = "dense"
    respects_budget: ClassVar[bool] = False

    def allowed(self, probe: AttentionProbe, plan: DecodePlan) -> torch.Tensor:
        check_plan(probe, plan)
        L = probe.length
        return causal_allowed(L, probe.q.device).expand(probe.batch, probe.num_kv_heads, L, L)
