"""The SGLang plugin on CPU: registration, launch flags, and one decode step of the backend.

SGLang 0.5.12 pins transformers 5.6.0 and huggingface_hub < 2, older than the project's own, so it lives in
a venv of its own (``scripts/sglang_test_deps.sh``: ``.venvs/sglang-0.5.12``, or ``$BUTLER_SGLANG_PYTHON``)
and every check runs in a subprocess of that venv's python: nothing the project's ``.venv`` holds (a newer
transformers, the ``kernels`` package it pulls in) is visible there. ``tests/sglang_stubs`` (a labelled,
test-only torchvision stand-in: no CPU build of torchvision exists on the registry) is put on
``PYTHONPATH`` when the venv has no real torchvision. Triton runs in
interpreter mode (``TRITON_INTERPRET=1``), SGLang's own decode kernel included.

The checks themselves live at the bottom of this file and run as ``python tests/test_sglang.py NAME``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STUBS = Path(__file__).resolve().parent / "sglang_stubs"
SGLANG_PYTHON = Path(os.environ.get("BUTLER_SGLANG_PYTHON", REPO / ".venvs" / "sglang-0.5.12" / "bin" / "python"))

pytestmark = pytest.mark.sglang


def _sglang_pythonpath() -> str | None:
    """PYTHONPATH for the subprocesses, or None when the SGLang venv is missing."""
    if not SGLANG_PYTHON.is_file():
        return None
    probe = subprocess.run([str(SGLANG_PYTHON), "-c", "import importlib.util as u; print(u.find_spec('sglang') is not None, "
                            "u.find_spec('torchvision') is not None)"], capture_output=True, text=True, env={"PATH": os.environ.get("PATH", "")})
    has_sglang, has_torchvision = probe.stdout.split() if probe.returncode == 0 else ("False", "False")
    if has_sglang != "True":
        return None
    # test-only stand-in, see tests/sglang_stubs/README.md
    return "" if has_torchvision == "True" else str(STUBS)


PYTHONPATH = _sglang_pythonpath()
requires_sglang = pytest.mark.skipif(
    PYTHONPATH is None,
    reason=f"no SGLang venv at {SGLANG_PYTHON}: run `bash scripts/sglang_test_deps.sh`",
)


def _run(args: list[str], *, timeout: int = 300, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=PYTHONPATH or "",
        TRITON_INTERPRET="1",
        BUTLER_KERNELS_IMPL="triton",  # the Triton kernels themselves (interpreted), not the CPU reference
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        PYTHONWARNINGS="ignore",
        SGLANG_PLUGINS="tokenbutler",
    )
    for var in ("TOKENBUTLER_PREDICTOR", "TOKENBUTLER_BUDGET", "TOKENBUTLER_SINKS", "TOKENBUTLER_WINDOW", "TOKENBUTLER_MAX_BUDGET"):
        env.pop(var, None)
    env.update(extra_env or {})
    # cwd outside the checkout: a stale butler_zoo.egg-info in the repo root would hide the entry point
    with tempfile.TemporaryDirectory() as cwd:
        return subprocess.run([str(SGLANG_PYTHON), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _inner(name: str, tmp_path: Path) -> dict:
    proc = _run([str(Path(__file__).resolve()), name, str(tmp_path)])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"`{name}` failed (rc {proc.returncode}):\n{out[-6000:]}"
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert lines, out[-4000:]
    return json.loads(lines[-1][len("RESULT "):])


@requires_sglang
def test_launch_server_help_lists_backend_and_flags():
    proc = _run(["-m", "sglang.launch_server", "--help"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    text = proc.stdout
    for choice in ("--attention-backend", "--decode-attention-backend"):
        line = next(l for l in text.splitlines() if l.strip().startswith(choice + " {"))
        assert "tokenbutler" in line, line
    for flag in ("--tokenbutler-predictor", "--tokenbutler-budget", "--tokenbutler-sinks", "--tokenbutler-window",
                 "--tokenbutler-max-budget"):
        assert flag in text
    assert "TokenButler sparse decoding (butler-zoo plugin)" in text


@requires_sglang
def test_flags_reach_scheduler_server_args_and_startup_checks(tmp_path):
    r = _inner("flags", tmp_path)
    # values on the ServerArgs after a pickle round trip (how the scheduler process receives them)
    assert r["values"] == {"predictor": r["predictor"], "budget": 0.1, "sinks": 8, "window": 32, "max_budget": None}
    assert r["backends"] == ["triton", None, "tokenbutler"]  # prefill falls back to triton
    assert r["policy"] == {"sinks": 8, "window": 32, "budget": 0.1, "prediction_interval": 1}
    assert r["env_values"]["budget"] == 256 and r["env_values"]["predictor"] == r["predictor"]
    assert "tokenbutler" in r["registered"]
    assert r["cell_size_extra"] == r["cell_size_expected"] > 0
    errors = r["errors"]
    assert "fraction" in errors["bad_budget"] or "(0, 1]" in errors["bad_budget"]
    assert "does not fit the served model" in errors["mismatch"] and "num_hidden_layers" in errors["mismatch"]
    assert "tokenbutler backend is not selected" in errors["flags_without_backend"]
    assert "--page-size 16" in errors["page_size"]
    assert "no predictor" in errors["no_predictor"]
    assert "supports SGLang 0.5.12" in errors["old_sglang"]
    assert r["old_sglang_without_flag"] == "no exit"


@requires_sglang
def test_decode_step_against_sglang_dense_and_torch_reference(tmp_path):
    """Format-2 predictors (the default) at three budgets, a format-1 predictor at one."""
    r = _inner("decode", tmp_path)
    assert [(c["budget"], c["format"]) for c in r["cases"]] == [("16", 2), ("0.1", 2), ("1.0", 2), ("16", 1)]
    for case in r["cases"]:
        if case["all_dense"]:
            # a budget that covers every context the table holds: SGLang's own Triton decode, bit for bit
            assert all(d == 0.0 for d in case["max_abs_vs_sglang_dense"]), case
        # rows that fit sinks + window + budget attend every position: SGLang's dense decode up to
        # rounding (fp32 here) and the torch reference
        for row in case["dense_rows"]:
            assert case["max_abs_vs_sglang_dense"][row] < 2e-5, case
        # every row: the project's torch reference (score, top-B per KV head, budgeted attention)
        for row in range(3):
            assert case["max_abs_vs_reference"][row] < 2e-5, case
    by_budget = {c["budget"]: c for c in r["cases"] if c["format"] == 2}
    assert by_budget["1.0"]["all_dense"] and not by_budget["16"]["all_dense"] and not by_budget["0.1"]["all_dense"]
    assert by_budget["1.0"]["parent_decode_calls"] == 3  # every layer
    assert by_budget["16"]["parent_decode_calls"] == 0 and by_budget["0.1"]["parent_decode_calls"] == 0
    # layer 0 is dense in every case: through butler's kernel when the step is budgeted (the parent's
    # decode metadata is not even built then), SGLang's own kernel bit for bit when not
    for case in r["cases"]:
        assert case["layer0_parent_calls"] == (1 if case["all_dense"] else 0), case
        assert case["layer0_max_abs_vs_sglang_dense"] < (1e-12 if case["all_dense"] else 2e-5), case
    # layers 1 and 2 selected by their producer in one launch, equal to selecting in each layer
    assert by_budget["16"]["selected_by_producer"] == [1, 2] == by_budget["0.1"]["selected_by_producer"]
    assert by_budget["1.0"]["selected_by_producer"] == []
    assert all(case["per_layer_selection_equal"] for case in r["cases"])
    assert by_budget["1.0"]["sparse_rows"] == [] and len(by_budget["1.0"]["dense_rows"]) == 3  # budget covers the context
    assert by_budget["16"]["dense_rows"] == [0] and by_budget["16"]["sparse_rows"] == [1, 2]  # row by row
    assert by_budget["0.1"]["sparse_rows"] == [0, 1, 2]
    format1 = r["cases"][-1]
    assert format1["dense_rows"] == [0] and format1["sparse_rows"] == [1, 2] and format1["selected_by_producer"] == [1, 2]
    for case in r["cases"]:
        # the sketch store is reference.project_sketch of the pool's keys (format 2: with the angles of
        # each token's position, from the served model's rotary table), written by extend and decode
        # (fused into the attention launch for format 1, its own launch for format 2; the parent's
        # K/V write when the budget covers the context)
        assert case["sketch_written_in_extend"] < 1e-6 and case["sketch_written_in_decode"] < 1e-6, case
        # producer queries: predictor.position_queries(producer_queries(...)) at the decode positions
        assert case["producer_queries_max_abs"] < 1e-5, case
        assert case["graph_replay_equals_eager"], case
    for case in r["cases"][:3]:
        # format 2 is not format 1 by another name: the rotations change the sketch and the queries
        assert case["sketch_differs_from_format1"] and case["queries_differ_from_unpositioned"], case
        # positions reach the backend: decode angles of the rows' positions, extend batches' of theirs
        assert case["decode_angles_ok"] and case["extend_angles_ok"] and case["padding_is_identity"], case
    assert r["startup_errors"]["interleaved"].startswith("TokenButlerStartupError") and "neox" in r["startup_errors"]["interleaved"]
    assert "rotary_emb" in r["startup_errors"]["missing"]
    assert "rotary_dim == head_dim" in r["startup_errors"]["partial"]


# =====================================================================================================
# The checks, run in a subprocess with SGLang on the path: python tests/test_sglang.py NAME TMPDIR
# =====================================================================================================
L, HQ, HKV, D, E = 3, 4, 2, 16, 64


def _make_model_and_predictor(tmp: Path, layers: int = L, name: str = "pred", format_version: int | None = None):
    import torch
    from transformers import LlamaConfig

    from butler_zoo import ButlerConfig, ButlerPredictor

    model_dir = tmp / "model"
    if not (model_dir / "config.json").is_file():
        cfg = LlamaConfig(hidden_size=E, intermediate_size=128, num_hidden_layers=L, num_attention_heads=HQ,
                          num_key_value_heads=HKV, head_dim=D, vocab_size=256, max_position_embeddings=512)
        cfg.architectures = ["LlamaForCausalLM"]
        cfg.save_pretrained(model_dir)
    kw = {} if format_version is None else {"format_version": format_version}  # default: the current format (2)
    bc = ButlerConfig(base_model="tiny-llama", base_model_type="llama", num_hidden_layers=layers, hidden_size=E,
                      num_attention_heads=HQ, num_key_value_heads=HKV, head_dim=D, producer_stride=2, sketch_dim=8, mlp_dim=32,
                      **kw)
    torch.manual_seed(0)
    ButlerPredictor(bc).save_pretrained(tmp / name)
    return model_dir, tmp / name


def _server_args(model_dir, *extra):
    from sglang.srt.server_args import prepare_server_args

    return prepare_server_args(["--model-path", str(model_dir), "--skip-tokenizer-init", "--device", "cpu", *extra])


def _error_of(fn) -> str:
    try:
        fn()
    except SystemExit as e:
        return str(e.code)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return "no exit"


def _check_flags(tmp: Path) -> dict:
    import contextlib
    import io
    import pickle

    from sglang.srt.plugins import load_plugins

    load_plugins()
    from butler_sglang import plugin, settings
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS
    from sglang.srt.model_executor.pool_configurator import DefaultPoolConfigurator

    model_dir, pred = _make_model_and_predictor(tmp)
    _, wrong = _make_model_and_predictor(tmp, layers=5, name="pred-5-layers")
    tb = ["--decode-attention-backend", "tokenbutler", "--tokenbutler-predictor", str(pred)]
    sa = _server_args(model_dir, *tb, "--tokenbutler-budget", "10%", "--tokenbutler-sinks", "8", "--tokenbutler-window", "32")
    sa = pickle.loads(pickle.dumps(sa))  # as the scheduler process receives it
    resolved = settings.validate_server_args(sa)
    sa.check_server_args()  # the launcher-side hook passes

    # sgl.Engine(**kwargs) path: no command line, environment variables instead
    from sglang.srt.server_args import ServerArgs

    os.environ.update(TOKENBUTLER_PREDICTOR=str(pred), TOKENBUTLER_BUDGET="256")
    env_sa = ServerArgs(model_path=str(model_dir), skip_tokenizer_init=True, device="cpu",
                        attention_backend="triton", decode_attention_backend="tokenbutler")
    env_values = settings.requested_values(env_sa)
    env_resolved = settings.validate_server_args(env_sa)
    for v in ("TOKENBUTLER_PREDICTOR", "TOKENBUTLER_BUDGET"):
        os.environ.pop(v)

    # the KV pool sizing counts the sketch: d' * H_kv * (layers 1..L-1) * 2 bytes (bf16)
    import torch
    from types import SimpleNamespace

    mr = SimpleNamespace(server_args=sa, model_config=sa.get_model_config(), kv_cache_dtype=torch.bfloat16, dtype=torch.bfloat16,
                         use_mla_backend=False, start_layer=0)
    import sglang.srt.model_executor.pool_configurator as pc

    pc.get_attention_tp_size = lambda: 1
    import sglang.srt.layers.dp_attention as dpa

    dpa.get_attention_tp_size = lambda: 1
    cfgr = DefaultPoolConfigurator.__new__(DefaultPoolConfigurator)
    with_sketch = cfgr._compute_cell_size(mr, L)
    dense_sa = _server_args(model_dir, "--attention-backend", "triton")
    without = cfgr._compute_cell_size(SimpleNamespace(**{**vars(mr), "server_args": dense_sa}), L)

    errors = {}
    with contextlib.redirect_stderr(io.StringIO()) as err:
        errors["bad_budget"] = _error_of(lambda: _server_args(model_dir, *tb, "--tokenbutler-budget", "1.5"))
    errors["bad_budget"] += err.getvalue()
    errors["mismatch"] = _error_of(
        lambda: _server_args(model_dir, "--decode-attention-backend", "tokenbutler", "--tokenbutler-predictor", str(wrong)).check_server_args()
    )
    errors["flags_without_backend"] = _error_of(
        lambda: _server_args(model_dir, "--attention-backend", "triton", "--tokenbutler-predictor", str(pred)).check_server_args()
    )
    errors["page_size"] = _error_of(lambda: _server_args(model_dir, *tb, "--page-size", "16").check_server_args())
    errors["no_predictor"] = _error_of(lambda: _server_args(model_dir, "--decode-attention-backend", "tokenbutler").check_server_args())

    # an unsupported SGLang release: SystemExit only when the backend is asked for
    plugin._registered = False
    real = settings.sglang_version
    settings.sglang_version = lambda: "0.5.23"
    argv = sys.argv
    try:
        sys.argv = ["launch_server", "--decode-attention-backend", "tokenbutler"]
        errors["old_sglang"] = _error_of(plugin.register)
        sys.argv = ["launch_server", "--attention-backend", "triton"]
        old_without = _error_of(plugin.register)
    finally:
        sys.argv, settings.sglang_version = argv, real
        plugin._registered = True
    return {
        "predictor": str(pred),
        "values": getattr(sa, settings.SERVER_ARGS_ATTR),
        "backends": [sa.attention_backend, sa.prefill_attention_backend, sa.decode_attention_backend],
        "policy": resolved.policy.to_dict(),
        "env_values": env_values,
        "env_policy": env_resolved.policy.to_dict(),
        "registered": sorted(k for k in ATTENTION_BACKENDS if k == "tokenbutler"),
        "cell_size_extra": with_sketch - without,
        "cell_size_expected": (L - 1) * HKV * 8 * 2,
        "errors": errors,
        "old_sglang_without_flag": old_without,
    }


def _fake_runner(sa, dtype, layers, forward=None):
    """The attributes of ModelRunner that TritonAttnBackend and the plugin read, around SGLang's own
    ReqToTokenPool and MHATokenToKVPool; ``forward(forward_batch)`` stands for the model's forward."""
    import types

    import torch
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool

    r2t = ReqToTokenPool(size=4, max_context_len=160, device="cpu", enable_memory_saver=False)
    pool = MHATokenToKVPool(600, page_size=1, dtype=dtype, head_num=HKV, head_dim=D, layer_num=L, device="cpu",
                            enable_memory_saver=False)
    model = types.SimpleNamespace(model=types.SimpleNamespace(layers=torch.nn.ModuleList(layers)))
    return types.SimpleNamespace(
        server_args=sa, model_config=sa.get_model_config(), req_to_token_pool=r2t, token_to_kv_pool=pool,
        token_to_kv_pool_allocator=None, sliding_window_size=None, hybrid_gdn_config=None, kimi_linear_config=None,
        linear_attn_model_spec=None, device="cpu", gpu_id=0, dtype=dtype, model=model, is_draft_worker=False,
        start_layer=0, end_layer=L, forward=forward or (lambda forward_batch, *a, **kw: None),
    )


def _rotary(sa, neox: bool = True, rotary_dim: int = D):
    """SGLang's own RotaryEmbedding of the tiny model (the table format-2 predictors take angles from)."""
    import sglang.srt.layers.rotary_embedding.base as rope_base
    from sglang.srt.layers.rotary_embedding import get_rope
    from sglang.srt.server_args import set_global_server_args_for_scheduler

    set_global_server_args_for_scheduler(sa)
    # test-only: off CUDA, SGLang builds its RoPE with vLLM's kernel unless it runs its CPU engine
    rope_base._is_cpu = True
    return get_rope(D, rotary_dim=rotary_dim, max_position=512, base=10000, is_neox_style=neox)


def _check_decode(tmp: Path) -> dict:
    import types

    import torch
    from sglang.srt.plugins import load_plugins

    load_plugins()
    import sglang.srt.layers.attention.triton_backend as tb
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from butler_kernels import reference as ref
    from butler_sglang import backend as bb

    tb.get_attention_tp_size = lambda: 1  # no distributed init on CPU: attention TP size 1
    model_dir, pred2 = _make_model_and_predictor(tmp)
    _, pred1 = _make_model_and_predictor(tmp, name="pred-format-1", format_version=1)
    dtype = torch.float32  # the Triton interpreter's bf16 dots are not exact

    class DecoderLayer(torch.nn.Module):  # returns (hidden_states, residual) like SGLang's Llama layers
        def __init__(self, rotary):
            super().__init__()
            self.self_attn = torch.nn.Module()
            self.self_attn.rotary_emb = rotary  # one table shared by every layer, as get_rope caches it

        def forward(self, positions, hidden, forward_batch, residual):
            return hidden * 2, hidden + 1

    def angles(rotary, positions):  # cos, sin [n, D/2] of the served model's table
        cos, sin = rotary.cos_sin_cache[positions.long()].chunk(2, dim=-1)
        return cos.to(dtype), sin.to(dtype)

    def max_abs(a, b):
        return (a.float() - b.float()).abs().max().item()

    result = {"cases": []}
    for budget, fmt in (("16", 2), ("0.1", 2), ("1.0", 2), ("16", 1)):
        torch.manual_seed(1)
        pred = pred2 if fmt == 2 else pred1
        sa = _server_args(model_dir, "--decode-attention-backend", "tokenbutler", "--tokenbutler-predictor", str(pred),
                          "--tokenbutler-budget", budget, "--tokenbutler-sinks", "4", "--tokenbutler-window", "8")
        rotary = _rotary(sa)
        radix = [RadixAttention(HQ, D, D ** -0.5, num_kv_heads=HKV, layer_id=l) for l in range(L)]
        prefill_kv = {}

        def model_forward(forward_batch):
            # the model's extend forward as far as the pool sees it: every layer writes the batch's K/V
            n = forward_batch.out_cache_loc.shape[0]
            for l in range(L):
                prefill_kv[l] = (torch.randn(n, HKV, D, dtype=dtype), torch.randn(n, HKV, D, dtype=dtype))
                forward_batch.token_to_kv_pool.set_kv_buffer(radix[l], forward_batch.out_cache_loc, *prefill_kv[l])

        mr = _fake_runner(sa, dtype, [DecoderLayer(rotary) for _ in range(L)], forward=model_forward)
        backend = bb.create_backend(mr)
        dense = tb.TritonAttnBackend(mr)
        state = mr._tokenbutler_state
        predictor = state.predictor
        assert predictor.position_consistent == (fmt == 2)
        pool, r2t = mr.token_to_kv_pool, mr.req_to_token_pool
        lens = torch.tensor([20, 90, 130])
        bs, rpi = 3, torch.tensor([1, 2, 3])
        perm = torch.randperm(590) + 1  # scattered slots: the paged layout, slot 0 unused
        off = 0
        for i, n in enumerate(lens.tolist()):
            r2t.req_to_token[rpi[i], :n] = perm[off: off + n].to(torch.int32)
            off += n
        case = {"budget": budget, "format": fmt}
        # "prefill": one extend batch of all positions but the last of every row, rows one after the
        # other (positions 0..n-2 of row 0, then of row 1, ...), through model_runner.forward and the pool
        ext_loc = torch.cat([r2t.req_to_token[rpi[i], : n - 1].long() for i, n in enumerate(lens.tolist())])
        ext_pos = torch.cat([torch.arange(n - 1) for n in lens.tolist()])
        ext = types.SimpleNamespace(forward_mode=ForwardMode.EXTEND, positions=ext_pos, out_cache_loc=ext_loc,
                                    token_to_kv_pool=pool, batch_size=bs)
        mr.forward(ext)
        rope_ext = (*angles(rotary, ext_pos), predictor.rope_pairs) if fmt == 2 else None
        if fmt == 2:
            case["extend_angles_ok"] = bool(torch.equal(state.key_angles, torch.cat(angles(rotary, ext_pos), dim=-1)))
        for l in (1, 2):
            want = ref.project_sketch(pool.get_key_buffer(l)[ext_loc], predictor.key_proj[l - 1], rope_ext)
            case["sketch_written_in_extend"] = max(case.get("sketch_written_in_extend", 0.0), max_abs(state.sketch[l][ext_loc], want))
        if fmt == 2:
            plain = ref.project_sketch(pool.get_key_buffer(1)[ext_loc], predictor.key_proj[0])
            case["sketch_differs_from_format1"] = max_abs(state.sketch[1][ext_loc], plain) > 1e-3
            # keys past the gathered angles (a piecewise CUDA graph's padding): the identity rotation
            n_ext = ext_pos.shape[0]
            cos_p, sin_p, _ = state.key_rope(n_ext + 3)
            case["padding_is_identity"] = bool(
                torch.equal(cos_p[:n_ext], angles(rotary, ext_pos)[0]) and (cos_p[n_ext:] == 1).all() and (sin_p[n_ext:] == 0).all()
            )

        out_loc = torch.stack([r2t.req_to_token[rpi[i], n - 1] for i, n in enumerate(lens.tolist())]).long()
        positions = lens - 1
        fb = types.SimpleNamespace(batch_size=bs, forward_mode=ForwardMode.DECODE, spec_info=None, seq_lens=lens.clone(),
                                   seq_lens_sum=int(lens.sum()), seq_lens_cpu=lens.clone(), req_pool_indices=rpi,
                                   out_cache_loc=out_loc, token_to_kv_pool=pool, positions=positions)
        # As in SGLang: the step's metadata, then the forward. Producer 0 reads the residual stream
        # after layer 0 (hidden_states + residual) and selects for layers 1 and 2 at once.
        state.begin_forward(fb)  # model_runner.forward's wrapper: nothing to gather for a decode step
        backend.init_forward_metadata(fb)
        dense.init_forward_metadata(fb)
        h = torch.randn(bs, E, dtype=dtype)
        mr.model.model.layers[0](positions, h, fb, None)
        rope_dec = angles(rotary, positions)
        unpositioned = predictor.producer_queries(0, h * 2 + (h + 1))
        expect_q = predictor.position_queries(unpositioned, rope_dec if fmt == 2 else None)
        case["producer_queries_max_abs"] = max_abs(state.queries[0][:bs], expect_q)
        if fmt == 2:
            case["queries_differ_from_unpositioned"] = max_abs(expect_q, unpositioned) > 1e-3
            case["decode_angles_ok"] = bool(torch.equal(state.key_angles, torch.cat(rope_dec, dim=-1)))
        case.update({"all_dense": backend.all_dense, "selected_by_producer": sorted(state.selections),
                     "dense_rows": [], "sparse_rows": [], "max_abs_vs_sglang_dense": [], "max_abs_vs_reference": []})
        end = lens.to(torch.int32)
        start = torch.zeros_like(end)
        table = r2t.req_to_token[rpi]
        policy = state.policy
        bpr = ref.budget_for_rows(policy.budget, start, end, backend.budget)
        limit = bpr if bpr is not None else torch.full_like(end, backend.budget)
        dense_rows = (end <= policy.sinks + policy.window + limit).tolist()
        case["dense_rows"] = [i for i in range(bs) if dense_rows[i]]
        case["sparse_rows"] = [i for i in range(bs) if not dense_rows[i]]
        saved = {}
        # SGLang's own decode kernel runs in a served layer only when the budget covers every context
        # (with CUDA graphs, a call for rows that are not there still costs its launches)
        parent_calls = []
        parent_decode = backend.decode_attention_fwd
        backend.decode_attention_fwd = lambda *a, **kw: (parent_calls.append(1), parent_decode(*a, **kw))[1]
        # layer 0 (dense): in a budgeted step butler's kernel over every position, else SGLang's own
        q = torch.randn(bs, HQ * D, dtype=dtype)
        kn, vn = torch.randn(bs, HKV, D, dtype=dtype), torch.randn(bs, HKV, D, dtype=dtype)
        out0 = backend.forward_decode(q, kn, vn, radix[0], fb)
        case["layer0_max_abs_vs_sglang_dense"] = (out0 - dense.forward_decode(q, kn, vn, radix[0], fb)).abs().max().item()
        case["layer0_parent_calls"] = len(parent_calls)
        for l in (1, 2):
            q = torch.randn(bs, HQ * D, dtype=dtype)
            kn, vn = torch.randn(bs, HKV, D, dtype=dtype), torch.randn(bs, HKV, D, dtype=dtype)
            out = backend.forward_decode(q, kn, vn, radix[l], fb)
            out_dense = dense.forward_decode(q, kn, vn, radix[l], fb)
            saved[l] = (q, kn, vn, out)
            # the project's torch reference, from the same predictor queries and sketch cache
            q_sel = predictor.layer_queries(l, state.queries[0][:bs])
            scores = ref.score_tokens(q_sel, ref.gather_positions(state.sketch[l], table), HKV)
            sel = ref.select_topk(scores, start, end, policy.sinks, policy.window, backend.budget, bpr)
            out_ref = ref.budgeted_attention(q.view(bs, HQ, D), pool.get_key_buffer(l), pool.get_value_buffer(l), sel,
                                             start, end, policy.sinks, policy.window, D ** -0.5, table).reshape(bs, -1)
            for key, other in (("max_abs_vs_sglang_dense", out_dense), ("max_abs_vs_reference", out_ref)):
                diffs = (out - other).abs().amax(dim=-1).tolist()
                case[key] = [max(a, b) for a, b in zip(case[key] or [0.0] * bs, diffs)]
            # the new token's sketch, at its position
            new = ref.project_sketch(kn, predictor.key_proj[l - 1], (*rope_dec, predictor.rope_pairs) if fmt == 2 else None)
            case["sketch_written_in_decode"] = max(case.get("sketch_written_in_decode", 0.0), max_abs(state.sketch[l][out_loc], new))
        backend.decode_attention_fwd = parent_decode
        case["parent_decode_calls"] = len(parent_calls)
        # Without the producer's selections, each layer selects for itself: the same output.
        state.selections.clear()
        case["per_layer_selection_equal"] = all(
            torch.equal(backend.forward_decode(q_, kn_, vn_, radix[l], fb), out_) for l, (q_, kn_, vn_, out_) in saved.items()
        )

        # the CUDA-graph path: static buffers filled at capture (dummy lengths), rewritten at replay
        backend.init_cuda_graph_state(4, 4)
        backend.init_forward_metadata_capture_cuda_graph(bs, bs, rpi, torch.ones(bs, dtype=torch.int32), None, ForwardMode.DECODE, None)
        backend.init_forward_metadata_replay_cuda_graph(bs, rpi, lens.to(torch.int32), int(lens.sum()), None, ForwardMode.DECODE, None, lens)
        q, kn, vn, out = saved[2]
        replayed = backend.forward_decode(q, kn, vn, radix[2], fb)
        case["graph_replay_equals_eager"] = bool(torch.equal(replayed, out))
        result["cases"].append(case)
        state.remove()

    # Startup refuses a format-2 predictor without a usable rotary table
    errors = {}
    sa = _server_args(model_dir, "--decode-attention-backend", "tokenbutler", "--tokenbutler-predictor", str(pred2))
    for name, layer_rotary in (("interleaved", _rotary(sa, neox=False)), ("partial", _rotary(sa, rotary_dim=D // 2)), ("missing", None)):
        errors[name] = _error_of(lambda: bb.create_backend(_fake_runner(sa, dtype, [DecoderLayer(layer_rotary) for _ in range(L)])))
    result["startup_errors"] = errors
    return result


if __name__ == "__main__":
    name, tmp = sys.argv[1], Path(sys.argv[2])
    checks = {"flags": _check_flags, "decode": _check_decode}
    print("RESULT " + json.dumps(checks[name](tmp)), flush=True)
