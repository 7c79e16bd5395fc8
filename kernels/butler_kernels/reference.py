"""Plain-torch reference of TokenButler's budgeted decode: score, select, attend.

This module *is* the definition of the decode policy. The transformers path runs it on CPU (and
wherever the Triton kernels do not apply), the Triton kernels are tested against it, and the SGLang
backend calls the same functions. Nothing here depends on transformers or SGLang.

Conventions shared by every function and kernel of the package
--------------------------------------------------------------
* A batch has ``B`` rows. Row ``b`` may attend to the positions ``[start[b], end[b])`` of its
  sequence; ``end[b] - 1`` is the token being decoded. ``start`` absorbs left padding and sliding
  windows, ``end`` the current length (static caches hold unwritten slots beyond it).
* ``S`` sinks, ``W`` window, budget ``k``. The window is ``[max(start, end - W), end)`` (so it
  always holds the current token when ``W >= 1``), the sinks are ``[start, min(start + S, win_lo))``
  and the candidates are the rest, ``[sink_hi, win_lo)``. The three sets are disjoint, so no
  position is ever attended twice.
* Selection: the top ``k`` candidates by predicted score, per (row, KV head). Slots with no
  candidate left hold ``-1``. A row whose context fits in ``S + W + k`` therefore attends to every
  position: the dense fallback is part of the definition, not a special case.
* Layouts. A cache tensor is either *dense* ``[B, H_kv, T, X]`` (transformers; position ``p`` of row
  ``b`` is ``[b, :, p]``) or *paged* ``[slots, H_kv, X]`` (SGLang's KV pool; position ``p`` of row
  ``b`` lives in slot ``token_table[b, p]``).
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "policy_ranges",
    "gather_positions",
    "score_tokens",
    "select_topk",
    "expand_neighbors",
    "attended_positions",
    "budgeted_attention",
    "dense_decode_attention",
    "budget_for_rows",
    "project_sketch",
    "write_sketch",
    "unrotate_keys",
    "rotate_pairs",
    "residual_layer_norm",
]


def policy_ranges(start: torch.Tensor, end: torch.Tensor, sinks: int, window: int):
    """Return ``(sink_hi, win_lo)``: sinks are ``[start, sink_hi)``, candidates ``[sink_hi, win_lo)``,
    the window ``[win_lo, end)``."""
    win_lo = torch.maximum(start, end - window)
    sink_hi = torch.minimum(start + sinks, win_lo)
    return sink_hi, win_lo


def budget_for_rows(budget: int | float, start: torch.Tensor, end: torch.Tensor, max_budget: int,
                    fixed: int = 0) -> torch.Tensor | None:
    """Per-row selected slots for a fractional budget: ``ceil(f * context) - fixed`` (``fixed``: the sinks +
    window the budget also counts), in ``[0, max_budget]``; ``None`` for an integer budget, which is the same
    for every row."""
    if isinstance(budget, float):
        ctx = (end - start).to(torch.float64)
        return torch.clamp(torch.ceil(ctx * budget) - fixed, min=0, max=max_budget).to(torch.int64)
    return None


def gather_positions(buf: torch.Tensor, token_table: torch.Tensor | None, length: int | None = None) -> torch.Tensor:
    """View any cache layout as dense ``[B, H_kv, T, X]``.

    ``buf`` dense: returned as is. ``buf`` paged ``[slots, H_kv, X]``: gathered through
    ``token_table [B, T]`` (entries past a row's ``end`` may be any valid slot index)."""
    if buf.dim() == 4:
        return buf if length is None else buf[:, :, :length]
    if token_table is None:
        raise ValueError("a paged cache buffer [slots, H_kv, X] needs token_table [B, T] to map positions to slots")
    table = token_table if length is None else token_table[:, :length]
    return buf[table.long()].permute(0, 2, 1, 3)  # [B, T, H, X] -> [B, H, T, X]


def score_tokens(q_sel: torch.Tensor, sketch: torch.Tensor, num_kv_heads: int) -> torch.Tensor:
    """Predicted importance of every cached token, per KV head: ``<q~, k~> / sqrt(d')``.

    q_sel: ``[B, *rows, H_sel, d']`` with ``H_sel`` a multiple of ``num_kv_heads`` (``rows`` is empty
    at decode; training and evaluation score many query rows at once). When the predictor emits one
    query per *query* head, the scores of a KV head's group are max-reduced (one shared selection
    per KV head is what makes the gather cheap).
    sketch: dense ``[B, H_kv, T, d']``. Returns float32 ``[B, *rows, H_kv, T]``.
    """
    *lead, h_sel, d = q_sel.shape
    if h_sel % num_kv_heads:
        raise ValueError(f"{h_sel} predictor heads do not group evenly over {num_kv_heads} KV heads")
    group = h_sel // num_kv_heads
    q = q_sel.float().reshape(*lead, num_kv_heads, group, d)
    s = torch.einsum("b...hgd,bhtd->b...hgt", q, sketch.float()) / math.sqrt(d)
    return s.amax(dim=-2)


def select_topk(
    scores: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    sinks: int,
    window: int,
    budget: int,
    budget_per_row: torch.Tensor | None = None,
) -> torch.Tensor:
    """Top-``budget`` candidates per (row, KV head) by score.

    scores: ``[B, H_kv, T]`` over positions ``0..T-1``. Returns int64 positions ``[B, H_kv, budget]``
    in descending score order, ``-1`` where a row has fewer candidates (or a smaller
    ``budget_per_row``)."""
    b, h, t = scores.shape
    k = min(budget, t)
    sink_hi, win_lo = policy_ranges(start, end, sinks, window)
    pos = torch.arange(t, device=scores.device)
    cand = (pos >= sink_hi[:, None]) & (pos < win_lo[:, None])  # [B, T]
    masked = scores.float().masked_fill(~cand[:, None, :], float("-inf"))
    top = torch.topk(masked, k, dim=-1)
    ok = torch.isfinite(top.values)
    if budget_per_row is not None:
        ok &= torch.arange(k, device=scores.device) < budget_per_row[:, None, None]
    sel = torch.where(ok, top.indices, torch.full_like(top.indices, -1))
    if k < budget:
        sel = torch.cat([sel, sel.new_full((b, h, budget - k), -1)], dim=-1)
    return sel


def expand_neighbors(
    sel: torch.Tensor, start: torch.Tensor, end: torch.Tensor, sinks: int, window: int, length: int
) -> torch.Tensor:
    """Neighbor fetching for prediction intervals > 1 (TokenButler v2, cluster-aware).

    Each run of consecutive selected positions ``[a, a + c)`` is extended by its own length: every
    member ``p`` adds ``p + c``. A neighbor is kept if it is a candidate, not already selected and
    not added twice. ``length`` bounds the positions (the cache length). Returns
    ``[B, H_kv, 2 * budget]`` positions (``-1`` for empty slots); the first half is ``sel`` unchanged.
    Cheap next to attention, and run only when the selection is refreshed.
    """
    b, h, k = sel.shape
    sink_hi, win_lo = policy_ranges(start, end, sinks, window)
    t = length
    member = torch.zeros(b, h, t + 1, dtype=torch.bool, device=sel.device)
    valid = sel >= 0
    member.scatter_(2, torch.where(valid, sel, t).long(), True)
    member[..., t] = False
    # run length through p = length of the run ending at p + length of the run starting at p - 1
    m = member.to(torch.int64)
    idx = torch.arange(t + 1, device=sel.device)
    # distance to the previous non-member (left) and next non-member (right)
    left_break = torch.where(~member, idx, torch.full_like(idx, -1)).cummax(dim=-1).values
    right_break = torch.where(~member, idx, torch.full_like(idx, t)).flip(-1).cummin(dim=-1).values.flip(-1)
    run = (right_break - left_break - 1) * m
    s = torch.where(valid, sel, 0).long()
    neigh = s + run.gather(2, s)
    ok = valid & (neigh >= sink_hi[:, None, None]) & (neigh < win_lo[:, None, None])
    ok &= ~member.gather(2, neigh.clamp(max=t))
    # the same neighbor reached from two runs: keep its first occurrence
    neigh = torch.where(ok, neigh, -1)
    sorted_n, order = torch.sort(neigh, dim=-1)
    dup = torch.zeros_like(ok)
    dup_sorted = torch.cat([torch.zeros_like(sorted_n[..., :1], dtype=torch.bool), sorted_n[..., 1:] == sorted_n[..., :-1]], -1)
    dup.scatter_(2, order, dup_sorted & (sorted_n >= 0))
    neigh = torch.where(dup, -1, neigh)
    return torch.cat([sel, neigh.to(sel.dtype)], dim=-1)


def attended_positions(
    sel: torch.Tensor, start: torch.Tensor, end: torch.Tensor, sinks: int, window: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Positions a decode step reads, per (row, KV head): sinks, then the window, then ``sel``.

    Returns ``(pos [B, H_kv, S + W + n], valid [B, H_kv, S + W + n])``; invalid entries hold 0."""
    b, h, _ = sel.shape
    sink_hi, win_lo = policy_ranges(start, end, sinks, window)
    ar_s = torch.arange(sinks, device=sel.device)
    ar_w = torch.arange(window, device=sel.device)
    sink_pos = start[:, None] + ar_s
    sink_ok = sink_pos < sink_hi[:, None]
    win_pos = win_lo[:, None] + ar_w
    win_ok = win_pos < end[:, None]
    fixed_pos = torch.cat([sink_pos, win_pos], -1)[:, None, :].expand(b, h, -1)
    fixed_ok = torch.cat([sink_ok, win_ok], -1)[:, None, :].expand(b, h, -1)
    pos = torch.cat([fixed_pos, sel.to(fixed_pos.dtype)], -1)
    ok = torch.cat([fixed_ok, sel >= 0], -1)
    return torch.where(ok, pos, 0), ok


def budgeted_attention(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    sel: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    sinks: int,
    window: int,
    scale: float,
    token_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """Decode attention of ``q [B, H_q, D]`` over sinks + window + ``sel`` only.

    Gathers just the attended K/V rows (the rest of the cache is never read), accumulates in
    float32 and returns ``[B, H_q, D]`` in ``q``'s dtype."""
    b, hq, d = q.shape
    h_kv = k_buf.shape[-3] if k_buf.dim() == 4 else k_buf.shape[1]
    group = hq // h_kv
    pos, ok = attended_positions(sel, start, end, sinks, window)  # [B, H_kv, n]
    n = pos.shape[-1]
    if k_buf.dim() == 4:
        idx = pos[..., None].expand(b, h_kv, n, k_buf.shape[-1])
        k = k_buf.gather(2, idx)
        v = v_buf.gather(2, pos[..., None].expand(b, h_kv, n, v_buf.shape[-1]))
    else:
        if token_table is None:
            raise ValueError("paged K/V buffers need token_table")
        slots = token_table.long().gather(1, pos.reshape(b, -1)).view(b, h_kv, n)
        heads = torch.arange(h_kv, device=q.device)[None, :, None]
        k = k_buf[slots, heads]  # [B, H_kv, n, D]
        v = v_buf[slots, heads]
    qg = q.float().view(b, h_kv, group, d)
    logits = torch.einsum("bhgd,bhnd->bhgn", qg, k.float()) * scale
    logits = logits.masked_fill(~ok[:, :, None, :], float("-inf"))
    p = torch.softmax(logits, dim=-1)
    out = torch.einsum("bhgn,bhnd->bhgd", p, v.float())
    return out.reshape(b, hq, v.shape[-1]).to(q.dtype)


def dense_decode_attention(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    scale: float,
    token_table: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dense decode attention over ``[start, end)``: what budgeted attention must equal when the
    budget covers the context."""
    k = gather_positions(k_buf, token_table)
    v = gather_positions(v_buf, token_table)
    b, hq, d = q.shape
    h_kv, t = k.shape[1], k.shape[2]
    pos = torch.arange(t, device=q.device)
    ok = (pos >= start[:, None]) & (pos < end[:, None])
    qg = q.float().view(b, h_kv, hq // h_kv, d)
    logits = torch.einsum("bhgd,bhtd->bhgt", qg, k.float()) * scale
    logits = logits.masked_fill(~ok[:, None, None, :], float("-inf"))
    out = torch.einsum("bhgt,bhtd->bhgd", torch.softmax(logits, -1), v.float())
    return out.reshape(b, hq, v.shape[-1]).to(q.dtype)


def unrotate_keys(keys: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Undo the base model's rotary embedding: ``keys [..., D]`` post-RoPE, ``cos``/``sin`` ``[..., D/2]``
    (broadcastable) the base's angles at the keys' positions -> the pre-RoPE keys.

    The layout is Llama's and Mistral's "rotate half" (transformers, and SGLang's neox style): dimension
    ``i < D/2`` pairs with ``i + D/2``. A position-consistent sketch (predictor format 2) starts from these
    keys, so that a key's sketch does not depend on where in the context it sits."""
    half = keys.shape[-1] // 2
    k1, k2 = keys[..., :half], keys[..., half:]
    return torch.cat([k1 * cos + k2 * sin, k2 * cos - k1 * sin], dim=-1)


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Rotate the ``d'/2`` pairs ``(j, j + d'/2)`` of ``x [..., d']`` by the base's rotary angle of frequency
    ``pairs[j]`` (an index into the base's ``D/2`` frequencies; ``-1``: not rotated) at the positions whose
    ``cos``/``sin`` ``[..., D/2]`` are given.

    Applied to a key's sketch at the key's position and to a predicted query at the query's position, it
    makes the score ``<q~, k~>`` depend on the two positions only through their distance, as the base's own
    attention logits do: the predictor sees no absolute position."""
    half = x.shape[-1] // 2
    idx = pairs.clamp(min=0)
    rotated = (pairs >= 0).to(x.dtype)
    c = cos.index_select(-1, idx).to(x.dtype) * rotated + (1 - rotated)
    s = sin.index_select(-1, idx).to(x.dtype) * rotated
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1)


def project_sketch(keys: torch.Tensor, weight: torch.Tensor, rope: tuple | None = None) -> torch.Tensor:
    """Sketch of keys: ``keys [n, H_kv, D]`` (post-RoPE), ``weight [H_kv, D, d']`` (a layer's
    ``ButlerPredictor.key_proj``) -> ``[n, H_kv, d']`` in ``keys``' dtype, computed in ``weight``'s
    dtype (``ButlerPredictor.project_keys`` in the token-major layout of a KV pool).

    ``rope = (cos, sin, pairs)`` (predictor format 2): ``cos``/``sin`` ``[n, D/2]`` the base's rotary angles
    at the keys' positions, ``pairs [d'/2]`` the predictor's ``rope_pairs``: the keys are un-rotated before
    the projection and the sketch rotated after it (:func:`unrotate_keys`, :func:`rotate_pairs`)."""
    k = keys.to(weight.dtype)
    if rope is not None:
        cos, sin, pairs = rope
        k = unrotate_keys(k, cos[:, None].to(weight.dtype), sin[:, None].to(weight.dtype))
    out = torch.einsum("nhd,hde->nhe", k, weight)
    if rope is not None:
        out = rotate_pairs(out, cos[:, None].to(weight.dtype), sin[:, None].to(weight.dtype), pairs)
    return out.to(keys.dtype)


def write_sketch(pool: torch.Tensor, loc: torch.Tensor, keys: torch.Tensor, weight: torch.Tensor,
                 rope: tuple | None = None) -> None:
    """Store the sketch of ``keys [n, H_kv, D]`` into the paged sketch ``pool [slots, H_kv, d']`` at
    slots ``loc [n]`` (in place, rounded to the pool's dtype); ``rope`` as in :func:`project_sketch`."""
    pool[loc.long()] = project_sketch(keys, weight, rope).to(pool.dtype)


def residual_layer_norm(
    hidden: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """A producer's input norm where the base defers its residual add (SGLang's decoder layers):
    ``layer_norm(hidden + residual)``, the sum rounded to ``hidden``'s dtype first, in that dtype."""
    x = hidden if residual is None else hidden + residual
    return torch.nn.functional.layer_norm(x, (x.shape[-1],), weight.to(x.dtype), None if bias is None else bias.to(x.dtype), eps)
