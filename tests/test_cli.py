"""The click CLI: help texts, info, budget parsing, generate on a tiny local model."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from butler_zoo.cli import main
from butler_zoo.cli.options import BUDGET
from tiny_models import tiny_model, tiny_predictor


def test_console_script_help():
    # the script pip installed next to this interpreter (the venv need not be activated)
    script = Path(sys.executable).parent / "butler-zoo"
    res = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    for cmd in ("generate", "info"):
        assert cmd in res.stdout


def test_every_command_has_help():
    runner = CliRunner()
    for name in main.commands:
        res = runner.invoke(main, [name, "--help"])
        assert res.exit_code == 0, (name, res.output)
        assert "usage:" in res.output.lower()  # click says "Usage:", the argparse front ends "usage:"


def test_budget_parsing():
    assert BUDGET.convert("512", None, None) == 512
    assert BUDGET.convert("0.1", None, None) == 0.1
    assert BUDGET.convert("25%", None, None) == 0.25
    res = CliRunner().invoke(main, ["generate", "hi", "--budget", "150%"])
    assert res.exit_code == 2 and "is not a budget" in res.output


def test_info(tmp_path):
    predictor = tiny_predictor(tiny_model())
    predictor.config.training = {"recipe": "unit-test"}
    predictor.save_pretrained(tmp_path)
    res = CliRunner().invoke(main, ["info", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert "model_type llama" in res.output and "12 positions read per step in all: 2 sinks + 4-token window" in res.output
    res = CliRunner().invoke(main, ["info", str(tmp_path), "--json"])
    assert json.loads(res.output)["num_parameters"] == predictor.num_parameters()


def test_generate_compare_dense(tmp_path):
    """A tiny local base with a word-level tokenizer, so generate runs end to end in seconds."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    base = tiny_model("llama-gqa")
    base.save_pretrained(tmp_path / "base")
    vocab = {f"w{i}": i for i in range(128)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w1"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w1", pad_token="w0", eos_token="w2").save_pretrained(tmp_path / "base")
    predictor = tiny_predictor(base)
    predictor.config.base_model = str(tmp_path / "base")
    predictor.save_pretrained(tmp_path / "pred")
    prompt = " ".join(f"w{i % 100 + 3}" for i in range(40))
    res = CliRunner().invoke(main, ["generate", prompt, "-p", str(tmp_path / "pred"), "-n", "6", "--budget", "4",
                                    "--compare-dense", "--no-chat", "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "== TokenButler" in res.output and "== dense" in res.output
    assert "KV positions read during decode:" in res.output
