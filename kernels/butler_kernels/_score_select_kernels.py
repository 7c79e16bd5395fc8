"""Triton kernels of score + exact top-k selection (see ``score_select.py`` for the launcher).

Imported lazily through ``_triton_loader.kernel_module``, in the mode Triton runs in.

Selection is a radix select on an order-preserving int32 key of the score, done in three launches
per call (two with ``SelectConfig.serial_cap=None``) plus one memset of a small int32 workspace.
The digits come from a **log-scale code** of the key (``_norm_code``): the signed octave of the
score (the float exponent, with the 23 subnormal octaves spread out as if they were normal)
followed by 14 mantissa bits. Its top 11 bits are the level-1 bin (4 bins per octave over the whole
float range, 4096 bins), the next 12 the level-2 digit. Multiplying every score by ``2^j`` shifts
every bin by ``4j``: the counts, and hence the work, do not depend on the scale of the scores.

1. ``_score_hist_kernel``, a few programs per (KV head, row), each striding over chunks of the
   row's candidates: reads the sketch once, scores the candidates, writes their keys (4 bytes per
   token instead of the 32-byte sketch row, so later passes are cheap) and histograms their
   level-1 bins. A 4096-bin histogram is too costly in registers, so each program keeps a 256-bin
   *window* of it in registers, anchored on the magnitudes of its first chunk (127 codes, 31.75
   octaves, per sign, plus the two zeros); candidates outside the window (rare: magnitudes 28
   octaves below or 3 above the first chunk's largest) are counted by a second pass of the
   program over its own keys, with an atomic each, when its window holds fewer than its chunks.
   The last program of a row to finish (ticket counter) turns the histogram into the
   threshold bin ``b1``: everything in bins above it is selected, the bin holds the boundary.
2. ``_compact_kernel``, same grid over the keys: stream-compacts candidates above ``b1`` straight
   into the output, copies the positions of the members of ``b1`` into a side buffer (and
   provisionally the first ones into the output's free slots), histograms their level-2 digits and
   tracks their min/max key. The last program of the row: when the members all fit or all tie,
   the provisional output is the answer; otherwise the level-2 threshold ``b2``, then either (at
   most ``serial_cap`` members) it splits the members itself and radix-selects among those of
   ``b2`` (they share 23 bits of the code: a handful of keys, ties aside), or it leaves the row to
3. ``_boundary_kernel``, a few programs per row over the side buffer: members above ``b2`` to the
   output, members of ``b2`` to a second side buffer (and provisionally to the output); the last
   program radix-selects among them unless they all fit or tie. Rows resolved earlier return at
   once. So a boundary bin crowded by the shape of the distribution (a large common offset, two
   close values) is split in parallel, never scanned by one program.

One launch may select for several layers at once (``score_select_triton`` with a leading layer
axis): grid axis 2 then runs over (layer, batch row) pairs, each with its own workspace row, so
the layers served by one predictor producer share one set of launches, tails and waves.

Nothing is ever sorted and no fp32 score goes back to memory. Every shape is static for a fixed
``k``, nothing syncs with the host, so the launch sequence is CUDA-graph capturable.
"""

import triton
import triton.language as tl

# Level-1 bins: 4096, the signed log-scale code of the key (see _norm_code). Per sign 1116 codes
# are in use: magnitude code 0 (zero), 4..95 (subnormal octaves), 96..1111 (normal), 1112..1115
# (inf, nan); +0 is bin 2048, -0 bin 2047, positive scores above, negative ones below.
NBG = tl.constexpr(4096)
NB2 = tl.constexpr(4096)  # level-2 digits: the next 12 bits of the code
NB_REFINE = tl.constexpr(256)  # digits per pass of the serial radix select
_MC_TOP = tl.constexpr(1115)  # largest magnitude code (a nan)
# Register window of the scoring programs: 256 bins = per sign 127 consecutive magnitude codes
# [base, base + 127) (31.75 octaves) plus one bin for each zero; base >= 1 (code 0 is zero).
_WIN = tl.constexpr(127)
_WIN_HEADROOM = tl.constexpr(12)  # the window ends 3 octaves above the first chunk's largest magnitude

# Workspace layout, int32 per (row, KV head); zeroed by the launcher before every call. The
# histogram holds the level-1 bins during scoring, then (zeroed by the scoring pass's last
# program) the level-2 digits during compaction.
WS_HIST = tl.constexpr(0)
WS_TICKET1 = tl.constexpr(4096)
WS_TICKET2 = tl.constexpr(4096 + 1)
WS_TICKET3 = tl.constexpr(4096 + 2)
WS_B1 = tl.constexpr(4096 + 3)
WS_A1 = tl.constexpr(4096 + 4)
# Slots taken above b1 (low word) and members of b1 (high word): one 64-bit counter, so that a
# compaction step reserves both with one atomic round trip (8-byte aligned: WS_STRIDE is even).
WS_CNT_ABOVE = tl.constexpr(4096 + 14)
WS_CNT_BIN = tl.constexpr(4096 + 15)
WS_BIN_MIN = tl.constexpr(4096 + 7)  # min / max key of the members of b1 (then of b2)
WS_BIN_MAX = tl.constexpr(4096 + 8)
WS_DEFERRED = tl.constexpr(4096 + 9)  # 1: the boundary pass resolves the row
WS_B2 = tl.constexpr(4096 + 10)
WS_A2 = tl.constexpr(4096 + 11)
WS_CNT_ABOVE2 = tl.constexpr(4096 + 12)
WS_CNT_BIN2 = tl.constexpr(4096 + 13)
# Work counters (read by tests and benchmarks through score_select.selection_work).
WS_N_CAND = tl.constexpr(4096 + 16)  # candidates of the row
WS_N_WINDOW = tl.constexpr(4096 + 17)  # candidates binned in the scoring programs' register windows
WS_N_PARALLEL = tl.constexpr(4096 + 18)  # boundary-bin members the boundary pass split in parallel
WS_N_SCAN = tl.constexpr(4096 + 19)  # boundary-bin members a row's last program scanned serially
WS_N_SELECT = tl.constexpr(4096 + 20)  # keys that entered the serial radix select
WS_N_PASSES = tl.constexpr(4096 + 21)  # radix passes of that select
WS_STRIDE = tl.constexpr(4096 + 24)

_INT32_MAX = tl.constexpr(2147483647)
_INT32_MIN = tl.constexpr(-2147483648)


@triton.jit
def _order_key(score):
    """int32 whose signed order is the float order of ``score`` (fp32)."""
    bits = score.to(tl.int32, bitcast=True)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


@triton.jit
def _norm_mag(key):
    """(negative, code): the sign of an order key and a 23-bit log-scale code of its magnitude,
    monotone: ``octave index << 14 | 14 mantissa bits``, where normal floats have octave index
    ``exponent + 23`` and a subnormal ``m * 2^-149`` the index ``bit_length(m)`` with the bits
    after its leading one as mantissa (its exact float conversion normalises it). Zero is 0."""
    neg = key < 0
    m = tl.where(neg, key ^ 0x7FFFFFFF, key) & 0x7FFFFFFF
    sub = (m.to(tl.float32).to(tl.int32, bitcast=True) >> 9) - (126 << 14)
    nm = tl.where(m >= (1 << 23), (m >> 9) + (23 << 14), sub)
    return neg, tl.where(m == 0, 0, nm)


@triton.jit
def _norm_code(key):
    """Signed log-scale code of an order key, monotone in the score: the magnitude code of
    ``_norm_mag``, negated (``-1 - code``) for negative scores. Bits 22.. are the level-1 bin
    (``>> 12``, offset by 2048), bits 11..0 the level-2 digit."""
    neg, nm = _norm_mag(key)
    return tl.where(neg, -1 - nm, nm)


@triton.jit
def _level1_bin(code):
    return (code >> 12) + 2048


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
def _threshold_bin_mem(ptr, need, NB: tl.constexpr, BLK: tl.constexpr, ZERO: tl.constexpr):
    """``_threshold_bin`` of ``NB`` bins in memory, loaded at once (one round trip) as
    ``NB / BLK`` blocks: the block holding the threshold first, then the bin inside it (a flat
    cumsum over 4096 bins spills): ``(t, above, total)``, ``t = -1`` when ``total < need``.
    ``ZERO``: clear the bins after reading them."""
    NBLK: tl.constexpr = NB // BLK
    blocks = tl.arange(0, NBLK)
    idx = blocks[:, None] * BLK + tl.arange(0, BLK)[None, :]
    h = tl.load(ptr + idx, cache_modifier=".cg")
    if ZERO:
        tl.store(ptr + idx, tl.zeros([NBLK, BLK], tl.int32))
    sums = tl.sum(h, axis=1)
    tb, above = _threshold_bin(sums, need, NBLK)
    t_in, above_in = _threshold_bin(tl.sum(tl.where(blocks[:, None] == tb, h, 0), axis=0), need - above, BLK)
    total = tl.sum(sums, 0)
    found = total >= need
    return tl.where(found, tb * BLK + t_in, -1), tl.where(found, above + above_in, total), total


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
def _layer_and_row(n_b):
    """``(pid, layer, b)``: grid axis 2 runs over layers x batch rows (``n_b`` rows per layer), so
    one launch selects for several layers; ``pid`` numbers the (layer, row) pairs."""
    pid = tl.program_id(2)
    j = pid // n_b
    return pid, j, pid - j * n_b


@triton.jit
def _window_bin(bin1, base):
    """Register-window bin of level-1 bins and whether it is in the window anchored at magnitude
    code ``base``. Window bins: 0..126 negative codes base+126..base, 127 -0, 128 +0, 129..255
    positive codes base..base+126, i.e. bin1 - 1921 + base, bin1 - 1920, bin1 - 1919 - base."""
    pos_lo = 2048 + base
    neg_hi = 2047 - base
    wbin = bin1 - tl.where(bin1 >= pos_lo, 1919 + base, tl.where(bin1 <= neg_hi, 1921 - base, 1920))
    in_win = (wbin >= 0) & (wbin < NB_REFINE) & ((bin1 >= pos_lo) | (bin1 <= neg_hi) | (((bin1 - 2047) >> 1) == 0))
    return wbin, in_win


@triton.jit
def _load_sketch_chunk(
    sk_ptr, stride_sk0, stride_sk1, stride_sk2, stride_skd, tt_ptr, stride_ttb, stride_ttt,
    b, h, c, lo, hi, dd, dmask, CHUNK: tl.constexpr, PAGED: tl.constexpr,
):
    """Sketch rows of chunk ``c`` of a row's candidates ``[lo, hi)``, as stored (masked: a chunk
    past the end loads nothing)."""
    offs = c * CHUNK + tl.arange(0, CHUNK)
    cand = (offs >= lo) & (offs < hi)
    if PAGED:
        slot = tl.load(tt_ptr + b.to(tl.int64) * stride_ttb + offs.to(tl.int64) * stride_ttt, mask=cand, other=0)
        rows = sk_ptr + slot.to(tl.int64) * stride_sk0 + h.to(tl.int64) * stride_sk1
    else:
        rows = sk_ptr + b.to(tl.int64) * stride_sk0 + h.to(tl.int64) * stride_sk1 + offs.to(tl.int64) * stride_sk2
    # The sketch is streamed exactly once: do not let it push the keys out of L2.
    return tl.load(
        rows[:, None, None] + dd * stride_skd,
        mask=cand[:, None, None] & dmask,
        other=0.0,
        eviction_policy="evict_first",
    )


@triton.jit
def _score_hist_kernel(
    q_ptr, stride_ql, stride_qb, stride_qh, stride_qd,
    sk_ptr, stride_skl, stride_sk0, stride_sk1, stride_sk2, stride_skd,
    tt_ptr, stride_ttb, stride_ttt,
    start_ptr, end_ptr, bpr_ptr,
    keys_ptr, ws_ptr,
    T, sinks, window, k, n_b,
    H_KV: tl.constexpr, GROUP: tl.constexpr, DP: tl.constexpr, BLOCK_DP: tl.constexpr,
    CHUNK: tl.constexpr, PAGED: tl.constexpr, HAS_BPR: tl.constexpr,
):
    h = tl.program_id(0)
    p = tl.program_id(1)
    pid, j, b = _layer_and_row(n_b)
    n_prog = tl.num_programs(1)
    row = pid * H_KV + h
    ws_row = ws_ptr + row.to(tl.int64) * WS_STRIDE
    lo, hi = _candidate_range(start_ptr, end_ptr, b, sinks, window, T)
    sk_ptr += j.to(tl.int64) * stride_skl
    # A sketch row is read as [pieces of 8]: one thread holds all of a candidate (two 16-byte
    # loads), so the dot product and everything after it run once per candidate; a [CHUNK, d']
    # tile would split each row over two threads and repeat the key and histogram work in both.
    dd = tl.arange(0, BLOCK_DP // 8)[None, :, None] * 8 + tl.arange(0, 8)[None, None, :]
    dmask = dd < DP
    q_row = q_ptr + j.to(tl.int64) * stride_ql + b.to(tl.int64) * stride_qb + h.to(tl.int64) * GROUP * stride_qh
    # One predictor head per KV head: its query stays in registers (the loop's key stores would
    # otherwise force a reload and conversion every chunk).
    q0 = tl.load(q_row + dd * stride_qd, mask=dmask, other=0.0).to(tl.float32)
    # Programs stride over the chunks of their row's candidates only: T is a capacity (a static
    # cache, SGLang's table width) that the rows may fill only partly, and unused chunks must cost
    # nothing, not even an idle program.
    hist = tl.zeros([NB_REFINE], tl.int32)
    base = tl.full([], -1, tl.int32)  # first magnitude code of the window; set by the first chunk
    n_mine = tl.zeros([], tl.int32)  # candidates of this program's chunks
    c = lo // CHUNK + p
    # The loop body is mostly integer work on the previous chunk's scores: the next chunk's sketch
    # is requested before it (double buffering), so a program always has a load in flight.
    sk_next = _load_sketch_chunk(
        sk_ptr, stride_sk0, stride_sk1, stride_sk2, stride_skd, tt_ptr, stride_ttb, stride_ttt,
        b, h, c, lo, hi, dd, dmask, CHUNK, PAGED,
    )
    while c * CHUNK < hi:
        offs = c * CHUNK + tl.arange(0, CHUNK)
        cand = (offs >= lo) & (offs < hi)
        sk = sk_next.to(tl.float32)
        sk_next = _load_sketch_chunk(
            sk_ptr, stride_sk0, stride_sk1, stride_sk2, stride_skd, tt_ptr, stride_ttb, stride_ttt,
            b, h, c + n_prog, lo, hi, dd, dmask, CHUNK, PAGED,
        )
        # max over the predictor heads of the GQA group; 1/sqrt(d') is a positive factor that
        # cannot change the order, so it is never applied.
        best = tl.full([CHUNK], float("-inf"), tl.float32)
        for g in tl.static_range(GROUP):
            qg = q0
            if GROUP > 1:
                qg = tl.load(q_row + g * stride_qh + dd * stride_qd, mask=dmask, other=0.0).to(tl.float32)
            best = tl.maximum(best, tl.sum(tl.sum(sk * qg, axis=2), axis=1))
        key = _order_key(best)
        tl.store(keys_ptr + row.to(tl.int64) * T + offs, key, mask=cand)
        bin1 = _level1_bin(_norm_code(key))
        if base < 0:
            # Anchor the window on this program's first chunk: its top sits 3 octaves above the
            # largest magnitude, so a scaled row gets a window shifted by the same octaves.
            mc = tl.where(bin1 >= 2048, bin1 - 2048, 2047 - bin1)
            top = tl.max(tl.where(cand, mc, 0), 0) + _WIN_HEADROOM
            base = tl.minimum(tl.maximum(top - (_WIN - 1), 1), _MC_TOP + 1 - _WIN)
        wbin, in_win = _window_bin(bin1, base)
        hist += tl.histogram(wbin, NB_REFINE, mask=cand & in_win)
        n_mine += tl.minimum(hi, c * CHUNK + CHUNK) - tl.maximum(lo, c * CHUNK)
        c += n_prog
    # Window bins back to level-1 bins (2047 - code for negative codes, 2048 + code for positive).
    wb = tl.arange(0, NB_REFINE)
    g1 = wb + tl.where(wb >= _WIN + 2, 1919 + base, tl.where(wb >= _WIN, 1920, 1921 - base))
    tl.atomic_add(ws_row + WS_HIST + g1, hist, mask=hist > 0, sem="relaxed")
    n_win = tl.sum(hist, 0)
    tl.atomic_add(ws_row + WS_N_WINDOW, n_win, sem="relaxed")
    if n_win < n_mine:
        # Candidates outside the window (rare unless a row mixes magnitudes 2^30 apart, or the
        # first chunk holds an outlier): a second pass over this program's own keys bins them with
        # one atomic each. Counting them here instead of a masked atomic per chunk keeps the
        # common loop free of atomics, which cost instruction issue even when masked off.
        tl.debug_barrier()  # the keys this program stored are visible to all of its threads
        c = lo // CHUNK + p
        while c * CHUNK < hi:
            offs = c * CHUNK + tl.arange(0, CHUNK)
            cand = (offs >= lo) & (offs < hi)
            key = tl.load(keys_ptr + row.to(tl.int64) * T + offs, mask=cand, other=0, cache_modifier=".cg")
            bin1 = _level1_bin(_norm_code(key))
            _, in_win = _window_bin(bin1, base)
            tl.atomic_add(ws_row + WS_HIST + bin1, 1, mask=cand & (in_win == 0), sem="relaxed")
            c += n_prog

    # Last program: every histogram update of the row is visible after the ticket.
    tl.debug_barrier()
    ticket = tl.atomic_add(ws_row + WS_TICKET1, 1, sem="acq_rel")
    if ticket == n_prog - 1:
        k_row = _row_budget(bpr_ptr, b, k, HAS_BPR)
        # Cleared as it is read: the compaction pass histograms the level-2 digits in its place.
        t, above, total = _threshold_bin_mem(ws_row + WS_HIST, k_row, NBG, NB_REFINE, True)
        # b1 = -1: every candidate fits the budget; b1 = NBG: nothing is selected.
        b1 = tl.where(total <= k_row, -1, t)
        a1 = tl.where(total <= k_row, total, above)
        b1 = tl.where(k_row <= 0, NBG, b1)
        a1 = tl.where(k_row <= 0, 0, a1)
        tl.store(ws_row + WS_B1, b1)
        tl.store(ws_row + WS_A1, a1)
        tl.store(ws_row + WS_N_CAND, total)
        tl.store(ws_row + WS_BIN_MIN, _INT32_MAX)
        tl.store(ws_row + WS_BIN_MAX, _INT32_MIN)


@triton.jit
def _bit_length(x):
    """Bit length of a non-negative int64 scalar below 2^40."""
    n = tl.zeros([], tl.int32)
    for j in tl.static_range(40):
        n += ((x >> j) > 0).to(tl.int32)
    return n


@triton.jit
def _load_members(pos_ptr, keys_row, i, n, BLOCK: tl.constexpr):
    """Block ``[i, i + BLOCK)`` of the ``n`` positions at ``pos_ptr`` (written by other programs:
    read from L2) and their keys: ``(offs, mask, pos, key)``."""
    offs = i + tl.arange(0, BLOCK)
    m = offs < n
    pos = tl.load(pos_ptr + offs, mask=m, other=0, cache_modifier=".cg")
    return offs, m, pos, tl.load(keys_row + pos, mask=m, other=0)


@triton.jit
def _append(out_row, stride_ok, written, pos, take):
    """Store the ``pos`` of the ``take`` entries at ``out_row[written:]`` in block order; returns
    ``written`` advanced by their count."""
    take_i = take.to(tl.int32)
    tl.store(out_row + (written + tl.cumsum(take_i, 0) - 1).to(tl.int64) * stride_ok, pos, mask=take)
    return written + tl.sum(take_i, 0)


@triton.jit
def _radix_narrow(hist, need, base, width, shift):
    """One pass of the serial radix select: the live key interval ``[base, base + width]``
    narrows to the digit bin (``hist`` of ``(key - base) >> shift``) holding the ``need``-th
    largest key; returns the new ``(need, base, width)``."""
    t, above = _threshold_bin(hist, need, NB_REFINE)
    t_lo = t.to(tl.int64) << shift
    one = tl.full([], 1, tl.int64)
    return need - above, base + t_lo, tl.minimum(width - t_lo, (one << shift) - 1)


@triton.jit
def _select_exact(pos_ptr, keys_row, n, need, out_row, stride_ok, written, BLOCK: tl.constexpr):
    """Write the ``need`` positions with the largest keys among the ``n`` positions at ``pos_ptr``
    (keys gathered from ``keys_row``) to ``out_row[written:]``; ties at the threshold are broken by
    buffer order. Returns ``written`` advanced by ``min(need, n)``, and the number of radix passes
    (-1 when no select was needed).

    Serial radix select: 8 bits per pass over the live key interval [base, base + width], starting
    from the members' own min/max so that a narrow set needs few passes and all-equal keys none."""
    passes = tl.full([], -1, tl.int32)
    if need >= n:
        i = tl.zeros([], tl.int32)
        while i < n:
            offs = i + tl.arange(0, BLOCK)
            m = offs < n
            pos = tl.load(pos_ptr + offs, mask=m, other=0, cache_modifier=".cg")
            tl.store(out_row + (written + offs).to(tl.int64) * stride_ok, pos, mask=m)
            i += BLOCK
        written += n
    elif (need > 0) & (n <= BLOCK):
        # The common case (a boundary sub-bin holds a handful of keys): one load, then every pass
        # in registers instead of a round trip to memory per pass.
        offs, m, pos, key = _load_members(pos_ptr, keys_row, 0, n, BLOCK)
        written, passes = _select_block(pos, key, m, need, out_row, stride_ok, written)
    elif need > 0:
        passes = tl.zeros([], tl.int32)
        kmin = tl.full([], _INT32_MAX, tl.int32)
        kmax = tl.full([], _INT32_MIN, tl.int32)
        i = tl.zeros([], tl.int32)
        while i < n:
            offs, m, pos, key = _load_members(pos_ptr, keys_row, i, n, BLOCK)
            kmin = tl.minimum(kmin, tl.min(tl.where(m, key, _INT32_MAX), 0))
            kmax = tl.maximum(kmax, tl.max(tl.where(m, key, _INT32_MIN), 0))
            i += BLOCK
        base = kmin.to(tl.int64)
        width = kmax.to(tl.int64) - base
        while width > 0:
            shift = tl.maximum(_bit_length(width) - 8, 0).to(tl.int64)
            hist = tl.zeros([NB_REFINE], tl.int32)
            i = tl.zeros([], tl.int32)
            while i < n:
                offs, m, pos, key = _load_members(pos_ptr, keys_row, i, n, BLOCK)
                key = key.to(tl.int64)
                live = m & (key >= base) & (key <= base + width)
                digit = tl.where(live, (key - base) >> shift, 0).to(tl.int32)
                hist += tl.histogram(digit, NB_REFINE, mask=live)
                i += BLOCK
            need, base, width = _radix_narrow(hist, need, base, width, shift)
            passes += 1
        thr = base.to(tl.int32)
        eq_seen = tl.zeros([], tl.int32)
        i = tl.zeros([], tl.int32)
        while i < n:
            offs, m, pos, key = _load_members(pos_ptr, keys_row, i, n, BLOCK)
            gt = m & (key > thr)
            eq = m & (key == thr)
            eq_i = eq.to(tl.int32)
            written = _append(out_row, stride_ok, written, pos, gt | (eq & (eq_seen + tl.cumsum(eq_i, 0) - 1 < need)))
            eq_seen += tl.sum(eq_i, 0)
            i += BLOCK
    return written, passes


@triton.jit
def _select_block(pos, key, m, need, out_row, stride_ok, written):
    """``_select_exact`` of the masked entries of one block held in registers (``1 <= need <``
    their count): the same radix passes and the same tie order (block order), with no memory round
    trip but the final stores. Returns ``(written + need, passes)``."""
    passes = tl.zeros([], tl.int32)
    base = tl.min(tl.where(m, key, _INT32_MAX), 0).to(tl.int64)
    width = tl.max(tl.where(m, key, _INT32_MIN), 0).to(tl.int64) - base
    key64 = key.to(tl.int64)
    while width > 0:
        shift = tl.maximum(_bit_length(width) - 8, 0).to(tl.int64)
        live = m & (key64 >= base) & (key64 <= base + width)
        digit = tl.where(live, (key64 - base) >> shift, 0).to(tl.int32)
        need, base, width = _radix_narrow(tl.histogram(digit, NB_REFINE, mask=live), need, base, width, shift)
        passes += 1
    thr = base.to(tl.int32)
    eq = m & (key == thr)
    take = (m & (key > thr)) | (eq & (tl.cumsum(eq.to(tl.int32), 0) - 1 < need))
    return _append(out_row, stride_ok, written, pos, take), passes


@triton.jit
def _split_serial(side, n, keys_row, out_row, stride_ok, written, need, b2, BLOCK: tl.constexpr):
    """One program resolves the boundary bin: its ``n`` members at ``side`` whose level-2 digit is
    above ``b2`` go to ``out_row[written:]`` and the serial radix select takes the ``need`` best of
    those in ``b2``. Returns ``(written, kept, passes)``, ``kept`` the members of ``b2``."""
    if n <= BLOCK:
        # One block: members, digits and the select stay in registers (the tail of every row at
        # batch >= 8 goes through here: each round trip saved is ~1 us per layer).
        offs, m, pos, key = _load_members(side, keys_row, 0, n, BLOCK)
        d2 = _norm_code(key) & (NB2 - 1)
        eq = m & (d2 == b2)
        written = _append(out_row, stride_ok, written, pos, m & (d2 > b2))
        kept = tl.sum(eq.to(tl.int32), 0)
        passes = tl.full([], -1, tl.int32)
        if need >= kept:
            written = _append(out_row, stride_ok, written, pos, eq)
        elif need > 0:
            written, passes = _select_block(pos, key, eq, need, out_row, stride_ok, written)
    else:
        # Members of b2 compacted in place to the front of the side buffer (a block is fully read
        # before the barrier and lands below its end), then the multi-block select.
        kept = tl.zeros([], tl.int32)
        i = tl.zeros([], tl.int32)
        while i < n:
            offs, m, pos, key = _load_members(side, keys_row, i, n, BLOCK)
            d2 = _norm_code(key) & (NB2 - 1)
            eq = m & (d2 == b2)
            eq_i = eq.to(tl.int32)
            written = _append(out_row, stride_ok, written, pos, m & (d2 > b2))
            tl.debug_barrier()
            tl.store(side + kept + tl.cumsum(eq_i, 0) - 1, pos, mask=eq)
            kept += tl.sum(eq_i, 0)
            i += BLOCK
        tl.debug_barrier()
        written, passes = _select_exact(side, keys_row, kept, need, out_row, stride_ok, written, BLOCK)
    return written, kept, passes


@triton.jit
def _pad_row(out_row, stride_ok, written, k, BLOCK: tl.constexpr):
    i = written + tl.zeros([], tl.int32)
    while i < k:
        offs = i + tl.arange(0, BLOCK)
        tl.store(out_row + offs.to(tl.int64) * stride_ok, tl.full([BLOCK], -1, tl.int32), mask=offs < k)
        i += BLOCK


@triton.jit
def _store_work(ws_row, n_scan, n_select, passes):
    tl.store(ws_row + WS_N_SCAN, n_scan)
    tl.store(ws_row + WS_N_SELECT, tl.where(passes >= 0, n_select, 0))
    tl.store(ws_row + WS_N_PASSES, tl.maximum(passes, 0))


@triton.jit
def _finish_row(ws_row, side, keys_row, out_row, stride_ok, k_row, k, serial_cap, BLOCK: tl.constexpr):
    """Last compaction program of a row: completes the row's output, or leaves a boundary bin of
    more than ``serial_cap`` members to the boundary pass (``b2`` and ``a2`` in the workspace)."""
    a1 = tl.load(ws_row + WS_A1)
    n = tl.load(ws_row + WS_CNT_BIN, cache_modifier=".cg")
    need = tl.maximum(k_row - a1, 0)
    written = a1
    n_scan = tl.zeros([], tl.int32)
    n_select = tl.zeros([], tl.int32)
    passes = tl.full([], -1, tl.int32)
    deferred = tl.zeros([], tl.int32)
    if need > 0:
        bin_min = tl.load(ws_row + WS_BIN_MIN, cache_modifier=".cg")
        bin_max = tl.load(ws_row + WS_BIN_MAX, cache_modifier=".cg")
        if (n <= need) | (bin_min == bin_max):
            # The compaction programs already wrote the first `need` members of b1 after the a1
            # positions above it: when they all fit, or all tie, that is the answer.
            written += tl.minimum(n, need)
        else:
            b2, a2, _ = _threshold_bin_mem(ws_row + WS_HIST, need, NB2, NB_REFINE, False)
            if n > serial_cap:
                # Too many members for one program: the boundary pass splits them in parallel.
                tl.store(ws_row + WS_B2, b2)
                tl.store(ws_row + WS_A2, a2)
                tl.store(ws_row + WS_BIN_MIN, _INT32_MAX)  # reused for the members of b2
                tl.store(ws_row + WS_BIN_MAX, _INT32_MIN)
                tl.store(ws_row + WS_DEFERRED, 1)
                tl.store(ws_row + WS_N_PARALLEL, n)
                deferred += 1
            else:
                written, n_select, passes = _split_serial(side, n, keys_row, out_row, stride_ok, written, need - a2, b2, BLOCK)
                n_scan = n
    if deferred == 0:
        _store_work(ws_row, n_scan, n_select, passes)
        _pad_row(out_row, stride_ok, written, k, BLOCK)


@triton.jit
def _compact_kernel(
    start_ptr, end_ptr, bpr_ptr, keys_ptr, ws_ptr, side_ptr,
    out_ptr, stride_ol, stride_ob, stride_oh, stride_ok,
    T, side_stride, sinks, window, k, serial_cap, n_b,
    H_KV: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, HAS_BPR: tl.constexpr,
):
    tl.static_assert(CHUNK < 65536, "the packed compaction counts need CHUNK < 2^16")
    h = tl.program_id(0)
    p = tl.program_id(1)
    pid, j, b = _layer_and_row(n_b)
    n_prog = tl.num_programs(1)
    row = pid * H_KV + h
    ws_row = ws_ptr + row.to(tl.int64) * WS_STRIDE
    out_row = out_ptr + j.to(tl.int64) * stride_ol + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
    keys_row = keys_ptr + row.to(tl.int64) * T
    side = side_ptr + row.to(tl.int64) * side_stride
    b1 = tl.load(ws_row + WS_B1)
    a1 = tl.load(ws_row + WS_A1)
    k_row = _row_budget(bpr_ptr, b, k, HAS_BPR)
    need = k_row - a1  # boundary slots: the members of b1 provisionally fill [a1, a1 + need)
    out_bnd = out_row + a1.to(tl.int64) * stride_ok
    lo, hi = _candidate_range(start_ptr, end_ptr, b, sinks, window, T)
    if b1 >= NBG:  # nothing to select: skip straight to the ticket
        hi = lo
    c = lo // CHUNK + p
    # Each step waits on one atomic round trip: the next chunk's keys are requested before it.
    offs_next = c * CHUNK + tl.arange(0, CHUNK)
    key_next = tl.load(keys_row + offs_next, mask=(offs_next >= lo) & (offs_next < hi), other=0)
    cnt_ptr = (ws_row + WS_CNT_ABOVE).to(tl.pointer_type(tl.int64), bitcast=True)
    while c * CHUNK < hi:
        offs = c * CHUNK + tl.arange(0, CHUNK)
        cand = (offs >= lo) & (offs < hi)
        key = key_next
        offs_next = offs + n_prog * CHUNK
        key_next = tl.load(keys_row + offs_next, mask=(offs_next >= lo) & (offs_next < hi), other=0)
        code = _norm_code(key)
        bin1 = _level1_bin(code)
        above = cand & (bin1 > b1)
        member = cand & (bin1 == b1)
        # One scan and one sum for both stream compactions (the kernel is bound by instruction
        # issue, and each scan costs barriers): counts above b1 in the low 16 bits, members of b1
        # in the high ones (CHUNK < 2^16).
        packed = above.to(tl.int32) | (member.to(tl.int32) << 16)
        rank = tl.cumsum(packed, 0)
        counts = tl.sum(packed, 0)
        n_above = counts & 0xFFFF
        n_member = counts >> 16
        if counts != 0:
            # Both reservations in one round trip; the low word never carries into the high one
            # (its total is a1 < 2^31).
            bases = tl.atomic_add(cnt_ptr, n_above.to(tl.int64) | (n_member.to(tl.int64) << 32), sem="relaxed")
            # The count above b1 is exactly a1 < k_row <= k: these slots never overflow.
            dst = (bases & 0xFFFFFFFF).to(tl.int32) + (rank & 0xFFFF) - 1
            tl.store(out_row + dst.to(tl.int64) * stride_ok, offs, mask=above)
            if n_member > 0:
                slot = (bases >> 32).to(tl.int32) + (rank >> 16) - 1
                tl.store(side + slot, offs, mask=member)
                # Provisional boundary: final when the members all fit or all tie (see _finish_row).
                tl.store(out_bnd + slot.to(tl.int64) * stride_ok, offs, mask=member & (slot < need))
                kmin = tl.min(tl.where(member, key, _INT32_MAX), 0)
                kmax = tl.max(tl.where(member, key, _INT32_MIN), 0)
                tl.atomic_min(ws_row + WS_BIN_MIN, kmin, sem="relaxed")
                tl.atomic_max(ws_row + WS_BIN_MAX, kmax, sem="relaxed")
                d_lo = _norm_code(kmin) & (NB2 - 1)
                d_hi = _norm_code(kmax) & (NB2 - 1)
                if d_lo == d_hi:  # one digit (ties, a narrow bin): one atomic instead of n_member
                    tl.atomic_add(ws_row + WS_HIST + d_lo, n_member, sem="relaxed")
                else:
                    tl.atomic_add(ws_row + WS_HIST + (code & (NB2 - 1)), 1, mask=member, sem="relaxed")
        c += n_prog

    tl.debug_barrier()
    ticket = tl.atomic_add(ws_row + WS_TICKET2, 1, sem="acq_rel")
    if ticket == n_prog - 1:
        _finish_row(ws_row, side, keys_row, out_row, stride_ok, k_row, k, serial_cap, BLOCK)


@triton.jit
def _boundary_kernel(
    bpr_ptr, keys_ptr, ws_ptr, side_ptr,
    out_ptr, stride_ol, stride_ob, stride_oh, stride_ok,
    T, k, n_b,
    H_KV: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, HAS_BPR: tl.constexpr,
):
    """Rows whose boundary bin was too crowded for one program (``_finish_row``): split its members
    by their level-2 digit in parallel. Members above ``b2`` go to the output, members of ``b2``
    after them in the side buffer (and provisionally into the output, final if they all fit or
    tie); the last program radix-selects among those. Other rows return at once."""
    h = tl.program_id(0)
    p = tl.program_id(1)
    pid, j, b = _layer_and_row(n_b)
    n_prog = tl.num_programs(1)
    row = pid * H_KV + h
    ws_row = ws_ptr + row.to(tl.int64) * WS_STRIDE
    if tl.load(ws_row + WS_DEFERRED) != 0:
        out_row = out_ptr + j.to(tl.int64) * stride_ol + b.to(tl.int64) * stride_ob + h.to(tl.int64) * stride_oh
        keys_row = keys_ptr + row.to(tl.int64) * T
        side = side_ptr + row.to(tl.int64) * (2 * T)  # [members of b1 | members of b2]
        side2 = side + T
        n = tl.load(ws_row + WS_CNT_BIN)
        a1 = tl.load(ws_row + WS_A1)
        b2 = tl.load(ws_row + WS_B2)
        a2 = tl.load(ws_row + WS_A2)
        k_row = _row_budget(bpr_ptr, b, k, HAS_BPR)
        need2 = k_row - a1 - a2
        out_gt = out_row + a1.to(tl.int64) * stride_ok
        out_eq = out_row + (a1 + a2).to(tl.int64) * stride_ok
        c = p
        while c * CHUNK < n:
            _, m, pos, key = _load_members(side, keys_row, c * CHUNK, n, CHUNK)
            d2 = _norm_code(key) & (NB2 - 1)
            gt = m & (d2 > b2)
            gt_i = gt.to(tl.int32)
            n_gt = tl.sum(gt_i, 0)
            if n_gt > 0:  # exactly a2 of them in all
                base = tl.atomic_add(ws_row + WS_CNT_ABOVE2, n_gt, sem="relaxed")
                tl.store(out_gt + (base + tl.cumsum(gt_i, 0) - 1).to(tl.int64) * stride_ok, pos, mask=gt)
            eq = m & (d2 == b2)
            eq_i = eq.to(tl.int32)
            n_eq = tl.sum(eq_i, 0)
            if n_eq > 0:
                base = tl.atomic_add(ws_row + WS_CNT_BIN2, n_eq, sem="relaxed")
                slot = base + tl.cumsum(eq_i, 0) - 1
                tl.store(side2 + slot, pos, mask=eq)
                tl.store(out_eq + slot.to(tl.int64) * stride_ok, pos, mask=eq & (slot < need2))
                tl.atomic_min(ws_row + WS_BIN_MIN, tl.min(tl.where(eq, key, _INT32_MAX), 0), sem="relaxed")
                tl.atomic_max(ws_row + WS_BIN_MAX, tl.max(tl.where(eq, key, _INT32_MIN), 0), sem="relaxed")
            c += n_prog

        tl.debug_barrier()
        ticket = tl.atomic_add(ws_row + WS_TICKET3, 1, sem="acq_rel")
        if ticket == n_prog - 1:
            n2 = tl.load(ws_row + WS_CNT_BIN2, cache_modifier=".cg")
            bin_min = tl.load(ws_row + WS_BIN_MIN, cache_modifier=".cg")
            bin_max = tl.load(ws_row + WS_BIN_MAX, cache_modifier=".cg")
            written = a1 + a2
            n_scan = tl.zeros([], tl.int32)
            n_select = tl.zeros([], tl.int32)
            passes = tl.full([], -1, tl.int32)
            if (n2 <= need2) | (bin_min == bin_max):
                written += tl.minimum(n2, need2)
            else:
                written, passes = _select_exact(side2, keys_row, n2, need2, out_row, stride_ok, written, BLOCK)
                n_select = n2
            _store_work(ws_row, n_scan, n_select, passes)
            _pad_row(out_row, stride_ok, written, k, BLOCK)
