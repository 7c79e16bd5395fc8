"""Triton kernels of score + exact top-k selection (see ``score_select.py`` for the launcher).

Imported lazily through ``_triton_loader.kernel_module``, in the mode Triton runs in.

Selection is a radix select on an order-preserving int32 key of the score, done in two launches
per call plus one memset of a small int32 workspace:

1. ``_score_hist_kernel``, a few programs per (KV head, row), each striding over chunks of the
   row's candidates: reads the sketch once, scores the candidates, writes their keys (4 bytes per token instead of the 32-byte sketch
   row, so later passes are cheap) and adds a 256-bin histogram of a coarse, monotone bin of the
   key to the row's histogram. The last program of a row to finish (ticket counter) turns the
   histogram into the threshold bin ``b1``: everything in bins above it is selected, the bin
   itself holds the boundary.
2. ``_compact_kernel``, same grid over the keys: stream-compacts candidates above ``b1`` straight
   into the output, copies the positions of the members of ``b1`` into a side buffer and
   histograms their keys on the next 12 bits. The last program of a row resolves the boundary
   exactly: a 4096-bin threshold on that second histogram, then a serial radix select on what is
   left (usually a handful of keys), then ``-1`` padding.

Nothing is ever sorted and no fp32 score goes back to memory. Every shape is static for a fixed
``k``, nothing syncs with the host, so the launch sequence is CUDA-graph capturable.
"""

import triton
import triton.language as tl

# Coarse bins (level 1): 128 per sign. Magnitudes in [2^-15, 2^16) get 4 bins per octave (the
# exponent and the top 2 mantissa bits); smaller magnitudes share bin "0" and larger ones bin
# "huge" on each side. Keys in one regular bin share their top 11 bits, so the next 12 bits are a
# valid second-level digit; the two clamped bins per sign fall back to the serial select.
NB1 = tl.constexpr(256)
NB2 = tl.constexpr(4096)
NB_REFINE = tl.constexpr(256)
_CODE_LO = tl.constexpr((127 - 15) * 4)  # (exponent, 2 mantissa bits) code of 2^-15
_NREG = tl.constexpr(31 * 4)  # regular bins per sign: 31 octaves x 4
_FINE_SHIFT = tl.constexpr(9)  # level-2 digit: key bits [20:9]

# Workspace layout, int32 per (row, KV head); zeroed by the launcher before every call.
WS_HIST1 = tl.constexpr(0)
WS_HIST2 = tl.constexpr(256)
WS_TICKET1 = tl.constexpr(256 + 4096)
WS_TICKET2 = tl.constexpr(256 + 4096 + 1)
WS_B1 = tl.constexpr(256 + 4096 + 2)
WS_A1 = tl.constexpr(256 + 4096 + 3)
WS_CNT_ABOVE = tl.constexpr(256 + 4096 + 4)
WS_CNT_BIN = tl.constexpr(256 + 4096 + 5)
WS_STRIDE = tl.constexpr(256 + 4096 + 8)

_INT32_MAX = tl.constexpr(2147483647)
_INT32_MIN = tl.constexpr(-2147483648)


@triton.jit
def _order_key(score):
    """int32 whose signed order is the float order of ``score`` (fp32)."""
    bits = score.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _coarse_bin(key):
    """Monotone map of an order key to [0, NB1): see the comment on NB1."""
    neg = key < 0
    mag = tl.where(neg, key ^ 0x7FFFFFFF, key) & 0x7FFFFFFF
    code = mag >> 21
    mc = tl.minimum(tl.maximum(code - (_CODE_LO - 1), 0), _NREG + 1)
    return tl.where(neg, 127 - mc, 128 + mc)


@triton.jit
def _is_regular_bin(b):
    mc = tl.where(b >= 128, b - 128, 127 - b)
    return (mc >= 1) & (mc <= _NREG)


@triton.jit
def _fine_digit(key):
    return (key >> _FINE_SHIFT) & (NB2 - 1)


@triton.jit
def _threshold_bin(hist, need, NB: tl.constexpr):
    """Largest bin ``t`` whose suffix count (bins >= t) reaches ``need`` (>= 1, <= total), and the
    count of the bins strictly above it."""
    cum = tl.cumsum(hist, 0)
    total = tl.sum(hist, 0)
    suffix = total - cum + hist
    idx = tl.arange(0, NB)
    t = tl.max(tl.where(suffix >= need, idx, -1), 0)
    above = tl.sum(tl.where(idx > t, hist, 0), 0)
    return t, above


@triton.jit
def _candidate_range(start_ptr, end_ptr, b, sinks, window, T):
    """``[lo, hi)``: the candidates of ``reference.policy_ranges``, clipped to the cache."""
    st = tl.load(start_ptr + b).to(tl.int32)
    en = tl.load(end_ptr + b).to(tl.int32)
    win_lo = tl.maximum(st, en - window)
    sink_hi = tl.minimum(st + sinks, win_lo)
    return tl.maximum(sink_hi, 0), tl.minimum(win_lo, T)


@triton.jit
def _row_budget(bpr_ptr, b, k, HAS_BPR: tl.constexpr):
    k_row = k
    if HAS_BPR:
        k_row = tl.minimum(tl.maximum(tl.load(bpr_ptr + b).to(tl.int32), 0), k)
    return k_row


@triton.jit
def _score_hist_kernel(
    q_ptr, stride_qb, stride_qh, stride_qd,
    sk_ptr, stride_sk0, stride_sk1, stride_sk2, stride_skd,
    tt_ptr, stride_ttb, stride_ttt,
    start_ptr, end_ptr, bpr_ptr,
    keys_ptr, ws_ptr,
    T, sinks, window, k,
    H_KV: tl.constexpr, GROUP: tl.constexpr, DP: tl.constexpr, BLOCK_DP: tl.constexpr,
    CHUNK: tl.constexpr, PAGED: tl.constexpr, HAS_BPR: tl.constexpr,
):
    h = tl.program_id(0)
    p = tl.program_id(1)
    b = tl.program_id(2)
    n_prog = tl.num_programs(1)
    row = b * H_KV + h
    ws_row = ws_ptr + row.to(tl.int64) * WS_STRIDE
    lo, hi = _candidate_range(start_ptr, end_ptr, b, sinks, window, T)
    dd = tl.arange(0, BLOCK_DP)
    dmask = dd < DP
    # Programs stride over the chunks of their row's candidates only: T is a capacity (a static
    # cache, SGLang's table width) that the rows may fill only partly, and unused chunks must cost
    # nothing, not even an idle program.
    hist = tl.zeros([NB1], tl.int32)
    c = lo // CHUNK + p
    while c * CHUNK < hi:
        offs = c * CHUNK + tl.arange(0, CHUNK)
        cand = (offs >= lo) & (offs < hi)
        if PAGED:
            slot = tl.load(tt_ptr + b.to(tl.int64) * stride_ttb + offs.to(tl.int64) * stride_ttt, mask=cand, other=0)
            rows = sk_ptr + slot.to(tl.int64) * stride_sk0 + h.to(tl.int64) * stride_sk1
        else:
            rows = sk_ptr + b.to(tl.int64) * stride_sk0 + h.to(tl.int64) * stride_sk1 + offs.to(tl.int64) * stride_sk2
        # The sketch is streamed exactly once: do not let it push the keys out of L2.
        sk = tl.load(
            rows[:, None] + dd[None, :] * stride_skd,
            mask=cand[:, None] & dmask[None, :],
            other=0.0,
            eviction_policy="evict_first",
        ).to(tl.float32)
        # max over the predictor heads of the GQA group; 1/sqrt(d') is a positive factor that
        # cannot change the order, so it is never applied.
        best = tl.full([CHUNK], float("-inf"), tl.float32)
        for g in tl.static_range(GROUP):
            qg = tl.load(
                q_ptr + b.to(tl.int64) * stride_qb + (h * GROUP + g) * stride_qh + dd * stride_qd,
                mask=dmask,
                other=0.0,
            ).to(tl.float32)
            best = tl.maximum(best, tl.sum(sk * qg[None, :], axis=1))
        key = _order_key(best)
        tl.store(keys_ptr + row.to(tl.int64) * T + offs, key, mask=cand)
        hist += tl.histogram(_coarse_bin(key), NB1, mask=cand)
        c += n_prog
    tl.atomic_add(ws_row + WS_HIST1 + tl.arange(0, NB1), hist, mask=hist > 0, sem="relaxed")

    # Last program of the row: every histogram update of the row is visible after the ticket.
    tl.debug_barrier()
    ticket = tl.atomic_add(ws_row + WS_TICKET1, 1, sem="acq_rel")
    if ticket == n_prog - 1:
        hist = tl.load(ws_row + WS_HIST1 + tl.arange(0, NB1), cache_modifier=".cg")
        k_row = _row_budget(bpr_ptr, b, k, HAS_BPR)
        total = tl.sum(hist, 0)
        t, above = _threshold_bin(hist, k_row, NB1)
        # b1 = -1: every candidate fits the budget; b1 = NB1: nothing is selected.
        b1 = tl.where(total <= k_row, -1, t)
        a1 = tl.where(total <= k_row, total, above)
        b1 = tl.where(k_row <= 0, NB1, b1)
        a1 = tl.where(k_row <= 0, 0, a1)
        tl.store(ws_row + WS_B1, b1)
        tl.store(ws_row + WS_A1, a1)


@triton.jit
def _bit_length(x):
    """Bit length of a non-negative int64 scalar below 2^40."""
    n = tl.zeros([], tl.int32)
    for j in tl.static_range(40):
        n += ((x >> j) > 0).to(tl.int32)
    return n


@triton.jit
def _select_exact(pos_ptr, keys_row, n, need, out_row, stride_ok, written, BLOCK: tl.constexpr):
    """Write the ``need`` positions with the largest keys among the ``n`` positions at ``pos_ptr``
    (keys gathered from ``keys_row``) to ``out_row[written:]``; ties at the threshold are broken by
    buffer order. Returns ``written`` advanced by ``min(need, n)``.

    Serial radix select: 8 bits per pass over the live key interval [base, base + width], starting
    from the members' own min/max so that a narrow set needs few passes and all-equal keys none."""
    if need >= n:
        i = tl.zeros([], tl.int32)
        while i < n:
            offs = i + tl.arange(0, BLOCK)
            m = offs < n
            pos = tl.load(pos_ptr + offs, mask=m, other=0, cache_modifier=".cg")
            tl.store(out_row + (written + offs).to(tl.int64) * stride_ok, pos, mask=m)
            i += BLOCK
        written += n
    elif need > 0:
        kmin = tl.full([], _INT32_MAX, tl.int32)
        kmax = tl.full([], _INT32_MIN, tl.int32)
        i = tl.zeros([], tl.int32)
        while i < n:
            offs = i + tl.arange(0, BLOCK)
            m = offs < n
            pos = tl.load(pos_ptr + offs, mask=m, other=0, cache_modifier=".cg")
            key = tl.load(keys_row + pos, mask=m, other=0)
            kmin = tl.minimum(kmin, tl.min(tl.where(m, key, _INT32_MAX), 0))
            kmax = tl.maximum(kmax, tl.max(tl.where(m, key, _INT32_MIN), 0))
            i += BLOCK
        base = kmin.to(tl.int64)
        width = kmax.to(tl.int64) - base
        one = tl.full([], 1, tl.int64)
        while width > 0:
            shift = tl.maximum(_bit_length(width) - 8, 0).to(tl.int64)
            hist = tl.zeros([NB_REFINE], tl.int32)
            i = tl.zeros([], tl.int32)
            while i < n:
                offs = i + tl.arange(0, BLOCK)
                m = offs < n
                pos = tl.load(pos_ptr + offs, mask=m, other=0, cache_modifier=".cg")
                key = tl.load(keys_row + pos, mask=m, other=0).to(tl.int64)
                live = m & (key >= base) & (key <= base + width)
                digit = tl.where(live, (key - base) >> shift, 0).to(tl.int32)
                hist += tl.histogram(digit, NB_REFINE, mask=live)
                i += BLOCK
            t, above = _threshold_bin(hist, need, NB_REFINE)
            need -= above
            t_lo = t.to(tl.int64) << shift
            base += t_lo
            width = tl.minimum(width - t_lo, (one << shift) - 1)
        thr = base.to(tl.int32)
        eq_seen = tl.zeros([], tl.int32)
        i = tl.zeros([], tl.int32)
        while i < n:
            offs = i + tl.arange(0, BLOCK)
            m = offs < n
            pos = tl.load(pos_ptr + offs, mask=m, other=0, cache_modifier=".cg")
            key = tl.load(keys_row + pos, mask=m, other=0)
            gt = m & (key > thr)
            eq = m & (key == thr)
            eq_i = eq.to(tl.int32)
            take = gt | (eq & (eq_seen + tl.cumsum(eq_i, 0) - 1 < need))
            take_i = take.to(tl.int32)
            dst = written + tl.cumsum(take_i, 0) - 1
            tl.store(out_row + dst.to(tl.int64) * stride_ok, pos, mask=take)
            written += tl.sum(take_i, 0)
            eq_seen += tl.sum(eq_i, 0)
            i += BLOCK
    return written


@triton.jit
def _finish_row(ws_row, side, keys_row, out_row, stride_ok, b1, k_row, k, BLOCK: tl.constexpr):
    a1 = tl.load(ws_row + WS_A1)
    n = tl.load(ws_row + WS_CNT_BIN, cache_modifier=".cg")
    need = tl.maximum(k_row - a1, 0)
    written = a1
    if need > 0:
        if _is_regular_bin(b1):
            hist2 = tl.load(ws_row + WS_HIST2 + tl.arange(0, NB2), cache_modifier=".cg")
            b2, a2 = _threshold_bin(hist2, need, NB2)
            # Members above b2 are selected; members in b2 are compacted in place to the front of
            # the side buffer (a block is fully read before the barrier and lands below its end).
            kept = tl.zeros([], tl.int32)
            i = tl.zeros([], tl.int32)
            while i < n:
                offs = i + tl.arange(0, BLOCK)
                m = offs < n
                pos = tl.load(side + offs, mask=m, other=0, cache_modifier=".cg")
                d2 = _fine_digit(tl.load(keys_row + pos, mask=m, other=0))
                gt = m & (d2 > b2)
                eq = m & (d2 == b2)
                gt_i = gt.to(tl.int32)
                eq_i = eq.to(tl.int32)
                tl.store(out_row + (written + tl.cumsum(gt_i, 0) - 1).to(tl.int64) * stride_ok, pos, mask=gt)
                written += tl.sum(gt_i, 0)
                tl.debug_barrier()
                tl.store(side + kept + tl.cumsum(eq_i, 0) - 1, pos, mask=eq)
                kept += tl.sum(eq_i, 0)
                i += BLOCK
            tl.debug_barrier()
            n = kept
            need = need - a2
        written = _select_exact(side, keys_row, n, need, out_row, stride_ok, written, BLOCK)
    i = written + tl.zeros([], tl.int32)
    while i < k:
        offs = i + tl.arange(0, BLOCK)
        tl.store(out_row + offs.to(tl.int64) * stride_ok, tl.full([BLOCK], -1, tl.int32), mask=offs < k)
        i += BLOCK


@triton.jit
def _compact_kernel(
    start_ptr, end_ptr, bpr_ptr, keys_ptr, ws_ptr, side_ptr,
    out_ptr, stride_ob, stride_oh, stride_ok,
    T, sinks, window, k,
    H_KV: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, HAS_BPR: tl.constexpr,
):
    h = tl.program_id(0)
    p = tl.program_id(1)
    b = tl.program_id(2)
    n_prog = tl.num_programs(1)
    row = b * H_KV + h
    ws_row = ws_ptr + row.to(tl.int64) * WS_STRIDE
    out_row = out_ptr + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    keys_row = keys_ptr + row.to(tl.int64) * T
    side = side_ptr + row.to(tl.int64) * T
    b1 = tl.load(ws_row + WS_B1)
    lo, hi = _candidate_range(start_ptr, end_ptr, b, sinks, window, T)
    if b1 >= NB1:  # nothing to select: skip straight to the ticket
        hi = lo
    c = lo // CHUNK + p
    while c * CHUNK < hi:
        offs = c * CHUNK + tl.arange(0, CHUNK)
        cand = (offs >= lo) & (offs < hi)
        key = tl.load(keys_row + offs, mask=cand, other=0)
        digit = _coarse_bin(key)
        above = cand & (digit > b1)
        above_i = above.to(tl.int32)
        n_above = tl.sum(above_i, 0)
        if n_above > 0:
            # The count above b1 is exactly a1 < k_row <= k: these slots never overflow.
            base = tl.atomic_add(ws_row + WS_CNT_ABOVE, n_above, sem="relaxed")
            dst = base + tl.cumsum(above_i, 0) - 1
            tl.store(out_row + dst.to(tl.int64) * stride_ok, offs, mask=above)
        member = cand & (digit == b1)
        member_i = member.to(tl.int32)
        n_member = tl.sum(member_i, 0)
        if n_member > 0:
            base = tl.atomic_add(ws_row + WS_CNT_BIN, n_member, sem="relaxed")
            tl.store(side + base + tl.cumsum(member_i, 0) - 1, offs, mask=member)
            if _is_regular_bin(b1):
                tl.atomic_add(ws_row + WS_HIST2 + _fine_digit(key), 1, mask=member, sem="relaxed")
        c += n_prog

    tl.debug_barrier()
    ticket = tl.atomic_add(ws_row + WS_TICKET2, 1, sem="acq_rel")
    if ticket == n_prog - 1:
        k_row = _row_budget(bpr_ptr, b, k, HAS_BPR)
        _finish_row(ws_row, side, keys_row, out_row, stride_ok, b1, k_row, k, BLOCK)
