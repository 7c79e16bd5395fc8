"""Save/load round trip, AutoButler from a local folder and from a repo id through the HF cache offline."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

from butler_zoo import AutoButler, ButlerPredictor
from tiny_models import left_padded_batch, tiny_model, tiny_predictor

SHA = "0123456789abcdef0123456789abcdef01234567"


def _state_equal(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_save_load_round_trip(tmp_path):
    predictor = tiny_predictor(tiny_model(), query_heads="query", budget=0.2, prediction_interval=2)
    predictor.config.training = {"recipe": "unit-test", "tokens": 0}
    predictor.save_pretrained(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["README.md", "config.json", "model.safetensors"]
    assert not list(tmp_path.glob("*.bin")) and not list(tmp_path.glob("*.pt"))
    loaded = ButlerPredictor.from_pretrained(tmp_path)
    assert loaded.config == predictor.config
    assert _state_equal(loaded, predictor)
    assert json.loads((tmp_path / "config.json").read_text())["butler_zoo"] == "predictor"


def _save_pair(tmp_path):
    base = tiny_model("llama-gqa")
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    predictor = tiny_predictor(base, budget=9)
    predictor.config.base_model = str(base_dir)
    pred_dir = tmp_path / "predictor"
    predictor.save_pretrained(pred_dir)
    return base, base_dir, predictor, pred_dir


def test_autobutler_from_local_folder(tmp_path):
    base, base_dir, predictor, pred_dir = _save_pair(tmp_path)
    model = AutoButler.from_pretrained(pred_dir, dtype=torch.float32, budget=10)
    assert model.butler.policy.budget == 10 and model.butler.policy.sinks == 2
    assert _state_equal(model.butler.predictor, predictor)
    ids, mask = left_padded_batch()
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4, pad_token_id=0)
    assert out.shape == (2, ids.shape[1] + 4)


def _fake_cache_entry(hub_dir: Path, repo_id: str, folder: Path) -> None:
    """A Hugging Face cache entry by hand: refs/main + snapshots/<sha>/<files> (OFFLINE.md)."""
    repo = hub_dir / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(SHA)
    shutil.copytree(folder, repo / "snapshots" / SHA)


def test_autobutler_from_repo_id_offline_cache(tmp_path):
    base = tiny_model("llama-gqa")
    base_dir = tmp_path / "base"
    base.save_pretrained(base_dir)
    predictor = tiny_predictor(base, budget=9)
    predictor.config.base_model = "tiny-org/tiny-llama"
    predictor.config.base_model_revision = "main"
    pred_dir = tmp_path / "predictor"
    predictor.save_pretrained(pred_dir)
    hf_home = tmp_path / "hf_home"
    _fake_cache_entry(hf_home / "hub", "butler-test/tiny-llama-butler", pred_dir)
    _fake_cache_entry(hf_home / "hub", "tiny-org/tiny-llama", base_dir)
    script = textwrap.dedent(
        """
        import torch
        from butler_zoo import AutoButler, ButlerError
        model = AutoButler.from_pretrained("butler-test/tiny-llama-butler", dtype=torch.float32)
        assert model.config._name_or_path == "tiny-org/tiny-llama"
        ids = torch.tensor([[5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18]])
        out = model.generate(input_ids=ids, max_new_tokens=3, pad_token_id=0)
        print("generated", out.shape[1] - ids.shape[1])
        try:
            AutoButler.from_pretrained("butler-test/not-in-cache")
        except ButlerError as e:
            print("missing:", e)
        """
    )
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    env.pop("HF_ENDPOINT", None)
    res = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "generated 3" in res.stdout
    assert "missing: butler-test/not-in-cache is not in the local Hugging Face cache" in res.stdout
