"""The SGLang plugin on CPU: registration, launch flags, and one decode step of the backend, against every
supported SGLang release (``butler_sglang.SUPPORTED_SGLANG_VERSIONS``: 0.5.12 and 0.5.23).

Each release pins its own transformers and torch (0.5.12: transformers 5.6.0, torch 2.11; 0.5.23: transformers
5.19.0, torch 2.14.1), older or newer than the project's own, so each lives in a venv of its own
(``scripts/sglang_test_deps.sh``: ``.venvs/sglang-0.5.12`` and ``.venvs/sglang-0.5.23``, or
``$BUTLER_SGLANG_PYTHON_0_5_12`` / ``$BUTLER_SGLANG_PYTHON_0_5_23``) and every check runs in a subprocess of
that venv's python, once per release: nothing the project's ``.venv`` holds (a newer transformers, the
``kernels`` package it pulls in) is visible there. ``tests/sglang_stubs`` (a labelled, test-only torchvision
stand-in: no CPU build of torchvision exists on the registry) is put on ``PYTHONPATH`` when the venv has no
real torchvision. Triton runs in interpreter mode (``TRITON_INTERPRET=1``), SGLang's own decode kernel
included. A missing venv skips that release's tests with the command that makes it; a venv holding another
SGLang release than its name says fails them.

The checks themselves live at the bottom of this file and run as ``python tests/test_sglang.py NAME``;
where the releases differ (SGLang's own API, not the plugin's behaviour) they branch on the installed
release, and every assertion holds for both.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
STUBS = Path(__file__).resolve().parent / "sglang_stubs"
sys.path.insert(0, str(REPO / "integrations" / "sglang"))  # butler_sglang's constants, without SGLang
from butler_sglang import SUPPORTED_SGLANG_VERSIONS  # noqa: E402

pytestmark = pytest.mark.sglang

MAKE_VENVS = "bash scripts/sglang_test_deps.sh"


@dataclass(frozen=True)
class SGLangVenv:
    version: str  # the release this venv is for
    python: Path
    pythonpath: str | None  # None: no usable venv (the skip reason says why)
    installed: str | None  # the sglang release the venv holds
    reason: str = ""


def _venv_python(version: str) -> Path:
    override = os.environ.get("BUTLER_SGLANG_PYTHON_" + version.replace(".", "_"))
    return Path(override) if override else REPO / ".venvs" / f"sglang-{version}" / "bin" / "python"


def _probe(version: str) -> SGLangVenv:
    """The venv of SGLang ``version`` and the PYTHONPATH its subprocesses get."""
    python = _venv_python(version)
    make = f"{MAKE_VENVS} {version}"
    if not python.is_file():
        return SGLangVenv(version, python, None, None, f"no SGLang {version} venv at {python}: run `{make}`")
    code = ("import importlib.util as u, importlib.metadata as m\n"
            "v = m.version('sglang') if u.find_spec('sglang') else 'none'\n"
            "print(v, u.find_spec('torchvision') is not None)")
    probe = subprocess.run([str(python), "-c", code], capture_output=True, text=True, env={"PATH": os.environ.get("PATH", "")})
    if probe.returncode != 0:
        return SGLangVenv(version, python, None, None, f"{python} does not run ({probe.stderr.strip()[-300:]}): run `{make}`")
    installed, has_torchvision = probe.stdout.split()
    if installed == "none":
        return SGLangVenv(version, python, None, None, f"no sglang in {python}: run `{make}`")
    # test-only stand-in, see tests/sglang_stubs/README.md
    return SGLangVenv(version, python, "" if has_torchvision == "True" else str(STUBS), installed)


# probed in the pytest process only, once per release, when a test asks for it (the checks below run
# this file, and tests/test_sglang_parallel.py, as scripts in each venv and import these helpers there)
@functools.lru_cache(maxsize=None)
def _venv_of(version: str) -> SGLangVenv:
    return _probe(version)


@pytest.fixture(params=SUPPORTED_SGLANG_VERSIONS, ids=lambda v: f"sglang-{v}")
def venv(request) -> SGLangVenv:
    env = _venv_of(request.param)
    if env.pythonpath is None:
        pytest.skip(env.reason)
    assert env.installed == env.version, f"{env.python} holds sglang {env.installed}, not {env.version}: run `{MAKE_VENVS} {env.version}`"
    return env


def _run(venv: SGLangVenv, args: list[str], *, timeout: int = 420, extra_env: dict | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.update(
        PYTHONPATH=venv.pythonpath or "",
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
        return subprocess.run([str(venv.python), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _inner(venv: SGLangVenv, name: str, tmp_path: Path, script: Path | None = None) -> dict:
    """Run check ``name`` of ``script`` (default: this file) in the venv; its ``RESULT`` line."""
    proc = _run(venv, [str((script or Path(__file__)).resolve()), name, str(tmp_path)])
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"`{name}` on SGLang {venv.version} failed (rc {proc.returncode}):\n{out[-6000:]}"
    lines = [l for l in proc.stdout.splitlines() if l.startswith("RESULT ")]
    assert lines, out[-4000:]
    result = json.loads(lines[-1][len("RESULT "):])
    assert result["sglang"] == venv.version  # the checks ran on the release this venv is for
    return result


def test_every_supported_release_has_an_adapter_and_a_venv_recipe():
    """The plugin's version table, its adapters and the CPU test venvs name the same releases."""
    from butler_sglang import compat

    assert tuple(compat.ADAPTERS) == SUPPORTED_SGLANG_VERSIONS
    assert set(compat.GPU_TESTED) <= set(SUPPORTED_SGLANG_VERSIONS)
    recipe = (REPO / "scripts" / "sglang_test_deps.sh").read_text()
    for v in SUPPORTED_SGLANG_VERSIONS:
        assert f"sglang=={v}" in recipe and f"sglang-{v}" in recipe, v
    notes = {v: compat.release_note(v) for v in SUPPORTED_SGLANG_VERSIONS}
    assert "CPU-tested only" in notes["0.5.23"] and "GPU-tested" in notes["0.5.12"]


def test_launch_server_help_lists_backend_and_flags(venv):
    proc = _run(venv, ["-m", "sglang.launch_server", "--help"])
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    text = proc.stdout
    for choice in ("--attention-backend", "--decode-attention-backend"):
        line = next(l for l in text.splitlines() if l.strip().startswith(choice + " {"))
        assert "tokenbutler" in line, line
    for flag in ("--tokenbutler-predictor", "--tokenbutler-budget", "--tokenbutler-sinks", "--tokenbutler-window",
                 "--tokenbutler-max-budget"):
        assert flag in text
    assert "TokenButler sparse decoding (butler-zoo plugin)" in text
    assert "not registered" not in proc.stderr, proc.stderr[-2000:]


def test_flags_reach_scheduler_server_args_and_startup_checks(venv, tmp_path):
    r = _inner(venv, "flags", tmp_path)
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
    assert "supports SGLang 0.5.12, 0.5.23" in errors["old_sglang"] and "0.5.9 is installed" in errors["old_sglang"]
    assert r["old_sglang_without_flag"] == "no exit"
    # the startup log line names the release, and whether it is GPU-tested
    assert ("CPU-tested only" in r["startup_log"]) == (venv.version == "0.5.23"), r["startup_log"]
    assert f"SGLang {venv.version}" in r["startup_log"]
    if venv.version == "0.5.23":
        # settings only 0.5.23 has are refused too
        assert "--attn-dp-size 2" in errors["attn_dp"] and "--dcp-size 2" in errors["dcp"], errors


def test_producer_hook_on_sglangs_own_llama_model(venv, tmp_path):
    """The one model-side API change between the releases (0.5.12: layers return (hidden, residual);
    0.5.23: capture_output of the next layer), on SGLang's own LlamaModel: the producer receives the
    residual stream after its layer at decode steps, never in extend, and SGLang's own capture of the
    same stream (Eagle-3's auxiliary hidden states) still gets it."""
    r = _inner(venv, "producer", tmp_path)
    assert r["calls_in_extend"] == 0 and r["calls_in_decode"] == 1, r
    assert r["stream_max_abs"] is not None and r["stream_max_abs"] <= 1e-6 * r["stream_scale"], r
    assert r["sglang_capture_max_abs"] is not None and r["sglang_capture_max_abs"] <= 1e-6 * r["stream_scale"], r


def test_decode_step_against_sglang_dense_and_torch_reference(venv, tmp_path):
    """Format-2 predictors (the default) at three budgets, a format-1 predictor at one."""
    r = _inner(venv, "decode", tmp_path)
    assert [(c["budget"], c["format"]) for c in r["cases"]] == [("28", 2), ("0.1", 2), ("1.0", 2), ("28", 1)]
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
    assert by_budget["1.0"]["all_dense"] and not by_budget["28"]["all_dense"] and not by_budget["0.1"]["all_dense"]
    assert by_budget["1.0"]["parent_decode_calls"] == 3  # every layer
    assert by_budget["28"]["parent_decode_calls"] == 0 and by_budget["0.1"]["parent_decode_calls"] == 0
    # layer 0 is dense in every case: through butler's kernel when the step is budgeted (the parent's
    # decode metadata is not even built then), SGLang's own kernel bit for bit when not
    for case in r["cases"]:
        assert case["layer0_parent_calls"] == (1 if case["all_dense"] else 0), case
        assert case["layer0_max_abs_vs_sglang_dense"] < (1e-12 if case["all_dense"] else 2e-5), case
    # layers 1 and 2 selected by their producer in one launch, equal to selecting in each layer
    assert by_budget["28"]["selected_by_producer"] == [1, 2] == by_budget["0.1"]["selected_by_producer"]
    assert by_budget["1.0"]["selected_by_producer"] == []
    assert all(case["per_layer_selection_equal"] for case in r["cases"])
    assert by_budget["1.0"]["sparse_rows"] == [] and len(by_budget["1.0"]["dense_rows"]) == 3  # budget covers the context
    assert by_budget["28"]["dense_rows"] == [0] and by_budget["28"]["sparse_rows"] == [1, 2]  # row by row
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
        # (0.5.12: a forward hook on the producer layer; 0.5.23: capture_output of the next layer)
        assert case["producer_queries_max_abs"] < 1e-5, case
        # no producer work in extend batches
        assert case["extend_leaves_queries"], case
        assert case["graph_replay_equals_eager"], case
        if venv.version == "0.5.23":
            # a capture_output SGLang passes itself (Eagle's auxiliary states) still gets the stream
            assert case["chained_capture_kept"], case
    for case in r["cases"][:3]:
        # format 2 is not format 1 by another name: the rotations change the sketch and the queries
        assert case["sketch_differs_from_format1"] and case["queries_differ_from_unpositioned"], case
        # positions reach the backend: decode angles of the rows' positions, extend batches' of theirs
        assert case["decode_angles_ok"] and case["extend_angles_ok"] and case["padding_is_identity"], case
    assert r["startup_errors"]["interleaved"].startswith("TokenButlerStartupError") and "neox" in r["startup_errors"]["interleaved"]
    assert "rotary_emb" in r["startup_errors"]["missing"]
    assert "rotary_dim == head_dim" in r["startup_errors"]["partial"]
    if venv.version == "0.5.23":
        assert "position_start" in r["startup_errors"]["offset_table"], r["startup_errors"]
        assert "virtual ids" in r["startup_errors"]["translating_pool"], r["startup_errors"]


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


def _sglang_version() -> str:
    from butler_sglang.compat import installed_version

    return installed_version()


def _server_args(model_dir, *extra):
    from sglang.srt.server_args import prepare_server_args

    return prepare_server_args(["--model-path", str(model_dir), "--skip-tokenizer-init", "--device", "cpu", *extra])


def _checked(server_args):
    """The launcher's checks, as the release runs them: 0.5.23 resolves the (sealed) record first."""
    resolve_once = getattr(server_args, "resolve_once", None)
    if resolve_once is not None:
        resolve_once()
    server_args.check_server_args()
    return server_args


def _error_of(fn) -> str:
    try:
        fn()
    except SystemExit as e:
        return str(e.code)
    except Exception as e:  # noqa: BLE001
        return f"{type(e).__name__}: {e}"
    return "no exit"


def _cell_size(sa, num_layers: int, tp: int = 1) -> int:
    """``DefaultPoolConfigurator._compute_cell_size`` (hooked by the plugin) for the tiny model, bf16, with
    what each release hands it: the ModelRunner (0.5.12), the KVCacheConfigurator (0.5.23); on rank 0 of
    ``tp`` attention-TP ranks."""
    from types import SimpleNamespace

    import torch
    from sglang.srt.model_executor.pool_configurator import DefaultPoolConfigurator

    cfgr = DefaultPoolConfigurator.__new__(DefaultPoolConfigurator)
    common = dict(server_args=sa, kv_cache_dtype=torch.bfloat16, use_mla_backend=False, is_draft_worker=False)
    if _sglang_version() == "0.5.12":
        import sglang.srt.layers.dp_attention as dpa
        import sglang.srt.model_executor.pool_configurator as pc

        pc.get_attention_tp_size = dpa.get_attention_tp_size = lambda: tp  # no distributed init on CPU
        arg = SimpleNamespace(**common, model_config=sa.get_model_config(), dtype=torch.bfloat16, start_layer=0)
    else:
        from sglang.srt.arg_groups.overrides import model_config_of
        from sglang.srt.server_args import set_global_server_args_for_scheduler

        set_global_server_args_for_scheduler(sa)  # the runtime context get_parallel() reads (sa's TP size)
        cfgr.kv_cache_dtype_str = "auto"
        arg = SimpleNamespace(**common, model_config=model_config_of(sa), model_dtype=torch.bfloat16, pp_size=1,
                              layer_info=SimpleNamespace(start_layer=0, end_layer=num_layers, num_effective_layers=num_layers))
    return cfgr._compute_cell_size(arg, num_layers)


def _check_flags(tmp: Path) -> dict:
    import contextlib
    import io
    import logging
    import pickle

    from sglang.srt.plugins import load_plugins

    load_plugins()
    from butler_sglang import plugin, settings
    from sglang.srt.layers.attention.attention_registry import ATTENTION_BACKENDS

    model_dir, pred = _make_model_and_predictor(tmp)
    _, wrong = _make_model_and_predictor(tmp, layers=5, name="pred-5-layers")
    tb = ["--decode-attention-backend", "tokenbutler", "--tokenbutler-predictor", str(pred)]
    sa = _server_args(model_dir, *tb, "--tokenbutler-budget", "10%", "--tokenbutler-sinks", "8", "--tokenbutler-window", "32")
    sa = pickle.loads(pickle.dumps(sa))  # as the scheduler process receives it
    resolved = settings.validate_server_args(sa)
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    logging.getLogger("butler_sglang").addHandler(handler)
    _checked(sa)  # the launcher-side hook passes, and logs its line
    logging.getLogger("butler_sglang").removeHandler(handler)

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
    with_sketch = _cell_size(sa, L)
    without = _cell_size(_server_args(model_dir, "--attention-backend", "triton"), L)

    errors = {}
    with contextlib.redirect_stderr(io.StringIO()) as err:
        errors["bad_budget"] = _error_of(lambda: _server_args(model_dir, *tb, "--tokenbutler-budget", "1.5"))
    errors["bad_budget"] += err.getvalue()
    errors["mismatch"] = _error_of(
        lambda: _checked(_server_args(model_dir, "--decode-attention-backend", "tokenbutler", "--tokenbutler-predictor", str(wrong)))
    )
    errors["flags_without_backend"] = _error_of(
        lambda: _checked(_server_args(model_dir, "--attention-backend", "triton", "--tokenbutler-predictor", str(pred)))
    )
    errors["page_size"] = _error_of(lambda: _checked(_server_args(model_dir, *tb, "--page-size", "16")))
    errors["no_predictor"] = _error_of(lambda: _checked(_server_args(model_dir, "--decode-attention-backend", "tokenbutler")))
    if _sglang_version() == "0.5.23":
        # refused from the settings alone (a CPU machine cannot resolve a multi-GPU launch)
        errors["attn_dp"] = _error_of(lambda: settings.validate_server_args(_server_args(model_dir, *tb, "--attn-dp-size", "2")))
        errors["dcp"] = _error_of(lambda: settings.validate_server_args(_server_args(model_dir, *tb, "--dcp-size", "2")))

    # an unsupported SGLang release: SystemExit only when the backend is asked for
    plugin._registered = False
    real = settings.sglang_version
    settings.sglang_version = lambda: "0.5.9"
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
        "sglang": _sglang_version(),
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
        "startup_log": log.getvalue(),
    }


def _set_attention_tp(sa, rank: int, size: int) -> None:
    """This process as attention-TP rank ``rank`` of ``size``, where SGLang's Triton backend and the plugin
    (``compat.attention_tp``) read it, without a distributed init (none on the CPU): 0.5.12's
    ``dp_attention`` functions, 0.5.23's runtime context (published for ``sa``, the rank stamped)."""
    if _sglang_version() == "0.5.12":
        import sglang.srt.layers.attention.triton_backend as tb
        import sglang.srt.layers.dp_attention as dpa

        dpa.get_attention_tp_rank = lambda: rank
        dpa.get_attention_tp_size = tb.get_attention_tp_size = lambda: size
        return
    from sglang.srt.runtime_context import get_parallel
    from sglang.srt.server_args import set_global_server_args_for_scheduler

    get_parallel().clear_stamp()  # an earlier call's rank, which would contradict sa's TP size
    set_global_server_args_for_scheduler(sa)
    get_parallel().override_permanently(attn_tp_rank=rank, attn_tp_size=size)


def _fake_runner(sa, dtype, layers, forward=None, kv_heads: int = HKV, start_layer: int = 0, end_layer: int = L):
    """The attributes of ModelRunner that TritonAttnBackend and the plugin read, around SGLang's own
    ReqToTokenPool and MHATokenToKVPool; ``forward(forward_batch)`` stands for the model's forward."""
    import types

    import torch
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool, ReqToTokenPool

    r2t = ReqToTokenPool(size=4, max_context_len=160, device="cpu", enable_memory_saver=False)
    pool = MHATokenToKVPool(600, page_size=1, dtype=dtype, head_num=kv_heads, head_dim=D, layer_num=end_layer - start_layer,
                            device="cpu", enable_memory_saver=False, start_layer=start_layer)
    model = types.SimpleNamespace(model=types.SimpleNamespace(layers=torch.nn.ModuleList(layers)))
    runner = types.SimpleNamespace(
        server_args=sa, req_to_token_pool=r2t, token_to_kv_pool=pool,
        token_to_kv_pool_allocator=None, sliding_window_size=None, hybrid_gdn_config=None, kimi_linear_config=None,
        linear_attn_model_spec=None, device="cpu", gpu_id=0, dtype=dtype, model=model, is_draft_worker=False,
        start_layer=start_layer, end_layer=end_layer, forward=forward or (lambda forward_batch, *a, **kw: None),
    )
    if _sglang_version() == "0.5.12":
        runner.model_config = sa.get_model_config()
    else:
        from sglang.srt.arg_groups.overrides import model_config_of
        from sglang.srt.mem_cache.kv_index_translator import KVIndexTranslator

        runner.model_config = model_config_of(sa)
        runner.page_size = 1
        runner.kv_cache_dtype = dtype
        runner.decode_num_tokens_per_req = lambda **kw: 1
        # the plain pool's translator: req_to_token holds physical slots
        runner.kv_index_translator = KVIndexTranslator(req_to_token=r2t.req_to_token, token_to_kv_pool_allocator=None,
                                                       token_to_kv_pool=pool, page_size=1, device="cpu")
    return runner


def _forward_batch(**fields):
    """A ForwardBatch as far as the backends read it (0.5.23 reads a few more fields)."""
    import types

    if _sglang_version() != "0.5.12":
        fields = {"kv_loc_plan": None, "kv_loc_cols": None, "out_cache_loc_is_physical": False, "encoder_lens": None,
                  "mha_return_lse": False, "residual_stream": None, "attn_cp_metadata": None, **fields}
        fields.pop("token_to_kv_pool", None)  # 0.5.23's ForwardBatch has no pool
    return types.SimpleNamespace(**fields)


def _rotary(sa, neox: bool = True, rotary_dim: int = D):
    """SGLang's own RotaryEmbedding of the tiny model (the table format-2 predictors take angles from)."""
    import sglang.srt.layers.rotary_embedding.base as rope_base
    from sglang.srt.layers.rotary_embedding import get_rope
    from sglang.srt.server_args import set_global_server_args_for_scheduler

    set_global_server_args_for_scheduler(sa)
    # test-only: off CUDA, SGLang builds its RoPE with vLLM's kernel unless it runs its CPU engine
    rope_base._is_cpu = True
    return get_rope(D, rotary_dim=rotary_dim, max_position=512, base=10000, is_neox_style=neox)


def _decoder_layer_class():
    """A decoder layer with the calling convention of the installed release's Llama layers, holding the
    served model's rotary embedding: ``run_layers(layers, positions, h, fb)`` runs layers 0 and 1 of a
    decode step, after which the residual stream after layer 0 is ``2h + (h + 1)`` in both releases."""
    import torch

    class DecoderLayer(torch.nn.Module):
        def __init__(self, rotary):
            super().__init__()
            self.self_attn = torch.nn.Module()
            self.self_attn.rotary_emb = rotary  # one table shared by every layer, as get_rope caches it

    if _sglang_version() == "0.5.12":
        class Layer0512(DecoderLayer):
            # 0.5.12: returns (hidden_states, residual) with the residual add deferred
            def forward(self, positions, hidden, forward_batch, residual):
                return hidden * 2, hidden + 1

        def run_layers(layers, positions, h, fb, capture_output=None):
            hidden, residual = layers[0](positions, h, fb, None)
            return layers[1](positions, hidden, fb, residual)

        return Layer0512, run_layers

    class Layer0523(DecoderLayer):
        # 0.5.23: returns one tensor (here the whole stream after the layer; SGLang keeps the residual in
        # forward_batch.residual_stream) and calls capture_output with the stream before its attention
        def forward(self, positions, hidden, forward_batch, capture_output=None):
            if capture_output is not None:
                capture_output(hidden)  # borrowed, as SGLang passes it
            return hidden * 2 + (hidden + 1)

    def run_layers(layers, positions, h, fb, capture_output=None):
        out = layers[0](positions, h, fb)
        return layers[1](positions, out, fb, capture_output=capture_output)

    return Layer0523, run_layers


def _graph_capture_replay(backend, bs, rpi, lens, fb) -> None:
    """The CUDA-graph metadata calls of a decode graph (static buffers filled at capture from a dummy
    batch of length-1 rows, rewritten at replay), through the entry points of the installed release."""
    import torch
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    backend.init_cuda_graph_state(4, 4)
    ones = torch.ones(bs, dtype=torch.int32)
    if _sglang_version() == "0.5.12":
        backend.init_forward_metadata_capture_cuda_graph(bs, bs, rpi, ones, None, ForwardMode.DECODE, None)
        backend.init_forward_metadata_replay_cuda_graph(bs, rpi, lens.to(torch.int32), int(lens.sum()), None, ForwardMode.DECODE,
                                                        None, lens)
        return
    capture = _forward_batch(**{**vars(fb), "seq_lens": ones, "seq_lens_sum": bs})
    backend.init_forward_metadata_out_graph(capture, in_capture=True)
    replay = _forward_batch(**{**vars(fb), "seq_lens": lens.to(torch.int32)})
    backend.init_forward_metadata_out_graph(replay)


def _check_decode(tmp: Path) -> dict:
    import torch
    from sglang.srt.plugins import load_plugins

    load_plugins()
    import sglang.srt.layers.attention.triton_backend as tb
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from butler_kernels import reference as ref
    from butler_sglang import backend as bb

    model_dir, pred2 = _make_model_and_predictor(tmp)
    _set_attention_tp(_server_args(model_dir, "--attention-backend", "triton"), 0, 1)
    _, pred1 = _make_model_and_predictor(tmp, name="pred-format-1", format_version=1)
    dtype = torch.float32  # the Triton interpreter's bf16 dots are not exact
    DecoderLayer, run_layers = _decoder_layer_class()

    def angles(rotary, positions):  # cos, sin [n, D/2] of the served model's table
        cos, sin = rotary.cos_sin_cache[positions.long()].chunk(2, dim=-1)
        return cos.to(dtype), sin.to(dtype)

    def max_abs(a, b):
        return (a.float() - b.float()).abs().max().item()

    result = {"sglang": _sglang_version(), "cases": []}
    for budget, fmt in (("28", 2), ("0.1", 2), ("1.0", 2), ("28", 1)):
        torch.manual_seed(1)
        pred = pred2 if fmt == 2 else pred1
        sa = _server_args(model_dir, "--decode-attention-backend", "tokenbutler", "--tokenbutler-predictor", str(pred),
                          "--tokenbutler-budget", budget, "--tokenbutler-sinks", "4", "--tokenbutler-window", "8")
        rotary = _rotary(sa)
        radix = [RadixAttention(HQ, D, D ** -0.5, num_kv_heads=HKV, layer_id=l) for l in range(L)]
        prefill_kv = {}
        pool_holder = {}

        def model_forward(forward_batch):
            # the model's extend forward as far as the pool sees it: every layer writes the batch's K/V
            n = forward_batch.out_cache_loc.shape[0]
            for l in range(L):
                prefill_kv[l] = (torch.randn(n, HKV, D, dtype=dtype), torch.randn(n, HKV, D, dtype=dtype))
                loc = bb.api().decode_write_loc(forward_batch)  # the release's write location, as SGLang passes it
                pool_holder["pool"].set_kv_buffer(radix[l], loc, *prefill_kv[l])

        mr = _fake_runner(sa, dtype, [DecoderLayer(rotary) for _ in range(L)], forward=model_forward)
        pool_holder["pool"] = mr.token_to_kv_pool
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
        ext = _forward_batch(forward_mode=ForwardMode.EXTEND, positions=ext_pos, out_cache_loc=ext_loc,
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
        # the decoder layers of an extend batch leave the producer queries alone
        before = state.queries[0].clone()
        run_layers(mr.model.model.layers, ext_pos[:bs], torch.randn(bs, E, dtype=dtype), ext)
        case["extend_leaves_queries"] = bool(torch.equal(state.queries[0], before))

        out_loc = torch.stack([r2t.req_to_token[rpi[i], n - 1] for i, n in enumerate(lens.tolist())]).long()
        positions = lens - 1
        fb = _forward_batch(batch_size=bs, forward_mode=ForwardMode.DECODE, spec_info=None, seq_lens=lens.clone(),
                            seq_lens_sum=int(lens.sum()), seq_lens_cpu=lens.clone(), req_pool_indices=rpi,
                            out_cache_loc=out_loc, token_to_kv_pool=pool, positions=positions)
        # As in SGLang: the step's metadata, then the forward. Producer 0 reads the residual stream
        # after layer 0 (hidden_states + residual) and selects for layers 1 and 2 at once.
        state.begin_forward(fb)  # model_runner.forward's wrapper: nothing to gather for a decode step
        backend.init_forward_metadata(fb)
        dense.init_forward_metadata(fb)
        h = torch.randn(bs, E, dtype=dtype)
        chained = []
        run_layers(mr.model.model.layers, positions, h, fb,
                   capture_output=lambda value, owned=False: chained.append(value.clone()))
        if result["sglang"] != "0.5.12":
            case["chained_capture_kept"] = len(chained) == 1 and bool(torch.equal(chained[0], h * 2 + (h + 1)))
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
        bpr = ref.budget_for_rows(policy.budget, start, end, backend.budget, fixed=policy.sinks + policy.window)
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
        _graph_capture_replay(backend, bs, rpi, lens, fb)
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
    if result["sglang"] != "0.5.12":
        # 0.5.23 only: a table that starts at another position than 0, and a pool whose req_to_token holds
        # virtual ids (the unified pool's translator)
        offset = _rotary(sa)
        offset.position_start = 7
        errors["offset_table"] = _error_of(lambda: bb.create_backend(_fake_runner(sa, dtype, [DecoderLayer(offset) for _ in range(L)])))
        offset.position_start = 0
        runner = _fake_runner(sa, dtype, [DecoderLayer(_rotary(sa)) for _ in range(L)])
        runner.kv_index_translator.is_translating = True
        errors["translating_pool"] = _error_of(lambda: bb.create_backend(runner))
    result["startup_errors"] = errors
    return result


def _real_llama_model(model_dir):
    """SGLang's own ``LlamaModel`` of the installed release for the tiny config, on the CPU (a one-process
    gloo group, TP 1), random weights, every attention replaced by zeros (so the residual stream after
    layer 0 is ``emb + mlp(post_attention_layernorm(emb))``, computable from the layer's own modules)."""
    import tempfile

    import torch
    import sglang.srt.layers.rotary_embedding.base as rope_base
    from sglang.srt.distributed import parallel_state as ps
    from transformers import LlamaConfig

    sa = _server_args(model_dir, "--attention-backend", "triton")
    init = f"file://{tempfile.mkdtemp()}/dist"
    if _sglang_version() == "0.5.12":
        from sglang.srt.server_args import set_global_server_args_for_scheduler

        set_global_server_args_for_scheduler(sa)
        ps.init_distributed_environment(world_size=1, rank=0, distributed_init_method=init, local_rank=0, backend="gloo")
        ps.initialize_model_parallel(tensor_model_parallel_size=1, backend="gloo")
    else:
        from sglang.srt.runtime_context import SpawnRanks, publish

        publish(sa, role="scheduler", ranks=SpawnRanks(world_rank=0, gpu_id=0))  # rank 0 of a TP-1 launch
        ps.init_distributed_environment(world_size=1, rank=0, distributed_init_method=init, local_rank=0, backend="gloo")
        ps.initialize_model_parallel(backend="gloo")
    rope_base._is_cpu = True  # test-only: off CUDA, SGLang builds its RoPE with vLLM's kernel unless on its CPU engine
    from sglang.srt.models.llama import LlamaModel

    model = LlamaModel(LlamaConfig.from_pretrained(model_dir), quant_config=None)
    torch.manual_seed(0)
    for param in model.parameters():
        param.data.normal_(0, 0.2)
    for layer in model.layers:
        layer.self_attn.attn.forward = lambda q, k, v, forward_batch, *a, **kw: torch.zeros_like(q)
    return model


def _check_producer(tmp: Path) -> dict:
    """compat.install_producer_hook on SGLang's own Llama model: at decode steps (only) it hands the residual
    stream after the producer layer, and SGLang's own capture of that stream (Eagle's auxiliary hidden
    states, ``layers_to_capture``) keeps working next to it."""
    import torch
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from butler_sglang.compat import api

    model_dir, _ = _make_model_and_predictor(tmp)
    model = _real_llama_model(model_dir)
    streams = []
    handle = api().install_producer_hook(
        model.layers, 0, lambda hidden, residual: streams.append((hidden + residual if residual is not None else hidden).clone())
    )
    embeds = []
    model.layers[0].register_forward_pre_hook(lambda module, args: embeds.append(args[1].clone()))
    ids, positions = torch.tensor([5, 7]), torch.tensor([3, 9])
    out = {"sglang": _sglang_version()}
    with torch.no_grad():
        model(ids, positions, _forward_batch(batch_size=2, forward_mode=ForwardMode.EXTEND, spec_info=None, positions=positions))
        out["calls_in_extend"] = len(streams)
        model.layers_to_capture = [1]  # SGLang's own capture of the stream before layer 1 (Eagle-3)
        result = model(ids, positions, _forward_batch(batch_size=2, forward_mode=ForwardMode.DECODE, spec_info=None,
                                                      positions=positions))
        layer0 = model.layers[0]
        emb = embeds[-1]
        normed = layer0.post_attention_layernorm(emb)
        mlp = layer0.mlp(normed)
        want = emb + (mlp[0] if isinstance(mlp, tuple) else mlp)
    handle.remove()
    out["calls_in_decode"] = len(streams)
    out["stream_max_abs"] = (streams[-1] - want).abs().max().item() if streams else None
    aux = result[1] if isinstance(result, tuple) else []
    out["sglang_capture_max_abs"] = (aux[0] - want).abs().max().item() if len(aux) else None
    out["stream_scale"] = want.abs().max().item()
    return out


if __name__ == "__main__":
    name, tmp = sys.argv[1], Path(sys.argv[2])
    checks = {"flags": _check_flags, "decode": _check_decode, "producer": _check_producer}
    print("RESULT " + json.dumps(checks[name](tmp)), flush=True)
