"""H2O, Heavy-Hitter Oracle (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative
Inference of Large Language Models", NeurIPS 2023, arXiv 2306.14048).

What is faithful (the authors' real-eviction cache, not the reference's per-row logit shortcut):

* The cache holds at most ``capacity`` tokens: ``heavy_ratio`` of them (H2O's default: half) are
  heavy hitters, the rest the most recent cached tokens.
* A token's score is its **accumulated attention**: the sum, over every step so far, of the
  attention probability it received, each step's softmax taken over the tokens cached at that step
  (plus the new token, which scores its own self-attention).
* Prefill: the prompt is processed densely, every prompt token scores the attention summed over all
  prompt rows, and the initial cache is the most recent tokens plus the top heavy hitters.
* Decode: step ``i`` attends its cache plus token ``i``, adds that attention to the scores, then
  evicts the lowest-scoring non-recent tokens down to the next step's capacity. Eviction is
  **permanent**: an evicted token is never read again.

Adaptations to the teacher-forced decode simulation:

* Budget accounting: row ``i`` reads ``budgets[i]`` positions including itself, so the cache kept
  between steps is ``budgets[i + 1] - 1`` tokens (H2O's cache size ``k`` reads ``k + 1`` at a step).
  Budgets that grow with the context (a fractional budget) simply let the cache grow; a shrinking
  budget evicts several tokens at once.
* "Recent" means the most recent tokens *still in the cache*, exactly as the authors' cache slices
  its last ``recent_size`` entries; with non-decreasing budgets this is the last positions.
* Teacher forcing: the decoded tokens are the ground-truth continuation, not the model's samples,
  and all rows come from one forward pass; the attention that drives the scores is this layer's
  (``probe.logits()``), restricted to the cache of each step exactly as the harness applies it.
  Every method here is simulated this way.
* GQA: ``granularity="kv"`` (default) keeps one cache per KV head, shared by its query heads, with
  the attention summed over the group (what GQA ports of H2O do, and the only form a per-KV-head
  runtime like ours can use); ``"q"`` keeps one cache per query head, as H2O did on MHA models,
  which a GQA runtime could not gather without duplicating K/V.

Cost: the decode rows are simulated one after another (the cache at step ``i`` depends on every
earlier eviction), vectorised over batch and heads: about ten small tensor operations per row.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import ClassVar

import torch

from ..probe import AttentionProbe, DecodePlan, causal_allowed
from ._common import check_plan, selection_heads


@dataclasses.dataclass
class H2O:
    name: ClassVar[str] = "h2o"
    respects_budget: ClassVar[bool] = True
    heavy_ratio: float = 0.5
    granularity: str = "kv"

    def __post_init__(self) -> None:
        if not 0.0 <= self.heavy_ratio <= 1.0:
            raise ValueError(f"heavy_ratio must be in [0, 1], got {self.heavy_ratio}")

    def allowed(self, probe: AttentionProbe, plan: DecodePlan) -> torch.Tensor:
        check_plan(probe, plan)
        h, g = selection_heads(probe, self.granularity)
        b, L, P = probe.batch, probe.length, plan.prefill_len
        budgets = plan.budgets.tolist()
        logits = probe.logits().view(b, h, g, L, L)
        out = causal_allowed(L, logits.device).expand(b, h, L, L).clone()

        score = torch.zeros(b, h, L, dtype=torch.float32, device=logits.device)
        score[..., :P] = torch.softmax(logits[..., :P, :P], dim=-1).sum(dim=(2, 3))
        cache = torch.zeros(b, h, L, dtype=torch.bool, device=logits.device)
        cache[..., :P] = True
        size = self._evict(cache, score, P, budgets[P] - 1)
        with _one_cpu_thread(logits.device):
            for i in range(P, L):
                cache[..., i] = True
                size += 1
                out[..., i, :] = cache
                row = logits[..., i, :].masked_fill(~cache[:, :, None, :], float("-inf"))
                score += torch.softmax(row, dim=-1).sum(dim=2)
                if i + 1 < L:
                    size = self._evict(cache, score, size, budgets[i + 1] - 1)
        return out

    def _evict(self, cache: torch.Tensor, score: torch.Tensor, size: int, capacity: int) -> int:
        """Evict in place down to ``capacity`` tokens per head; return the new size. Every head holds
        the same number of tokens, so ``size`` is one integer."""
        n = size - capacity
        if n <= 0:
            return size
        recent = capacity - int(capacity * self.heavy_ratio)
        cached_from_here = cache.flip(-1).cumsum(-1).flip(-1)  # cached tokens at or after each position
        protected = cached_from_here <= recent
        priority = score.masked_fill(~cache | protected, float("inf"))
        cache.scatter_(-1, priority.topk(n, dim=-1, largest=False).indices, False)
        return capacity


@contextlib.contextmanager
def _one_cpu_thread(device: torch.device):
    """Run the per-row loop on one intra-op thread on CPU: its tensors are a few thousand elements,
    too small to gain from threads, and every op's thread barrier stalls whenever another process
    holds a core (measured: 0.07 s vs 5 s per layer at L=1024 on a 2-core machine with one core busy)."""
    if device.type != "cpu":
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)
