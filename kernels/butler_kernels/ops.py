"""``torch.library`` custom ops: ``butler::score_select``, ``butler::budgeted_attention`` (and
``butler::budgeted_attention_step``, which also writes the new tokens' sketch), ``butler::write_sketch``
(and ``butler::write_sketch_rope``, the sketch of a format-2 predictor) and ``butler::residual_layer_norm``.

Each op has a fake implementation (shapes only), so ``torch.compile(fullgraph=True)`` traces
through it without a graph break, and its output shapes are static for a fixed budget, so CUDA
graphs capture it. CUDA tensors run the Triton kernels; every other device runs the plain-torch
reference, so the ops work everywhere. Both are inference ops (no autograd formula).
"""

from __future__ import annotations

from typing import Optional

import torch

from butler_kernels import reference
from butler_kernels._checks import check_score_select_layers
from butler_kernels.budgeted_attention import NewSketch, budgeted_attention_triton, check_attention_call
from butler_kernels.score_select import score_select_reference, score_select_triton
from butler_kernels.producer_norm import check_residual_layer_norm, residual_layer_norm_triton
from butler_kernels.sketch_write import check_sketch_write, sketch_write_triton

__all__ = ["score_select", "budgeted_attention", "budgeted_attention_step", "write_sketch", "write_sketch_rope",
           "residual_layer_norm"]


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


# split_counters is an input, not a mutated argument: the kernel leaves it as it found it (zeroed),
# so no caller can observe a change; Inductor cannot lower mutable ops with optional arguments.
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
    split_counters: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """Decode attention of ``q [B, H_q, D]`` over sinks + window + ``sel``; ``[B, H_q, D]`` in
    ``q``'s dtype. Arguments as in ``budgeted_attention.budgeted_attention_triton`` (the reference
    has no splits and never reads ``split_counters``)."""
    check_attention_call(q, k_buf, v_buf, sel, start, end, token_table, sinks, window, split_counters)
    return reference.budgeted_attention(q, k_buf, v_buf, sel, start, end, sinks, window, scale, token_table).contiguous()


@budgeted_attention.register_kernel("cuda")
def _budgeted_attention_cuda(q, k_buf, v_buf, sel, start, end, token_table, sinks, window, scale, split_counters=None):
    return budgeted_attention_triton(q, k_buf, v_buf, sel, start, end, sinks=sinks, window=window, scale=scale,
                                     token_table=token_table, split_counters=split_counters)


@budgeted_attention.register_fake
def _budgeted_attention_fake(q, k_buf, v_buf, sel, start, end, token_table, sinks, window, scale, split_counters=None):
    check_attention_call(q, k_buf, v_buf, sel, start, end, token_table, sinks, window, split_counters)
    return q.new_empty(q.shape)


# The decode step of a paged cache: the attention and the new tokens' sketch write in one launch.
# Every tensor is required: torch 2.11's dispatcher drops trailing arguments equal to their
# defaults and then fails to bump the version of a mutated one.
@torch.library.custom_op("butler::budgeted_attention_step", mutates_args=("sketch_pool",))
def budgeted_attention_step(
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
    split_counters: Optional[torch.Tensor],
    sketch_pool: torch.Tensor,
    sketch_loc: torch.Tensor,
    new_keys: torch.Tensor,
    sketch_weight: torch.Tensor,
) -> torch.Tensor:
    """``budgeted_attention`` that also writes the sketch of the rows' new keys: ``new_sketch =
    NewSketch(sketch_pool, sketch_loc, new_keys, sketch_weight)`` of ``budgeted_attention_triton``
    (``reference.write_sketch`` here)."""
    new_sketch = NewSketch(sketch_pool, sketch_loc, new_keys, sketch_weight)
    check_attention_call(q, k_buf, v_buf, sel, start, end, token_table, sinks, window, split_counters, new_sketch)
    reference.write_sketch(*new_sketch)
    return reference.budgeted_attention(q, k_buf, v_buf, sel, start, end, sinks, window, scale, token_table).contiguous()


@budgeted_attention_step.register_kernel("cuda")
def _budgeted_attention_step_cuda(q, k_buf, v_buf, sel, start, end, token_table, sinks, window, scale, split_counters,
                                  sketch_pool, sketch_loc, new_keys, sketch_weight):
    return budgeted_attention_triton(q, k_buf, v_buf, sel, start, end, sinks=sinks, window=window, scale=scale,
                                     token_table=token_table, split_counters=split_counters,
                                     new_sketch=NewSketch(sketch_pool, sketch_loc, new_keys, sketch_weight))


@budgeted_attention_step.register_fake
def _budgeted_attention_step_fake(q, k_buf, v_buf, sel, start, end, token_table, sinks, window, scale, split_counters,
                                  sketch_pool, sketch_loc, new_keys, sketch_weight):
    check_attention_call(q, k_buf, v_buf, sel, start, end, token_table, sinks, window, split_counters,
                          NewSketch(sketch_pool, sketch_loc, new_keys, sketch_weight))
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


# A separate op rather than optional arguments of butler::write_sketch: torch 2.11's dispatcher drops
# trailing arguments equal to their defaults and then fails to bump the version of a mutated one.
@torch.library.custom_op("butler::write_sketch_rope", mutates_args=("pool",))
def write_sketch_rope(
    pool: torch.Tensor, loc: torch.Tensor, keys: torch.Tensor, weight: torch.Tensor,
    cos: torch.Tensor, sin: torch.Tensor, pairs: torch.Tensor,
) -> None:
    """``write_sketch`` of a format-2 (position-consistent) predictor: ``cos``/``sin`` ``[n, D/2]`` the
    base's rotary angles at the keys' positions, ``pairs [d'/2]`` its ``rope_pairs``
    (``reference.write_sketch(..., rope=(cos, sin, pairs))``)."""
    check_sketch_write(pool, loc, keys, weight, (cos, sin, pairs))
    reference.write_sketch(pool, loc, keys, weight, rope=(cos, sin, pairs))


@write_sketch_rope.register_kernel("cuda")
def _write_sketch_rope_cuda(pool, loc, keys, weight, cos, sin, pairs):
    sketch_write_triton(pool, loc, keys, weight, rope=(cos, sin, pairs))


@write_sketch_rope.register_fake
def _write_sketch_rope_fake(pool, loc, keys, weight, cos, sin, pairs):
    check_sketch_write(pool, loc, keys, weight, (cos, sin, pairs))
    return None


@torch.library.custom_op("butler::residual_layer_norm", mutates_args=())
def residual_layer_norm(
    hidden: torch.Tensor, residual: Optional[torch.Tensor], weight: torch.Tensor, bias: Optional[torch.Tensor], eps: float
) -> torch.Tensor:
    """``layer_norm(hidden + residual)`` of ``[n, E]`` rows (``reference.residual_layer_norm``)."""
    check_residual_layer_norm(hidden, residual, weight, bias)
    return reference.residual_layer_norm(hidden, residual, weight, bias, eps).contiguous()


@residual_layer_norm.register_kernel("cuda")
def _residual_layer_norm_cuda(hidden, residual, weight, bias, eps):
    return residual_layer_norm_triton(hidden, residual, weight, bias, eps)


@residual_layer_norm.register_fake
def _residual_layer_norm_fake(hidden, residual, weight, bias, eps):
    check_residual_layer_norm(hidden, residual, weight, bias)
    return hidden.new_empty(hidden.shape)
