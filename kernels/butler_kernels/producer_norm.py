"""The producer's input norm at decode: ``LayerNorm(hidden + residual)`` in one launch
(``reference.residual_layer_norm``).

SGLang's decoder layers hand the next layer ``(hidden, residual)`` with the residual add deferred,
so a producer hook needs the add, then the predictor's LayerNorm: two launches of torch, the norm
a slow one at a few rows. ``residual_layer_norm_triton`` does both in one.
"""

from __future__ import annotations

import torch

from butler_kernels._triton_loader import Launch, run_launches

__all__ = ["residual_layer_norm_triton", "residual_norm_launch", "check_residual_layer_norm"]

_KERNELS = "_norm_kernels"
_FLOAT = (torch.float16, torch.bfloat16, torch.float32)
_MAX_E = 1 << 16  # one row in one program's registers


def check_residual_layer_norm(hidden, residual, weight, bias) -> None:
    """Shapes, dtypes and devices of a residual LayerNorm call; raises ``ValueError``/``TypeError``."""
    if hidden.dim() != 2:
        raise ValueError(f"hidden must be [n, E], got shape {list(hidden.shape)}")
    n, e = hidden.shape
    if residual is not None and tuple(residual.shape) != (n, e):
        raise ValueError(f"residual must have hidden's shape {[n, e]}, got {list(residual.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None and tuple(t.shape) != (e,):
            raise ValueError(f"{name} must be [E] = [{e}], got {list(t.shape)}")
    for name, t in (("hidden", hidden), ("residual", residual), ("weight", weight), ("bias", bias)):
        if t is not None and t.dtype not in _FLOAT:
            raise TypeError(f"{name} must be float16/bfloat16/float32, got {t.dtype}")
    if residual is not None and residual.dtype != hidden.dtype:
        raise TypeError(f"residual ({residual.dtype}) and hidden ({hidden.dtype}) must share one dtype")
    if e > _MAX_E:
        raise ValueError(f"hidden size {e} is larger than the kernel's {_MAX_E} (one row per program)")
    devices = {t.device for t in (hidden, residual, weight, bias) if t is not None}
    if len(devices) != 1:
        raise ValueError(f"hidden, residual, weight and bias must be on one device, got {sorted(map(str, devices))}")


def residual_layer_norm_triton(
    hidden: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    eps: float,
) -> torch.Tensor:
    """``layer_norm(hidden + residual)`` of ``[n, E]`` rows, a new contiguous tensor in ``hidden``'s
    dtype. CPU tensors run in the Triton interpreter."""
    check_residual_layer_norm(hidden, residual, weight, bias)
    out = torch.empty(hidden.shape, dtype=hidden.dtype, device=hidden.device)
    if hidden.shape[0]:
        run_launches(_KERNELS, [residual_norm_launch(hidden, residual, weight, bias, eps, out)])
    return out


def residual_norm_launch(hidden, residual, weight, bias, eps, out) -> Launch:
    """The launch of one call (checked arguments, n >= 1); separate so that ``_compile_check``
    builds exactly what runs. Inner dimensions are made unit-stride here."""
    hidden = hidden if hidden.stride(1) == 1 else hidden.contiguous()
    residual = residual if residual is None or residual.stride(1) == 1 else residual.contiguous()
    weight = weight.contiguous()
    bias = bias.contiguous() if bias is not None else None
    e = hidden.shape[1]
    block = max(16, 1 << (e - 1).bit_length())
    return Launch(
        "_residual_layer_norm_kernel", (hidden.shape[0],),
        (hidden, hidden.stride(0), residual if residual is not None else hidden,
         residual.stride(0) if residual is not None else 0, weight, bias if bias is not None else weight,
         out, out.stride(0), e, float(eps)),
        # ~16 elements per thread: a 4096-wide row on 8 warps
        dict(BLOCK_E=block, HAS_RESIDUAL=residual is not None, HAS_BIAS=bias is not None,
             num_warps=max(1, min(16, block // 512)), num_stages=1),
    )
