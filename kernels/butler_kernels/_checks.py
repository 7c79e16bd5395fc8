"""Argument checks shared by the Triton launchers, the custom ops' fake implementations and the
dispatch entry point. Only shapes, dtypes and devices are checked: values live on the device and
reading them would sync the host (and break CUDA-graph capture)."""

from __future__ import annotations

import torch

_INDEX_DTYPES = (torch.int32, torch.int64)
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def _fail(msg: str) -> None:
    raise ValueError(msg)


def _check_int_vector(name: str, t: torch.Tensor, batch: int) -> None:
    if t.dtype not in _INDEX_DTYPES:
        raise TypeError(f"{name} must be int32 or int64, got {t.dtype}")
    if t.dim() != 1 or t.shape[0] != batch:
        _fail(f"{name} must have shape [B] = [{batch}], got {list(t.shape)}")


def _check_same_device(ref: torch.Tensor, **named: torch.Tensor | None) -> None:
    for name, t in named.items():
        if t is not None and t.device != ref.device:
            _fail(f"{name} is on {t.device} but the inputs are on {ref.device}")


def check_out(name: str, out: torch.Tensor, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> None:
    if tuple(out.shape) != tuple(shape) or out.dtype != dtype or out.device != device:
        _fail(f"{name} must be a {dtype} tensor of shape {list(shape)} on {device}, got {out.dtype} {list(out.shape)} on {out.device}")


def check_policy(sinks: int, window: int) -> None:
    if sinks < 0 or window < 0:
        _fail(f"sinks and window must be >= 0, got sinks={sinks}, window={window}")


def check_index_dtype(index_dtype: torch.dtype) -> None:
    if index_dtype not in _INDEX_DTYPES:
        raise TypeError(f"index_dtype must be torch.int32 or torch.int64, got {index_dtype}")


def check_token_table(token_table: torch.Tensor | None, batch: int, what: str) -> int:
    """Validate a paged buffer's table; returns the number of positions it maps."""
    if token_table is None:
        _fail(f"a paged {what} [slots, H_kv, X] needs token_table [B, T] to map positions to slots")
    if token_table.dtype not in _INDEX_DTYPES:
        raise TypeError(f"token_table must be int32 or int64, got {token_table.dtype}")
    if token_table.dim() != 2 or token_table.shape[0] != batch:
        _fail(f"token_table must have shape [B, T] with B = {batch}, got {list(token_table.shape)}")
    return token_table.shape[1]


def check_score_select(
    q_sel: torch.Tensor,
    sketch: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    token_table: torch.Tensor | None,
    budget_per_row: torch.Tensor | None,
    sinks: int,
    window: int,
    k: int,
    index_dtype: torch.dtype,
) -> tuple[int, int, int, int]:
    """Returns ``(B, H_kv, T, group)``."""
    if q_sel.dim() != 3:
        _fail(f"q_sel must be [B, H_sel, d'], got shape {list(q_sel.shape)}")
    if q_sel.dtype not in _FLOAT_DTYPES or sketch.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"q_sel and sketch must be float16/bfloat16/float32, got {q_sel.dtype} and {sketch.dtype}")
    if not isinstance(k, (int, torch.SymInt)) or isinstance(k, bool):
        raise TypeError(f"the budget k must be an int (it fixes the output shape), got {type(k).__name__}")
    if k < 0:
        _fail(f"the budget must be >= 0, got {k}")
    check_policy(sinks, window)
    check_index_dtype(index_dtype)
    b, h_sel, dp = q_sel.shape
    if sketch.dim() == 4:
        if sketch.shape[0] != b:
            _fail(f"sketch [B, H_kv, T, d'] has batch {sketch.shape[0]}, q_sel has {b}")
        t = sketch.shape[2]
    elif sketch.dim() == 3:
        t = check_token_table(token_table, b, "sketch")
    else:
        _fail(f"sketch must be dense [B, H_kv, T, d'] or paged [slots, H_kv, d'], got shape {list(sketch.shape)}")
    h_kv = sketch.shape[1]
    if sketch.shape[-1] != dp:
        _fail(f"sketch width {sketch.shape[-1]} differs from q_sel's d' = {dp}")
    if h_kv == 0 or h_sel % h_kv:
        _fail(f"{h_sel} predictor heads do not group evenly over {h_kv} KV heads")
    _check_int_vector("start", start, b)
    _check_int_vector("end", end, b)
    if budget_per_row is not None:
        _check_int_vector("budget_per_row", budget_per_row, b)
    _check_same_device(q_sel, sketch=sketch, start=start, end=end, token_table=token_table, budget_per_row=budget_per_row)
    return b, h_kv, t, h_sel // h_kv


def check_score_select_layers(
    q_sel: torch.Tensor,
    sketch: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    token_table: torch.Tensor | None,
    budget_per_row: torch.Tensor | None,
    sinks: int,
    window: int,
    k: int,
    index_dtype: torch.dtype,
) -> tuple[int | None, int, int, int, int]:
    """``check_score_select`` of a call with or without a leading layer axis: ``q_sel [L, B, H_sel,
    d']`` with a sketch per layer (dense ``[L, B, H_kv, T, d']`` or paged ``[L, slots, H_kv, d']``),
    every layer sharing ``start``, ``end``, ``token_table`` and the budget. Returns ``(L, B, H_kv, T,
    group)``, ``L`` None for a call without the layer axis."""
    if q_sel.dim() != 4:
        return (None, *check_score_select(q_sel, sketch, start, end, token_table, budget_per_row, sinks, window, k, index_dtype))
    n_layers = q_sel.shape[0]
    if n_layers == 0:
        _fail("q_sel [L, B, H_sel, d'] needs at least one layer")
    if sketch.dim() not in (4, 5) or sketch.shape[0] != n_layers:
        _fail(
            f"with q_sel [L, B, H_sel, d'] (L = {n_layers}) the sketch must be dense [L, B, H_kv, T, d'] or paged "
            f"[L, slots, H_kv, d'], got shape {list(sketch.shape)}"
        )
    return (n_layers, *check_score_select(q_sel[0], sketch[0], start, end, token_table, budget_per_row, sinks, window, k, index_dtype))


def check_split_counters(counters: torch.Tensor, pairs: int, device) -> None:
    """The attention kernel's ticket counters: zeroed int32, one per (row, KV head)."""
    if counters.dtype != torch.int32 or not counters.is_contiguous() or counters.numel() < pairs:
        _fail(
            f"split_counters must be a contiguous int32 tensor of at least B * H_kv = {pairs} zeros, got "
            f"{counters.dtype} of shape {list(counters.shape)}{'' if counters.is_contiguous() else ' (not contiguous)'}"
        )
    if counters.device != torch.device(device):
        _fail(f"split_counters is on {counters.device}, q on {device}")


def check_attention(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    sel: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    token_table: torch.Tensor | None,
    sinks: int,
    window: int,
) -> tuple[int, int, int, int]:
    """Returns ``(B, H_kv, group, D)``."""
    if q.dim() != 3:
        _fail(f"q must be [B, H_q, D], got shape {list(q.shape)}")
    if q.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"q must be float16/bfloat16/float32, got {q.dtype}")
    if k_buf.dtype != q.dtype or v_buf.dtype != q.dtype:
        raise TypeError(f"q, k_buf and v_buf must share one dtype, got {q.dtype}, {k_buf.dtype}, {v_buf.dtype}")
    if k_buf.shape != v_buf.shape:
        _fail(f"k_buf {list(k_buf.shape)} and v_buf {list(v_buf.shape)} must have the same shape")
    check_policy(sinks, window)
    b, hq, d = q.shape
    if k_buf.dim() == 4:
        if k_buf.shape[0] != b:
            _fail(f"k_buf [B, H_kv, T, D] has batch {k_buf.shape[0]}, q has {b}")
    elif k_buf.dim() == 3:
        check_token_table(token_table, b, "K/V buffer")
    else:
        _fail(f"k_buf must be dense [B, H_kv, T, D] or paged [slots, H_kv, D], got shape {list(k_buf.shape)}")
    h_kv = k_buf.shape[1]
    if k_buf.shape[-1] != d:
        _fail(f"K/V head dim {k_buf.shape[-1]} differs from q's {d}")
    if h_kv == 0 or hq % h_kv:
        _fail(f"{hq} query heads do not group evenly over {h_kv} KV heads")
    if sel.dim() != 3 or sel.shape[0] != b or sel.shape[1] != h_kv:
        _fail(f"sel must be [B, H_kv, n] = [{b}, {h_kv}, n], got {list(sel.shape)}")
    if sel.dtype not in _INDEX_DTYPES:
        raise TypeError(f"sel must be int32 or int64, got {sel.dtype}")
    _check_int_vector("start", start, b)
    _check_int_vector("end", end, b)
    _check_same_device(q, k_buf=k_buf, v_buf=v_buf, sel=sel, start=start, end=end, token_table=token_table)
    return b, h_kv, hq // h_kv, d
