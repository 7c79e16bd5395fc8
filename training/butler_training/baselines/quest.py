"""Quest (Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference",
ICML 2024, arXiv 2406.10774).

What is faithful:

* The KV cache is cut into pages of ``page_size`` (16) consecutive tokens from position 0. Each page
  keeps the per-channel minimum ``m`` and maximum ``M`` of its (post-RoPE) keys.
* At a decode step the query ``q`` of each **query head** scores every page with the upper bound of
  ``q . k`` over the page: ``sum_d max(q_d * m_d, q_d * M_d)``; pages are read in order of that bound.
* The page holding the current token (still being filled) is always read. Selection is per query head
  (``H = H_q``), as in the paper; a GQA runtime would have to gather per query head to use it.

Adaptations to the teacher-forced decode simulation and to budgets counted in tokens:

* The current page counts its actual tokens (``i % page_size + 1``) against the budget, then whole
  pages are taken by bound while they fit. With ``partial_page=True`` (default) the remainder of the
  budget (< one page) is spent on the first tokens of the next-ranked page, so every method reads
  the same number of tokens; Quest itself only reads whole pages, and ``partial_page=False`` floors
  to whole pages (reading up to ``page_size - 1`` fewer tokens than the budget). Within a page Quest
  has no finer score, so the first tokens by position are the ones taken: no oracle information.
* A budget smaller than the filled part of the current page reads the most recent ``budgets[i]``
  tokens of that page.
* Quest leaves the first two layers dense; here only layer 0 is (the harness's rule for every
  method). No sinks or window are forced, as in Quest.

The bound is computed with two matrix products instead of materialising ``q * m`` and ``q * M``:
``max(q m, q M) = q (M + m) / 2 + |q| (M - m) / 2`` since ``M >= m``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import ClassVar

import torch

from ..probe import AttentionProbe, DecodePlan, causal_allowed
from ._common import check_plan


@dataclasses.dataclass
class Quest:
    name: ClassVar[str] = "quest"
    respects_budget: ClassVar[bool] = True
    page_size: int = 16
    partial_page: bool = True

    def __post_init__(self) -> None:
        if self.page_size < 1:
            raise ValueError(f"page_size must be >= 1, got {self.page_size}")

    def page_bounds(self, probe: AttentionProbe) -> torch.Tensor:
        """``[B, H_q, L, n_pages]``: every row's upper bound of ``q . k`` on every page."""
        b, hkv, L, d = probe.k.shape
        ps, n_pages = self.page_size, math.ceil(L / self.page_size)
        k = probe.k.float()
        pad = n_pages * ps - L
        inf = k.new_full((b, hkv, pad, d), float("inf"))
        k_min = torch.cat([k, inf], dim=2).view(b, hkv, n_pages, ps, d).amin(dim=3)
        k_max = torch.cat([k, -inf], dim=2).view(b, hkv, n_pages, ps, d).amax(dim=3)
        center = ((k_max + k_min) / 2).repeat_interleave(probe.group_size, dim=1)
        radius = ((k_max - k_min) / 2).repeat_interleave(probe.group_size, dim=1)
        q = probe.q.float()
        return q @ center.transpose(-1, -2) + q.abs() @ radius.transpose(-1, -2)

    def allowed(self, probe: AttentionProbe, plan: DecodePlan) -> torch.Tensor:
        check_plan(probe, plan)
        L, P, ps = probe.length, plan.prefill_len, self.page_size
        device = probe.q.device
        bound = self.page_bounds(probe)
        n_pages = bound.shape[-1]
        i = torch.arange(L, device=device)
        budgets = plan.budgets.to(device)
        current = i // ps
        # Only the complete pages before the current one compete.
        valid = torch.arange(n_pages, device=device)[None, :] < current[:, None]  # [L, n_pages]
        bound = bound.masked_fill(~valid, float("-inf"))
        order = torch.sort(bound, dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order).scatter_(-1, order, torch.arange(n_pages, device=device).expand_as(order))

        rest = (budgets - (i - current * ps + 1)).clamp(min=0)
        n_full = rest // ps
        part = rest % ps if self.partial_page else torch.zeros_like(rest)
        full_pages = rank < n_full[:, None]
        part_page = (rank == n_full[:, None]) & (part > 0)[:, None] & valid

        j = torch.arange(L, device=device)
        tokens = full_pages.repeat_interleave(ps, dim=-1)[..., :L]
        tokens |= part_page.repeat_interleave(ps, dim=-1)[..., :L] & ((j % ps)[None, :] < part[:, None])
        page_lo = torch.maximum(current * ps, i - budgets + 1)
        tokens |= (j[None, :] >= page_lo[:, None]) & (j[None, :] <= i[:, None])
        tokens[..., :P, :] = causal_allowed(L, device)[:P]
        return tokens
