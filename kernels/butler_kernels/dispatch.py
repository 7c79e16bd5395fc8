"""``sparse_decode``: the one entry point the transformers runtime and the SGLang backend call.

Implementation choice, per call (``impl=``) or per process (``BUTLER_KERNELS_IMPL``, read at
import):

* ``"auto"`` (default): the ``butler::`` custom ops, which run the Triton kernels on CUDA tensors
  and the plain-torch reference elsewhere; traceable by ``torch.compile(fullgraph=True)``.
* ``"reference"``: the plain-torch reference on any device (debugging, numerics checks).
* ``"triton"``: the Triton launchers on any device; CPU tensors go through the Triton
  interpreter (slow: tests only).
"""

from __future__ import annotations

import os

import torch

import butler_kernels.ops  # noqa: F401  (registers torch.ops.butler.*)
from butler_kernels import reference
from butler_kernels.budgeted_attention import NewSketch, budgeted_attention_triton
from butler_kernels.score_select import score_select_reference, score_select_triton
from butler_kernels.producer_norm import residual_layer_norm_triton
from butler_kernels.sketch_write import sketch_write_triton

__all__ = ["IMPLEMENTATIONS", "default_impl", "residual_layer_norm", "select", "sparse_decode", "write_sketch"]

IMPLEMENTATIONS = ("auto", "triton", "reference")
_ENV = "BUTLER_KERNELS_IMPL"


def _check_impl(name: str, source: str) -> str:
    if name not in IMPLEMENTATIONS:
        raise ValueError(f"{source} must be one of {IMPLEMENTATIONS}, got {name!r}")
    return name


_DEFAULT_IMPL = _check_impl(os.environ.get(_ENV, "auto"), _ENV)


def default_impl() -> str:
    """The implementation used when ``impl`` is not given (``BUTLER_KERNELS_IMPL`` at import)."""
    return _DEFAULT_IMPL


def select(
    q_sel: torch.Tensor,
    sketch: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    *,
    sinks: int,
    window: int,
    budget: int,
    token_table: torch.Tensor | None = None,
    budget_per_row: torch.Tensor | None = None,
    impl: str | None = None,
    index_dtype: torch.dtype = torch.int32,
) -> torch.Tensor:
    """The selection half of ``sparse_decode``: top-``budget`` positions ``[B, H_kv, budget]``
    (``-1`` padded), or ``[L, B, H_kv, budget]`` for ``q_sel [L, B, H_sel, d']`` and a sketch per
    layer (several layers in one set of launches; see ``score_select.score_select_triton``)."""
    impl = default_impl() if impl is None else _check_impl(impl, "impl")
    _check_budget(budget)
    args = (q_sel, sketch, start, end)
    if impl == "auto":
        return torch.ops.butler.score_select(*args, token_table, budget_per_row, sinks, window, budget, index_dtype)
    fn = score_select_triton if impl == "triton" else score_select_reference
    return fn(*args, sinks=sinks, window=window, k=budget, token_table=token_table, budget_per_row=budget_per_row,
              index_dtype=index_dtype)


def write_sketch(pool: torch.Tensor, loc: torch.Tensor, keys: torch.Tensor, weight: torch.Tensor, *, impl: str | None = None) -> None:
    """Store the sketch of new keys ``[n, H_kv, D]`` (a layer's projection ``weight [H_kv, D, d']``)
    at slots ``loc`` of the paged sketch ``pool [slots, H_kv, d']``, in place
    (``reference.write_sketch``; ``impl`` as in ``sparse_decode``)."""
    impl = default_impl() if impl is None else _check_impl(impl, "impl")
    if impl == "auto":
        torch.ops.butler.write_sketch(pool, loc, keys, weight)
    elif impl == "triton":
        sketch_write_triton(pool, loc, keys, weight)
    else:
        reference.write_sketch(pool, loc, keys, weight)


def residual_layer_norm(
    hidden: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None, eps: float,
    *, impl: str | None = None,
) -> torch.Tensor:
    """``layer_norm(hidden + residual)`` of ``[n, E]`` rows in one launch (a producer's input norm
    under a base that defers its residual add; ``reference.residual_layer_norm``; ``impl`` as in
    ``sparse_decode``)."""
    impl = default_impl() if impl is None else _check_impl(impl, "impl")
    if impl == "auto":
        return torch.ops.butler.residual_layer_norm(hidden, residual, weight, bias, eps)
    if impl == "triton":
        return residual_layer_norm_triton(hidden, residual, weight, bias, eps)
    return reference.residual_layer_norm(hidden, residual, weight, bias, eps)


def _check_budget(budget) -> None:
    if isinstance(budget, bool) or not isinstance(budget, (int, torch.SymInt)):
        raise TypeError(
            f"budget must be an int (the static top-k); got {type(budget).__name__}. For a fraction of the "
            "context pass the cap as budget and reference.budget_for_rows(...) as budget_per_row"
        )
    if budget < 0:
        raise ValueError(f"budget must be >= 0, got {budget}")


def sparse_decode(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    q_sel: torch.Tensor | None,
    sketch: torch.Tensor | None,
    start: torch.Tensor,
    end: torch.Tensor,
    *,
    sinks: int,
    window: int,
    budget: int,
    scale: float,
    token_table: torch.Tensor | None = None,
    budget_per_row: torch.Tensor | None = None,
    selection: torch.Tensor | None = None,
    split_counters: torch.Tensor | None = None,
    new_sketch: NewSketch | None = None,
    impl: str | None = None,
    index_dtype: torch.dtype = torch.int32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One budgeted decode step of one layer: select, then attend.

    q ``[B, H_q, D]``; K/V dense ``[B, H_kv, T, D]`` or paged ``[slots, H_kv, D]``; predictor
    queries ``q_sel [B, H_sel, d']`` and the sketch cache (dense ``[B, H_kv, T, d']`` or paged
    ``[slots, H_kv, d']``); ``token_table [B, T]`` maps positions to slots for whichever buffers are
    paged. ``budget`` is the static top-k per KV head (an int: it fixes the output shape);
    ``budget_per_row [B]`` (<= budget) lowers it per row, e.g. ``reference.budget_for_rows`` for a
    fraction of the context.

    ``selection [B, H_kv, n]`` (a previous step's ``sel``, possibly ``reference.expand_neighbors``
    of it) skips scoring: the prediction-interval reuse. ``split_counters``: a zeroed int32 buffer
    of ``B * H_kv`` or more that the attention kernel may reuse call after call on one stream (it
    leaves it zeroed; see ``budgeted_attention_triton``), else one is zeroed per call.
    ``new_sketch`` (:class:`~butler_kernels.budgeted_attention.NewSketch`): the step's sketch write,
    done by the attention launch (after the selection, which never reads the new token). Returns
    ``(out [B, H_q, D], sel)``, ``sel`` being ``selection`` itself when given, else
    ``[B, H_kv, budget]`` positions in ``index_dtype``.
    """
    impl = default_impl() if impl is None else _check_impl(impl, "impl")
    _check_budget(budget)
    if selection is None:
        if q_sel is None or sketch is None:
            raise ValueError("sparse_decode needs q_sel and sketch to score, or a selection to reuse")
        if q_sel.dim() != 3:
            raise ValueError(f"sparse_decode decodes one layer: q_sel must be [B, H_sel, d'], got shape {list(q_sel.shape)}")
        sel = select(q_sel, sketch, start, end, sinks=sinks, window=window, budget=budget, token_table=token_table,
                     budget_per_row=budget_per_row, impl=impl, index_dtype=index_dtype)
    else:
        sel = selection
    if impl == "auto":
        args = (q, k_buf, v_buf, sel, start, end, token_table, sinks, window, scale, split_counters)
        if new_sketch is None:
            out = torch.ops.butler.budgeted_attention(*args)
        else:
            out = torch.ops.butler.budgeted_attention_step(*args, *new_sketch)
    elif impl == "triton":
        out = budgeted_attention_triton(q, k_buf, v_buf, sel, start, end, sinks=sinks, window=window, scale=scale,
                                        token_table=token_table, split_counters=split_counters, new_sketch=new_sketch)
    else:
        if new_sketch is not None:
            reference.write_sketch(*new_sketch)
        out = reference.budgeted_attention(q, k_buf, v_buf, sel, start, end, sinks, window, scale, token_table)
    return out, sel
