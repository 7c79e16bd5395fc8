"""SnapKV (Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024,
arXiv 2404.14469).

What is faithful:

* Prefill eviction, decided **once** at the end of the prompt: the last ``observation_window`` (32)
  prompt rows vote, each vote the row's causal softmax attention over the prompt; votes are summed
  over the window rows; the votes for the prefix (the prompt before the window) are smoothed by a
  1-D pooling of ``kernel_size`` 7 (stride 1, same padding; max pooling as configured in the
  authors' experiments, ``pooling="avg"`` for their class default); the top ``capacity - window``
  prefix positions plus the whole observation window are kept.
* Decode: nothing is evicted any more: every decoded token is appended to the cache and kept.
  A prompt that fits in the capacity is not compressed.

Adaptations to the teacher-forced decode simulation:

* Budget accounting: the prompt capacity is ``budgets[P] - 1`` so that the first decode row reads
  exactly its budget (the token being decoded takes the last slot). Because decoded tokens are kept,
  row ``i`` then reads ``budgets[P] - 1 + (i - P + 1)`` positions: more than ``budgets[i]`` for any
  budget that grows slower than one token per row. So ``respects_budget`` is False and
  ``attended_fraction`` reports what SnapKV really reads. ``capacity="mean"`` instead sizes the prompt
  capacity so that the mean read over the decode rows equals the mean budget (equal average KV read,
  for a like-for-like comparison).
* A capacity smaller than the observation window keeps the most recent ``capacity`` prompt tokens
  (SnapKV assumes capacity > window). At a capacity of at most the window SnapKV keeps no prefix
  token at all, not even the attention sink at position 0: faithful, and ruinous for short prompts
  (SmolLM2, P=128, 25% budget: mass recall 0.37-0.52 against 0.91-0.97 for the oracle), so compare
  SnapKV with prompts long enough that the capacity exceeds the window.
* GQA: ``granularity="kv"`` (default) makes one selection per KV head from the votes summed over
  its query heads (as GQA-aware follow-ups such as Ada-KV do; the original code compressed
  ``repeat_kv``-expanded, per-query-head caches, ``granularity="q"``).
* Teacher forcing: the votes come from the probe's prefill rows, which are dense, as in SnapKV (it
  compresses after a dense prefill); the decoded tokens are the ground-truth continuation.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import torch
import torch.nn.functional as F

from ..probe import AttentionProbe, DecodePlan, causal_allowed
from ._common import check_plan, selection_heads


@dataclasses.dataclass
class SnapKV:
    name: ClassVar[str] = "snapkv"
    respects_budget: ClassVar[bool] = False
    observation_window: int = 32
    kernel_size: int = 7
    pooling: str = "max"
    capacity: str = "first_row"
    granularity: str = "kv"

    def __post_init__(self) -> None:
        if self.observation_window < 1 or self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError("need observation_window >= 1 and an odd kernel_size >= 1")
        if self.pooling not in ("max", "avg"):
            raise ValueError(f"pooling must be 'max' or 'avg', got {self.pooling!r}")
        if self.capacity not in ("first_row", "mean"):
            raise ValueError(f"capacity must be 'first_row' or 'mean', got {self.capacity!r}")

    def prompt_capacity(self, plan: DecodePlan) -> int:
        """Prompt tokens kept after the prefill eviction."""
        P, L = plan.prefill_len, plan.length
        if self.capacity == "first_row":
            return int(plan.budgets[P]) - 1
        decoded = torch.arange(1, L - P + 1, dtype=torch.float64)  # row i also reads tokens P..i
        cap = round(float((plan.budgets[P:].double() - decoded).mean()))
        return min(max(cap, 0), P)

    def allowed(self, probe: AttentionProbe, plan: DecodePlan) -> torch.Tensor:
        check_plan(probe, plan)
        h, g = selection_heads(probe, self.granularity)
        b, L, P = probe.batch, probe.length, plan.prefill_len
        device = probe.q.device
        cap = self.prompt_capacity(plan)
        keep = torch.zeros(b, h, P, dtype=torch.bool, device=device)
        if cap >= P:
            keep[:] = True
        else:
            w = min(self.observation_window, P)
            recent = min(w, cap)
            keep[..., P - recent :] = True
            top_n = cap - recent
            if top_n > 0:
                logits = probe.logits().view(b, h, g, L, L)[..., P - w : P, :P]
                votes = torch.softmax(logits, dim=-1)[..., : P - w].sum(dim=(2, 3))  # [b, h, P - w]
                pool = F.max_pool1d if self.pooling == "max" else F.avg_pool1d
                pooled = pool(votes.reshape(b * h, 1, P - w), self.kernel_size, stride=1,
                              padding=self.kernel_size // 2).view(b, h, P - w)
                keep[..., : P - w].scatter_(-1, pooled.topk(top_n, dim=-1).indices, True)
        out = causal_allowed(L, device).expand(b, h, L, L).clone()
        out[..., P:, :P] = keep[:, :, None, :]
        return out
