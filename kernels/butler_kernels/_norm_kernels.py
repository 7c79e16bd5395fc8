"""Triton kernel of the producer's input norm (see ``producer_norm.py`` for the launcher).

Imported lazily through ``_triton_loader.kernel_module``, in the mode Triton runs in.

One program per row holds the whole row in registers: residual add (rounded to the activations'
dtype, as the eager ``hidden + residual`` is), mean and variance in fp32 in two passes over the
registers, affine, one store. At decode a batch has a few rows, so each row gets many warps: torch's
LayerNorm kernel took 8.3 us for 8 rows of 4096 on the H100 (one block per row, a serial Welford
loop), plus a launch for the add.
"""

import triton
import triton.language as tl


@triton.jit
def _residual_layer_norm_kernel(
    x_ptr, stride_xn, r_ptr, stride_rn, w_ptr, b_ptr, o_ptr, stride_on,
    E, eps,
    BLOCK_E: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    ee = tl.arange(0, BLOCK_E)
    m = ee < E
    x = tl.load(x_ptr + row * stride_xn + ee, mask=m, other=0.0)
    if HAS_RESIDUAL:
        x = (x.to(tl.float32) + tl.load(r_ptr + row * stride_rn + ee, mask=m, other=0.0).to(tl.float32)).to(x.dtype)
    x = x.to(tl.float32)
    mean = tl.sum(x, 0) / E
    xc = tl.where(m, x - mean, 0.0)
    rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, 0) / E + eps)
    y = xc * rstd * tl.load(w_ptr + ee, mask=m, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y += tl.load(b_ptr + ee, mask=m, other=0.0).to(tl.float32)
    tl.store(o_ptr + row * stride_on + ee, y.to(o_ptr.dtype.element_ty), mask=m)
