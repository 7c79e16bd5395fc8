"""Per-program timeline of one paged selection: where the scoring and compaction kernels spend their time.

    python benchmarks/trace_select.py            # batch 8 / 16 x 32K, 8 x 128K, 1 x 32K (needs a CUDA GPU)

Builds an instrumented copy of ``butler_kernels`` in a temporary folder (``%globaltimer`` stamps
written by every program: start, end of its loop, after its ticket, end of the row's last work; in
the compaction kernel also the phases of a row's serial end) and prints, per kernel, quantiles over
programs and rows in microseconds from the kernel's first program. Inputs are those of
``bench_kernels.py --layout paged`` (random queries and sketch, head-major sketch pool, 10% budget).
The instrumentation is a text patch of the kernel source: it fails loudly (AssertionError) when the
kernels change shape, rather than timing something else.
"""

from __future__ import annotations

import pathlib
import shutil
import sys
import tempfile

_HERE = pathlib.Path(__file__).resolve().parent
_SRC = _HERE.parent / "kernels" / "butler_kernels"


def _sub(text: str, old: str, new: str) -> str:
    """``text.replace(old, new)`` that fails when ``old`` is gone (the kernels changed shape)."""
    assert old in text, f"trace_select.py: kernel source no longer contains {old[:60]!r}"
    return text.replace(old, new)


def build_instrumented(dst: pathlib.Path) -> None:
    shutil.copytree(_SRC, dst, ignore=shutil.ignore_patterns("__pycache__"))
    k = (dst / "_score_select_kernels.py").read_text()
    k = _sub(k, "@triton.jit\ndef _order_key", '''@triton.jit
def _now(x):
    return tl.inline_asm_elementwise("mov.u64 $0, %globaltimer;", "=l,r", [x], dtype=tl.int64, is_pure=False, pack=1)


@triton.jit
def _stamp(dbg_ptr, row, p, n_prog, i, x):
    tl.store(dbg_ptr + (row.to(tl.int64) * n_prog + p) * 8 + i, _now(x))


@triton.jit
def _order_key''')
    # scoring kernel
    k = _sub(k, "    keys_ptr, ws_ptr,\n    T, sinks, window, k, n_b,\n    H_KV", "    keys_ptr, ws_ptr,\n    T, sinks, window, k, n_b, dbg_ptr,\n    H_KV")
    k = _sub(k, """    ws_row = ws_ptr + row.to(tl.int64) * WS_STRIDE
    lo, hi = _candidate_range(start_ptr, end_ptr, b, sinks, window, T)
    sk_ptr""", """    ws_row = ws_ptr + row.to(tl.int64) * WS_STRIDE
    _stamp(dbg_ptr, row, p, n_prog, 0, p)
    lo, hi = _candidate_range(start_ptr, end_ptr, b, sinks, window, T)
    sk_ptr""")
    k = _sub(k, """    # Window bins back to level-1 bins""", """    _stamp(dbg_ptr, row, p, n_prog, 1, p)
    # Window bins back to level-1 bins""")
    k = _sub(k, """    ticket = tl.atomic_add(ws_row + WS_TICKET1, 1, sem="acq_rel")
    if ticket == n_prog - 1:""", """    ticket = tl.atomic_add(ws_row + WS_TICKET1, 1, sem="acq_rel")
    _stamp(dbg_ptr, row, p, n_prog, 2, ticket)
    if ticket == n_prog - 1:""")
    k = _sub(k, """        tl.store(ws_row + WS_BIN_MAX, _INT32_MIN)


@triton.jit
def _bit_length""", """        tl.store(ws_row + WS_BIN_MAX, _INT32_MIN)
        _stamp(dbg_ptr, row, p, n_prog, 3, ticket)


@triton.jit
def _bit_length""")
    # compaction kernel
    k = _sub(k, "    T, side_stride, sinks, window, k, serial_cap, n_b,\n", "    T, side_stride, sinks, window, k, serial_cap, n_b, dbg_ptr,\n")
    k = _sub(k, """    side = side_ptr + row.to(tl.int64) * side_stride
    b1 = tl.load(ws_row + WS_B1)""", """    side = side_ptr + row.to(tl.int64) * side_stride
    _stamp(dbg_ptr, row, p, n_prog, 0, p)
    b1 = tl.load(ws_row + WS_B1)""")
    k = _sub(k, """    ticket = tl.atomic_add(ws_row + WS_TICKET2, 1, sem="acq_rel")
    if ticket == n_prog - 1:
        _finish_row(ws_row, side, keys_row, out_row, stride_ok, k_row, k, serial_cap, BLOCK)""", """    _stamp(dbg_ptr, row, p, n_prog, 1, p)
    ticket = tl.atomic_add(ws_row + WS_TICKET2, 1, sem="acq_rel")
    _stamp(dbg_ptr, row, p, n_prog, 2, ticket)
    if ticket == n_prog - 1:
        _finish_row(ws_row, side, keys_row, out_row, stride_ok, k_row, k, serial_cap, BLOCK)
        _stamp(dbg_ptr, row, p, n_prog, 3, ticket)""")
    k = _sub(k, "def _finish_row(ws_row, side, keys_row, out_row, stride_ok, k_row, k, serial_cap, BLOCK: tl.constexpr):",
                  "def _finish_row(ws_row, side, keys_row, out_row, stride_ok, k_row, k, serial_cap, dbg_ptr, row, p, n_prog, BLOCK: tl.constexpr):")
    k = _sub(k, "_finish_row(ws_row, side, keys_row, out_row, stride_ok, k_row, k, serial_cap, BLOCK)",
                  "_finish_row(ws_row, side, keys_row, out_row, stride_ok, k_row, k, serial_cap, dbg_ptr, row, p, n_prog, BLOCK)")
    k = _sub(k, """    if need > 0:
        bin_min = tl.load(ws_row + WS_BIN_MIN, cache_modifier=".cg")
        bin_max = tl.load(ws_row + WS_BIN_MAX, cache_modifier=".cg")""", """    if need > 0:
        bin_min = tl.load(ws_row + WS_BIN_MIN, cache_modifier=".cg")
        bin_max = tl.load(ws_row + WS_BIN_MAX, cache_modifier=".cg")
        _stamp(dbg_ptr, row, p, n_prog, 4, bin_min)""")
    k = _sub(k, """            b2, a2, _ = _threshold_bin_mem(ws_row + WS_HIST, need, NB2, NB_REFINE, False)
""", """            b2, a2, _ = _threshold_bin_mem(ws_row + WS_HIST, need, NB2, NB_REFINE, False)
            _stamp(dbg_ptr, row, p, n_prog, 5, b2)
""")
    k = _sub(k, """                n_scan = n
    if deferred == 0:""", """                n_scan = n
                _stamp(dbg_ptr, row, p, n_prog, 6, written)
                tl.store(dbg_ptr + (row.to(tl.int64) * n_prog + p) * 8 + 7, n.to(tl.int64))
    if deferred == 0:""")
    assert k.count("_stamp(") >= 12, k.count("_stamp(")
    (dst / "_score_select_kernels.py").write_text(k)
    s = (dst / "score_select.py").read_text()
    s = _sub(s, "    launches = [\n        Launch(\n            \"_score_hist_kernel\"", """    DBG["score"] = torch.zeros(rows * n1 * 8, dtype=torch.int64, device=device)
    DBG["compact"] = torch.zeros(rows * n2 * 8, dtype=torch.int64, device=device)
    DBG["n"] = (n1, n2)
    launches = [
        Launch(
            "_score_hist_kernel\"""")
    s = _sub(s, "keys, ws,\n             t, sinks, window, k, b),", "keys, ws,\n             t, sinks, window, k, b, DBG[\"score\"]),")
    s = _sub(s, "t, side_stride, sinks, window, k, serial_cap, b),", "t, side_stride, sinks, window, k, serial_cap, b, DBG[\"compact\"]),")
    s = _sub(s, "_KERNELS = \"_score_select_kernels\"", "_KERNELS = \"_score_select_kernels\"\nDBG = {}")
    assert s.count("DBG") >= 6
    (dst / "score_select.py").write_text(s)


def main() -> None:
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="trace_select_"))
    build_instrumented(tmp / "butler_kernels")
    sys.path[:0] = [str(tmp), str(_HERE)]
    import math

    import torch

    import bench_kernels as bk
    import butler_kernels.score_select as ss

    assert ss.__file__.startswith(str(tmp)), ss.__file__
    if not torch.cuda.is_available():
        raise SystemExit("trace_select.py needs a CUDA GPU")
    for batch, context in [(8, 32768), (16, 32768), (8, 131072), (1, 32768)]:
        sinks, window, kv = 64, 128, 8
        k = math.ceil(0.1 * context)
        shape = bk.Shape(batch, context, 0.1, sinks, window, k, sinks + window + k, 32, kv, kv, 128, 16)
        x = bk.Inputs(shape, torch.bfloat16, "paged", torch.Generator(device="cuda").manual_seed(0))
        for _ in range(5):
            ss.score_select_triton(x.q_sel, x.sketch_ours, x.start, x.end, sinks=sinks, window=window, k=k, token_table=x.table)
        torch.cuda.synchronize()
        n1, n2 = ss.DBG["n"]
        rows = batch * kv
        print(f"== batch {batch} x {context}: rows {rows}, programs/row score {n1} compact {n2}")
        for name, n in (("score", n1), ("compact", n2)):
            d = ss.DBG[name].view(rows, n, 8).double().cpu()
            t0 = d[:, :, 0].min()
            nmem = d[:, :, 7].amax(1)
            d = torch.where(d > 0, (d - t0) / 1000.0, torch.full_like(d, float("nan")))  # us from kernel start
            start, loop_end, ticket, fin, f_load, f_thr, f_split, _ = d.unbind(-1)
            loop = loop_end - start
            row_last_loop = loop_end.amax(1)
            fin_row = torch.nan_to_num(fin, nan=-1).amax(1)
            tail = fin_row - row_last_loop
            q = lambda v: " ".join(f"{float(v.quantile(p)):6.1f}" for p in (0.0, 0.5, 0.9, 1.0))
            print(f"  {name}: end {float(fin_row.max()):6.1f} us | program start q0/50/90/100 {q(start.flatten())} | "
                  f"loop dur {q(loop.flatten())} | row last loop end {q(row_last_loop)} | tail (finish) {q(tail)}")
            if name == "compact":
                lastp = torch.nan_to_num(fin, nan=-1).argmax(1)
                g = lambda v: v.gather(1, lastp[:, None])[:, 0]
                ticket_wait = g(ticket) - row_last_loop
                ld = g(f_load) - g(ticket); thr = g(f_thr) - g(f_load); split = g(f_split) - g(f_thr); rest = g(fin) - g(f_split)
                ok = ~torch.isnan(split)
                if not ok.any():
                    continue
                print(f"    rows serial {int(ok.sum())}/{rows}: ticket wait {q(ticket_wait)} | counters {q(ld[ok])} | level-2 thr {q(thr[ok])} | split {q(split[ok])} | pad {q(rest[ok])}")
                print(f"    members n q0/50/90/100 {q(nmem)}; split us for n<=1024 {q(split[ok & (nmem <= 1024)]) if (ok & (nmem <= 1024)).any() else '-'} n>1024 {q(split[ok & (nmem > 1024)]) if (ok & (nmem > 1024)).any() else '-'}")
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
