"""One budgeted decode step on a transformers cache layer: valid range, selection, attention.

The selection and the attention go through :mod:`butler_kernels` (its ``butler::`` custom ops):
the Triton kernels on CUDA, the plain-torch reference elsewhere. Both implement
:mod:`butler_kernels.reference`, and both are traceable by ``torch.compile(fullgraph=True)``.
"""

from __future__ import annotations

import torch

from butler_kernels import reference as ref
from butler_kernels import sparse_decode
from butler_zoo.errors import ButlerError
from butler_zoo.policy import SparsePolicy

__all__ = ["valid_range", "decode_step", "read_counts", "fits_dense"]


def valid_range(
    attention_mask: torch.Tensor | None, length: int, batch: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(start, end)`` per row: the positions the decoded token may attend to, from the model's own
    mask (left padding, unwritten static-cache slots and sliding windows all show up there).

    transformers passes no mask (``None``) only when every cached position may be attended."""
    if attention_mask is None:
        return torch.zeros(batch, dtype=torch.long, device=device), torch.full((batch,), length, dtype=torch.long, device=device)
    m = attention_mask[:, 0, -1, :]
    ok = m if m.dtype == torch.bool else m == 0
    if ok.shape[-1] != length:
        raise ButlerError(f"attention mask covers {ok.shape[-1]} positions but the cache holds {length}")
    ar = torch.arange(length, device=ok.device)
    start = torch.where(ok, ar, length).amin(dim=-1)
    end = torch.where(ok, ar + 1, 0).amax(dim=-1)
    return start, end


def _check_contiguous(attention_mask: torch.Tensor, start: torch.Tensor, end: torch.Tensor) -> None:
    m = attention_mask[:, 0, -1, :]
    ok = m if m.dtype == torch.bool else m == 0
    if not torch.equal(ok.sum(-1), end - start):
        raise ButlerError(
            "the attention mask of a decode step has holes (masked positions between attended ones); sparse decode "
            "supports left padding, causal and sliding-window masks. Pass a 2D padding mask with left padding."
        )


def fits_dense(length: int, policy: SparsePolicy) -> bool:
    """A cache this short is attended densely: the budget (or sinks + window) covers it anyway."""
    return length <= policy.sinks + policy.window + policy.max_budget(length)


def _select(q_sel, sketch, start, end, policy: SparsePolicy, budget: int, per_row):
    return torch.ops.butler.score_select(q_sel, sketch, start, end, None, per_row, policy.sinks, policy.window, budget, torch.int32)


def decode_step(
    q: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    q_sel: torch.Tensor,
    sketch: torch.Tensor,
    attention_mask: torch.Tensor | None,
    policy: SparsePolicy,
    scaling: float,
    cache_layer=None,
    check_mask: bool = False,
):
    """Budgeted attention of ``q [B, H_q, D]`` over the dense-layout cache ``key/value [B, H_kv, T, D]``.

    Returns ``(out [B, H_q, D], sel [B, H_kv, n], start, end)`` where ``sel`` holds the predicted
    positions read besides sinks and window (``-1`` = unused slot)."""
    length = key.shape[2]
    start, end = valid_range(attention_mask, length, q.shape[0], q.device)
    if check_mask and attention_mask is not None:
        _check_contiguous(attention_mask, start, end)
    budget = policy.max_budget(length)
    per_row = ref.budget_for_rows(policy.budget, start, end, budget, fixed=policy.sinks + policy.window)
    selection = None
    if policy.prediction_interval > 1 and cache_layer is not None:
        selection = _interval_selection(cache_layer, q_sel, sketch, start, end, policy, budget, per_row, length)
    out, sel = sparse_decode(
        q, key, value, q_sel, sketch, start, end, sinks=policy.sinks, window=policy.window, budget=budget,
        scale=scaling, budget_per_row=per_row, selection=selection,
    )
    return out, sel, start, end


def _interval_selection(cache_layer, q_sel, sketch, start, end, policy, budget, per_row, length):
    """Prediction interval ``i``: predict (with neighbor fetching) every ``i``-th step, else reuse.

    The stored selection holds absolute positions, so it survives sliding layers that drop old
    tokens; reused positions that entered the window (or left the sliding range) are dropped."""
    offset = cache_layer.position_offset(length)
    state = cache_layer._butler_selection
    if state is None or state["age"] % policy.prediction_interval == 0 or state["budget"] != budget:
        sel = _select(q_sel, sketch, start, end, policy, budget, per_row)
        sel = ref.expand_neighbors(sel, start, end, policy.sinks, policy.window, length)
        state = {"positions": torch.where(sel >= 0, sel + offset, -1), "age": 0, "budget": budget}
    else:
        sink_hi, win_lo = ref.policy_ranges(start, end, policy.sinks, policy.window)
        rel = state["positions"] - offset
        keep = (state["positions"] >= 0) & (rel >= sink_hi[:, None, None]) & (rel < win_lo[:, None, None])
        sel = torch.where(keep, rel, -1)
    state["age"] += 1
    cache_layer._butler_selection = state
    return sel


def read_counts(sel: torch.Tensor, start: torch.Tensor, end: torch.Tensor, policy: SparsePolicy):
    """``(positions read, positions a dense step would read)``, summed over rows and KV heads."""
    sink_hi, win_lo = ref.policy_ranges(start, end, policy.sinks, policy.window)
    heads = sel.shape[1]
    fixed = ((sink_hi - start) + (end - win_lo)) * heads
    read = fixed.sum() + (sel >= 0).sum()
    return read, ((end - start) * heads).sum()
