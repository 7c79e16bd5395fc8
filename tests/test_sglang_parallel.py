"""Tensor, data and pipeline parallelism of the SGLang plugin (``butler_sglang.parallel``), on the CPU.

Two kinds of tests:

* plain torch, in the project's venv (no SGLang): the KV heads of each attention-TP rank, the predictor
  sliced to them (``shard_predictor``), and every rank's producer queries, sketches and selection against
  the slice of the single-rank computation (emulated ranks: a loop over ``rank in range(tp)``); the
  pipeline partitions a predictor can run on;
* inside each supported SGLang release (``sglang`` marker, the venvs of ``tests/test_sglang.py``): the
  startup checks of every parallel setting (accepted, or refused with its message), the KV pool sizing per
  rank, one decode step of the backend per emulated TP rank against the slice of the TP-1 step (SGLang's
  pools, the Triton kernels in the interpreter), and a pipeline stage whose producer is the layer right
  before it (the backend on stand-in layers; the hook on SGLang's own ``LlamaModel`` built as that stage).

No test here runs several processes or a collective: on one CPU there is no NCCL. What a multi-GPU
machine still has to run is in docs/sglang.md (Parallelism).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "integrations" / "sglang"))

from butler_sglang.parallel import aligned_partition, kv_heads_of_rank, pipeline_problem, shard_predictor, stage_problem  # noqa: E402
from butler_zoo import ButlerConfig, ButlerPredictor  # noqa: E402
from test_sglang import _inner, venv  # noqa: E402,F401  (the SGLang venv of each release, a fixture)


def _config(h_kv=4, h_q=8, query_heads="kv", fmt=2, layers=5, stride=2):
    return ButlerConfig(base_model="tiny", base_model_type="llama", num_hidden_layers=layers, hidden_size=32,
                        num_attention_heads=h_q, num_key_value_heads=h_kv, head_dim=16, producer_stride=stride,
                        sketch_dim=8, mlp_dim=24, query_heads=query_heads, format_version=fmt)


# ----- plain torch -----------------------------------------------------------------------------------
def test_kv_heads_of_rank_follow_sglangs_sharding():
    # as many or more heads than ranks: consecutive blocks
    assert [list(kv_heads_of_rank(8, 2, r)) for r in range(2)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    assert [list(kv_heads_of_rank(8, 8, r)) for r in range(8)] == [[h] for h in range(8)]
    # fewer heads than ranks: one head each, replicated on consecutive ranks (QKVParallelLinear's
    # shard_id = tp_rank // (tp_size / num_kv_heads))
    assert [list(kv_heads_of_rank(2, 8, r)) for r in range(8)] == [[0]] * 4 + [[1]] * 4
    assert [list(kv_heads_of_rank(1, 4, r)) for r in range(4)] == [[0]] * 4
    assert list(kv_heads_of_rank(4, 1, 0)) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="do not split over 3"):
        kv_heads_of_rank(8, 3, 0)
    with pytest.raises(ValueError, match="replicated evenly over 3"):
        kv_heads_of_rank(2, 3, 0)
    with pytest.raises(ValueError, match="outside a group of 2"):
        kv_heads_of_rank(8, 2, 2)


@pytest.mark.parametrize("query_heads", ["kv", "query"])
@pytest.mark.parametrize("tp", [1, 2, 8])
def test_each_rank_computes_the_slice_of_the_full_predictor(tp, query_heads):
    """Emulated ranks: every rank's producer queries (format 2: rotated at their positions), sketches and
    top-B selection equal the full computation's for the rank's KV heads, bit for bit."""
    from butler_kernels import reference as ref

    torch.manual_seed(0)
    cfg = _config(query_heads=query_heads)
    full = ButlerPredictor(cfg).eval()
    for p in full.producers:  # a trained-looking LayerNorm (the default is the identity)
        p.norm.weight.data.normal_(1.0, 0.1)
        p.norm.bias.data.normal_(0.0, 0.1)
    B, T, H_kv, D = 3, 40, cfg.num_key_value_heads, cfg.head_dim
    group = cfg.num_query_heads // H_kv
    hidden = torch.randn(B, cfg.hidden_size)
    keys = torch.randn(B, H_kv, T, D)
    pos = torch.arange(T)
    inv = 1.0 / 10000 ** (torch.arange(D // 2) / (D // 2))
    cos_k, sin_k = torch.cos(pos[:, None] * inv)[None], torch.sin(pos[:, None] * inv)[None]  # [1, T, D/2]
    q_pos = torch.tensor([T, T - 3, T - 7])
    rope_q = (torch.cos(q_pos[:, None] * inv), torch.sin(q_pos[:, None] * inv))
    start, end = torch.zeros(B, dtype=torch.int32), torch.tensor([T, 31, 17], dtype=torch.int32)
    sinks, window, budget = 2, 4, 6

    def compute(pred, keys):
        q = pred.position_queries(pred.producer_queries(0, hidden), rope_q)  # [B, n, H_sel, d']
        out = {"queries": q, "selection": {}, "sketch": {}}
        for layer in cfg.served_layers(0):
            sketch = pred.project_keys(layer, keys, rope=(cos_k, sin_k))  # [B, H, T, d']
            scores = ref.score_tokens(pred.layer_queries(layer, q), sketch, keys.shape[1])
            out["sketch"][layer] = sketch
            out["selection"][layer] = ref.select_topk(scores, start, end, sinks, window, budget)
        return out

    want = compute(full, keys)
    covered = set()
    for rank in range(tp):
        heads = kv_heads_of_rank(H_kv, tp, rank)
        shard = shard_predictor(full, heads)
        assert shard.config.num_key_value_heads == len(heads) and shard.config.num_query_heads == len(heads) * group
        assert shard.num_parameters() <= full.num_parameters()
        got = compute(shard, keys[:, heads.start : heads.stop])
        q_heads = slice(heads.start * group, heads.stop * group)
        assert torch.equal(got["queries"], want["queries"][:, :, q_heads]), (tp, rank)
        for layer in cfg.served_layers(0):
            assert torch.equal(got["sketch"][layer], want["sketch"][layer][:, heads.start : heads.stop]), (tp, rank, layer)
            assert torch.equal(got["selection"][layer], want["selection"][layer][:, heads.start : heads.stop]), (tp, rank, layer)
        covered.update(heads)
    assert covered == set(range(H_kv))
    if tp == 1:  # one GPU: the same code, the full slice, every tensor equal
        only = shard_predictor(full, range(H_kv))
        assert only is not full and all(torch.equal(a, b) for a, b in zip(only.state_dict().values(), full.state_dict().values()))


def test_shard_predictor_keeps_dtype_and_copies():
    full = ButlerPredictor(_config()).to(torch.bfloat16)
    shard = shard_predictor(full, range(1, 3))
    assert shard.key_proj.dtype == torch.bfloat16 and shard.key_proj.is_contiguous()
    assert shard.key_proj.untyped_storage().data_ptr() != full.key_proj.untyped_storage().data_ptr()
    assert shard.config.shapes["num_key_value_heads"] == 2 and full.config.num_key_value_heads == 4


def test_shard_predictor_refuses_a_tensor_it_does_not_know():
    full = ButlerPredictor(_config())
    full.register_parameter("new_scale", torch.nn.Parameter(torch.ones(4)))
    with pytest.raises(ValueError, match="'new_scale'"):
        shard_predictor(full, range(0, 2))
    with pytest.raises(ValueError, match="not a run of the predictor's 4 KV heads"):
        shard_predictor(ButlerPredictor(_config()), range(2, 6))


def test_pipeline_stages_run_the_producers_of_their_layers():
    cfg = _config(layers=32, stride=4)  # producers after layers 0, 4, ..., 28
    # a stage may start right after a producer layer (its input is that layer's stream), not elsewhere
    assert stage_problem(cfg, 0, 17) is None and stage_problem(cfg, 17, 32) is None and stage_problem(cfg, 1, 5) is None
    problem = stage_problem(cfg, 16, 32)
    assert "serves layer 16" in problem and "after layer 12" in problem and "after layer 15" in problem
    even = {2: [(0, 16), (16, 32)]}
    message = pipeline_problem(cfg, 2, lambda r: even[2][r])
    assert message.startswith("--pp-size 2: stage 1:") and "SGLANG_PP_LAYER_PARTITION=17,15" in message
    assert pipeline_problem(cfg, 2, lambda r: [(0, 17), (17, 32)][r]) is None
    for pp in (2, 3, 4, 8):
        parts = aligned_partition(32, pp, 4)
        starts = [sum(parts[:i]) for i in range(pp)]
        assert sum(parts) == 32 and all(n > 0 for n in parts)
        assert all((s - 1) % 4 == 0 for s in starts[1:]), parts
        assert pipeline_problem(cfg, pp, lambda r: (starts[r], starts[r] + parts[r])) is None
    assert aligned_partition(32, 4, 4) == [9, 8, 8, 7]
    # more stages than producer groups: no partition works, and the message says how many can
    small = _config(layers=5, stride=2)
    assert aligned_partition(5, 4, 2) is None
    assert "at most 3" in pipeline_problem(small, 4, lambda r: [(0, 1), (1, 2), (2, 3), (3, 5)][r])


# ----- inside SGLang ---------------------------------------------------------------------------------
_RESULTS: dict[str, dict] = {}


def _results(venv, tmp_path_factory) -> dict:
    """Every check below, run in one subprocess per release (importing SGLang costs ~10 s a process)."""
    if venv.version not in _RESULTS:
        _RESULTS[venv.version] = _inner(venv, "all", tmp_path_factory.mktemp(f"parallel-{venv.version}"), script=Path(__file__))
    return _RESULTS[venv.version]


@pytest.mark.sglang
def test_parallel_settings_at_startup(venv, tmp_path_factory):
    r = _results(venv, tmp_path_factory)["startup"]
    e = r["errors"]
    for accepted in ("tp2", "tp4_replicated_kv", "dp2", "tp2_dp2", "pp2_aligned", "pp2_partition_env"):
        assert e[accepted] == "accepted", (accepted, e[accepted])
    assert "--tp-size 3" in e["tp3"] and "2 KV heads cannot be replicated evenly over 3" in e["tp3"]
    assert "--enable-dp-attention is not supported" in e["dp_attention"] or "--attn-dp-size 2" in e["dp_attention"], e
    assert "--attention-context-parallel-size 2" in e["context_parallel"]
    pp = e["pp2_even"]
    assert "--pp-size 2: stage 1:" in pp and "after layer 0" in pp and "SGLANG_PP_LAYER_PARTITION=3,2" in pp, pp
    # the KV pool counts each rank's sketch: its own KV heads only (2 heads: 1 per rank at TP 2, 1 replica at TP 4)
    assert r["cell_size_extra"] == {"1": 2 * 2 * 8 * 2, "2": 2 * 1 * 8 * 2, "4": 2 * 1 * 8 * 2}, r["cell_size_extra"]


@pytest.mark.sglang
def test_tensor_parallel_ranks_decode_the_slice_of_the_full_step(venv, tmp_path_factory):
    """One decode step of the backend per emulated attention-TP rank (SGLang's pools holding the rank's KV
    heads, its query heads' q) equals the TP-1 step's slice: the producer queries, the sketch store, the
    producer's selections and the attention output (predictor with one query per query head, so a KV
    head's group of predicted queries is sliced too; TP 4 replicates each of the 2 KV heads on 2 ranks)."""
    r = _results(venv, tmp_path_factory)["tp_decode"]
    assert r["ranks"] == [[2, 0, [0]], [2, 1, [1]], [4, 0, [0]], [4, 1, [0]], [4, 2, [1]], [4, 3, [1]]], r["ranks"]
    assert r["full_sparse_rows"] == [1, 2]  # the step is budgeted: rows 1 and 2 select, row 0 fits its budget
    for case in r["cases"]:
        assert case["kv_heads_in_log"], case
        assert case["queries"] == 0.0 and case["sketch"] == 0.0, case  # bit for bit
        assert case["selection_equal"] and case["selected_by_producer"] == [1, 2], case
        assert case["output"] < 2e-5, case  # fp32; the kernels split the work per head as at TP 1


@pytest.mark.sglang
def test_pipeline_stage_reads_its_producer_from_its_input(venv, tmp_path_factory):
    """A stage that starts right after a producer layer computes that producer's queries from the
    residual stream it receives (0.5.12: the first layer's (hidden, residual) arguments; 0.5.23: its
    capture_output), through the backend on stand-in layers and through the hook on SGLang's own Llama
    stage; a stage whose producer is further back is refused when its backend is built."""
    r = _results(venv, tmp_path_factory)["pp_stage"]
    assert r["stage_queries_max_abs"] < 1e-6, r
    assert r["sketch_layers"] == [1, 2] and r["selected_by_producer"] == [1, 2], r
    assert "serves layer 2" in r["refused"] and "after layer 0" in r["refused"], r["refused"]
    # on SGLang's own LlamaModel built as that stage, from the tensors the previous stage sends
    m = _results(venv, tmp_path_factory)["pp_model"]
    assert m["stage_layers"] == [1, 3] and m["calls_after_extend"] == 0 and m["calls_after_decode"] == 1, m
    assert m["stream_max_abs"] is not None and m["stream_max_abs"] < 1e-6, m


# =====================================================================================================
# The checks, run in a subprocess of an SGLang venv: python tests/test_sglang_parallel.py NAME|all TMPDIR
# =====================================================================================================
def _model_dir(tmp: Path, layers: int) -> Path:
    from transformers import LlamaConfig

    import test_sglang as t

    d = tmp / f"model-{layers}"
    if not (d / "config.json").is_file():
        cfg = LlamaConfig(hidden_size=t.E, intermediate_size=128, num_hidden_layers=layers, num_attention_heads=t.HQ,
                          num_key_value_heads=t.HKV, head_dim=t.D, vocab_size=256, max_position_embeddings=512)
        cfg.architectures = ["LlamaForCausalLM"]
        cfg.save_pretrained(d)
    return d


def _check_startup(tmp: Path) -> dict:
    import os

    from sglang.srt.plugins import load_plugins

    load_plugins()
    import test_sglang as t
    from butler_sglang import settings

    model_dir, pred = t._make_model_and_predictor(tmp)
    model5 = _model_dir(tmp, 5)
    _, pred5 = t._make_model_and_predictor(tmp, layers=5, name="pred-5")
    tb = ["--decode-attention-backend", "tokenbutler", "--tokenbutler-predictor"]

    def check(model, predictor, *extra):
        # the settings as given, then as the launcher resolves and checks them
        sa = t._server_args(model, *tb, str(predictor), *extra)
        err = t._error_of(lambda: settings.validate_server_args(sa))
        if err != "no exit":
            return err
        err = t._error_of(lambda: t._checked(sa))
        return "accepted" if err == "no exit" else err

    e = {
        "tp2": check(model_dir, pred, "--tp-size", "2"),
        "tp4_replicated_kv": check(model_dir, pred, "--tp-size", "4"),
        "tp3": check(model_dir, pred, "--tp-size", "3"),
        "dp2": check(model_dir, pred, "--dp-size", "2"),
        "tp2_dp2": check(model_dir, pred, "--tp-size", "2", "--dp-size", "2"),
        "dp_attention": check(model_dir, pred, "--tp-size", "2", "--dp-size", "2", "--enable-dp-attention"),
        "context_parallel": check(model_dir, pred, "--tp-size", "2", "--attention-context-parallel-size", "2"),
        # 3 layers, stride 2: the even split starts stage 1 at layer 1, right after producer layer 0
        "pp2_aligned": check(model_dir, pred, "--pp-size", "2"),
        # 5 layers: the even split starts stage 1 at layer 2, whose producer (after layer 0) is a stage back
        "pp2_even": check(model5, pred5, "--pp-size", "2"),
    }
    os.environ["SGLANG_PP_LAYER_PARTITION"] = "3,2"
    e["pp2_partition_env"] = check(model5, pred5, "--pp-size", "2")
    del os.environ["SGLANG_PP_LAYER_PARTITION"]

    cell = {}
    for tp in (1, 2, 4):
        with_sketch = t._server_args(model_dir, *tb, str(pred), "--tp-size", str(tp))
        without = t._server_args(model_dir, "--attention-backend", "triton", "--tp-size", str(tp))
        t._set_attention_tp(with_sketch, 0, tp)
        cell[str(tp)] = t._cell_size(with_sketch, t.L, tp=tp) - t._cell_size(without, t.L, tp=tp)
    return {"sglang": t._sglang_version(), "errors": e, "cell_size_extra": cell}


def _decode_case(tmp: Path, pred: Path, tp: int, rank: int, inputs: dict) -> dict:
    """Extend and one decode step on the rank's slice of ``inputs`` (the TP-1 run's tensors)."""
    import io
    import logging

    import test_sglang as t
    from sglang.srt.layers.radix_attention import RadixAttention
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from butler_sglang import backend as bb
    from butler_sglang.parallel import kv_heads_of_rank

    model_dir = tmp / "model"
    heads = kv_heads_of_rank(t.HKV, tp, rank)
    hq = t.HQ // tp
    q_heads = slice(rank * hq, (rank + 1) * hq)
    sa = t._server_args(model_dir, "--decode-attention-backend", "tokenbutler", "--tokenbutler-predictor", str(pred),
                        "--tokenbutler-budget", "28", "--tokenbutler-sinks", "4", "--tokenbutler-window", "8", "--tp-size", str(tp))
    t._set_attention_tp(sa, rank, tp)
    DecoderLayer, run_layers = t._decoder_layer_class()
    rotary = t._rotary(sa)
    t._set_attention_tp(sa, rank, tp)  # _rotary publishes the server args again (0.5.23)
    radix = [RadixAttention(hq, t.D, t.D ** -0.5, num_kv_heads=len(heads), layer_id=l) for l in range(t.L)]
    kv = {l: (k[:, heads.start : heads.stop], v[:, heads.start : heads.stop]) for l, (k, v) in inputs["prefill_kv"].items()}
    holder = {}

    def model_forward(fb):
        for l in range(t.L):
            holder["pool"].set_kv_buffer(radix[l], bb.api().decode_write_loc(fb), *kv[l])

    mr = t._fake_runner(sa, torch.float32, [DecoderLayer(rotary) for _ in range(t.L)], forward=model_forward, kv_heads=len(heads))
    holder["pool"] = mr.token_to_kv_pool
    log = io.StringIO()
    handler = logging.StreamHandler(log)
    logging.getLogger("butler_sglang").addHandler(handler)
    logging.getLogger("butler_sglang").setLevel(logging.INFO)
    backend = bb.create_backend(mr)
    logging.getLogger("butler_sglang").removeHandler(handler)
    state = mr._tokenbutler_state
    r2t, lens, rpi = mr.req_to_token_pool, inputs["lens"], inputs["rpi"]
    r2t.req_to_token[rpi] = inputs["table"]
    ext_loc, ext_pos = inputs["ext_loc"], inputs["ext_pos"]
    mr.forward(t._forward_batch(forward_mode=ForwardMode.EXTEND, positions=ext_pos, out_cache_loc=ext_loc,
                                token_to_kv_pool=mr.token_to_kv_pool, batch_size=3))
    fb = t._forward_batch(batch_size=3, forward_mode=ForwardMode.DECODE, spec_info=None, seq_lens=lens.clone(),
                          seq_lens_sum=int(lens.sum()), seq_lens_cpu=lens.clone(), req_pool_indices=rpi,
                          out_cache_loc=inputs["out_loc"], token_to_kv_pool=mr.token_to_kv_pool, positions=lens - 1)
    state.begin_forward(fb)
    backend.init_forward_metadata(fb)
    run_layers(mr.model.model.layers, lens - 1, inputs["h"], fb)
    outs = {}
    for l in range(t.L):
        q = inputs["q"][l].view(3, t.HQ, t.D)[:, q_heads].reshape(3, -1)
        k, v = inputs["new_kv"][l]
        outs[l] = backend.forward_decode(q, k[:, heads.start : heads.stop], v[:, heads.start : heads.stop], radix[l], fb)
    result = {
        "heads": heads, "q_heads": q_heads, "queries": state.queries[0][:3].clone(), "sketch": state._sketch_store.clone(),
        "selections": {l: s.clone() for l, s in state.selections.items()}, "out": outs, "log": log.getvalue(),
    }
    state.remove()
    return result


def _check_tp_decode(tmp: Path) -> dict:
    from sglang.srt.plugins import load_plugins

    load_plugins()
    import test_sglang as t

    t._make_model_and_predictor(tmp)
    pred = tmp / "pred-query-heads"
    torch.manual_seed(0)
    ButlerPredictor(ButlerConfig(base_model="tiny-llama", base_model_type="llama", num_hidden_layers=t.L, hidden_size=t.E,
                                 num_attention_heads=t.HQ, num_key_value_heads=t.HKV, head_dim=t.D, producer_stride=2,
                                 sketch_dim=8, mlp_dim=32, query_heads="query")).save_pretrained(pred)
    torch.manual_seed(1)
    lens = torch.tensor([20, 90, 130])
    rpi = torch.tensor([1, 2, 3])
    table = torch.zeros(3, 160, dtype=torch.int32)
    perm = torch.randperm(590) + 1
    off = 0
    for i, n in enumerate(lens.tolist()):
        table[i, :n] = perm[off : off + n].to(torch.int32)
        off += n
    n_ext = int((lens - 1).sum())
    inputs = {
        "lens": lens, "rpi": rpi, "table": table,
        "ext_loc": torch.cat([table[i, : n - 1].long() for i, n in enumerate(lens.tolist())]),
        "ext_pos": torch.cat([torch.arange(n - 1) for n in lens.tolist()]),
        "out_loc": torch.stack([table[i, n - 1] for i, n in enumerate(lens.tolist())]).long(),
        "prefill_kv": {l: (torch.randn(n_ext, t.HKV, t.D), torch.randn(n_ext, t.HKV, t.D)) for l in range(t.L)},
        "new_kv": {l: (torch.randn(3, t.HKV, t.D), torch.randn(3, t.HKV, t.D)) for l in range(t.L)},
        "q": {l: torch.randn(3, t.HQ * t.D) for l in range(t.L)},
        "h": torch.randn(3, t.E),
    }
    full = _decode_case(tmp, pred, 1, 0, inputs)
    sinks, window, budget = 4, 8, 28 - 4 - 8
    sparse = [i for i, n in enumerate(lens.tolist()) if n > sinks + window + budget]
    group = t.HQ // t.HKV  # predictor heads per KV head (query_heads="query")
    out = {"sglang": t._sglang_version(), "ranks": [], "cases": [], "full_sparse_rows": sparse}
    for tp in (2, 4):
        for rank in range(tp):
            got = _decode_case(tmp, pred, tp, rank, inputs)
            h = got["heads"]
            ph = slice(h.start * group, h.stop * group)
            out["ranks"].append([tp, rank, list(h)])
            hd = t.D  # output columns of the rank's query heads
            qh = got["q_heads"]
            out["cases"].append({
                "tp": tp, "rank": rank,
                "kv_heads_in_log": f"KV heads {h.start}-{h.stop - 1} of {t.HKV} (attention-TP rank {rank} of {tp})" in got["log"],
                "queries": (got["queries"] - full["queries"][:, :, ph]).abs().max().item(),
                "sketch": (got["sketch"] - full["sketch"][h.start : h.stop]).abs().max().item(),
                "selected_by_producer": sorted(got["selections"]),
                "selection_equal": all(torch.equal(got["selections"][l], full["selections"][l][:, h.start : h.stop])
                                       for l in full["selections"]),
                "output": max((got["out"][l] - full["out"][l][:, qh.start * hd : qh.stop * hd]).abs().max().item()
                              for l in range(t.L)),
            })
    return out


def _check_pp_stage(tmp: Path) -> dict:
    """Stage 1 of 2 of the 3-layer model (layers 1-2), producer 0 (after layer 0) on stage 0."""
    from sglang.srt.plugins import load_plugins

    load_plugins()
    import test_sglang as t
    from sglang.srt.model_executor.forward_batch_info import ForwardMode

    from butler_sglang import backend as bb

    model_dir, pred = t._make_model_and_predictor(tmp)
    sa = t._server_args(model_dir, "--decode-attention-backend", "tokenbutler", "--tokenbutler-predictor", str(pred),
                        "--tokenbutler-budget", "28", "--tokenbutler-sinks", "4", "--tokenbutler-window", "8", "--pp-size", "2")
    DecoderLayer, _ = t._decoder_layer_class()
    t._set_attention_tp(sa, 0, 1)
    rotary = t._rotary(sa)
    layers = [DecoderLayer(rotary) for _ in range(t.L)]
    mr = t._fake_runner(sa, torch.float32, layers, start_layer=1, end_layer=t.L)
    backend = bb.create_backend(mr)
    state = mr._tokenbutler_state
    lens, rpi = torch.tensor([20, 90, 130]), torch.tensor([1, 2, 3])
    for i, n in enumerate(lens.tolist()):
        mr.req_to_token_pool.req_to_token[rpi[i], :n] = torch.arange(1 + 150 * i, 1 + 150 * i + n, dtype=torch.int32)
    fb = t._forward_batch(batch_size=3, forward_mode=ForwardMode.DECODE, spec_info=None, seq_lens=lens.clone(),
                          seq_lens_sum=int(lens.sum()), seq_lens_cpu=lens.clone(), req_pool_indices=rpi,
                          out_cache_loc=torch.tensor([19, 240, 429]), token_to_kv_pool=mr.token_to_kv_pool, positions=lens - 1)
    state.begin_forward(fb)
    backend.init_forward_metadata(fb)
    hidden, residual = torch.randn(3, t.E), torch.randn(3, t.E)
    # the stage's first layer, called as the release calls it with what the previous stage sent
    if t._sglang_version() == "0.5.12":
        layers[1](lens - 1, hidden, fb, residual)  # pp_proxy_tensors' hidden_states and residual
        stream = hidden + residual
    else:
        stream = hidden  # 0.5.23's boundary hands the completed stream to capture_output
        layers[1](lens - 1, hidden, fb, capture_output=None)
    pred_model = state.predictor
    cos, sin = rotary.cos_sin_cache[(lens - 1).long()].chunk(2, dim=-1)
    want = pred_model.position_queries(pred_model.producer_queries(0, stream), (cos, sin))
    result = {
        "sglang": t._sglang_version(),
        "stage_queries_max_abs": (state.queries[0][:3] - want).abs().max().item(),
        "sketch_layers": sorted(state.sketch),
        "selected_by_producer": sorted(state.selections),
    }
    state.remove()
    # layers 2-2 alone: the producer of layer 2 reads the stream after layer 0, two stages back
    result["refused"] = t._error_of(lambda: bb.create_backend(t._fake_runner(sa, torch.float32, [DecoderLayer(rotary) for _ in range(t.L)],
                                                                             start_layer=2, end_layer=t.L)))
    return result


def _check_pp_model(tmp: Path) -> dict:
    """SGLang's own ``LlamaModel`` built as stage 1 of 2 (layers 1-2 of 3; the process's pipeline group is
    stood in for: one CPU process has no second rank), fed what stage 0 sends (``PPProxyTensors`` of
    ``hidden_states`` and ``residual``), attention zeroed: the producer hook of layer 0, installed for a
    stage starting at layer 1, receives the stream the stage starts from (``hidden_states + residual``),
    at decode steps only. Runs last: it initialises a one-process gloo group and patches the model module."""
    import tempfile
    import types

    import sglang.srt.layers.rotary_embedding.base as rope_base
    import sglang.srt.models.llama as llama
    from sglang.srt.distributed import parallel_state as ps
    from sglang.srt.model_executor.forward_batch_info import ForwardMode, PPProxyTensors
    from transformers import LlamaConfig

    import test_sglang as t
    from butler_sglang.compat import api

    model_dir, _ = t._make_model_and_predictor(tmp)
    sa = t._server_args(model_dir, "--attention-backend", "triton")
    init = f"file://{tempfile.mkdtemp()}/dist"
    stage = types.SimpleNamespace(is_first_rank=False, is_last_rank=True, rank_in_group=1, world_size=2)
    if t._sglang_version() == "0.5.12":
        from sglang.srt.server_args import set_global_server_args_for_scheduler

        set_global_server_args_for_scheduler(sa)
        ps.init_distributed_environment(world_size=1, rank=0, distributed_init_method=init, local_rank=0, backend="gloo")
        ps.initialize_model_parallel(tensor_model_parallel_size=1, backend="gloo")
        llama.get_pp_group = lambda: stage
    else:
        import sglang.srt.utils.common as common
        from sglang.srt.runtime_context import SpawnRanks, get_parallel, publish

        get_parallel().clear_stamp()
        publish(sa, role="scheduler", ranks=SpawnRanks(world_rank=0, gpu_id=0))
        ps.init_distributed_environment(world_size=1, rank=0, distributed_init_method=init, local_rank=0, backend="gloo")
        ps.initialize_model_parallel(backend="gloo")
        real, fake = get_parallel, {"pp_group": stage, "pp_rank": 1, "pp_size": 2}

        class Stage1:
            def __getattr__(self, name):
                return fake[name] if name in fake else getattr(real(), name)

        llama.get_parallel = common.get_parallel = lambda: Stage1()
    rope_base._is_cpu = True  # test-only, as in test_sglang._real_llama_model
    model = llama.LlamaModel(LlamaConfig.from_pretrained(model_dir), quant_config=None)
    torch.manual_seed(0)
    for param in model.parameters():
        param.data.normal_(0, 0.2)
    for layer in model.layers[model.start_layer : model.end_layer]:
        layer.self_attn.attn.forward = lambda q, k, v, forward_batch, *a, **kw: torch.zeros_like(q)
    streams = []
    handle = api().install_producer_hook(
        model.layers, 0, lambda hidden, residual: streams.append((hidden if residual is None else hidden + residual).clone()),
        start_layer=model.start_layer,
    )
    ids, positions = torch.tensor([5, 7]), torch.tensor([3, 9])
    hidden, residual = torch.randn(2, t.E), torch.randn(2, t.E)
    out = {"sglang": t._sglang_version(), "stage_layers": [model.start_layer, model.end_layer]}
    with torch.no_grad():
        for mode in (ForwardMode.EXTEND, ForwardMode.DECODE):
            proxy = PPProxyTensors({"hidden_states": hidden.clone(), "residual": residual.clone()})
            model(ids, positions, t._forward_batch(batch_size=2, forward_mode=mode, spec_info=None, positions=positions),
                  pp_proxy_tensors=proxy)
            out[f"calls_after_{mode.name.lower()}"] = len(streams)
    handle.remove()
    out["stream_max_abs"] = (streams[-1] - (hidden + residual)).abs().max().item() if streams else None
    return out


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    name, tmp = sys.argv[1], Path(sys.argv[2])
    checks = {"startup": _check_startup, "tp_decode": _check_tp_decode, "pp_stage": _check_pp_stage, "pp_model": _check_pp_model}
    if name == "all":  # each check in its own folder, every result under its name
        result = {}
        for key, check in checks.items():
            (tmp / key).mkdir()
            result[key] = check(tmp / key)
        result["sglang"] = result["startup"]["sglang"]
    else:
        result = checks[name](tmp)
    print("RESULT " + json.dumps(result), flush=True)
