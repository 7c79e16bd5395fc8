"""``torch.library`` custom ops: ``butler::score_select`` and ``butler::budgeted_attention``.

Each op has a fake implementation (shapes only), so ``torch.compile(fullgraph=True)`` traces
through it without a graph break, and its output shapes are static for a fixed budget, so CUDA
graphs capture it. CUDA tensors run the Triton kernels; every other device runs the plain-torch
reference, so the ops work everywhere. Both are inference ops (no autograd formula).
"""

from __future__ import annotations

from typing import Optional

import torch

from butler_kernels import reference
from butler_kernels._checks import check_attention, check_score_select_layers
from butler_kernels.budgeted_attention import budgeted_attention_triton
from butler_kernels.score_select import score_select_reference, score_select_triton
from butler_kernels.sketch_write import sketch_write_triton

__all__ = ["score_select", "budgeted_attention", "write_sketch"]


@torch.library.custom_op("butler::score_select", mutates_args=())
def score_select(
    q_sel: torch.Tensor,
    sketch: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    token_table: Optional[torch.Tensor],
    budget_per_row: Optional[torch.Tensor],
    sinks: int,
    window: int,
    k: int,
    index_dtype: torch.dtype,
) -> torch.Tensor:
    """Top-``k`` candidate positions per (row, KV head), ``[B, H_kv, k]``, ``-1`` padded (order
    unspecified); ``[L, B, H_kv, k]`` for several layers at once. Arguments as in
    ``score_select.score_select_triton``."""
    return score_select_reference(
        q_sel, sketch, start, end, sinks=sinks, window=window, k=k,
        token_table=token_table, budget_per_row=budget_per_row, index_dtype=index_dtype,
    )


@score_select.register_kernel("cuda")
def _score_select_cuda(q_sel, sketch, start, end, token_table, budget_per_row, sinks, window, k, index_dtype):
    return score_select_triton(
        q_sel, sketch, start, end, sinks=sinks, window=window, k=k,
        token_table=token_table, budget_per_row=budget_per_row, index_dtype=index_dtype,
    )


@score_select.register_fake
def _score_select_fake(q_sel, sketch, start, end, token_table, budget_per_row, sinks, window, k, index_dtype):
    n_layers, b, h_kv, _, _ = check_score_select_layers(
        q_sel, sketch, start, end, token_table, budget_per_row, sinks, window, k, index_dtype
    )
    shape = (b, h_kv, k) if n_layers is None else (n_layers, b, h_kv, k)
    return q_sel.new_empty(shape, dtype=index_dtype)


@torch.library.custom_op("butler::budgeted_attention", mutates_args=())
def budgeted_attention(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    sel: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    token_table: Optional[torch.Tensor],
    sinks: int,
    window: int,
    scale: float,
) -> torch.Tensor:
    """Decode attention of ``q [B, H_q, D]`` over sinks + window + ``sel``; ``[B, H_q, D]`` in
    ``q``'s dtype. Arguments as in ``budgeted_attention.budgeted_attention_triton``."""
    check_attention(q, k_buf, v_buf, sel, start, end, token_table, sinks, window)
    return reference.budgeted_attention(q, k_buf, v_buf, sel, start, end, sinks, window, scale, token_table).contiguous()


@budgeted_attention.register_kernel("cuda")
def _budgeted_attention_cuda(q, k_buf, v_buf, sel, start, end, token_table, sinks, window, scale):
    return budgeted_attention_triton(q, k_buf, v_buf, sel, start, end, sinks=sinks, window=window, scale=scale, token_table=token_table)


@budgeted_attention.register_fake
def _budgeted_attention_fake(q, k_buf, v_buf, sel, start, end, token_table, sinks, window, scale):
    check_attention(q, k_buf, v_buf, sel, start, end, token_table, sinks, window)
    return q.new_empty(q.shape)


@torch.library.custom_op("butler::write_sketch", mutates_args=("pool",))
def write_sketch(pool: torch.Tensor, loc: torch.Tensor, keys: torch.Tensor, weight: torch.Tensor) -> None:
    """Sketch of ``keys [n, H_kv, D]`` by ``weight [H_kv, D, d']`` into ``pool [slots, H_kv, d']`` at
    slots ``loc [n]``, in place (``reference.write_sketch``)."""
    reference.write_sketch(pool, loc, keys, weight)


@write_sketch.register_kernel("cuda")
def _write_sketch_cuda(pool, loc, keys, weight):
    sketch_write_triton(pool, loc, keys, weight)


@write_sketch.register_fake
def _write_sketch_fake(pool, loc, keys, weight):
    return None
