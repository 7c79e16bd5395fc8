"""Shared fixtures of the Hub tests: the tiny random Llama of `tiny_models` saved to a folder with a
character-level tokenizer, and tiny predictors for it that pin a Hub id as their base."""

from __future__ import annotations

import os

# Triton fixes its mode (compiled or interpreter) when it is first imported, and transformers may import
# it early. Without CUDA the kernel tests run in the interpreter, so choose that mode before any test
# module is collected; on a GPU machine the compiled mode stays (tests/test_kernels_gpu.py needs it).
if "TRITON_INTERPRET" not in os.environ:
    import torch

    if not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"

import string
from pathlib import Path

import pytest

from tiny_models import tiny_model, tiny_predictor

# The Hub id the tiny predictors pin as their base (a published predictor must name a Hub repo); load the
# base from `tiny_llama_dir` with `AutoButler.from_pretrained(..., base_model=str(tiny_llama_dir))`.
TINY_BASE_ID = "test-org/tiny-llama"
TINY_LAYERS = 4  # G=2: producer 0 serves layers 1-2, producer 1 serves layer 3


def char_tokenizer():
    """A character-level fast tokenizer over printable ASCII (98 ids, inside the tiny vocab of 128)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for ch in string.digits + string.ascii_letters + string.punctuation + " ":
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>")


def save_tiny_llama(path: Path, seed: int = 0) -> Path:
    """Save the tiny Llama and its tokenizer to ``path`` (a normal transformers folder)."""
    tiny_model("llama-gqa", layers=TINY_LAYERS, seed=seed).save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return path


def make_tiny_predictor(base_model: str, seed: int = 1, base_model_revision: str | None = None, query_heads: str = "kv"):
    """A random predictor for the tiny Llama (policy: 12 positions read, 2 sinks + 4-token window + 6 predicted) pinning ``base_model``."""
    predictor = tiny_predictor(tiny_model("llama-gqa", layers=TINY_LAYERS), seed=seed, query_heads=query_heads)
    predictor.config.base_model = base_model
    predictor.config.base_model_revision = base_model_revision
    return predictor


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture
def tiny_predictor_dir(tmp_path) -> Path:
    """A saved tiny predictor (random weights) whose config pins ``TINY_BASE_ID`` as its base."""
    path = tmp_path / "tiny-butler"
    make_tiny_predictor(TINY_BASE_ID).save_pretrained(path)
    return path
