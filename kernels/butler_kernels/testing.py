"""Checks of a selection against the reference, for tests and benchmarks (kernels and integrations).

``selection_work`` (re-exported from ``score_select``) runs the Triton selection and returns its
deterministic work counters, e.g. how many candidates reached the serial boundary stage.

A fast selection may order its positions freely and may break ties (or last-bit rounding
differences of the scores) differently from ``torch.topk``, so it is compared as a set of scores,
not of positions: the reference scores of the selected positions, sorted, must equal the top
reference scores of the candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from butler_kernels import reference
from butler_kernels.score_select import SelectionWork, selection_work

__all__ = ["SelectionCheck", "SelectionWork", "check_selection", "graph_time_ms", "selection_work"]


@dataclass
class SelectionCheck:
    """Outcome of :func:`check_selection`; ``ok`` when every listed failure count is zero and the
    selected scores match the top scores within ``tolerance``."""

    rows: int  # (row, KV head) pairs checked
    bad_count: int  # pairs whose number of selected positions differs from min(budget, candidates)
    bad_layout: int  # pairs with a -1 before a position, a duplicate, or a position out of range
    not_candidate: int  # selected positions outside the candidates [sink_hi, win_lo)
    max_score_error: float  # max |sorted selected scores - sorted top scores|
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.bad_count == 0 and self.bad_layout == 0 and self.not_candidate == 0 and self.max_score_error <= self.tolerance

    def __str__(self) -> str:
        if self.ok:
            return f"ok ({self.rows} rows, score err {self.max_score_error:.2e})"
        return (
            f"FAILED: {self.bad_count} wrong counts, {self.bad_layout} bad layouts, {self.not_candidate} non-candidates, "
            f"score err {self.max_score_error:.2e} > {self.tolerance:.1e} over {self.rows} rows"
        )


@torch.no_grad()
def check_selection(
    sel: torch.Tensor,
    q_sel: torch.Tensor,
    sketch: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    *,
    sinks: int,
    window: int,
    k: int,
    token_table: torch.Tensor | None = None,
    budget_per_row: torch.Tensor | None = None,
    tolerance: float | None = None,
) -> SelectionCheck:
    """Compare ``sel [B, H_kv, k]`` (positions first, then ``-1``) with the reference top-k.

    ``tolerance`` (absolute, on fp32 scores) defaults to a few ulps of the largest score magnitude,
    enough for a different summation order of ``<q~, sketch>``; relative to that magnitude, so that
    the check keeps its meaning for scores of any scale (0 when every score is 0)."""
    dense = reference.gather_positions(sketch, token_table)
    b, h_kv, t, _ = dense.shape
    scores = reference.score_tokens(q_sel, dense, h_kv)  # [B, H_kv, T] fp32
    sink_hi, win_lo = reference.policy_ranges(start, end, sinks, window)
    pos = torch.arange(t, device=scores.device)
    cand = (pos >= sink_hi[:, None]) & (pos < win_lo[:, None])  # [B, T]
    k_row = torch.full((b,), k, device=scores.device, dtype=torch.int64)
    if budget_per_row is not None:
        k_row = budget_per_row.to(torch.int64).clamp(0, k)
    want = torch.minimum(k_row, cand.sum(-1))[:, None].expand(b, h_kv)  # [B, H_kv]

    sel = sel.to(torch.int64)
    valid = sel >= 0
    slot = torch.arange(k, device=sel.device)
    bad_count = int(((valid.sum(-1) != want)).sum())
    prefix = valid == (slot < valid.sum(-1, keepdim=True))
    in_range = ~valid | (sel < t)
    srt = torch.sort(torch.where(valid, sel, -1 - slot), dim=-1).values  # -1 - slot keeps -1s distinct
    dup = (srt[..., 1:] == srt[..., :-1]) & (srt[..., 1:] >= 0)
    bad_layout = int((~prefix.all(-1) | ~in_range.all(-1) | dup.any(-1)).sum())
    safe = torch.where(valid & in_range, sel, 0)
    is_cand = cand[:, None, :].expand(b, h_kv, t).gather(-1, safe)
    not_candidate = int((valid & in_range & ~is_cand).sum())

    kk = min(k, t)
    neg = torch.finfo(torch.float32).min
    top = torch.topk(scores.masked_fill(~cand[:, None, :], neg), kk, dim=-1).values
    got = torch.sort(scores.gather(-1, safe).masked_fill(~valid, neg), dim=-1, descending=True).values[..., :kk]
    used = slot[:kk] < want[..., None]
    err = torch.where(used, (got - top).abs(), torch.zeros_like(got))
    max_err = float(err.max()) if err.numel() else 0.0
    if tolerance is None:
        magnitude = float(scores.abs().max()) if scores.numel() else 0.0
        tolerance = 1e-5 * magnitude
    return SelectionCheck(b * h_kv, bad_count, bad_layout, not_candidate, max_err, tolerance)


def graph_time_ms(fn, calls: int = 20) -> float:
    """Median ms of one call of ``fn`` replayed from a CUDA graph of ``calls`` calls (no launch
    overhead: what a server's captured decode step sees), timed with ``triton.testing.do_bench``.
    ``fn`` runs once on a side stream first (compilation, allocator warm-up)."""
    import triton.testing

    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    return triton.testing.do_bench(graph.replay, warmup=10, rep=200, return_mode="median") / calls
