"""Quality by context length (`butler-zoo eval --seq-lens`): the long-context path runs end to end on a tiny
model past the length its predictor was trained on, and the pass-key task scores hand-made cases right."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from butler_training.by_length import LengthEvalConfig, _needle_accuracy, evaluate_by_length, format_length_table
from butler_training.needle import KEY_KINDS, make_needle_samples, needle_batches
from butler_training.train import TrainConfig, train
from conftest import char_tokenizer
from tiny_models import tiny_model

TEXT = ("the lighthouse keeper rowed out at dawn and counted the gulls on the rocks. "
        "a storm came over the hills, and the village closed its shutters. ")


def _texts(folder: Path, n: int = 6) -> Path:
    folder.mkdir()
    for i in range(n):
        (folder / f"doc{i}.txt").write_text((TEXT + f"chapter {i} ends here. ") * 12)
    return folder


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny predictor trained on 48-token windows only (format 2)."""
    tmp = tmp_path_factory.mktemp("bylen")
    model = tiny_model("llama-gqa", layers=4)
    tok = char_tokenizer()
    g = torch.Generator().manual_seed(0)
    windows = torch.randint(3, 98, (24, 48), generator=g)
    cfg = TrainConfig(out=str(tmp / "pred"), tokens=8 * 4 * 48, batch_size=4, rows=16, lr=5e-3, device="cpu",
                      progress=False, plot=False, log_every=4, producer_stride=2, sketch_dim=8, mlp_dim=32)
    train(cfg, model=model, train_windows=windows, val_windows=windows[:2])
    from butler_zoo import ButlerPredictor

    return model, tok, ButlerPredictor.from_pretrained(tmp / "pred"), tmp


def test_long_context_path_runs_past_the_training_length(trained, tmp_path):
    model, tok, predictor, tmp = trained
    assert predictor.config.format_version == 2 and predictor.config.training["seq_len"] == 48
    data = _texts(tmp_path / "texts")
    cfg = LengthEvalConfig(
        out=str(tmp_path / "out"), data=[str(data)], seq_lens=[64, 160], windows=2, prefill=16, sinks=2, window=8,
        methods=["tokenbutler", "oracle", "streaming_llm"], fractions=[0.25, 0.5], needle_lengths=[160, 224],
        needle_depths=[0.2, 0.8], needle_per_depth=1, coref_tokens=128, coref_samples=2, coref_prefill=16,
        task_methods=["dense", "oracle", "tokenbutler"], task_fractions=[0.25], device="cpu", plot=True,
    )
    result = evaluate_by_length(cfg, model=model, tokenizer=tok, predictor=predictor)
    saved = json.loads((tmp_path / "out" / "eval_by_length.json").read_text())
    assert saved["by_length"].keys() == {"64", "160"} and saved["predictor_format"] == 2
    for L, block in saved["by_length"].items():
        methods = {(r["method"], r["budget"]) for r in block["results"]}
        assert methods >= {("tokenbutler", 0.25), ("oracle", 0.5), ("streaming_llm", 0.25), ("dense", 1.0)}
        tb = next(r for r in block["results"] if r["method"] == "tokenbutler" and r["budget"] == 0.25)
        diag = tb["diagnostics"]
        assert diag["recall_by_position"][0]["from"] == 16 and diag["recall_by_position"][-1]["to"] == int(L)
        assert set(diag["recall_by_layer"]) == {"1", "2", "3"}
        first = diag["recall_by_distance"][0]
        assert (first["from"], first["to"]) == (0, 8) and all(0 <= d["recall"] <= 1 for d in diag["recall_by_distance"])
        # where the budget covers sinks + window (rows past 40 at 25%), the window's distances are all read
        assert first["recall"] > max(d["recall"] for d in diag["recall_by_distance"][1:])
        assert abs(sum(d["mass_share"] for d in diag["recall_by_distance"]) - 1.0) < 1e-4  # rounded to 5 digits
        oracle = next(r for r in block["results"] if r["method"] == "oracle" and r["budget"] == 0.25)
        assert oracle["mass_recall"] >= tb["mass_recall"] - 1e-9  # the oracle keeps the most mass, by definition
        assert (tmp_path / "out" / f"len-{L}" / "eval.json").is_file()
    needle = {(r["method"], r["budget"]): r for r in saved["needle"]["results"]}
    assert needle[("dense", 1.0)]["samples"] == 4 and set(needle[("oracle", 0.25)]["by_cell"]) == {
        "160@0.2", "160@0.8", "224@0.2", "224@0.8"}
    assert {r["method"] for r in saved["coref"]["results"]} == {"dense", "oracle", "tokenbutler"}
    assert (tmp_path / "out" / "eval_by_length.png").is_file() and (tmp_path / "out" / "recall_by_position.png").is_file()
    table = format_length_table(result)
    assert "| 160 | 25% |" in table and table.count("\n") == 1 + 2 * 2


@pytest.mark.parametrize("kind", sorted(KEY_KINDS))
def test_needle_samples_are_exact(kind):
    NEEDLE, QUESTION = KEY_KINDS[kind]
    tok = char_tokenizer()
    hay = tok(TEXT * 20, add_special_tokens=False)["input_ids"]
    samples = make_needle_samples(tok, hay, 300, [0.0, 0.5, 1.0], per_depth=2, seed=1, key_kind=kind)
    assert len(samples) == 6 and all(len(s.ids) == 300 for s in samples)
    for s in samples:
        text = tok.decode(s.ids)
        s0, e0 = s.answer
        assert tok.decode(s.ids[s0:e0]).replace(" ", "") == s.key
        if kind == "digits":
            assert len(s.key) == 5 and s.key.isdigit()
        else:
            assert s.key[0].isupper() and s.key[1:].islower() and 6 <= len(s.key) <= 12
        assert text.endswith(QUESTION + " " + s.key + ".")
        needle = NEEDLE.format(key=s.key)
        at = text.index(needle)
        fill = 300 - len(tok(needle + QUESTION + " " + s.key + ".", add_special_tokens=False)["input_ids"])
        assert at == round(s.depth * fill)  # one character per token: the needle sits at its depth
    assert len({s.key for s in samples}) == 6


def test_needle_refuses_an_unknown_key_kind():
    with pytest.raises(ValueError, match="unknown needle key kind 'emoji'; choose one of words, digits"):
        make_needle_samples(char_tokenizer(), list(range(3, 90)) * 10, 160, [0.5], 1, key_kind="emoji")


class _FixedLogits:
    """Test double of DecodeSimulator: 'hidden states' are one-hot rows of the tokens it is told to predict,
    and the logits are those rows, so the scorer's argmax sees exactly the planned predictions."""

    def __init__(self, predictions: dict[int, torch.Tensor], vocab: int):
        self.predictions, self.vocab = predictions, vocab

    def forward(self, ids, method, plan):
        out = torch.zeros(ids.shape[0], ids.shape[1], self.vocab)
        for b in range(ids.shape[0]):
            nxt = self.predictions[int(ids[b, 0])]
            out[b, torch.arange(ids.shape[1]), nxt] = 1.0
        return out

    def logits(self, hidden):
        return hidden


def test_needle_scoring_on_hand_made_cases():
    """Four samples, answer span 6:9 (its first token predicted by the dense prompt row 5, the other two by
    decode rows 6 and 7): every token right (correct); the 2nd key token wrong (wrong); the last wrong
    (wrong); only the first wrong (correct: the method decoded the rest, the first is the prompt's)."""
    V = 20
    base = [3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    ids = torch.stack([torch.tensor([first] + base[1:]) for first in (1, 2, 13, 14)])
    spans = [(6, 9)] * 4
    right = torch.cat([ids[0, 1:], torch.tensor([0])])  # row i predicts token i+1
    second_wrong, last_wrong, first_wrong = right.clone(), right.clone(), right.clone()
    second_wrong[6] = 19
    last_wrong[7] = 19
    first_wrong[5] = 19
    sim = _FixedLogits({1: right, 2: second_wrong, 13: last_wrong, 14: first_wrong}, V)
    r = _needle_accuracy(sim, [(ids, spans, 6, ["a", "b", "b", "c"])], None, lambda L, P: None, "cpu")
    assert r["accuracy"] == pytest.approx(2 / 4) and r["samples"] == 4
    assert r["token_accuracy"] == pytest.approx(6 / 8)  # decoded tokens: 2 + 1 + 1 + 2 of 4 x 2
    assert r["first_token_accuracy"] == pytest.approx(3 / 4)
    assert r["by_cell"] == {"a": 1.0, "b": 0.0, "c": 1.0}
    with pytest.raises(ValueError, match="leaves no token to decode"):
        _needle_accuracy(sim, [(ids, [(6, 7)] * 4, 6, ["a"] * 4)], None, lambda L, P: None, "cpu")
    batches = needle_batches(make_needle_samples(char_tokenizer(), list(range(3, 90)) * 10, 160, [0.5], 3), 2)
    assert [b[0].shape for b in batches] == [torch.Size([2, 160]), torch.Size([1, 160])]


def test_tasks_alone_and_merged_over_an_earlier_run(trained, tmp_path):
    """A run with no lengths (a bare --seq-lens) measures only the tasks; --merge --tasks-from puts its tasks
    beside the lengths of an earlier run and keeps the earlier run's tasks under ``superseded``."""
    from butler_training.by_length import main, merge_results

    model, tok, predictor, tmp = trained
    data = _texts(tmp_path / "texts")
    common = dict(data=[str(data)], prefill=16, sinks=2, window=8, methods=["tokenbutler"], fractions=[0.5],
                  needle_depths=[0.5], needle_per_depth=1, coref_tokens=128, coref_samples=1, coref_prefill=16,
                  task_methods=["dense", "tokenbutler"], task_fractions=[0.5], device="cpu", plot=True)
    evaluate_by_length(LengthEvalConfig(out=str(tmp_path / "a"), seq_lens=[64], windows=1, needle_lengths=[160],
                                        needle_key="digits", **common), model=model, tokenizer=tok, predictor=predictor)
    tasks = evaluate_by_length(LengthEvalConfig(out=str(tmp_path / "b"), seq_lens=[], needle_lengths=[160], **common),
                               model=model, tokenizer=tok, predictor=predictor)
    assert tasks["by_length"] == {} and tasks["needle"]["key"] == "words" and tasks["coref"]["samples"] == 1
    assert not (tmp_path / "b" / "eval_by_length.png").exists()  # nothing by length to plot
    a, b = tmp_path / "a" / "eval_by_length.json", tmp_path / "b" / "eval_by_length.json"
    with pytest.raises(SystemExit, match="a second needle result"):
        merge_results([a, b], tmp_path / "m")
    assert main(["--merge", str(tmp_path / "m"), str(a), "--tasks-from", str(b)]) == 0
    merged = json.loads((tmp_path / "m" / "eval_by_length.json").read_text())
    assert merged["seq_lens"] == [64] and merged["needle"]["key"] == "words" and merged["needle"]["source"]["file"] == b.name
    assert [n["key"] for n in merged["superseded"]["needle"]] == ["digits"] and len(merged["superseded"]["coref"]) == 1
    # merged again (its own tasks replaced by the same run's): every provenance survives
    again = merge_results([tmp_path / "m" / "eval_by_length.json"], tmp_path / "m2", tasks_from=b)
    assert again["sources"] == merged["sources"] and again["sources"]["64"]["machine"] is not None
    assert again["superseded"]["needle"][0]["source"] == merged["needle"]["source"]


def test_tasks_resume_runs_only_what_is_missing(trained, tmp_path, monkeypatch):
    """Each task configuration is saved as it finishes; --resume runs only the missing ones and refuses a
    task made with other settings."""
    import butler_training.by_length as bl

    model, tok, predictor, tmp = trained
    data = _texts(tmp_path / "texts")
    cfg = dict(out=str(tmp_path / "t"), data=[str(data)], seq_lens=[], prefill=16, sinks=2, window=8,
               needle_lengths=[160], needle_depths=[0.5], needle_per_depth=1, coref_samples=0,
               task_methods=["dense", "tokenbutler"], task_fractions=[0.25, 0.5], device="cpu", plot=False)
    first = evaluate_by_length(LengthEvalConfig(**cfg), model=model, tokenizer=tok, predictor=predictor)
    assert [(r["method"], r["budget"]) for r in first["needle"]["results"]] == [("dense", 1.0), ("tokenbutler", 0.25), ("tokenbutler", 0.5)]
    path = tmp_path / "t" / "eval_by_length.json"
    saved = json.loads(path.read_text())
    saved["needle"]["results"] = saved["needle"]["results"][:2]  # as if stopped during the last configuration
    path.write_text(json.dumps(saved))
    calls = []
    real = bl._needle_accuracy
    monkeypatch.setattr(bl, "_needle_accuracy", lambda *a: calls.append(a) or real(*a))
    again = evaluate_by_length(LengthEvalConfig(**cfg, resume=True), model=model, tokenizer=tok, predictor=predictor)
    assert len(calls) == 1 and again["needle"]["results"] == first["needle"]["results"]
    with pytest.raises(SystemExit, match="needle results .* other settings"):
        evaluate_by_length(LengthEvalConfig(**{**cfg, "needle_depths": [0.2]}, resume=True), model=model, tokenizer=tok,
                           predictor=predictor)
