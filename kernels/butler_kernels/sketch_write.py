"""Write the sketch of new keys into a paged sketch pool (``reference.write_sketch``).

``sketch_write_triton`` projects ``keys [n, H_kv, D]`` with a layer's ``weight [H_kv, D, d']`` and
stores the rows at slots ``loc [n]`` of ``pool [slots, H_kv, d']`` (any strides: the SGLang backend
keeps it head-major), in one launch: the plain-torch path is a matmul plus an indexed store, two
kernels and a temporary per layer and step.

``rope = (cos, sin, pairs)`` (predictor format 2): ``cos``/``sin`` ``[n, D/2]`` the base's rotary
angles at each key's position (any strides, e.g. the two halves of one ``[n, D]`` table), ``pairs
[d'/2]`` the predictor's ``rope_pairs`` (``-1``: not rotated). The same launch un-rotates the keys
and rotates the sketch's pairs, as ``reference.project_sketch(..., rope=)``.
"""

from __future__ import annotations

import torch

from butler_kernels._triton_loader import Launch, run_launches, triton_interpreted

__all__ = ["check_sketch_write", "sketch_write_triton"]

_KERNELS = "_sketch_kernels"
_BLOCK_T = 16


def check_sketch_write(pool, loc, keys, weight, rope=None) -> None:
    """Shapes, dtypes and devices of a sketch write; raises ``ValueError``/``TypeError``."""
    if keys.dim() != 3 or weight.dim() != 3 or pool.dim() != 3:
        raise ValueError(
            f"sketch write needs keys [n, H_kv, D], weight [H_kv, D, d'] and pool [slots, H_kv, d'], got "
            f"{list(keys.shape)}, {list(weight.shape)} and {list(pool.shape)}"
        )
    n, h_kv, d = keys.shape
    if tuple(weight.shape[:2]) != (h_kv, d) or pool.shape[1] != h_kv or pool.shape[2] != weight.shape[2]:
        raise ValueError(
            f"shapes do not match: keys [n, H_kv, D] = {list(keys.shape)}, weight [H_kv, D, d'] = {list(weight.shape)}, "
            f"pool [slots, H_kv, d'] = {list(pool.shape)}"
        )
    if loc.dim() != 1 or loc.shape[0] != n or loc.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"loc must be an int32/int64 vector of the {n} slots, got {loc.dtype} {list(loc.shape)}")
    for name, t in (("keys", keys), ("weight", weight), ("pool", pool)):
        if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            raise TypeError(f"{name} must be float16/bfloat16/float32, got {t.dtype}")
    tensors = [pool, loc, keys, weight]
    if rope is not None:
        if len(rope) != 3:
            raise ValueError("rope must be (cos, sin, pairs)")
        cos, sin, pairs = rope
        dp = weight.shape[2]
        if d % 2 or dp % 2:
            raise ValueError(f"a rotary sketch needs an even head dim and sketch width, got D {d} and d' {dp}")
        for name, t in (("cos", cos), ("sin", sin)):
            if tuple(t.shape) != (n, d // 2):
                raise ValueError(f"rope {name} must be [n, D/2] = [{n}, {d // 2}] (the angles of each key), got {list(t.shape)}")
            if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
                raise TypeError(f"rope {name} must be float16/bfloat16/float32, got {t.dtype}")
        if tuple(pairs.shape) != (dp // 2,) or pairs.dtype not in (torch.int32, torch.int64):
            raise ValueError(
                f"rope pairs must be an int32/int64 vector of d'/2 = {dp // 2} frequencies, got {pairs.dtype} {list(pairs.shape)}"
            )
        tensors += [cos, sin, pairs]
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        names = "pool, loc, keys, weight" + (", cos, sin and pairs" if rope is not None else "")
        raise ValueError(f"{names} must be on one device, got {sorted(map(str, devices))}")


def sketch_write_triton(pool: torch.Tensor, loc: torch.Tensor, keys: torch.Tensor, weight: torch.Tensor, rope=None) -> None:
    """``reference.write_sketch`` in one Triton launch (in place). CPU tensors run in the Triton
    interpreter. ``rope = (cos, sin, pairs)``: a format-2 sketch (module docstring); the ``pairs``
    must lie in ``[-1, D/2)`` (not checked: it would read them on the host)."""
    check_sketch_write(pool, loc, keys, weight, rope)
    if keys.shape[0] == 0:
        return
    run_launches(_KERNELS, [sketch_write_launch(pool, loc, keys, weight, rope)])


def sketch_write_launch(pool, loc, keys, weight, rope=None) -> Launch:
    """The launch of one sketch write (checked arguments, n >= 1); separate so that
    ``_compile_check`` builds exactly what runs."""
    n, h_kv, d = keys.shape
    dp = weight.shape[2]
    interpreted = triton_interpreted()
    if rope is not None:
        cos, sin, pairs = rope
        rope_args = (cos, *cos.stride(), sin, *sin.stride(), pairs, pairs.stride(0))
    else:
        rope_args = (keys, 0, 0, keys, 0, 0, loc, 0)  # never read: any valid pointers
    return Launch(
        "_sketch_write_kernel", (h_kv, -(-n // _BLOCK_T)),
        (keys, *keys.stride(), weight, *weight.stride(), loc, loc.stride(0), pool, *pool.stride(), *rope_args, n),
        dict(D=d, BLOCK_D=max(16, 1 << (d - 1).bit_length()), DP=dp, BLOCK_DP=max(16, 1 << (dp - 1).bit_length()),
             BLOCK_T=_BLOCK_T, IEEE_DOT=weight.dtype == torch.float32,
             # Triton 3.6's interpreter multiplies bf16 dot operands as raw storage (see budgeted_attention).
             UPCAST_DOT=interpreted and weight.dtype != torch.float32,
             ROPE=rope is not None, BLOCK_H=max(16, 1 << (d // 2 - 1).bit_length()),
             num_warps=4, num_stages=1),
    )
