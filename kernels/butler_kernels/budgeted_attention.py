"""Decode attention over sinks + window + selected positions (``reference.attended_positions``).

Equals ``reference.budgeted_attention`` (and ``reference.dense_decode_attention`` when the
selection covers every candidate) up to floating-point rounding. ``budgeted_attention_triton``
launches the flash-decoding kernels of ``_attention_kernels``; K/V are read only at the attended
positions, once per GQA group.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from butler_kernels._checks import check_attention, check_out, check_split_counters
from butler_kernels._triton_loader import Launch, num_sms, run_launches, scratch, triton_interpreted

__all__ = ["AttentionConfig", "NewSketch", "default_attention_config", "budgeted_attention_triton"]

_KERNELS = "_attention_kernels"
_LOG2E = 1.4426950408889634


class NewSketch(NamedTuple):
    """A decode step's sketch write, folded into its attention launch: the sketch of each row's
    new key ``keys [B, H_kv, D]`` by the layer's ``weight [H_kv, D, d']``, stored at slot ``loc[b]``
    of ``pool [slots, H_kv, d']`` (``reference.write_sketch``; any strides). The attention does not
    read it: it saves the write its own launch (~2 us per layer and step in the SGLang server)."""

    pool: torch.Tensor
    loc: torch.Tensor
    keys: torch.Tensor
    weight: torch.Tensor


def check_attention_call(
    q, k_buf, v_buf, sel, start, end, token_table, sinks, window, split_counters=None, new_sketch: NewSketch | None = None,
) -> tuple[int, int, int, int]:
    """``check_attention`` plus the optional counters and sketch write of one call (the launcher's
    and the ops' checks); returns ``(B, H_kv, group, D)``."""
    from butler_kernels.sketch_write import check_sketch_write

    b, h_kv, group, d = check_attention(q, k_buf, v_buf, sel, start, end, token_table, sinks, window)
    if split_counters is not None:
        check_split_counters(split_counters, b * h_kv, q.device)
    if new_sketch is not None:
        pool, loc, keys, weight = new_sketch
        check_sketch_write(pool, loc, keys, weight)
        if tuple(keys.shape) != (b, h_kv, d):
            raise ValueError(f"new_sketch.keys must be [B, H_kv, D] = {[b, h_kv, d]} (one new token per row), got {list(keys.shape)}")
        if keys.device != q.device:
            raise ValueError(f"new_sketch is on {keys.device}, q on {q.device}")
    return b, h_kv, group, d


@dataclass(frozen=True)
class AttentionConfig:
    """Launch parameters of the split kernel. ``num_splits`` is an upper bound: a split holds at
    least one block of ``block_n`` attended entries."""

    num_splits: int = 1
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 2

    def __post_init__(self) -> None:
        if self.num_splits < 1:
            raise ValueError(f"AttentionConfig.num_splits must be >= 1, got {self.num_splits}")
        if self.block_n < 16 or self.block_n & (self.block_n - 1):
            raise ValueError(f"AttentionConfig.block_n must be a power of two >= 16, got {self.block_n}")


def default_attention_config(
    rows: int, attended: int, head_dim: int, device, sms: int | None = None, dtype: torch.dtype = torch.bfloat16,
    paged: bool = False,
) -> AttentionConfig:
    """Enough splits for ~4 programs per SM, but at least two blocks per split so that the merge
    and the per-program Q load stay small next to the K/V traffic. fp32 K/V (no tensor cores)
    takes half the block and twice the warps, which keeps it from spilling registers. From 64
    rows (batch 8 of 8 KV heads) blocks of 32 are 8-11% faster on the H100 (``bench_kernels.py
    --tune``, batch 8-16 x 32K-128K); below, 64 with more splits. Gathering from a paged pool
    (SGLang's) adds a dependent table load before each K/V block, and from 64 rows a third
    pipeline stage hides it: 5% faster at 8 and 16 x 32K (``bench_kernels.py --layout paged --batch 8 16
    --context 32768 --budget 0.1 --window 128 --tune``, ``benchmarks/results/bench_kernels_tune_paged_h100.log``)."""
    wide = head_dim > 128 or dtype == torch.float32
    block_n = 32 if wide or rows >= 64 else 64
    sms = sms if sms is not None else num_sms(device)
    max_splits = max(1, -(-attended // (2 * block_n)))
    splits = min(max(1, -(-4 * sms // max(rows, 1))), max_splits)
    stages = 3 if paged and not wide and rows >= 64 else 2
    return AttentionConfig(num_splits=splits, block_n=block_n, num_warps=8 if dtype == torch.float32 else 4,
                           num_stages=stages)


def budgeted_attention_triton(
    q: torch.Tensor,
    k_buf: torch.Tensor,
    v_buf: torch.Tensor,
    sel: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    *,
    sinks: int,
    window: int,
    scale: float,
    token_table: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    config: AttentionConfig | None = None,
    split_counters: torch.Tensor | None = None,
    new_sketch: NewSketch | None = None,
) -> torch.Tensor:
    """``q [B, H_q, D]`` attends to sinks + window + ``sel [B, H_kv, n]`` (``-1`` = empty) of K/V,
    dense ``[B, H_kv, T, D]`` (any strides) or paged ``[slots, H_kv, D]`` with ``token_table
    [B, T]``. Returns ``[B, H_q, D]`` in ``q``'s dtype, written to ``out`` (any strides) when given.
    CPU tensors run in the Triton interpreter. A row with nothing to attend to (``start == end``
    and no selection) gets zeros.

    ``split_counters``: a zeroed contiguous int32 tensor of at least ``B * H_kv`` elements, which
    the kernel leaves zeroed, for the tickets of its splits; reusable by every call on one stream
    (two launches running at once must not share it). Without it each call zeroes a new one, an
    extra fill launch. ``new_sketch``: the step's sketch write (:class:`NewSketch`), done by the
    same launch."""
    b, h_kv, group, d = check_attention_call(
        q, k_buf, v_buf, sel, start, end, token_table, sinks, window, split_counters, new_sketch
    )
    device = q.device
    hq = q.shape[1]
    if out is None:
        out = torch.empty((b, hq, d), dtype=q.dtype, device=device)
    else:
        check_out("out", out, (b, hq, d), q.dtype, device)
    if b == 0:
        return out
    cfg = config or default_attention_config(
        b * h_kv, sinks + window + sel.shape[-1], d, device, dtype=q.dtype, paged=k_buf.dim() == 3
    )
    launches = attention_launches(
        q, k_buf, v_buf, sel, start, end, token_table, sinks, window, scale, out, cfg, split_counters, new_sketch
    )
    run_launches(_KERNELS, launches)
    return out


def attention_launches(
    q, k_buf, v_buf, sel, start, end, token_table, sinks, window, scale, out, cfg: AttentionConfig, split_counters=None,
    new_sketch: NewSketch | None = None,
) -> list[Launch]:
    """Scratch buffers and kernel launches of one attention call (checked arguments, B >= 1).
    Separate from the launch itself so that ``_compile_check`` builds exactly what runs."""
    device = q.device
    b, hq, d = q.shape
    h_kv = k_buf.shape[1]
    start, end = start.contiguous(), end.contiguous()  # indexed with unit stride
    group = hq // h_kv
    n_sel = sel.shape[-1]
    blocks = max(1, -(-(sinks + window + n_sel) // cfg.block_n))
    n_iters = -(-blocks // cfg.num_splits)
    num_splits = -(-blocks // n_iters)
    interpreted = triton_interpreted()
    paged = k_buf.dim() == 3
    if paged:
        k_strides = (k_buf.stride(0), k_buf.stride(1), 0, k_buf.stride(2))
        v_strides = (v_buf.stride(0), v_buf.stride(1), 0, v_buf.stride(2))
        tt, tt_strides = token_table, (token_table.stride(0), token_table.stride(1))
    else:
        k_strides, v_strides = tuple(k_buf.stride()), tuple(v_buf.stride())
        tt, tt_strides = start, (0, 0)  # never read: any valid pointer
    if num_splits > 1:
        part_out = scratch((b, hq, num_splits, d), torch.float32, device)
        part_lse = scratch((b, hq, num_splits), torch.float32, device)
        counters = split_counters if split_counters is not None else torch.zeros(b * h_kv, dtype=torch.int32, device=device)
    else:
        part_out = part_lse = counters = out  # never read or written: the split kernel writes out itself
    block_d = max(16, 1 << (d - 1).bit_length())
    if new_sketch is not None:
        pool, loc, keys, weight = new_sketch
        dp = weight.shape[2]
        sketch_args = (keys, *keys.stride(), loc, loc.stride(0), weight, *weight.stride(), pool, *pool.stride())
    else:
        dp = 1
        sketch_args = (q, 0, 0, 0, start, 0, q, 0, 0, 0, q, 0, 0, 0)  # never read: any valid pointers
    return [
        Launch(
            "_attn_split_kernel", (h_kv, num_splits, b),
            (q, *q.stride(), k_buf, *k_strides, v_buf, *v_strides, tt, *tt_strides, sel, *sel.stride(),
             start, end, part_out, part_lse, counters, out, *out.stride(), *sketch_args,
             n_sel, sinks, window, num_splits, float(scale) * _LOG2E),
            dict(
                GROUP=group, G_PAD=max(16, 1 << (group - 1).bit_length()), D=d, BLOCK_D=block_d, BLOCK_N=cfg.block_n,
                DIRECT=num_splits == 1, COUNTED_LOOP=not interpreted, PAGED=paged, IEEE_DOT=q.dtype == torch.float32,
                # Triton 3.6's interpreter multiplies bf16 dot operands as their raw uint16
                # storage: interpreted runs feed the same (bf16-rounded) values as fp32.
                UPCAST_DOT=interpreted and q.dtype == torch.bfloat16,
                WRITE_SKETCH=new_sketch is not None, DP=dp, BLOCK_DP=max(16, 1 << (dp - 1).bit_length()),
                num_warps=cfg.num_warps, num_stages=cfg.num_stages,
            ),
        )
    ]
