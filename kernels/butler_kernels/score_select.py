"""Score every candidate position with the predictor and keep the exact top-k per (row, KV head).

Same result (as a set, ties aside) as ``reference.select_topk(reference.score_tokens(...))``:
candidates ``[sink_hi, win_lo)`` of ``reference.policy_ranges``, scores ``<q~, sketch> / sqrt(d')``
max-reduced over the predictor heads of a GQA group, ``-1`` where a row has fewer candidates than
its budget. Unlike the reference the order of the positions is unspecified.

``score_select_triton`` launches the kernels of ``_score_select_kernels`` (exact radix select, no
sort, no fp32 score round trip); ``score_select_reference`` composes the reference functions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from butler_kernels import reference
from butler_kernels._checks import check_out, check_score_select_layers
from butler_kernels._triton_loader import Launch, num_sms, run_launches, scratch

__all__ = [
    "SelectConfig",
    "SelectionWork",
    "default_select_config",
    "layers_per_launch",
    "score_select_triton",
    "score_select_reference",
    "selection_work",
    "workspace_bytes",
]

_KERNELS = "_score_select_kernels"
# The kernel module's WS_STRIDE and first work counter (tests check that both agree).
_WS_STRIDE = 4096 + 24
_WS_N_CAND = 4096 + 16
_N_COUNTERS = 6
_INT32_MAX = 2**31 - 1


@dataclass(frozen=True)
class SelectConfig:
    """Launch parameters of the two selection kernels (powers of two)."""

    chunk_score: int = 1024  # positions per scoring step
    chunk_compact: int = 2048  # positions per compaction step
    chunk_boundary: int = 256  # boundary-bin members per step of the boundary pass
    block_finish: int = 1024  # vector width of the serial end-of-row select
    warps_score: int = 8
    warps_compact: int = 8
    programs_per_row: int = 0  # per (row, KV head) and kernel; 0: ~5 per SM in all (one scoring wave)
    # Boundary bins of more members than this are split by a third, parallel pass instead of the
    # row's last compaction program; None: never (two launches, one program always finishes).
    serial_cap: int | None = 2048

    def __post_init__(self) -> None:
        for name in ("chunk_score", "chunk_compact", "chunk_boundary", "block_finish"):
            v = getattr(self, name)
            if v < 16 or v & (v - 1):
                raise ValueError(f"SelectConfig.{name} must be a power of two >= 16, got {v}")
        if self.serial_cap is not None and self.serial_cap < 0:
            raise ValueError(f"SelectConfig.serial_cap must be >= 0 or None, got {self.serial_cap}")


def default_select_config(rows: int, length: int, device, sms: int | None = None) -> SelectConfig:
    """Scoring chunks of 256 positions over 4 warps: the per-chunk histogram merges across warps, so
    fewer warps per program cost fewer barriers, and the 72-80 registers of a thread (the chunk being
    binned plus the next one in flight; ``python -m butler_kernels._compile_check``) let an SM hold
    five to seven programs. Tuned on the H100
    (``bench_kernels.py --tune``: 15-23% faster selection at batch 8-16 than 1024-position chunks
    over 8 warps). Chunks halve at short contexts so that every SM still gets a few programs.
    Compaction steps are longer, at 128 registers (two programs of 8 warps per SM).

    The boundary pass splits a crowded boundary bin (~5% of a row's candidates for Gaussian-like
    scores) over programs of 256 members each; below 64 rows (batch 1-7 of 8 KV heads) it takes
    every bin of more than 512 members, because there the serial end of the row is the step's
    critical path. Measured on the H100 against 2048-member steps and a cap of 2048 at every batch
    (``bench_kernels.py --layout paged --profile``, ``benchmarks/results/bench_kernels_paged_*``):
    the boundary pass 14.4 -> 11.2 us at 1 x 128K, 21.6 -> 18.7 at 8 x 128K, 34.4 -> 31.5 at
    16 x 128K; compaction + boundary 17.4 -> 15.9 us at 1 x 32K; the rest within noise."""
    target = 3 * (sms if sms is not None else num_sms(device))
    chunk = 256
    while chunk > 128 and rows * -(-length // chunk) < target:
        chunk //= 2
    return SelectConfig(chunk_score=chunk, chunk_compact=2048, warps_score=max(2, chunk // 64), warps_compact=8,
                        serial_cap=512 if rows < 64 else 2048)


def layers_per_launch(rows_per_layer: int, max_rows: int = 256) -> int:
    """How many layers one selection launch should take when a caller has several to select at
    once (``rows_per_layer``: batch x KV heads): up to ``max_rows`` (row, KV head) pairs in all.
    Below that the layers share launches, waves and serial tails; beyond it the scoring needs a
    second wave. Measured on the H100 (``benchmarks/bench_select_layers.py``, 4 layers of 8 KV
    heads at 10%, ``benchmarks/results/bench_select_layers_h100.log``): per layer 25.9 -> 12.6 us
    at batch 1 x 32K, 71.9 -> 55.4 at 8 x 32K (256 rows), 221.1 -> 193.5 at 8 x 128K, but
    120.1 -> 119.3 at 16 x 32K and 404.0 -> 437.8 at 16 x 128K (512 rows)."""
    return max(1, max_rows // max(rows_per_layer, 1))


def workspace_bytes(batch: int, num_kv_heads: int, length: int, boundary_pass: bool = True) -> int:
    """Scratch memory one call allocates (keys, boundary positions, histograms): per (row, KV head,
    position of the cache or table) 4 bytes of key and 8 of boundary positions (4 without the
    boundary pass, ``SelectConfig.serial_cap=None``), plus ~16 KB per (row, KV head). A call over
    L layers takes L times this."""
    rows = batch * num_kv_heads
    return rows * ((3 if boundary_pass else 2) * max(length, 1) + _WS_STRIDE) * 4


def score_select_triton(
    q_sel: torch.Tensor,
    sketch: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    *,
    sinks: int,
    window: int,
    k: int,
    token_table: torch.Tensor | None = None,
    budget_per_row: torch.Tensor | None = None,
    index_dtype: torch.dtype = torch.int32,
    out: torch.Tensor | None = None,
    config: SelectConfig | None = None,
) -> torch.Tensor:
    """Top-``k`` candidate positions ``[B, H_kv, k]`` (``index_dtype``), ``-1`` padded.

    q_sel ``[B, H_sel, d']``; sketch dense ``[B, H_kv, T, d']`` (any strides) or paged
    ``[slots, H_kv, d']`` with ``token_table [B, T]`` (fastest stored head-major, i.e. a transposed
    ``[H_kv, slots, d']`` tensor: see docs/kernels.md); ``budget_per_row [B]`` (clamped to
    ``[0, k]``) lowers the budget of single rows. ``out`` (any strides) receives the result, e.g. a
    buffer kept across CUDA-graph replays. CPU tensors run in the Triton interpreter.

    Several layers in one call: ``q_sel [L, B, H_sel, d']`` with the layers' sketches stacked
    (dense ``[L, B, H_kv, T, d']`` or paged ``[L, slots, H_kv, d']``, any strides) returns ``[L, B,
    H_kv, k]``, layer ``j`` equal to the call on ``q_sel[j], sketch[j]``: the same kernels over
    ``L`` times the rows, in one set of launches."""
    out, _ = _select(q_sel, sketch, start, end, token_table, budget_per_row, sinks, window, k, index_dtype, out, config, False)
    return out


def _select(
    q_sel, sketch, start, end, token_table, budget_per_row, sinks, window, k, index_dtype, out, config, keep_workspace: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Check, allocate and launch one selection; with ``keep_workspace`` also return the zeroed-then-
    filled workspace (``[rows, _WS_STRIDE]`` int32: histograms, tickets, work counters)."""
    n_layers, b, h_kv, t, _ = check_score_select_layers(
        q_sel, sketch, start, end, token_table, budget_per_row, sinks, window, k, index_dtype
    )
    device = q_sel.device
    shape = (b, h_kv, k) if n_layers is None else (n_layers, b, h_kv, k)
    if out is None:
        out = torch.empty(shape, dtype=index_dtype, device=device)
    else:
        check_out("out", out, shape, index_dtype, device)
    rows = b * h_kv * (n_layers or 1)
    ws = torch.zeros((rows, _WS_STRIDE), dtype=torch.int32, device=device) if keep_workspace else None
    if k > 0 and b > 0:
        cfg = config or default_select_config(rows, t, device)
        run_launches(
            _KERNELS, select_launches(q_sel, sketch, start, end, token_table, budget_per_row, sinks, window, k, out, cfg, ws)
        )
    return out, ws


def select_launches(
    q_sel, sketch, start, end, token_table, budget_per_row, sinks, window, k, out, cfg: SelectConfig, ws=None
) -> list[Launch]:
    """Scratch buffers and the kernel launches of one selection (checked arguments, k >= 1): score,
    compact and, unless ``cfg.serial_cap`` is None, the boundary pass.
    Separate from the launch itself so that ``_compile_check`` builds exactly what runs. ``ws``: a
    zeroed ``[rows, _WS_STRIDE]`` int32 workspace to use (``selection_work`` reads it back).
    With a leading layer axis (``q_sel [L, B, H_sel, d']``, ``out [L, B, H_kv, k]``) the grid's
    last axis runs over the L x B (layer, row) pairs."""
    device = q_sel.device
    layered = q_sel.dim() == 4
    if layered:
        # Layer strides apart, every layer is a call of its own: [L, ...] -> strides of layer 0.
        q_l, sk_l, out_l = q_sel.stride(0), sketch.stride(0), out.stride(0)
        n_layers, q_sel, sketch, out = q_sel.shape[0], q_sel[0], sketch[0], out[0]
    else:
        q_l = sk_l = out_l = 0
        n_layers = 1
    b, h_kv = out.shape[0], out.shape[1]
    rows = b * h_kv * n_layers
    # The kernels index the per-row vectors with unit stride (a no-op for the usual tensors).
    start, end = start.contiguous(), end.contiguous()
    if budget_per_row is not None:
        budget_per_row = budget_per_row.contiguous()
    paged = sketch.dim() == 3
    t = token_table.shape[1] if paged else sketch.shape[2]
    if ws is None:
        ws = torch.zeros((rows, _WS_STRIDE), dtype=torch.int32, device=device)
    # max(t, 1): an empty cache still needs valid pointers.
    keys = scratch((rows, max(t, 1)), torch.int32, device)
    # Positions of the boundary bin's members; with the boundary pass, then those of its sub-bin.
    side_stride = (1 if cfg.serial_cap is None else 2) * max(t, 1)
    side = scratch((rows, side_stride), torch.int32, device)
    if paged:
        sk_strides = (sketch.stride(0), sketch.stride(1), 0, sketch.stride(2))
        tt, tt_strides = token_table, (token_table.stride(0), token_table.stride(1))
    else:
        sk_strides = tuple(sketch.stride())
        tt, tt_strides = start, (0, 0)  # never read: any valid pointer
    has_bpr = budget_per_row is not None
    bpr = budget_per_row if has_bpr else start
    dp = q_sel.shape[-1]
    n1 = _programs_per_row(t, cfg.chunk_score, rows, device, cfg.programs_per_row)
    n2 = _programs_per_row(t, cfg.chunk_compact, rows, device, cfg.programs_per_row)
    serial_cap = _INT32_MAX if cfg.serial_cap is None else min(cfg.serial_cap, _INT32_MAX)
    lb = n_layers * b
    launches = [
        Launch(
            "_score_hist_kernel", (h_kv, n1, lb),
            (q_sel, q_l, *q_sel.stride(), sketch, sk_l, *sk_strides, tt, *tt_strides, start, end, bpr, keys, ws,
             t, sinks, window, k, b),
            dict(H_KV=h_kv, GROUP=q_sel.shape[1] // h_kv, DP=dp, BLOCK_DP=max(16, _next_pow2(dp)),
                 CHUNK=cfg.chunk_score, PAGED=paged, HAS_BPR=has_bpr, num_warps=cfg.warps_score, num_stages=1),
        ),
        Launch(
            "_compact_kernel", (h_kv, n2, lb),
            (start, end, bpr, keys, ws, side, out, out_l, *out.stride(), t, side_stride, sinks, window, k, serial_cap, b),
            dict(H_KV=h_kv, CHUNK=cfg.chunk_compact, BLOCK=cfg.block_finish, HAS_BPR=has_bpr,
                 num_warps=cfg.warps_compact, num_stages=1),
        ),
    ]
    if cfg.serial_cap is not None:
        launches.append(
            Launch(
                "_boundary_kernel", (h_kv, n2, lb),
                (bpr, keys, ws, side, out, out_l, *out.stride(), max(t, 1), k, b),
                dict(H_KV=h_kv, CHUNK=cfg.chunk_boundary, BLOCK=cfg.block_finish, HAS_BPR=has_bpr,
                     num_warps=cfg.warps_compact, num_stages=1),
            )
        )
    return launches


@dataclass
class SelectionWork:
    """Per (row, KV head) work counters of one selection, ``[B, H_kv]`` (``[L, B, H_kv]`` for a call
    over L layers) int64 tensors (see ``selection_work``). Deterministic: they depend on the scores, not on the launch or timing."""

    candidates: torch.Tensor  # candidates of the row ([sink_hi, win_lo) clipped to the cache)
    windowed: torch.Tensor  # candidates the scoring programs binned in registers (the rest: one atomic each)
    parallel: torch.Tensor  # boundary-bin members split by the parallel boundary pass (0: not needed)
    scanned: torch.Tensor  # boundary-bin members a row's last program scanned serially
    selected: torch.Tensor  # keys that entered the serial radix select
    passes: torch.Tensor  # radix passes of that select (8 bits each)

    @property
    def serial(self) -> torch.Tensor:
        """Candidates that reached the serial stage: members scanned plus keys radix-selected."""
        return self.scanned + self.selected

    def serial_fraction(self) -> float:
        """Largest ``serial / candidates`` over the rows (0 for rows without candidates)."""
        frac = self.serial.double() / self.candidates.clamp(min=1).double()
        return float(frac.max()) if frac.numel() else 0.0


def selection_work(
    q_sel: torch.Tensor,
    sketch: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    *,
    sinks: int,
    window: int,
    k: int,
    token_table: torch.Tensor | None = None,
    budget_per_row: torch.Tensor | None = None,
    index_dtype: torch.dtype = torch.int32,
    config: SelectConfig | None = None,
) -> tuple[torch.Tensor, SelectionWork]:
    """``score_select_triton`` that also returns the work counters its kernels leave in the
    workspace (a test and benchmark helper: it reads them back, so it syncs with the device)."""
    out, ws = _select(q_sel, sketch, start, end, token_table, budget_per_row, sinks, window, k, index_dtype, None, config, True)
    counters = ws[:, _WS_N_CAND : _WS_N_CAND + _N_COUNTERS].to(torch.int64).reshape(*out.shape[:-1], _N_COUNTERS).unbind(-1)
    return out, SelectionWork(*counters)


def score_select_reference(
    q_sel: torch.Tensor,
    sketch: torch.Tensor,
    start: torch.Tensor,
    end: torch.Tensor,
    *,
    sinks: int,
    window: int,
    k: int,
    token_table: torch.Tensor | None = None,
    budget_per_row: torch.Tensor | None = None,
    index_dtype: torch.dtype = torch.int64,
) -> torch.Tensor:
    """The same selection through the plain-torch reference (descending score order); with a
    leading layer axis (see ``score_select_triton``) one selection per layer, stacked."""
    n_layers, _, h_kv, _, _ = check_score_select_layers(
        q_sel, sketch, start, end, token_table, budget_per_row, sinks, window, k, index_dtype
    )
    if n_layers is not None:
        return torch.stack([
            score_select_reference(
                q_sel[j], sketch[j], start, end, sinks=sinks, window=window, k=k,
                token_table=token_table, budget_per_row=budget_per_row, index_dtype=index_dtype,
            )
            for j in range(n_layers)
        ])
    dense = reference.gather_positions(sketch, token_table)
    scores = reference.score_tokens(q_sel, dense, h_kv)
    sel = reference.select_topk(scores, start, end, sinks, window, k, budget_per_row)
    return sel.to(index_dtype)


def _programs_per_row(length: int, chunk: int, rows: int, device, requested: int) -> int:
    """Programs per (row, KV head): each strides over the chunks of its row, so a full row gets
    several chunks per program and a short one leaves its programs idle after one check. About 5
    per SM in all: the scoring kernel (~70-100 registers, 4 warps) fits 5-7 programs per SM, and
    more programs than that run as a second, partly idle wave. Measured on the H100 against 8 per
    SM (``bench_kernels.py --layout paged --profile``, ``benchmarks/results/bench_kernels_paged_*``):
    selection 0.095 -> 0.089 ms at 8 x 32K, 0.341 -> 0.282 at 8 x 128K, 0.171 -> 0.153 at
    16 x 32K, 0.681 -> 0.561 at 16 x 128K, batch 1 unchanged."""
    chunks = max(1, -(-length // chunk))
    wanted = requested or -(-5 * num_sms(device) // rows)
    return max(1, min(chunks, wanted))


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())
