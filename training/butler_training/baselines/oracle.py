"""Oracle selection: the true attention of the row being decoded picks the tokens.

Not a deployable method (it needs the full attention it is meant to avoid); it bounds what any
predictor of attention can reach under a given policy:

* ``oracle``: TokenButler's policy shape (sinks + window + top remaining tokens, ``fixed_positions``
  + ``select_top``) with the *true* group-mean attention of the current row as the score, one
  selection per KV head (or per query head with ``granularity="q"``). The gap between TokenButler
  and this oracle is prediction quality alone. TokenButler paper (arXiv 2503.07518) §4 calls it
  "Oracle"; the reference simulated it per query head with 4 forced sinks.
* ``oracle_topk``: no forced sinks or window, the top ``budget - 1`` tokens by true attention plus
  the current token (which the decode contract always reads). At a fixed budget it maximises the
  captured mass of the row, so ``mass_recall(oracle_topk)`` is the ceiling for every method.

Adaptation to the teacher-forced simulation: none is needed: selection is per row and uses nothing
from earlier rows.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch

from ..probe import AttentionProbe, DecodePlan, fixed_positions, select_top
from ._common import check_plan, selection_heads


def _true_scores(probe: AttentionProbe, granularity: str) -> torch.Tensor:
    selection_heads(probe, granularity)  # validates
    return probe.group_probs() if granularity == "kv" else probe.probs()


@dataclasses.dataclass
class Oracle:
    name: ClassVar[str] = "oracle"
    respects_budget: ClassVar[bool] = True
    granularity: str = "kv"

    def allowed(self, probe: AttentionProbe, plan: DecodePlan) -> torch.Tensor:
        check_plan(probe, plan)
        return select_top(_true_scores(probe, self.granularity), fixed_positions(plan, probe.q.device), plan)


@dataclasses.dataclass
class OracleTopK:
    name: ClassVar[str] = "oracle_topk"
    respects_budget: ClassVar[bool] = True
    granularity: str = "kv"

    def allowed(self, probe: AttentionProbe, plan: DecodePlan) -> torch.Tensor:
        check_plan(probe, plan)
        only_current = fixed_positions(dataclasses.replace(plan, sinks=0, window=1), probe.q.device)
        return select_top(_true_scores(probe, self.granularity), only_current, plan)
