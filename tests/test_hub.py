"""The zoo on a real Hub server: push to a local hub, serve it with olah on loopback (offline mode),
download with the real `hf` CLI, load with `AutoButler.from_pretrained(repo_id)` and generate.

olah (`pip install olah==0.5.4`, in the `test` extra) must be installed: these tests fail, never skip,
without it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from butler_zoo.errors import ButlerError
from butler_zoo.export import check_exported
from butler_zoo.hub import _olah_cli, check_repo_id, local_hub_repo_dir, serve_local_hub
from butler_zoo.predictor import ButlerPredictor
from butler_zoo.push import RepoFolder, commit_to_local_hub, push_predictor
from conftest import TINY_BASE_ID, make_tiny_predictor

REPO_ID = "test-org/tiny-llama-butler"


def test_olah_is_installed():
    """The round trip needs the olah Hub server; a missing install is an error with the fix in it."""
    assert Path(_olah_cli()).is_file()


def test_repo_ids_and_local_hub_layout(tmp_path):
    assert check_repo_id("butler-zoo/SmolLM2-135M-Instruct-butler") == "butler-zoo/SmolLM2-135M-Instruct-butler"
    for bad in ("no-slash", "a/b/c", "a//b", "bad id/x"):
        with pytest.raises(ButlerError):
            check_repo_id(bad)
    assert local_hub_repo_dir(tmp_path, "org/name") == tmp_path / "models" / "org" / "name"
    with pytest.raises(ButlerError, match="no models/ folder"):
        with serve_local_hub(tmp_path):
            pass


def _hf(*args, env, check=True) -> subprocess.CompletedProcess:
    hf = Path(sys.executable).parent / "hf"
    done = subprocess.run([str(hf if hf.is_file() else shutil.which("hf")), *args], env=env, capture_output=True, text=True, timeout=300)
    if check and done.returncode != 0:
        raise AssertionError(f"hf {' '.join(args)} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done


# Runs in a fresh interpreter: huggingface_hub reads HF_ENDPOINT when it is imported.
LOAD_AND_GENERATE = textwrap.dedent('''
    import json, sys, torch
    from safetensors.torch import load_file
    from butler_zoo import AutoButler, ButlerError, ButlerPredictor

    repo, sha1, v1_weights, v2_weights = sys.argv[1:5]
    same = lambda p, path: all(torch.equal(v, load_file(path)[k]) for k, v in p.state_dict().items())
    res = {}
    model = AutoButler.from_pretrained(repo)  # main; the base comes from the same server, at its pinned revision
    tokenizer = AutoButler.tokenizer(repo)
    enc = tokenizer("The quick brown fox jumps over the lazy dog.", return_tensors="pt")
    stats = model.butler.track_stats()
    out = model.generate(**enc, max_new_tokens=8, min_new_tokens=8, do_sample=False, pad_token_id=tokenizer.eos_token_id)
    res["prompt_tokens"], res["new_tokens"] = enc["input_ids"].shape[1], out.shape[1] - enc["input_ids"].shape[1]
    res["fraction_read"] = stats.fraction_read
    res["text"] = tokenizer.decode(out[0, enc["input_ids"].shape[1]:])
    res["base"] = model.config._name_or_path
    res["main_is_v2"] = same(model.butler.predictor, v2_weights)
    res["sha1_is_v1"] = same(ButlerPredictor.from_pretrained(repo, revision=sha1), v1_weights)
    res["stable_is_v1"] = same(ButlerPredictor.from_pretrained(repo, revision="stable"), v1_weights)
    try:
        AutoButler.from_pretrained(repo, revision="no-such-branch")
    except ButlerError as e:
        res["wrong_revision"] = str(e)
    print("RESULT " + json.dumps(res))
''')


@pytest.mark.slow
def test_round_trip_push_serve_download_load_generate(tmp_path, tiny_llama_dir):
    hub = tmp_path / "hub"
    # The base: the tiny random Llama (+ tokenizer) as repo test-org/tiny-llama of the same local hub.
    base_files = sorted(p.name for p in tiny_llama_dir.iterdir() if p.is_file())
    base_sha = commit_to_local_hub(RepoFolder(tiny_llama_dir, base_files, "tiny random Llama (test)", None), hub, TINY_BASE_ID)
    # Two predictor versions pinning that base commit: v1 on main, then v2 (with exported programs) on
    # main, then v1 again on a branch.
    versions = {}
    for seed in (1, 2):
        versions[seed] = tmp_path / f"v{seed}"
        make_tiny_predictor(TINY_BASE_ID, seed=seed, base_model_revision=base_sha).save_pretrained(versions[seed])
    first = push_predictor(versions[1], REPO_ID, to_local_hub=hub)
    second = push_predictor(versions[2], REPO_ID, to_local_hub=hub, export=True)
    push_predictor(versions[1], REPO_ID, to_local_hub=hub, revision="stable")

    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING_FACE"))}
    with serve_local_hub(hub, workdir=tmp_path / "olah") as url:
        env.update(HF_ENDPOINT=url, HF_HOME=str(tmp_path / "hf-home"), HF_HUB_DOWNLOAD_TIMEOUT="120", HF_HUB_DISABLE_TELEMETRY="1")

        # the real `hf` CLI, pinned to the first commit
        _hf("download", REPO_ID, "--revision", first.commit_oid, "--local-dir", str(tmp_path / "dl-v1"), env=env)
        got = sorted(p.name for p in (tmp_path / "dl-v1").iterdir() if p.is_file())
        assert got == first.folder.files == ["README.md", "config.json", "model.safetensors"]
        assert (tmp_path / "dl-v1" / "model.safetensors").read_bytes() == (versions[1] / "model.safetensors").read_bytes()
        # main: v2 with its exported programs, which reload and match eager
        _hf("download", REPO_ID, "--local-dir", str(tmp_path / "dl-main"), env=env)
        assert sorted(p.name for p in (tmp_path / "dl-main").iterdir() if p.is_file()) == second.folder.files
        predictor = ButlerPredictor.from_pretrained(tmp_path / "dl-main")
        for name in ("predictor.pt2", "predictor-score.pt2"):
            assert check_exported(tmp_path / "dl-main" / name, predictor) < 1e-6
        # a wrong revision fails
        wrong = _hf("download", REPO_ID, "--revision", "no-such-branch", "--local-dir", str(tmp_path / "dl-bad"), env=env, check=False)
        assert wrong.returncode != 0

        done = subprocess.run([sys.executable, "-c", LOAD_AND_GENERATE, REPO_ID, first.commit_oid,
                               str(versions[1] / "model.safetensors"), str(versions[2] / "model.safetensors")],
                              env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr
    res = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[len("RESULT "):])
    assert res["new_tokens"] == 8 and res["base"] == TINY_BASE_ID, res
    assert res["fraction_read"] < 1.0  # the prompt is longer than sinks + window + budget: decode was sparse
    assert res["main_is_v2"] and res["sha1_is_v1"] and res["stable_is_v1"]
    assert "revision 'no-such-branch' does not exist in the predictor repo" in res["wrong_revision"]
    assert "branches: main, stable" in res["wrong_revision"] or "branches: stable, main" in res["wrong_revision"]
    # the weights the server handed out are the ones pushed
    assert all(torch.equal(v, load_file(versions[2] / "model.safetensors")[k]) for k, v in predictor.state_dict().items())
