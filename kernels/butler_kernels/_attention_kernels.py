"""Triton kernels of budgeted decode attention (see ``budgeted_attention.py`` for the launcher).

Imported lazily through ``_triton_loader.kernel_module``, in the mode Triton runs in.

Flash-decoding over a *virtual* list of ``sinks + window + n_sel`` entries per (row, KV head):
entry ``i`` is sink ``start + i``, then window position ``win_lo + i - sinks``, then ``sel[i -
sinks - window]``; entries past the row's ranges and ``-1`` selections are masked. The list is
split across programs (grid: KV head x split x row) so that batch 1 still fills the GPU; each
program loads one K/V tile per block and uses it for every query head of the GQA group (the
query heads are the M dimension of the dot), keeps an online softmax in fp32 and writes a
normalised partial output and its base-2 log-sum-exp. The last split of a (row, KV head) to
finish (a ticket per pair) combines them into the output; with a single split the program writes
the output directly. Either way one launch per call: a separate merge launch cost ~2.5 us per
layer and step in the SGLang server (kernel plus launch gap, batch 8 x 32K on the H100).
"""

import triton
import triton.language as tl


@triton.jit
def _attend_block(
    q, m_i, l_i, acc, idx, i_hi, st, en, sink_hi, win_lo, sinks, n_fixed, sel_row, stride_sn,
    k_ptr, stride_k0, stride_k1, stride_k2, stride_kd,
    v_ptr, stride_v0, stride_v1, stride_v2, stride_vd,
    tt_ptr, stride_ttb, stride_ttt, b64, h64, dd, dmask, qk_scale,
    PAGED: tl.constexpr, IEEE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    """One block of ``BLOCK_N`` virtual entries: resolve positions, load K/V once, update the
    online softmax of every query head of the group."""
    in_sink = idx < sinks
    in_win = (idx >= sinks) & (idx < n_fixed)
    in_sel = (idx >= n_fixed) & (idx < i_hi)
    chosen = tl.load(sel_row + (idx - n_fixed).to(tl.int64) * stride_sn, mask=in_sel, other=-1).to(tl.int32)
    pos = tl.where(in_sink, st + idx, tl.where(in_win, win_lo + (idx - sinks), chosen))
    ok = tl.where(in_sink, pos < sink_hi, tl.where(in_win, pos < en, chosen >= 0))
    pos64 = tl.where(ok, pos, 0).to(tl.int64)
    if PAGED:
        slot = tl.load(tt_ptr + b64 * stride_ttb + pos64 * stride_ttt, mask=ok, other=0).to(tl.int64)
        k_rows = k_ptr + slot * stride_k0 + h64 * stride_k1
        v_rows = v_ptr + slot * stride_v0 + h64 * stride_v1
    else:
        k_rows = k_ptr + b64 * stride_k0 + h64 * stride_k1 + pos64 * stride_k2
        v_rows = v_ptr + b64 * stride_v0 + h64 * stride_v1 + pos64 * stride_v2
    kv_mask = ok[:, None] & dmask[None, :]
    kt = tl.load(k_rows[:, None] + dd[None, :] * stride_kd, mask=kv_mask, other=0.0)
    vt = tl.load(v_rows[:, None] + dd[None, :] * stride_vd, mask=kv_mask, other=0.0)
    if UPCAST_DOT:
        kt = kt.to(tl.float32)
    if IEEE_DOT:
        qk = tl.dot(q, tl.trans(kt), input_precision="ieee")
    else:
        qk = tl.dot(q, tl.trans(kt))
    qk = tl.where(ok[None, :], qk * qk_scale, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # A fully masked block keeps m at -inf: subtract 0 instead so that exp2 gives 0, not NaN.
    m_sub = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.math.exp2(m_i - m_sub)
    p = tl.math.exp2(qk - m_sub[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    # p is rounded to the K/V dtype for the tensor-core dot, as flash attention does.
    pv = p.to(vt.dtype)
    if UPCAST_DOT:
        pv = pv.to(tl.float32)
        vt = vt.to(tl.float32)
    if IEEE_DOT:
        acc = acc * alpha[:, None] + tl.dot(pv, vt, input_precision="ieee")
    else:
        acc = acc * alpha[:, None] + tl.dot(pv, vt)
    return m_new, l_i, acc


@triton.jit
def _attn_split_kernel(
    q_ptr, stride_qb, stride_qh, stride_qd,
    k_ptr, stride_k0, stride_k1, stride_k2, stride_kd,
    v_ptr, stride_v0, stride_v1, stride_v2, stride_vd,
    tt_ptr, stride_ttb, stride_ttt,
    sel_ptr, stride_sb, stride_sh, stride_sn,
    start_ptr, end_ptr,
    po_ptr, plse_ptr, cnt_ptr,
    o_ptr, stride_ob, stride_oh, stride_od,
    nk_ptr, stride_nkb, stride_nkh, stride_nkd, nloc_ptr, stride_nloc,
    w_ptr, stride_wh, stride_wd, stride_we, sp_ptr, stride_sps, stride_sph, stride_spe,
    n_sel, sinks, window, num_splits, qk_scale,
    GROUP: tl.constexpr, G_PAD: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
    DIRECT: tl.constexpr, COUNTED_LOOP: tl.constexpr,
    PAGED: tl.constexpr, IEEE_DOT: tl.constexpr, UPCAST_DOT: tl.constexpr,
    WRITE_SKETCH: tl.constexpr, DP: tl.constexpr, BLOCK_DP: tl.constexpr,
):
    h = tl.program_id(0)
    s = tl.program_id(1)
    b = tl.program_id(2)
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    st = tl.load(start_ptr + b).to(tl.int32)
    en = tl.load(end_ptr + b).to(tl.int32)
    win_lo = tl.maximum(st, en - window)
    sink_hi = tl.minimum(st + sinks, win_lo)
    n_fixed = sinks + window

    g = tl.arange(0, G_PAD)
    gmask = g < GROUP
    dd = tl.arange(0, BLOCK_D)
    dmask = dd < D
    # Every offset from a row, head, position or slot index times a stride is int64 (b64, h64,
    # heads, pos64, slot): a pool or sketch store may span more than 2^31 elements (issue 18).
    heads = h64 * GROUP + g
    q = tl.load(
        q_ptr + b64 * stride_qb + heads[:, None] * stride_qh + dd[None, :] * stride_qd,
        mask=gmask[:, None] & dmask[None, :],
        other=0.0,
    )
    if UPCAST_DOT:
        q = q.to(tl.float32)

    m_i = tl.full([G_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([G_PAD], tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    sel_row = sel_ptr + b64 * stride_sb + h64 * stride_sh
    # Without a selection (dense decode: a window as long as the table) a row's list ends with its
    # context, and the splits share that row's length: a table far longer than the row's context
    # then costs nothing. With one, every row's list is sinks + window + n_sel long.
    n_list = tl.where(n_sel == 0, sinks + tl.maximum(en - win_lo, 0), n_fixed + n_sel)
    per_split = tl.cdiv(tl.cdiv(n_list, num_splits), BLOCK_N) * BLOCK_N
    i_lo = s * per_split
    i_hi = tl.minimum(i_lo + per_split, n_list)
    n_iters = tl.cdiv(tl.maximum(i_hi - i_lo, 0), BLOCK_N)
    if COUNTED_LOOP:
        # scf.for: the form the compiler software-pipelines (K/V loads of the next blocks in
        # flight while this one is multiplied).
        for it in range(0, n_iters):
            m_i, l_i, acc = _attend_block(
                q, m_i, l_i, acc, i_lo + it * BLOCK_N + tl.arange(0, BLOCK_N), i_hi, st, en, sink_hi, win_lo,
                sinks, n_fixed, sel_row, stride_sn,
                k_ptr, stride_k0, stride_k1, stride_k2, stride_kd, v_ptr, stride_v0, stride_v1, stride_v2, stride_vd,
                tt_ptr, stride_ttb, stride_ttt, b64, h64, dd, dmask, qk_scale, PAGED, IEEE_DOT, UPCAST_DOT,
            )
    else:
        # The interpreter (Triton 3.6 with NumPy 2) cannot use a run-time value as a range bound.
        it = tl.zeros([], tl.int32)
        while it < n_iters:
            m_i, l_i, acc = _attend_block(
                q, m_i, l_i, acc, i_lo + it * BLOCK_N + tl.arange(0, BLOCK_N), i_hi, st, en, sink_hi, win_lo,
                sinks, n_fixed, sel_row, stride_sn,
                k_ptr, stride_k0, stride_k1, stride_k2, stride_kd, v_ptr, stride_v0, stride_v1, stride_v2, stride_vd,
                tt_ptr, stride_ttb, stride_ttt, b64, h64, dd, dmask, qk_scale, PAGED, IEEE_DOT, UPCAST_DOT,
            )
            it += 1

    if WRITE_SKETCH:
        if s == num_splits - 1:  # the split with the fewest entries
            _write_new_sketch(nk_ptr + b64 * stride_nkb + h64 * stride_nkh, stride_nkd, nloc_ptr + b64 * stride_nloc,
                              w_ptr + h64 * stride_wh, stride_wd, stride_we, sp_ptr + h64 * stride_sph, stride_sps,
                              stride_spe, dd, dmask, DP, BLOCK_DP)

    has = l_i > 0.0
    out = acc / tl.where(has, l_i, 1.0)[:, None]
    o_rows = o_ptr + b64 * stride_ob + heads[:, None] * stride_oh + dd[None, :] * stride_od
    if DIRECT:
        tl.store(o_rows, out.to(o_ptr.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])
    else:
        lse = tl.where(has, m_i + tl.math.log2(tl.where(has, l_i, 1.0)), float("-inf"))
        first = (b64 * tl.num_programs(0) * GROUP + heads) * num_splits  # [B, H_q, splits] flat
        tl.store(plse_ptr + first + s, lse, mask=gmask)
        tl.store(po_ptr + (first + s)[:, None] * D + dd[None, :], out, mask=gmask[:, None] & dmask[None, :])
        # Every thread's partial is written before the ticket (release); the last split's loads
        # of the others' partials come after it (acquire) and bypass L1.
        tl.debug_barrier()
        cnt = cnt_ptr + b64 * tl.num_programs(0) + h64
        ticket = tl.atomic_add(cnt, 1, sem="acq_rel")
        if ticket == num_splits - 1:
            _merge_splits(po_ptr, plse_ptr, first, num_splits, o_rows, gmask, dd, dmask, D, G_PAD, BLOCK_D, COUNTED_LOOP)
            # Left zeroed for the next call: the counters need no clearing launch.
            tl.store(cnt, 0)


@triton.jit
def _write_new_sketch(key_row, stride_kd, loc, w_head, stride_wd, stride_we, pool_head, stride_ps, stride_pe, dd, dmask,
                      DP: tl.constexpr, BLOCK_DP: tl.constexpr):
    """The sketch write of the decode step (``reference.write_sketch`` of the row's new key for
    this KV head), folded into the launch that attends it: one key times ``W [D, d']``, rounded
    to the weight's dtype as the reference's matmul output is."""
    ee = tl.arange(0, BLOCK_DP)
    emask = ee < DP
    w = tl.load(w_head + dd[:, None] * stride_wd + ee[None, :] * stride_we, mask=dmask[:, None] & emask[None, :], other=0.0)
    key = tl.load(key_row + dd * stride_kd, mask=dmask, other=0.0).to(w.dtype)
    sk = tl.sum(key.to(tl.float32)[:, None] * w.to(tl.float32), 0).to(w.dtype)
    slot = tl.load(loc).to(tl.int64)
    tl.store(pool_head + slot * stride_ps + ee * stride_pe, sk.to(pool_head.dtype.element_ty), mask=emask)


@triton.jit
def _merge_splits(
    po_ptr, plse_ptr, first, num_splits, o_rows, gmask, dd, dmask,
    D: tl.constexpr, G_PAD: tl.constexpr, BLOCK_D: tl.constexpr, COUNTED_LOOP: tl.constexpr,
):
    """Output of the GQA group's heads from the ``num_splits`` partials: softmax weights from the
    splits' log-sum-exps, relative to their maximum. Loops over the splits (a [heads, splits]
    tile of 16 splits cost the whole kernel registers and an SM's fifth program: dense layer 483.8 vs
    365.8 us at batch 8 x 32K on the H100, benchmarks/results/bench_decode_fusions_h100*.json)."""
    m = tl.full([G_PAD], float("-inf"), tl.float32)
    acc = tl.zeros([G_PAD, BLOCK_D], tl.float32)
    den = tl.zeros([G_PAD], tl.float32)
    if COUNTED_LOOP:
        for i in range(0, num_splits):
            m = tl.maximum(m, tl.load(plse_ptr + first + i, mask=gmask, other=float("-inf"), cache_modifier=".cg"))
        m_sub = tl.where(m == float("-inf"), 0.0, m)
        for i in range(0, num_splits):
            acc, den = _add_split(acc, den, po_ptr, plse_ptr, first + i, m_sub, gmask, dd, dmask, D)
    else:
        # The interpreter cannot use a run-time value as a range bound (see the split loop).
        i = tl.zeros([], tl.int32)
        while i < num_splits:
            m = tl.maximum(m, tl.load(plse_ptr + first + i, mask=gmask, other=float("-inf"), cache_modifier=".cg"))
            i += 1
        m_sub = tl.where(m == float("-inf"), 0.0, m)
        i = tl.zeros([], tl.int32)
        while i < num_splits:
            acc, den = _add_split(acc, den, po_ptr, plse_ptr, first + i, m_sub, gmask, dd, dmask, D)
            i += 1
    out = acc / tl.where(den > 0.0, den, 1.0)[:, None]
    tl.store(o_rows, out.to(o_rows.dtype.element_ty), mask=gmask[:, None] & dmask[None, :])


@triton.jit
def _add_split(acc, den, po_ptr, plse_ptr, part, m_sub, gmask, dd, dmask, D: tl.constexpr):
    w = tl.math.exp2(tl.load(plse_ptr + part, mask=gmask, other=float("-inf"), cache_modifier=".cg") - m_sub)
    po = tl.load(po_ptr + part[:, None] * D + dd[None, :], mask=gmask[:, None] & dmask[None, :], other=0.0,
                 cache_modifier=".cg")
    return acc + w[:, None] * po, den + w
