"""Triton kernel of the sketch write (see ``sketch_write.py`` for the launcher).

Imported lazily through ``_triton_loader.kernel_module``, in the mode Triton runs in.

One program per (KV head, block of new tokens): loads the tokens' keys and the head's projection
``[D, d']``, multiplies them on the tensor cores (fp32 accumulation, as the reference's matmul) and
scatters the rounded sketch rows to their slots of the paged pool. One launch replaces the
projection GEMM and the indexed store of the plain-torch path.
"""

import triton
import triton.language as tl


@triton.jit
def _sketch_write_kernel(
    k_ptr, stride_kn, stride_kh, stride_kd,
    w_ptr, stride_wh, stride_wd, stride_we,
    loc_ptr, stride_loc,
    out_ptr, stride_os, stride_oh, stride_oe,
    n,
    D: tl.constexpr, BLOCK_D: tl.constexpr, DP: tl.constexpr, BLOCK_DP: tl.constexpr, BLOCK_T: tl.constexpr,
    IEEE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    h = tl.program_id(0)
    tt = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = tt < n
    dd = tl.arange(0, BLOCK_D)
    ee = tl.arange(0, BLOCK_DP)
    w = tl.load(
        w_ptr + h * stride_wh + dd[:, None] * stride_wd + ee[None, :] * stride_we,
        mask=(dd[:, None] < D) & (ee[None, :] < DP),
        other=0.0,
    )
    keys = tl.load(
        k_ptr + tt[:, None].to(tl.int64) * stride_kn + h * stride_kh + dd[None, :] * stride_kd,
        mask=tmask[:, None] & (dd[None, :] < D),
        other=0.0,
    ).to(w.dtype)
    if UPCAST_DOT:
        keys = keys.to(tl.float32)
        w = w.to(tl.float32)
    if IEEE_DOT:
        sk = tl.dot(keys, w, input_precision="ieee")
    else:
        sk = tl.dot(keys, w)
    # Rounded to the weight's dtype first, as the reference's matmul output is.
    sk = sk.to(w_ptr.dtype.element_ty)
    slot = tl.load(loc_ptr + tt * stride_loc, mask=tmask, other=0).to(tl.int64)
    tl.store(
        out_ptr + slot[:, None] * stride_os + h * stride_oh + ee[None, :] * stride_oe,
        sk.to(out_ptr.dtype.element_ty),
        mask=tmask[:, None] & (ee[None, :] < DP),
    )
