"""Triton kernels of butler_kernels against the plain-torch reference, on CPU tensors through the
Triton interpreter; plus the custom ops, the dispatch entry point and argument checks.

Shapes are small on purpose (the interpreter runs every program in Python); the kernels are given
small chunks and blocks so that several programs, tickets and loop trips still happen.
tests/test_kernels_gpu.py runs the same checks at larger shapes on a GPU.

Triton's mode is fixed per process when triton is first imported. This module sets
TRITON_INTERPRET=1 before importing it; when something in the session (a conftest importing
transformers, say) imported triton earlier in compiled mode, the tests cannot run on CPU tensors
here, and ``test_interpreter_suite_in_fresh_process`` runs this file again in a fresh process with
the variable set from the start.
"""

import dataclasses
import os
import sys

if "triton" not in sys.modules:
    os.environ["TRITON_INTERPRET"] = "1"

import json  # noqa: E402
import math  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

import triton  # noqa: E402
from butler_kernels import (  # noqa: E402
    AttentionConfig,
    NewSketch,
    SelectConfig,
    budgeted_attention_triton,
    reference,
    residual_layer_norm_triton,
    score_select_reference,
    score_select_triton,
    sketch_write_triton,
    sparse_decode,
)
from butler_kernels import _triton_loader  # noqa: E402
from butler_kernels.testing import check_selection, selection_work  # noqa: E402

IN_PROCESS = _triton_loader.triton_interpreted()


@pytest.fixture(autouse=True)
def _interpreter_here(request):
    if not IN_PROCESS and request.node.originalname != "test_interpreter_suite_in_fresh_process":
        pytest.skip("triton was imported in compiled mode before this module; test_interpreter_suite_in_fresh_process runs it")


def test_interpreter_suite_in_fresh_process():
    if IN_PROCESS:
        pytest.skip("Triton runs in interpreter mode in this process: the tests run here")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    print(proc.stdout.strip().splitlines()[-1])


S, W = 4, 16  # sinks and window of most cases
SMALL_SELECT = SelectConfig(chunk_score=64, chunk_compact=128, chunk_boundary=32, block_finish=32, programs_per_row=3)
INDEX_POISON = 123456789


@pytest.fixture(autouse=True)
def _poison_scratch(monkeypatch):
    """Scratch the kernels must overwrite before reading holds garbage, never zeros."""
    monkeypatch.setattr(_triton_loader, "SCRATCH_POISON", INDEX_POISON)


# --------------------------------------------------------------------------------------- inputs


def _rows(b: int, t: int, ragged: bool, gen: torch.Generator):
    """start/end per row; ragged rows get left padding and shorter contexts."""
    if not ragged:
        return torch.zeros(b, dtype=torch.int64), torch.full((b,), t, dtype=torch.int64)
    start = torch.randint(0, max(1, t // 4), (b,), generator=gen)
    end = torch.minimum(start + torch.randint(1, t + 1, (b,), generator=gen), torch.tensor(t))
    end[0] = t  # one full row
    return start, end


def _layout(dense: torch.Tensor, layout: str, gen: torch.Generator, table_dtype=torch.int32):
    """dense ``[B, H, T, X]`` -> (buffer, token_table) in the requested layout."""
    b, h, t, x = dense.shape
    if layout == "dense":
        return dense, None
    if layout == "strided":  # [B, T, H, X] storage viewed as [B, H, T, X]
        return dense.permute(0, 2, 1, 3).contiguous().permute(0, 2, 1, 3), None
    assert layout in ("paged", "paged-head-major")
    slots = b * t + 11
    pool = torch.randn(slots, h, x, generator=gen).to(dense.dtype)  # unused slots hold garbage
    if layout == "paged-head-major":  # the SGLang backend's sketch pool: [slot, head] view of [head, slot] storage
        pool = pool.transpose(0, 1).contiguous().transpose(0, 1)
    table = torch.randperm(slots, generator=gen)[: b * t].view(b, t)
    pool[table.reshape(-1)] = dense.permute(0, 2, 1, 3).reshape(b * t, h, x)
    return pool, table.to(table_dtype)


def _ranges_mask(start, end, t):
    sink_hi, win_lo = reference.policy_ranges(start, end, S, W)
    pos = torch.arange(t)
    return (pos >= sink_hi[:, None]) & (pos < win_lo[:, None])


def _check_selection(sel, q_sel, sketch_dense, start, end, k, budget_per_row=None, sinks=S, window=W):
    """``sel`` must hold, per (row, KV head), min(k_row, #candidates) distinct candidates followed by
    -1, whose scores are the top scores (compared as sorted values, so ties and last-bit rounding
    differences at the boundary are allowed)."""
    assert sel.shape == (sketch_dense.shape[0], sketch_dense.shape[1], k)
    res = check_selection(sel, q_sel, sketch_dense, start, end, sinks=sinks, window=window, k=k, budget_per_row=budget_per_row)
    assert res.ok, str(res)


def _tol(dtype):
    return {torch.float32: 1e-4, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]


# ------------------------------------------------------------------------------------ selection


@pytest.mark.parametrize("layout", ["dense", "strided", "paged", "paged-head-major"])
@pytest.mark.parametrize("group", [1, 4])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("b,t,k,ragged", [(1, 40, 64, False), (3, 300, 24, True)])
def test_select_matches_reference(layout, group, dtype, b, t, k, ragged):
    gen = torch.Generator().manual_seed(hash((layout, group, str(dtype), b, t)) % 2**31)
    h_kv, dp = 2, 16
    q_sel = torch.randn(b, h_kv * group, dp, generator=gen).to(dtype)
    sketch = torch.randn(b, h_kv, t, dp, generator=gen).to(dtype)
    start, end = _rows(b, t, ragged, gen)
    buf, table = _layout(sketch, layout, gen)
    out = torch.full((b, h_kv, k), INDEX_POISON, dtype=torch.int32)
    res = score_select_triton(q_sel, buf, start, end, sinks=S, window=W, k=k, token_table=table, out=out, config=SMALL_SELECT)
    assert res is out
    _check_selection(out, q_sel, sketch, start, end, k)
    if not ragged and t <= S + W + k:  # the dense fallback: every candidate, as in the reference
        ref = score_select_reference(q_sel, buf, start, end, sinks=S, window=W, k=k, token_table=table)
        assert torch.equal(torch.sort(out.long(), -1).values, torch.sort(ref, -1).values)


@pytest.mark.parametrize("layout", ["dense", "paged-stacked"])
def test_select_over_layers_equals_per_layer(layout):
    """One launch over L layers (the layers of one predictor producer) gives every layer the
    selection, and the work counters, of a call of its own."""
    gen = torch.Generator().manual_seed(11)
    n_layers, b, h_kv, group, t, k, dp = 3, 3, 2, 2, 300, 24, 16
    q_sel = torch.randn(b, n_layers, h_kv * group, dp, generator=gen).transpose(0, 1)  # [L, B, ...] view
    sketch = torch.randn(n_layers, b, h_kv, t, dp, generator=gen)
    start, end = _rows(b, t, True, gen)
    bpr = torch.tensor([24, 5, 1000])
    table = None
    if layout == "paged-stacked":
        # The SGLang backend's storage: [H_kv, L, slots, d'] viewed as [L, slots, H_kv, d'].
        slots = b * t + 5
        store = torch.randn(h_kv, n_layers, slots, dp, generator=gen)
        table = torch.randperm(slots, generator=gen)[: b * t].view(b, t).int()
        buf = store.permute(1, 2, 0, 3)
        for j in range(n_layers):
            buf[j][table.reshape(-1).long()] = sketch[j].permute(0, 2, 1, 3).reshape(b * t, h_kv, dp)
    else:
        buf = sketch
    args = dict(sinks=S, window=W, k=k, token_table=table, budget_per_row=bpr)
    out = torch.full((n_layers, b, h_kv, k), INDEX_POISON, dtype=torch.int32)
    assert score_select_triton(q_sel, buf, start, end, out=out, config=SMALL_SELECT, **args) is out
    _, work = selection_work(q_sel, buf, start, end, config=SMALL_SELECT, **args)
    ref = score_select_reference(q_sel, buf, start, end, **args)
    assert ref.shape == out.shape
    for j in range(n_layers):
        _check_selection(out[j], q_sel[j], sketch[j], start, end, k, budget_per_row=bpr)
        alone, work_j = selection_work(q_sel[j], buf[j], start, end, config=SMALL_SELECT, **args)
        assert torch.equal(torch.sort(out[j].long(), -1).values, torch.sort(alone.long(), -1).values)
        assert torch.equal((ref[j] >= 0).sum(-1), (out[j] >= 0).sum(-1))
        for name in ("candidates", "windowed", "parallel", "scanned", "selected", "passes"):
            assert torch.equal(getattr(work, name)[j], getattr(work_j, name)), name


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d,dp", [(64, 16), (128, 8)])
def test_sketch_write_matches_reference(dtype, d, dp):
    """The fused projection + scatter into a head-major paged pool equals the matmul and indexed
    store of the reference (to one rounding of the pool's dtype); other slots stay untouched."""
    gen = torch.Generator().manual_seed(d + dp)
    n, h_kv, slots = 37, 3, 90
    keys = torch.randn(n, h_kv * 2, d, generator=gen).to(dtype)[:, ::2]  # strided, as a slice of SGLang's k
    weight = (torch.randn(h_kv, d, dp, generator=gen) / d**0.5).to(dtype)
    loc = torch.randperm(slots, generator=gen)[:n]
    pool = torch.randn(h_kv, slots, dp, generator=gen).to(dtype).transpose(0, 1)
    want = pool.clone()
    reference.write_sketch(want, loc, keys, weight)
    sketch_write_triton(pool, loc.int(), keys, weight)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(pool.float(), want.float(), rtol=tol, atol=tol)
    untouched = torch.ones(slots, dtype=torch.bool)
    untouched[loc] = False
    assert torch.equal(pool[untouched], want[untouched])
    with pytest.raises(ValueError, match="shapes do not match"):
        sketch_write_triton(pool, loc, keys, weight[:, :, :1])


def _rope_angles(positions: torch.Tensor, d: int, dtype, theta: float = 10000.0) -> torch.Tensor:
    """``[n, D]`` = cat(cos, sin) of the base's ``D/2`` rotary frequencies at ``positions`` (SGLang's
    ``cos_sin_cache`` layout)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    freqs = positions[:, None].float() * inv_freq
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("d,dp", [(64, 16), (16, 8), (128, 8)])
def test_sketch_write_with_rope_matches_reference(dtype, d, dp):
    """A format-2 sketch (keys un-rotated with their angles, the sketch's pairs rotated after the
    projection, some pairs not rotated) in one launch equals ``reference.write_sketch(..., rope=)``:
    bf16 bit for bit (every op rounded as torch rounds it), fp32 to the matmul's summation order.
    D/2 = 8 pads the halves to the 16 rows a tensor-core dot needs."""
    gen = torch.Generator().manual_seed(d * dp)
    n, h_kv, slots = 37, 3, 90
    keys = torch.randn(n, h_kv * 2, d, generator=gen).to(dtype)[:, ::2]  # strided, as a slice of SGLang's k
    weight = (torch.randn(h_kv, d, dp, generator=gen) / d**0.5).to(dtype)
    loc = torch.randperm(slots, generator=gen)[:n]
    angles = _rope_angles(torch.randint(0, 40000, (n,), generator=gen), d, dtype)  # halves of one table
    cos, sin = angles[:, : d // 2], angles[:, d // 2 :]
    half = dp // 2
    pairs = torch.full((half,), -1, dtype=torch.int64)
    pairs[half // 2 :] = torch.randperm(d // 2, generator=gen)[: half - half // 2]  # half the pairs rotate
    pool = torch.randn(h_kv, slots, dp, generator=gen).to(dtype).transpose(0, 1)  # head-major
    before = pool.clone()
    want = pool.clone()
    reference.write_sketch(want, loc, keys, weight, rope=(cos, sin, pairs))
    for pairs_dtype in (torch.int64, torch.int32):
        pool = before.clone()
        sketch_write_triton(pool, loc.int(), keys, weight, rope=(cos, sin, pairs.to(pairs_dtype)))
        if dtype == torch.bfloat16:
            assert torch.equal(pool, want)
        else:
            torch.testing.assert_close(pool, want, rtol=1e-5, atol=1e-5)
    untouched = torch.ones(slots, dtype=torch.bool)
    untouched[loc] = False
    assert torch.equal(pool[untouched], before[untouched])
    # not a format-1 write by another name
    plain = before.clone()
    reference.write_sketch(plain, loc, keys, weight)
    assert not torch.allclose(pool[loc].float(), plain[loc].float(), atol=1e-2)
    # the op: the reference off CUDA, and its schema
    pool = before.clone()
    args = (pool, loc, keys, weight, cos, sin, pairs)
    torch.ops.butler.write_sketch_rope(*args)
    assert torch.equal(pool, want)
    torch.library.opcheck(torch.ops.butler.write_sketch_rope.default, args)
    with pytest.raises(ValueError, match=r"rope cos must be \[n, D/2\]"):
        sketch_write_triton(pool, loc, keys, weight, rope=(angles, sin, pairs))
    with pytest.raises(ValueError, match="rope pairs must be"):
        sketch_write_triton(pool, loc, keys, weight, rope=(cos, sin, pairs[:1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("e,with_residual,with_bias", [(576, True, True), (100, False, True), (4096, True, False)])
def test_residual_layer_norm_matches_reference(dtype, e, with_residual, with_bias):
    """The producer's fused add + LayerNorm equals ``layer_norm(hidden + residual)`` (strided rows,
    as SGLang's hidden slices may be) to one rounding of the dtype: Triton 3.6's interpreter
    truncates fp32 to bf16 where the GPU rounds to nearest."""
    gen = torch.Generator().manual_seed(e)
    hidden = (3 * torch.randn(5, 2 * e, generator=gen)).to(dtype)[:, :e]
    residual = (10 * torch.randn(5, e, generator=gen)).to(dtype) if with_residual else None
    weight = torch.randn(e, generator=gen).to(dtype)
    bias = torch.randn(e, generator=gen).to(dtype) if with_bias else None
    want = reference.residual_layer_norm(hidden, residual, weight, bias, 1e-5)
    got = residual_layer_norm_triton(hidden, residual, weight, bias, 1e-5)
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype]
    torch.testing.assert_close(got.float(), want.float(), rtol=tol, atol=tol)
    if residual is not None:  # the sum is rounded to the dtype before the norm, as the eager add is
        assert torch.equal(want, torch.nn.functional.layer_norm(hidden + residual, (e,), weight, bias, 1e-5))
    assert torch.equal(residual_layer_norm_triton(hidden[:0], None, weight, bias, 1e-5), hidden[:0])
    torch.library.opcheck(torch.ops.butler.residual_layer_norm.default, (hidden, residual, weight, bias, 1e-5))


def test_residual_layer_norm_rejects_bad_input():
    h, w = torch.randn(3, 8), torch.randn(8)
    for args, error, match in [
        ((h[0], None, w, None), ValueError, "hidden must be \\[n, E\\]"),
        ((h, torch.randn(3, 7), w, None), ValueError, "residual must have hidden's shape"),
        ((h, None, torch.randn(7), None), ValueError, "weight must be \\[E\\] = \\[8\\]"),
        ((h, h.half(), w, None), TypeError, "must share one dtype"),
        ((h.int(), None, w, None), TypeError, "hidden must be float16/bfloat16/float32"),
    ]:
        for fn in (residual_layer_norm_triton, torch.ops.butler.residual_layer_norm):
            with pytest.raises(error, match=match):
                fn(*args, 1e-5)


@pytest.mark.parametrize("serial_cap", [None, 8])
def test_workspace_bytes_is_what_a_call_allocates(monkeypatch, serial_cap):
    import butler_kernels.score_select as ss

    allocated = []
    real = ss.scratch
    monkeypatch.setattr(ss, "scratch", lambda shape, dtype, device: allocated.append(real(shape, dtype, device)) or allocated[-1])
    gen = torch.Generator().manual_seed(5)
    b, h_kv, t = 3, 2, 150
    q_sel, sketch = torch.randn(b, h_kv, 16, generator=gen), torch.randn(b, h_kv, t, 16, generator=gen)
    start, end = _rows(b, t, True, gen)
    cfg = dataclasses.replace(SMALL_SELECT, serial_cap=serial_cap)
    score_select_triton(q_sel, sketch, start, end, sinks=S, window=W, k=10, config=cfg)
    ws = b * h_kv * ss._WS_STRIDE * 4  # the zeroed histograms and counters
    used = sum(x.numel() * x.element_size() for x in allocated) + ws
    assert used == ss.workspace_bytes(b, h_kv, t, boundary_pass=serial_cap is not None)


def test_select_default_config_and_int64():
    gen = torch.Generator().manual_seed(1)
    q_sel = torch.randn(2, 8, 16, generator=gen)
    sketch = torch.randn(2, 2, 700, 16, generator=gen)
    start, end = _rows(2, 700, True, gen)
    sel = score_select_triton(q_sel, sketch, start.int(), end.int(), sinks=S, window=W, k=50, index_dtype=torch.int64)
    assert sel.dtype == torch.int64
    _check_selection(sel, q_sel, sketch, start, end, 50)


def test_select_budget_per_row():
    gen = torch.Generator().manual_seed(2)
    b, t, k = 5, 200, 30
    q_sel = torch.randn(b, 3, 16, generator=gen)
    sketch = torch.randn(b, 3, t, 16, generator=gen)
    start, end = _rows(b, t, True, gen)
    bpr = torch.tensor([-2, 0, 5, 30, 1000])
    sel = score_select_triton(q_sel, sketch, start, end, sinks=S, window=W, k=k, budget_per_row=bpr, config=SMALL_SELECT)
    _check_selection(sel, q_sel, sketch, start, end, k, budget_per_row=bpr)
    ref = score_select_reference(q_sel, sketch, start, end, sinks=S, window=W, k=k, budget_per_row=bpr)
    assert torch.equal((sel >= 0).sum(-1), (ref >= 0).sum(-1))


def _offset_scores(b, h, t, gen):
    """Scores crowded in one coarse bin: a large common offset plus small spread."""
    q = torch.randn(b, h, 16, generator=gen)
    q[..., 0] = 40.0
    s = torch.randn(b, h, t, 16, generator=gen) * 0.05
    s[..., 0] = 1.0
    return q, s


_DISTRIBUTIONS = {
    "zeros": lambda b, h, t, g: (torch.randn(b, h, 16, generator=g), torch.zeros(b, h, t, 16)),
    "integer_ties": lambda b, h, t, g: (
        torch.randint(-2, 3, (b, h, 16), generator=g).float(),
        torch.randint(-2, 3, (b, h, t, 16), generator=g).float(),
    ),
    "huge": lambda b, h, t, g: (torch.randn(b, h, 16, generator=g) * 1e4, torch.randn(b, h, t, 16, generator=g) * 1e4),
    "tiny": lambda b, h, t, g: (torch.randn(b, h, 16, generator=g) * 1e-4, torch.randn(b, h, t, 16, generator=g) * 1e-4),
    "offset": _offset_scores,
    "negative": lambda b, h, t, g: (torch.randn(b, h, 16, generator=g), -3.0 - torch.rand(b, h, t, 16, generator=g) * 1e-3),
}


@pytest.mark.parametrize("name", sorted(_DISTRIBUTIONS))
def test_select_score_distributions(name):
    """Every branch of the radix select: regular coarse bins, the clamped ones (near zero, huge),
    a crowded boundary bin and exact ties."""
    gen = torch.Generator().manual_seed(3)
    q_sel, sketch = _DISTRIBUTIONS[name](2, 2, 500, gen)
    start, end = _rows(2, 500, True, gen)
    sel = score_select_triton(q_sel, sketch, start, end, sinks=S, window=W, k=60, config=SMALL_SELECT)
    _check_selection(sel, q_sel, sketch, start, end, 60)


def test_select_edge_cases():
    gen = torch.Generator().manual_seed(4)
    q_sel = torch.randn(3, 2, 16, generator=gen)
    sketch = torch.randn(3, 2, 50, 16, generator=gen)
    start = torch.tensor([0, 10, 30])
    end = torch.tensor([50, 10, 33])  # a full row, an empty row, a row shorter than sinks + window
    assert score_select_triton(q_sel, sketch, start, end, sinks=S, window=W, k=0).shape == (3, 2, 0)
    sel = score_select_triton(q_sel, sketch, start, end, sinks=S, window=W, k=8, config=SMALL_SELECT)
    _check_selection(sel, q_sel, sketch, start, end, 8)
    assert (sel[1:] == -1).all()
    # no sinks and no window: every position is a candidate
    sel = score_select_triton(q_sel, sketch, start, end, sinks=0, window=0, k=8, config=SMALL_SELECT)
    _check_selection(sel, q_sel, sketch, start, end, 8, sinks=0, window=0)


# --------------------------------------------------------------------- selection work, any scale
# The selection's cost must not depend on the scale of the scores (a positive rescale cannot change
# the top-k set). selection_work returns deterministic counters of where each row's candidates were
# handled: the "serial" ones (scanned or radix-selected by a single program) must stay a few % of
# the candidates for scores of any scale, sign mix, heavy ties and subnormal magnitudes.

# Several programs, tickets and boundary passes at small shapes; serial_cap ~2% of the candidates,
# as the default (2048) is of a 100K-token row.
WORK_SELECT = SelectConfig(chunk_score=256, chunk_compact=256, chunk_boundary=64, block_finish=64, programs_per_row=3, serial_cap=32)
WORK_T, WORK_K = 1600, 160  # 1580 candidates with S, W = 4, 16


def _order_keys(scores: torch.Tensor) -> torch.Tensor:
    bits = scores.float().contiguous().view(torch.int32).to(torch.int64)
    return torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits)


def _norm_codes(keys: torch.Tensor) -> torch.Tensor:
    """The kernels' signed log-scale code: octave (subnormals normalised) and 14 mantissa bits."""
    neg = keys < 0
    m = torch.where(neg, keys ^ 0x7FFFFFFF, keys) & 0x7FFFFFFF
    sub = (m.to(torch.float32).view(torch.int32).to(torch.int64) >> 9) - (126 << 14)
    nm = torch.where(m >= 1 << 23, (m >> 9) + (23 << 14), sub)
    nm = torch.where(m == 0, 0, nm)
    return torch.where(neg, -1 - nm, nm)


def _threshold(hist: torch.Tensor, need: int) -> tuple[int, int]:
    suffix = hist.flip(0).cumsum(0).flip(0)
    t = int(torch.nonzero(suffix >= need).max())
    return t, int(hist[t + 1 :].sum())


def _radix_passes(keys: torch.Tensor, need: int) -> int:
    base, width, passes = int(keys.min()), int(keys.max() - keys.min()), 0
    while width > 0:
        shift = max(width.bit_length() - 8, 0)
        live = keys[(keys >= base) & (keys <= base + width)]
        t, above = _threshold(torch.bincount((live - base) >> shift, minlength=256), need)
        need, base, width = need - above, base + (t << shift), min(width - (t << shift), (1 << shift) - 1)
        passes += 1
    return passes


def _expected_work(scores: torch.Tensor, k: int, serial_cap: int) -> dict:
    """Work counters of one row whose candidates score ``scores`` (fp32, as the kernel computes
    them): an independent model of the algorithm of _score_select_kernels."""
    n = scores.numel()
    work = dict(candidates=n, parallel=0, scanned=0, selected=0, passes=0)
    if k <= 0 or n <= k:
        return work
    keys = _order_keys(scores)
    code = _norm_codes(keys)
    bin1 = (code >> 12) + 2048
    b1, a1 = _threshold(torch.bincount(bin1, minlength=4096), k)
    members = keys[bin1 == b1]
    need = k - a1
    if members.numel() <= need or members.min() == members.max():
        return work  # the provisional boundary is the answer
    digit = code[bin1 == b1] & 4095
    b2, a2 = _threshold(torch.bincount(digit, minlength=4096), need)
    kept, need2 = members[digit == b2], need - a2
    if members.numel() > serial_cap:  # split by the boundary pass
        work["parallel"] = members.numel()
        if kept.numel() <= need2 or kept.min() == kept.max():
            return work
    else:  # split by the last compaction program
        work["scanned"] = members.numel()
    if need2 < kept.numel():
        work["selected"], work["passes"] = kept.numel(), _radix_passes(kept, need2)
    return work


def _check_work(q_sel, sketch, start, end, k, config=WORK_SELECT, tolerance=None, exact_scores=None):
    """Run the selection, check it against the reference and return its work counters; with
    ``exact_scores`` ([B, H_kv, T] fp32, the scores the kernel computes bit for bit) the counters
    must also equal the model's."""
    sel, work = selection_work(q_sel, sketch, start, end, sinks=S, window=W, k=k, config=config)
    res = check_selection(sel, q_sel, sketch, start, end, sinks=S, window=W, k=k, tolerance=tolerance)
    assert res.ok, str(res)
    if exact_scores is not None:
        cand = _ranges_mask(start, end, sketch.shape[2])
        for b in range(sketch.shape[0]):
            for h in range(sketch.shape[1]):
                want = _expected_work(exact_scores[b, h][cand[b]], k, config.serial_cap)
                got = {name: int(getattr(work, name)[b, h]) for name in want}
                assert got == want, f"row {b}, head {h}"
    return work


def _one_hot_case(scores: torch.Tensor, gen: torch.Generator):
    """Inputs whose kernel scores are exactly ``scores`` [B, H_kv, T] (fp32): a one-hot predictor
    query picks sketch column 0 (the other columns hold noise times zero)."""
    b, h, t = scores.shape
    q_sel = torch.zeros(b, h, 16)
    q_sel[..., 0] = 1.0
    sketch = torch.randn(b, h, t, 16, generator=gen)
    sketch[..., 0] = scores
    return q_sel, sketch


def test_select_work_is_scale_free():
    """Gaussian predictor scores (16-dim dot products, mixed signs) scaled by 1e-12..1e12: the
    serial stage stays a few % of the candidates at every scale, and under power-of-two scales
    (exact in floating point) every counter is identical."""
    gen = torch.Generator().manual_seed(20)
    q_sel = torch.randn(1, 2, 16, generator=gen)
    sketch = torch.randn(1, 2, WORK_T, 16, generator=gen)
    start, end = torch.zeros(1, dtype=torch.int64), torch.full((1,), WORK_T)
    counters = {}
    for scale in (1.0, 2.0**-100, 2.0**100, 1e-12, 1e-8, 1e8, 1e12):
        work = _check_work(q_sel, sketch * scale, start, end, WORK_K)
        assert torch.equal(work.windowed, work.candidates), f"scale {scale:g}: candidates binned one atomic each"
        assert work.serial_fraction() <= 0.03, f"scale {scale:g}: {work}"
        assert int(work.parallel.max()) <= 0.08 * WORK_T, f"scale {scale:g}: {work}"
        counters[scale] = torch.stack([work.parallel, work.scanned, work.selected, work.passes])
    for scale in (2.0**-100, 2.0**100):
        assert torch.equal(counters[scale], counters[1.0]), f"scale {scale:g}"


def _two_values(gen, b, h, t, lo, hi, frac_hi):
    return torch.where(torch.rand(b, h, t, generator=gen) < frac_hi, hi, lo)


_WORK_DISTRIBUTIONS = {
    # most scores negative, fewer positives than k: the boundary lies among the negatives
    "mixed_sign": lambda g, b, h, t: torch.where(
        torch.rand(b, h, t, generator=g) < 0.05, torch.rand(b, h, t, generator=g), -torch.rand(b, h, t, generator=g) * 3
    ),
    "all_equal": lambda g, b, h, t: torch.full((b, h, t), 0.37),
    "all_zero": lambda g, b, h, t: torch.zeros(b, h, t),
    "two_values": lambda g, b, h, t: _two_values(g, b, h, t, -1.0, 2.0, 0.3),  # boundary in the upper value
    "two_values_one_bin": lambda g, b, h, t: _two_values(g, b, h, t, 1.0, 1.0625, 0.05),  # boundary in the lower one
    "subnormal": lambda g, b, h, t: torch.randn(b, h, t, generator=g) * 1e-39,
    "offset": lambda g, b, h, t: 1000.0 + torch.randn(b, h, t, generator=g),  # all in one or two level-1 bins
    "wide": lambda g, b, h, t: torch.randn(b, h, t, generator=g) * torch.exp2(torch.randint(-80, 80, (b, h, t), generator=g).float()),
}


@pytest.mark.parametrize("block", [16, 2048])
@pytest.mark.parametrize("name", list(_WORK_DISTRIBUTIONS))
def test_select_work_distributions(name, block):
    """Exact selection (tolerance 0: the kernel's scores are exact here) and few serial candidates
    for mixed signs, heavy ties, subnormals, a large common offset and magnitudes spread over 160
    octaves; the counters equal those of an independent model of the algorithm. The serial end of
    a row in blocks of 16 (several blocks through memory) and of 2048 (one block in registers)."""
    gen = torch.Generator().manual_seed(21)
    scores = _WORK_DISTRIBUTIONS[name](gen, 1, 2, WORK_T).float()
    q_sel, sketch = _one_hot_case(scores, gen)
    start, end = torch.zeros(1, dtype=torch.int64), torch.full((1,), WORK_T)
    config = dataclasses.replace(WORK_SELECT, block_finish=block)
    work = _check_work(q_sel, sketch, start, end, WORK_K, config=config, tolerance=0.0, exact_scores=scores)
    assert work.serial_fraction() <= 0.03, str(work)
    if name != "wide":
        assert torch.equal(work.windowed, work.candidates), str(work)


@pytest.mark.parametrize("serial_cap", [None, 0])
def test_select_boundary_modes(serial_cap):
    """Two launches (the last compaction program always finishes the row) and a boundary pass for
    every row: the same exact selection, ragged rows and per-row budgets included."""
    gen = torch.Generator().manual_seed(22)
    b, t, k = 3, 700, 60
    config = SelectConfig(chunk_score=128, chunk_compact=128, chunk_boundary=32, block_finish=32, programs_per_row=3,
                          serial_cap=serial_cap)
    scores = torch.stack([
        torch.randn(2, t, generator=gen),
        _two_values(gen, 1, 2, t, 1.0, 1.0625, 0.5)[0],
        1000.0 + torch.randn(2, t, generator=gen) * 0.01,
    ]).float()
    q_sel, sketch = _one_hot_case(scores, gen)
    start, end = _rows(b, t, True, gen)
    bpr = torch.tensor([k, 7, 1000])
    sel, work = selection_work(q_sel, sketch, start, end, sinks=S, window=W, k=k, budget_per_row=bpr, config=config)
    res = check_selection(sel, q_sel, sketch, start, end, sinks=S, window=W, k=k, budget_per_row=bpr, tolerance=0.0)
    assert res.ok, str(res)
    cand = _ranges_mask(start, end, t)
    for i in range(b):
        for h in range(2):
            want = _expected_work(scores[i, h][cand[i]], min(int(bpr[i]), k), 2**31 - 1 if serial_cap is None else 0)
            assert {name: int(getattr(work, name)[i, h]) for name in want} == want, f"row {i}, head {h}"
    if serial_cap == 0:
        assert int(work.parallel.sum()) > 0


# ------------------------------------------------------------------------------------ attention


def _attention_case(b, h_kv, group, t, d, k, dtype, layout, gen, ragged=True, table_dtype=torch.int64):
    q = torch.randn(b, h_kv * group, d, generator=gen).to(dtype)
    kd = torch.randn(b, h_kv, t, d, generator=gen).to(dtype)
    vd = torch.randn(b, h_kv, t, d, generator=gen).to(dtype)
    start, end = _rows(b, t, ragged, gen)
    q_sel = torch.randn(b, h_kv, 16, generator=gen)
    sel = score_select_reference(q_sel, torch.randn(b, h_kv, t, 16, generator=gen), start, end, sinks=S, window=W, k=k)
    if layout == "paged":
        kbuf, table = _layout(kd, "paged", gen, table_dtype)
        vbuf = torch.randn_like(kbuf, dtype=torch.float32).to(dtype)
        vbuf[table.long().reshape(-1)] = vd.permute(0, 2, 1, 3).reshape(b * t, h_kv, d)
    else:
        kbuf, table = _layout(kd, layout, gen)
        vbuf, _ = _layout(vd, layout, gen)
    return q, kbuf, vbuf, sel, start, end, table


@pytest.mark.parametrize("layout", ["dense", "strided", "paged"])
@pytest.mark.parametrize("group,d", [(1, 64), (3, 128), (4, 64), (8, 128)])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_attention_matches_reference(layout, group, d, dtype):
    gen = torch.Generator().manual_seed(hash((layout, group, d, str(dtype))) % 2**31)
    q, kbuf, vbuf, sel, start, end, table = _attention_case(2, 2, group, 90, d, 20, dtype, layout, gen)
    sel = sel.int() if group % 2 else sel  # both index dtypes
    scale = 1.0 / math.sqrt(d)
    ref = reference.budgeted_attention(q, kbuf, vbuf, sel, start, end, S, W, scale, table)
    counters = torch.zeros(9, dtype=torch.int32)  # more than B * H_kv = 4: a caller's larger buffer
    for splits, split_counters in ((1, None), (3, None), (3, counters), (5, counters)):
        out = torch.full_like(q, float("nan"))
        cfg = AttentionConfig(num_splits=splits, block_n=16)
        budgeted_attention_triton(q, kbuf, vbuf, sel, start, end, sinks=S, window=W, scale=scale, token_table=table,
                                  out=out, config=cfg, split_counters=split_counters)
        torch.testing.assert_close(out.float(), ref.float(), rtol=_tol(dtype), atol=_tol(dtype))
        # the last split of each (row, KV head) merged and reset its ticket: reusable as is
        assert not counters.any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_writes_new_sketch(dtype):
    """The step's sketch write folded into the attention launch equals ``reference.write_sketch``
    (to one rounding), leaves other slots alone and does not change the attention output."""
    gen = torch.Generator().manual_seed(8)
    b, h_kv, group, t, d, dp = 3, 2, 4, 70, 64, 16
    q, kbuf, vbuf, sel, start, end, table = _attention_case(b, h_kv, group, t, d, 12, dtype, "paged", gen)
    keys = torch.randn(b, h_kv * 2, d, generator=gen).to(dtype)[:, ::2]  # strided, as a slice of SGLang's k
    weight = (torch.randn(h_kv, d, dp, generator=gen) / d**0.5).to(dtype)
    slots = kbuf.shape[0]
    loc = torch.randperm(slots, generator=gen)[:b]
    want_pool = torch.randn(h_kv, slots, dp, generator=gen).to(dtype).transpose(0, 1)  # head-major
    untouched = torch.ones(slots, dtype=torch.bool)
    untouched[loc] = False
    before = want_pool.clone()
    reference.write_sketch(want_pool, loc, keys, weight)
    want_out = reference.budgeted_attention(q, kbuf, vbuf, sel, start, end, S, W, 0.125, table)
    tol = {torch.float32: 1e-5, torch.bfloat16: 1.6e-2}[dtype]
    for splits in (1, 3):
        pool = before.clone()
        out = budgeted_attention_triton(q, kbuf, vbuf, sel, start, end, sinks=S, window=W, scale=0.125, token_table=table,
                                        config=AttentionConfig(num_splits=splits, block_n=16),
                                        new_sketch=NewSketch(pool, loc.int(), keys, weight))
        torch.testing.assert_close(pool.float(), want_pool.float(), rtol=tol, atol=tol)
        assert torch.equal(pool[untouched], before[untouched])
        torch.testing.assert_close(out.float(), want_out.float(), rtol=_tol(dtype), atol=_tol(dtype))
    # the op (reference off CUDA) and its schema: all four tensors or none
    pool = before.clone()
    args = (q, kbuf, vbuf, sel, start, end, table, S, W, 0.125, None, pool, loc, keys, weight)
    torch.ops.butler.budgeted_attention_step(*args)
    assert torch.equal(pool, want_pool)
    torch.library.opcheck(torch.ops.butler.budgeted_attention_step.default, args)
    with pytest.raises(ValueError, match="one new token per row"):
        budgeted_attention_triton(q, kbuf, vbuf, sel, start, end, sinks=S, window=W, scale=0.125, token_table=table,
                                  new_sketch=NewSketch(pool, loc[:2], keys[:2], weight))


def test_attention_fp32_and_default_config():
    gen = torch.Generator().manual_seed(5)
    q, kbuf, vbuf, sel, start, end, table = _attention_case(3, 2, 4, 120, 64, 30, torch.float32, "dense", gen)
    out = budgeted_attention_triton(q, kbuf, vbuf, sel, start, end, sinks=S, window=W, scale=0.3)
    ref = reference.budgeted_attention(q, kbuf, vbuf, sel, start, end, S, W, 0.3)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("layout", ["dense", "paged"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_budget_covering_context_is_dense_attention(layout, dtype):
    """With every candidate selected the budgeted step is dense decode attention."""
    gen = torch.Generator().manual_seed(6)
    b, h_kv, group, t, d = 3, 2, 4, 70, 64
    q, kbuf, vbuf, _, start, end, table = _attention_case(b, h_kv, group, t, d, 1, dtype, layout, gen)
    q_sel = torch.randn(b, h_kv, 16, generator=gen)
    sketch = torch.randn(b, h_kv, t, 16, generator=gen)
    if layout == "paged":  # the sketch pool shares the K/V slots, as in SGLang
        pool = torch.randn(kbuf.shape[0], h_kv, 16, generator=gen)
        pool[table.long().reshape(-1)] = sketch.permute(0, 2, 1, 3).reshape(-1, h_kv, 16)
        sketch = pool
    out, sel = sparse_decode(
        q, kbuf, vbuf, q_sel, sketch, start, end, sinks=S, window=W, budget=t, scale=0.125, token_table=table, impl="triton"
    )
    dense = reference.dense_decode_attention(q, kbuf, vbuf, start, end, 0.125, table)
    torch.testing.assert_close(out.float(), dense.float(), rtol=_tol(dtype), atol=_tol(dtype))
    n_cand = _ranges_mask(start, end, t).sum(-1)
    assert torch.equal((sel >= 0).sum(-1), n_cand[:, None].expand(b, h_kv))


# ------------------------------------------------------------------------ offsets past 2^31 elements
#
# Issue 18: the SGLang server faulted (illegal memory access) once its pools passed ~620K slots: the
# sketch write computed head * stride of the head-major sketch store in int32, and head 7 of a store
# of 31 layers x 620K slots x d' 16 starts past 2^31 elements. These tests give every kernel views
# whose element offsets run past 2^31, with every stride below it (so that Triton passes the strides
# as int32 and only the products can overflow), without the memory: sparse file mappings, of which
# only the pages written are ever backed (a few MB in all).

_HUGE_BASE = 2**32  # a huge view starts this many elements into its 2^33-element mapping
_INT32_LIMIT = 2**31


def _huge_view(tmp_path, shape, strides, dtype):
    """A ``shape``/``strides`` view of zeros reaching past 2^31 elements (and below 2^32) over a sparse
    file mapping. It starts 2^32 elements into the mapping, so that an offset a kernel computes in
    int32, off by -2^32 once it wraps, still points into the mapping: the values then come out
    wrong and the test fails (on a GPU that access faults; here it would crash the process)."""
    assert all(0 <= s < _INT32_LIMIT for n, s in zip(shape, strides) if n > 1), "strides past 2^31 are passed as int64"
    extent = 1 + sum((n - 1) * s for n, s in zip(shape, strides))
    assert _INT32_LIMIT < extent <= _HUGE_BASE, extent
    fd, name = tempfile.mkstemp(dir=tmp_path)
    os.close(fd)
    flat = torch.from_file(name, shared=True, size=2 * _HUGE_BASE, dtype=dtype)
    os.unlink(name)  # the mapping stays
    return flat.as_strided(shape, strides, _HUGE_BASE)


def _past_int32(view, *index) -> bool:
    """Whether ``view[index]`` starts past 2^31 elements into its huge view's region of the mapping."""
    return view.storage_offset() - _HUGE_BASE + sum(i * s for i, s in zip(index, view.stride())) >= _INT32_LIMIT


# Llama-like in miniature: 4 KV heads, d' 16, D 64; enough slots for offsets past 2^31.
_H_KV, _DP, _D = 4, 16, 64
_STORE_SLOTS = 24_000_000  # store [H_kv, 2 layers, slots, d'] (the backend's): head 3 starts 2.3e9 elements in
_SLOT_MAJOR_SLOTS = 40_000_000  # pool [slots, H_kv, d']: slot 34M starts 2.2e9 elements in
_KV_SLOTS = 12_000_000  # K/V pool [slots, H_kv, D]: slot 8.4M starts 2.1e9 elements in
_BIG_STRIDE = 1_200_000_000  # stride of a dense view's rows (or layers, or tokens): index 2 starts 2.4e9 in


def _sketch_pool(tmp_path, layout):
    """``(pool [slots, H_kv, d'], layers [2, slots, H_kv, d'] or None, slots)``: layer 1 of the backend's
    head-major store (and both its layers), or a slot-major pool."""
    if layout == "store":
        store = _huge_view(tmp_path, (_H_KV, 2, _STORE_SLOTS, _DP), (2 * _STORE_SLOTS * _DP, _STORE_SLOTS * _DP, _DP, 1),
                           torch.bfloat16)
        return store[:, 1].transpose(0, 1), store.permute(1, 2, 0, 3), _STORE_SLOTS
    pool = _huge_view(tmp_path, (_SLOT_MAJOR_SLOTS, _H_KV, _DP), (_H_KV * _DP, _DP, 1), torch.bfloat16)
    return pool, None, _SLOT_MAJOR_SLOTS


def _top_slots(n, slots, gen):
    """``n`` distinct slots among the last 4096 of a pool, shuffled."""
    return slots - 1 - torch.randperm(4096, generator=gen)[:n]


def _fill(view, gen):
    view.copy_(torch.randn(view.shape, generator=gen))
    return view


@pytest.mark.parametrize("rope", [False, True])
@pytest.mark.parametrize("layout", ["store", "slot-major"])
def test_sketch_write_offsets_past_int32(tmp_path, layout, rope):
    """The sketch write (the crash of issue 18) into rows past 2^31 elements (heads of the backend's
    store; slots of a slot-major pool, there from keys whose tokens lie past 2^31 too): the rows land
    where the same write into a small pool puts them, bit for bit."""
    gen = torch.Generator().manual_seed(18)
    n = 20
    pool, _, slots = _sketch_pool(tmp_path, layout)
    loc = _top_slots(n, slots, gen)
    keys = torch.randn(n, _H_KV * 2, _D, generator=gen).bfloat16()[:, ::2]
    if layout == "store":
        assert _past_int32(pool, 0, _H_KV - 1)  # head 3 of layer 1, whatever the slot
    else:
        assert _past_int32(pool, int(loc.min()))
        big_keys = _huge_view(tmp_path, (n, _H_KV, _D), (_BIG_STRIDE // 10, _D, 1), torch.bfloat16)
        assert _past_int32(big_keys, n - 1)
        keys = big_keys.copy_(keys)
    weight = (torch.randn(_H_KV, _D, _DP, generator=gen) / _D**0.5).bfloat16()
    rope_args = None
    if rope:
        angles = _rope_angles(torch.randint(0, 40000, (n,), generator=gen), _D, torch.bfloat16)
        rope_args = (angles[:, : _D // 2], angles[:, _D // 2 :], torch.tensor([-1, -1, -1, -1, 0, 5, 17, 31]))
    small = torch.zeros(n, _H_KV, _DP, dtype=torch.bfloat16)
    sketch_write_triton(small, torch.arange(n), keys.contiguous(), weight, rope=rope_args)
    sketch_write_triton(pool, loc.int(), keys, weight, rope=rope_args)
    assert small.abs().amin(-1).gt(0).all()
    assert torch.equal(pool[loc], small)
    want = reference.project_sketch(keys, weight, rope_args).bfloat16()
    torch.testing.assert_close(small.float(), want.float(), rtol=1.6e-2, atol=1.6e-2)


@pytest.mark.parametrize("layout", ["store", "slot-major", "dense", "dense-layers"])
def test_select_offsets_past_int32(tmp_path, layout):
    """Score + select over sketch rows past 2^31 elements: the backend's store over its two layers
    (heads past 2^31) through a token table whose last positions lie past 2^31, a slot-major pool
    (slots past 2^31) through a table whose last row does; a dense cache whose last row (with its
    query and ``out`` rows) or layer (with its queries) lies past 2^31. The selection equals the one
    of a small copy of the same sketch."""
    gen = torch.Generator().manual_seed(19)
    b, t, k, group = 3, 200, 24, 2
    start, end = _rows(b, t, True, gen)
    end[-1] = t  # the last row, past 2^31 elements in the dense layouts, has candidates to score
    n_layers = 2 if layout == "store" else 3 if layout == "dense-layers" else None
    q_shape = (b, _H_KV * group, _DP) if n_layers is None else (n_layers, b, _H_KV * group, _DP)
    q_sel = torch.randn(q_shape, generator=gen).bfloat16()
    out = small_table = table = None
    if layout.startswith("dense"):
        if layout == "dense":
            buf = _huge_view(tmp_path, (b, _H_KV, t, _DP), (_BIG_STRIDE, t * _DP, _DP, 1), torch.bfloat16)
            q_sel = _huge_view(tmp_path, q_shape, (_BIG_STRIDE, _DP, 1), torch.bfloat16).copy_(q_sel)
            out = _huge_view(tmp_path, (b, _H_KV, k), (_BIG_STRIDE, k, 1), torch.int32)
            assert _past_int32(buf, b - 1) and _past_int32(q_sel, b - 1) and _past_int32(out, b - 1)
        else:
            buf = _huge_view(tmp_path, (n_layers, b, _H_KV, t, _DP), (_BIG_STRIDE, _H_KV * t * _DP, t * _DP, _DP, 1),
                             torch.bfloat16)
            q_strides = (_BIG_STRIDE, _H_KV * group * _DP, _DP, 1)
            q_sel = _huge_view(tmp_path, q_shape, q_strides, torch.bfloat16).copy_(q_sel)
            assert _past_int32(buf, n_layers - 1) and _past_int32(q_sel, n_layers - 1)
        small = _fill(buf, gen).contiguous()
    else:
        pool, layered, slots = _sketch_pool(tmp_path, layout)
        buf = layered if layout == "store" else pool
        if layout == "store":  # positions past 2^31: a table stored position-major, with a large stride
            table = _huge_view(tmp_path, (b, t), (1, _BIG_STRIDE // 100), torch.int32)
            assert _past_int32(table, 0, t - 1) and _past_int32(pool, 0, _H_KV - 1)
        else:
            table = _huge_view(tmp_path, (b, t), (_BIG_STRIDE, 1), torch.int32)
        table.copy_(_top_slots(b * t, slots, gen).view(b, t))
        if layout == "slot-major":
            assert _past_int32(table, b - 1) and _past_int32(pool, int(table.min()))
        flat = table.reshape(-1).long()
        for layer in buf.unbind(0) if n_layers else [buf]:
            layer[flat] = torch.randn(b * t, _H_KV, _DP, generator=gen).bfloat16()
        small = buf[:, flat] if n_layers else buf[flat]
        small_table = torch.arange(b * t, dtype=torch.int32).view(b, t)
    kw = dict(sinks=S, window=W, k=k, config=SMALL_SELECT)
    got = score_select_triton(q_sel, buf, start, end, token_table=table, out=out, **kw)
    want = score_select_triton(q_sel.contiguous(), small, start, end, token_table=small_table, **kw)
    assert torch.equal(got, want)
    for j in range(n_layers or 1):
        dense = reference.gather_positions(small[j] if n_layers else small, small_table)
        _check_selection(got[j] if n_layers else got, q_sel[j] if n_layers else q_sel, dense, start, end, k)


@pytest.mark.parametrize("layout", ["paged", "dense"])
def test_attention_offsets_past_int32(tmp_path, layout):
    """Budgeted attention over K/V rows past 2^31 elements, with the decode step's sketch written past
    2^31 elements: SGLang's slot-major pool (slots past 2^31) through a token table whose last
    positions lie past 2^31, with query and output heads past 2^31, the sketch into a slot-major pool;
    or a dense cache, query and output whose last rows lie past 2^31, the sketch into heads of the
    backend's store. Output and sketch rows are those of a small copy, bit for bit."""
    gen = torch.Generator().manual_seed(20)
    b, t, k, group = 3, 100, 12, 2
    dtype = torch.bfloat16
    start, end = _rows(b, t, True, gen)
    q = torch.randn(b, _H_KV * group, _D, generator=gen).to(dtype)
    sel = score_select_reference(torch.randn(b, _H_KV, 16, generator=gen), torch.randn(b, _H_KV, t, 16, generator=gen),
                                 start, end, sinks=S, window=W, k=k)
    if layout == "paged":
        table = _huge_view(tmp_path, (b, t), (1, _BIG_STRIDE // 50), torch.int32)  # position-major
        table.copy_(_top_slots(b * t, _KV_SLOTS, gen).view(b, t))
        flat = table.reshape(-1).long()
        kbuf, vbuf = (_huge_view(tmp_path, (_KV_SLOTS, _H_KV, _D), (_H_KV * _D, _D, 1), dtype) for _ in range(2))
        for buf in (kbuf, vbuf):
            buf[flat] = torch.randn(b * t, _H_KV, _D, generator=gen).to(dtype)
        # query (and output) heads 320M elements apart: head 7 starts 2.2e9 elements in
        q = _huge_view(tmp_path, q.shape, (_D, 320_000_000, 1), dtype).copy_(q)
        out = _huge_view(tmp_path, q.shape, (_D, 320_000_000, 1), dtype)
        assert _past_int32(kbuf, int(table.min())) and _past_int32(table, 0, t - 1)
        assert _past_int32(q, 0, _H_KV * group - 1) and _past_int32(out, 0, _H_KV * group - 1)
        small_k, small_v, small_table = kbuf[flat], vbuf[flat], torch.arange(b * t).view(b, t)
        pool, _, slots = _sketch_pool(tmp_path, "slot-major")
    else:
        kbuf, vbuf = (_fill(_huge_view(tmp_path, (b, _H_KV, t, _D), (_BIG_STRIDE, t * _D, _D, 1), dtype), gen)
                      for _ in range(2))
        q = _huge_view(tmp_path, q.shape, (_BIG_STRIDE, _D, 1), dtype).copy_(q)
        out = _huge_view(tmp_path, q.shape, (_BIG_STRIDE, _D, 1), dtype)
        assert _past_int32(kbuf, b - 1) and _past_int32(q, b - 1) and _past_int32(out, b - 1)
        table = small_table = None
        small_k, small_v = kbuf.contiguous(), vbuf.contiguous()
        pool, _, slots = _sketch_pool(tmp_path, "store")
    loc = _top_slots(b, slots, gen)
    keys = torch.randn(b, _H_KV, _D, generator=gen).to(dtype)
    weight = (torch.randn(_H_KV, _D, _DP, generator=gen) / _D**0.5).to(dtype)
    small_pool = torch.zeros(b, _H_KV, _DP, dtype=dtype)
    kw = dict(sinks=S, window=W, scale=0.125, config=AttentionConfig(num_splits=3, block_n=16))
    got = budgeted_attention_triton(q, kbuf, vbuf, sel, start, end, token_table=table, out=out,
                                    new_sketch=NewSketch(pool, loc.int(), keys, weight), **kw)
    want = budgeted_attention_triton(q.contiguous(), small_k, small_v, sel, start, end, token_table=small_table,
                                     new_sketch=NewSketch(small_pool, torch.arange(b), keys, weight), **kw)
    assert torch.equal(got, want)
    assert small_pool.abs().amin(-1).gt(0).all()
    assert torch.equal(pool[loc], small_pool)
    ref = reference.budgeted_attention(q.contiguous(), small_k, small_v, sel, start, end, S, W, 0.125, small_table)
    torch.testing.assert_close(got.float(), ref.float(), rtol=_tol(dtype), atol=_tol(dtype))


def test_residual_layer_norm_offsets_past_int32(tmp_path):
    """The producer norm over rows past 2^31 elements (a large row stride): the small copy's output."""
    gen = torch.Generator().manual_seed(21)
    hidden = _fill(_huge_view(tmp_path, (3, 576), (_BIG_STRIDE, 1), torch.bfloat16), gen)
    residual = _fill(_huge_view(tmp_path, (3, 576), (_BIG_STRIDE, 1), torch.bfloat16), gen)
    assert _past_int32(hidden, 2)
    weight, bias = torch.randn(576, generator=gen).bfloat16(), torch.randn(576, generator=gen).bfloat16()
    got = residual_layer_norm_triton(hidden, residual, weight, bias, 1e-5)
    assert torch.equal(got, residual_layer_norm_triton(hidden.contiguous(), residual.contiguous(), weight, bias, 1e-5))


# ------------------------------------------------------------------------------------- dispatch


def test_sparse_decode_triton_matches_reference_and_reuses_selection():
    gen = torch.Generator().manual_seed(7)
    b, h_kv, group, t, d, k = 2, 2, 4, 150, 64, 24
    q = torch.randn(b, h_kv * group, d, generator=gen, dtype=torch.float32).half()
    kbuf = torch.randn(b, h_kv, t, d, generator=gen).half()
    vbuf = torch.randn(b, h_kv, t, d, generator=gen).half()
    q_sel = torch.randn(b, h_kv * group, 16, generator=gen)
    sketch = torch.randn(b, h_kv, t, 16, generator=gen)
    start, end = _rows(b, t, True, gen)
    kw = dict(sinks=S, window=W, budget=k, scale=0.125)
    out_t, sel_t = sparse_decode(q, kbuf, vbuf, q_sel, sketch, start, end, impl="triton", **kw)
    out_r, sel_r = sparse_decode(q, kbuf, vbuf, q_sel, sketch, start, end, impl="reference", **kw)
    out_a, sel_a = sparse_decode(q, kbuf, vbuf, q_sel, sketch, start, end, impl="auto", **kw)
    assert sel_t.dtype == sel_r.dtype == sel_a.dtype == torch.int32
    _check_selection(sel_t, q_sel, sketch, start, end, k)
    assert torch.equal(torch.sort(sel_r, -1).values, torch.sort(sel_a, -1).values)
    torch.testing.assert_close(out_t, out_r, rtol=4e-3, atol=4e-3)
    torch.testing.assert_close(out_a, out_r, rtol=0, atol=0)
    # prediction-interval reuse: the selection (here widened by neighbour fetching) skips scoring
    wide = reference.expand_neighbors(sel_t.long(), start, end, S, W, t)
    out_reuse, sel_reuse = sparse_decode(q, kbuf, vbuf, None, None, start, end, selection=wide, impl="triton", **kw)
    assert sel_reuse is wide
    ref = reference.budgeted_attention(q, kbuf, vbuf, wide, start, end, S, W, 0.125)
    torch.testing.assert_close(out_reuse, ref, rtol=4e-3, atol=4e-3)


def test_custom_ops_opcheck_and_compile():
    gen = torch.Generator().manual_seed(8)
    b, h_kv, t, d = 2, 2, 64, 64
    q = torch.randn(b, h_kv * 4, d, generator=gen)
    kbuf = torch.randn(b, h_kv, t, d, generator=gen)
    vbuf = torch.randn(b, h_kv, t, d, generator=gen)
    q_sel = torch.randn(b, h_kv, 16, generator=gen)
    sketch = torch.randn(b, h_kv, t, 16, generator=gen)
    start, end = torch.tensor([0, 5]), torch.tensor([60, 64])
    select_args = (q_sel, sketch, start, end, None, torch.tensor([3, 10]), S, W, 10, torch.int32)
    torch.library.opcheck(torch.ops.butler.score_select.default, select_args)
    sel = torch.ops.butler.score_select(*select_args)
    torch.library.opcheck(torch.ops.butler.budgeted_attention.default, (q, kbuf, vbuf, sel, start, end, None, S, W, 0.125))
    counters = torch.zeros(q.shape[0] * kbuf.shape[1], dtype=torch.int32)
    torch.library.opcheck(torch.ops.butler.budgeted_attention.default, (q, kbuf, vbuf, sel, start, end, None, S, W, 0.125, counters))
    # several layers at once, and the sketch write (a mutating op)
    layered = (q_sel.expand(3, -1, -1, -1), sketch.expand(3, -1, -1, -1, -1), *select_args[2:])
    torch.library.opcheck(torch.ops.butler.score_select.default, layered)
    assert torch.equal(torch.ops.butler.score_select(*layered)[1], sel)
    pool = torch.randn(50, h_kv, 16, generator=gen)
    torch.library.opcheck(torch.ops.butler.write_sketch.default, (pool, torch.tensor([3, 7]), q[:2, :h_kv], torch.randn(h_kv, d, 16, generator=gen)))

    def step(q, kbuf, vbuf, q_sel, sketch, start, end):
        return sparse_decode(q, kbuf, vbuf, q_sel, sketch, start, end, sinks=S, window=W, budget=10, scale=0.125, impl="auto")

    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")  # fullgraph: a graph break raises
    out_c, sel_c = compiled(q, kbuf, vbuf, q_sel, sketch, start, end)
    out_e, sel_e = step(q, kbuf, vbuf, q_sel, sketch, start, end)
    assert torch.equal(sel_c, sel_e)
    torch.testing.assert_close(out_c, out_e)


def test_interpreter_mode_is_used():
    from triton.runtime.interpreter import InterpretedFunction

    assert os.environ["TRITON_INTERPRET"] == "1" and triton.knobs.runtime.interpret
    for name, kernel in (("_score_select_kernels", "_score_hist_kernel"), ("_attention_kernels", "_attn_split_kernel")):
        assert isinstance(getattr(_triton_loader.kernel_module(name, torch.device("cpu")), kernel), InterpretedFunction)
    # the launcher sizes the workspace the kernels index
    from butler_kernels import score_select as score_select_module

    kernels = _triton_loader.kernel_module("_score_select_kernels", torch.device("cpu"))
    assert score_select_module._WS_STRIDE == int(kernels.WS_STRIDE)
    # ... and reads its work counters where the kernels write them
    assert score_select_module._WS_N_CAND == int(kernels.WS_N_CAND)
    counters = ("WS_N_CAND", "WS_N_WINDOW", "WS_N_PARALLEL", "WS_N_SCAN", "WS_N_SELECT", "WS_N_PASSES")
    assert [int(getattr(kernels, c)) for c in counters] == list(range(score_select_module._WS_N_CAND, score_select_module._WS_N_CAND + score_select_module._N_COUNTERS))


# ---------------------------------------------------------------------------------------- checks


def _valid_select_args():
    return dict(
        q_sel=torch.randn(2, 4, 16), sketch=torch.randn(2, 2, 30, 16),
        start=torch.zeros(2, dtype=torch.int64), end=torch.full((2,), 30),
    )


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(q_sel=torch.randn(2, 4)), ValueError, "q_sel must be"),
        (dict(q_sel=torch.randn(2, 3, 16)), ValueError, "do not group evenly"),
        (dict(q_sel=torch.randn(2, 4, 8)), ValueError, "sketch width"),
        (dict(q_sel=torch.randn(2, 4, 16).long()), TypeError, "float16/bfloat16/float32"),
        (dict(sketch=torch.randn(2, 30, 16)), ValueError, "needs token_table"),
        (dict(sketch=torch.randn(3, 2, 30, 16)), ValueError, "batch"),
        (dict(start=torch.zeros(3, dtype=torch.int64)), ValueError, "start must have shape"),
        (dict(end=torch.full((2,), 30.0)), TypeError, "end must be int32 or int64"),
        (dict(k=-1), ValueError, "budget must be >= 0"),
        (dict(k=2.5), TypeError, "must be an int"),
        (dict(sinks=-1), ValueError, "sinks and window"),
        (dict(index_dtype=torch.int16), TypeError, "index_dtype"),
        (dict(budget_per_row=torch.ones(3, dtype=torch.int64)), ValueError, "budget_per_row"),
    ],
)
def test_select_rejects_bad_input(change, error, match):
    args = _valid_select_args()
    kw = dict(sinks=S, window=W, k=5)
    for key in ("k", "sinks", "index_dtype", "budget_per_row"):
        if key in change:
            kw[key] = change.pop(key)
    args.update(change)
    for fn in (score_select_triton, score_select_reference):
        with pytest.raises(error, match=match):
            fn(args["q_sel"], args["sketch"], args["start"], args["end"], **kw)


def test_attention_and_dispatch_reject_bad_input():
    q = torch.randn(2, 8, 64)
    kbuf = torch.randn(2, 2, 30, 64)
    sel = torch.zeros(2, 2, 4, dtype=torch.int64)
    start, end = torch.zeros(2, dtype=torch.int64), torch.full((2,), 30)
    kw = dict(sinks=S, window=W, scale=0.1)
    with pytest.raises(ValueError, match="do not group evenly"):
        budgeted_attention_triton(torch.randn(2, 7, 64), kbuf, kbuf, sel, start, end, **kw)
    with pytest.raises(TypeError, match="share one dtype"):
        budgeted_attention_triton(q.half(), kbuf, kbuf, sel, start, end, **kw)
    with pytest.raises(ValueError, match="head dim"):
        budgeted_attention_triton(torch.randn(2, 8, 32), kbuf, kbuf, sel, start, end, **kw)
    with pytest.raises(ValueError, match="sel must be"):
        budgeted_attention_triton(q, kbuf, kbuf, sel[:, :1], start, end, **kw)
    with pytest.raises(ValueError, match="out must be"):
        budgeted_attention_triton(q, kbuf, kbuf, sel, start, end, out=torch.empty(2, 8, 32), **kw)
    with pytest.raises(ValueError, match="needs token_table"):
        budgeted_attention_triton(q, torch.randn(60, 2, 64), torch.randn(60, 2, 64), sel, start, end, **kw)
    for bad in (torch.zeros(3, dtype=torch.int32), torch.zeros(4), torch.zeros(8, dtype=torch.int32)[::2]):
        with pytest.raises(ValueError, match="split_counters must be a contiguous int32 tensor of at least B \\* H_kv = 4"):
            budgeted_attention_triton(q, kbuf, kbuf, sel, start, end, split_counters=bad, **kw)
        with pytest.raises(ValueError, match="split_counters must be"):
            torch.ops.butler.budgeted_attention(q, kbuf, kbuf, sel, start, end, None, S, W, 0.1, bad)
    q_sel, sketch = torch.randn(2, 2, 16), torch.randn(2, 2, 30, 16)
    common = dict(sinks=S, window=W, scale=0.1)
    with pytest.raises(ValueError, match="budget must be >= 0"):
        sparse_decode(q, kbuf, kbuf, q_sel, sketch, start, end, budget=-3, **common)
    with pytest.raises(TypeError, match="budget_for_rows"):
        sparse_decode(q, kbuf, kbuf, q_sel, sketch, start, end, budget=0.1, **common)
    with pytest.raises(ValueError, match="impl must be"):
        sparse_decode(q, kbuf, kbuf, q_sel, sketch, start, end, budget=4, impl="cuda", **common)
    with pytest.raises(ValueError, match="needs q_sel and sketch"):
        sparse_decode(q, kbuf, kbuf, None, None, start, end, budget=4, **common)
    with pytest.raises(ValueError, match="must be a power of two"):
        SelectConfig(chunk_score=100)


# ------------------------------------------------------------------------- GPU code, compiled here


def _nvidia_backend_available() -> bool:
    bin_dir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    return os.path.exists(os.path.join(bin_dir, "ptxas")) and os.path.exists(os.path.join(bin_dir, "cuobjdump"))


@pytest.mark.skipif(not _nvidia_backend_available(), reason="Triton's NVIDIA backend (ptxas, cuobjdump) is not installed")
def test_kernels_compile_for_hopper():
    """The interpreter accepts code the GPU compiler rejects: build every kernel for sm_90 as the
    launchers configure it for Llama-3.1-8B (no GPU needed). A fresh process, because this one
    runs Triton in interpreter mode."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (
        "import json, dataclasses\n"
        "from butler_kernels._compile_check import build_all\n"
        "print(json.dumps([dataclasses.asdict(b) for b in build_all(90)]))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    builds = json.loads(proc.stdout.strip().splitlines()[-1])
    assert {b["kernel"] for b in builds} == {
        "_score_hist_kernel", "_compact_kernel", "_boundary_kernel", "_attn_split_kernel", "_sketch_write_kernel",
        "_residual_layer_norm_kernel",
    }
    for b in builds:
        assert b["spill_bytes"] == 0, f"{b['kernel']} ({b['variant']}) spills {b['spill_bytes']} bytes"
        if b["kernel"] == "_attn_split_kernel":
            assert b["cp_async"], f"the K/V loop lost its pipelining: {b}"
            # fp32 K/V take IEEE dots on the FMA units by design (no TF32)
            assert b["mma"] or "float32" in b["variant"], f"the K/V loop lost its tensor cores: {b}"
