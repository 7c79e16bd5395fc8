"""StreamingLLM (Xiao et al., "Efficient Streaming Language Models with Attention Sinks", ICLR 2024,
arXiv 2309.17453).

Faithful: the cache is the first ``sinks`` tokens (4 in the paper) plus a rolling window of the most
recent tokens, the window taking the rest of the budget: row ``i`` reads sinks + the last
``budgets[i] - sinks`` tokens (the current one included). The selection is the same for every head.

Adaptation: StreamingLLM assigns positions inside its cache (re-indexing RoPE positions so the window
looks contiguous to the sinks); here keys keep their original post-RoPE positions, as they would in
a full-cache runtime that merely reads a subset, and as every other method here sees them. At the
short contexts of these evaluations (inside the model's trained length) that difference matters
little; it is the one departure.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ..probe import AttentionProbe, DecodePlan, fixed_positions
from ._common import check_plan


@dataclasses.dataclass
class StreamingLLM:
    name: ClassVar[str] = "streaming_llm"
    respects_budget: ClassVar[bool] = True

    def allowed(self, probe: AttentionProbe, plan: DecodePlan) -> torch.Tensor:
        check_plan(probe, plan)
        mask = fixed_positions(dataclasses.replace(plan, window=plan.length), probe.q.device)
        return mask.expand(probe.batch, probe.num_kv_heads, plan.length, plan.length)
