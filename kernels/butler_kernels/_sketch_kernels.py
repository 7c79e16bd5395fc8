"""Triton kernel of the sketch write (see ``sketch_write.py`` for the launcher).

Imported lazily through ``_triton_loader.kernel_module``, in the mode Triton runs in.

One program per (KV head, block of new tokens): loads the tokens' keys and the head's projection
``[D, d']``, multiplies them on the tensor cores (fp32 accumulation, as the reference's matmul) and
scatters the rounded sketch rows to their slots of the paged pool. One launch replaces the
projection GEMM and the indexed store of the plain-torch path.

``ROPE`` (predictor format 2, ``reference.project_sketch(..., rope=)``): the keys are un-rotated
with their tokens' angles first (each half of ``D`` is its own dot operand: the pairs are
``(i, i + D/2)``), and the sketch's pairs ``(j, j + d'/2)`` are rotated after the projection by the
angle of frequency ``pairs[j]``. Each column's partner is a second product against the weight's
columns swapped by halves, so the output stays one ``[tokens, d']`` tile. Every elementwise step is
rounded to the weight's dtype as the reference's torch ops are (exact products in fp32, then one
rounding per op).
"""

import triton
import triton.language as tl


@triton.jit
def _sketch_write_kernel(
    k_ptr, stride_kn, stride_kh, stride_kd,
    w_ptr, stride_wh, stride_wd, stride_we,
    loc_ptr, stride_loc,
    out_ptr, stride_os, stride_oh, stride_oe,
    cos_ptr, stride_cn, stride_cd,
    sin_ptr, stride_sn, stride_sd,
    pairs_ptr, stride_p,
    n,
    D: tl.constexpr, BLOCK_D: tl.constexpr, DP: tl.constexpr, BLOCK_DP: tl.constexpr, BLOCK_T: tl.constexpr,
    IEEE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    ROPE: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # Offsets from a head, token or slot index times a stride are int64: the SGLang backend's
    # head-major sketch store puts head h of a layer h * layers * slots * d' elements in, past 2^31
    # from ~620K slots with Llama-3.1-8B shapes (issue 18: an illegal address at the first extend).
    h = tl.program_id(0).to(tl.int64)
    tt = tl.program_id(1) * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = tt < n
    tt64 = tt.to(tl.int64)
    ee = tl.arange(0, BLOCK_DP)
    if ROPE:
        sk = _rope_sketch(
            k_ptr, stride_kn, stride_kh, stride_kd, w_ptr, stride_wh, stride_wd, stride_we,
            cos_ptr, stride_cn, stride_cd, sin_ptr, stride_sn, stride_sd, pairs_ptr, stride_p,
            h, tt64, tmask, ee, D, DP, BLOCK_H, IEEE_DOT, UPCAST_DOT,
        )
    else:
        dd = tl.arange(0, BLOCK_D)
        w = tl.load(
            w_ptr + h * stride_wh + dd[:, None] * stride_wd + ee[None, :] * stride_we,
            mask=(dd[:, None] < D) & (ee[None, :] < DP),
            other=0.0,
        )
        keys = tl.load(
            k_ptr + tt64[:, None] * stride_kn + h * stride_kh + dd[None, :] * stride_kd,
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
    slot = tl.load(loc_ptr + tt64 * stride_loc, mask=tmask, other=0).to(tl.int64)
    tl.store(
        out_ptr + slot[:, None] * stride_os + h * stride_oh + ee[None, :] * stride_oe,
        sk.to(out_ptr.dtype.element_ty),
        mask=tmask[:, None] & (ee[None, :] < DP),
    )


@triton.jit
def _round(x, dtype: tl.constexpr):
    """``x`` rounded to ``dtype`` (to nearest, ties to even) and held in fp32: the result of one
    torch op in that dtype. bf16 rounds on the bits: Triton 3.6's interpreter truncates a plain
    fp32 -> bf16 cast (and its "rtne" mode does not carry into the exponent), the GPU's cast rounds;
    this is the GPU's rounding in both."""
    x = x.to(tl.float32)
    if dtype == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return bits.to(tl.float32, bitcast=True)
    else:
        return x.to(dtype).to(tl.float32)


@triton.jit
def _dot(a, b, IEEE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr):
    if UPCAST_DOT:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE_DOT:
        return tl.dot(a, b, input_precision="ieee")
    return tl.dot(a, b)


@triton.jit
def _rope_sketch(
    k_ptr, stride_kn, stride_kh, stride_kd, w_ptr, stride_wh, stride_wd, stride_we,
    cos_ptr, stride_cn, stride_cd, sin_ptr, stride_sn, stride_sd, pairs_ptr, stride_p,
    h, tt, tmask, ee, D: tl.constexpr, DP: tl.constexpr, BLOCK_H: tl.constexpr,
    IEEE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """``[BLOCK_T, BLOCK_DP]`` sketch of the block's tokens ``tt`` (int64, as the head ``h``)
    (``reference.project_sketch`` with ``rope``), in the weight's dtype."""
    wdt: tl.constexpr = w_ptr.dtype.element_ty
    HALF: tl.constexpr = D // 2
    DPH: tl.constexpr = DP // 2
    hh = tl.arange(0, BLOCK_H)
    hmask = hh < HALF
    emask = ee < DP
    tt64 = tt[:, None]
    # un-rotate the keys: u1 = k1 cos + k2 sin, u2 = k2 cos - k1 sin (reference.unrotate_keys)
    kmask = tmask[:, None] & hmask[None, :]
    k_rows = k_ptr + tt64 * stride_kn + h * stride_kh
    k1 = _round(tl.load(k_rows + hh[None, :] * stride_kd, mask=kmask, other=0.0), wdt)
    k2 = _round(tl.load(k_rows + (hh[None, :] + HALF) * stride_kd, mask=kmask, other=0.0), wdt)
    c = _round(tl.load(cos_ptr + tt64 * stride_cn + hh[None, :] * stride_cd, mask=kmask, other=0.0), wdt)
    s = _round(tl.load(sin_ptr + tt64 * stride_sn + hh[None, :] * stride_sd, mask=kmask, other=0.0), wdt)
    # (exact values of wdt: the casts below do not round)
    u1 = _round(_round(k1 * c, wdt) + _round(k2 * s, wdt), wdt).to(wdt)
    u2 = _round(_round(k2 * c, wdt) - _round(k1 * s, wdt), wdt).to(wdt)
    # the projection by halves of D, for every column and for its partner (j <-> j + d'/2)
    partner = tl.where(ee < DPH, ee + DPH, ee - DPH)
    wmask = hmask[:, None] & emask[None, :]
    w_head = w_ptr + h * stride_wh
    w_lo = w_head + hh[:, None] * stride_wd
    w_hi = w_head + (hh[:, None] + HALF) * stride_wd
    sk = _dot(u1, tl.load(w_lo + ee[None, :] * stride_we, mask=wmask, other=0.0), IEEE_DOT, UPCAST_DOT)
    sk += _dot(u2, tl.load(w_hi + ee[None, :] * stride_we, mask=wmask, other=0.0), IEEE_DOT, UPCAST_DOT)
    sk_p = _dot(u1, tl.load(w_lo + partner[None, :] * stride_we, mask=wmask, other=0.0), IEEE_DOT, UPCAST_DOT)
    sk_p += _dot(u2, tl.load(w_hi + partner[None, :] * stride_we, mask=wmask, other=0.0), IEEE_DOT, UPCAST_DOT)
    # rounded to the weight's dtype, as the reference's matmul output is
    sk = _round(sk, wdt)
    sk_p = _round(sk_p, wdt)
    # rotate the pairs: x1 c - x2 s | x2 c + x1 s with the angle of frequency pairs[j]; -1: c 1, s 0
    j = tl.where(ee < DPH, ee, ee - DPH)
    freq = tl.load(pairs_ptr + j * stride_p, mask=emask, other=-1)
    rmask = tmask[:, None] & (freq >= 0)[None, :]
    freq = tl.maximum(freq, 0)[None, :]
    pc = _round(tl.load(cos_ptr + tt64 * stride_cn + freq * stride_cd, mask=rmask, other=1.0), wdt)
    ps = _round(tl.load(sin_ptr + tt64 * stride_sn + freq * stride_sd, mask=rmask, other=0.0), wdt)
    a = _round(sk * pc, wdt)
    b = _round(sk_p * ps, wdt)
    return _round(tl.where((ee < DPH)[None, :], a - b, a + b), wdt).to(wdt)
