"""Registry of supported model families, keyed by transformers ``model_type``.

A family knows where a model keeps its decoder layers and attention modules and how to read its
shapes from its config. Adding a family is one small file that calls :func:`register_family`;
nothing in the core changes.
"""

from __future__ import annotations

from butler_zoo.errors import UnsupportedModelError
from butler_zoo.families.base import ModelFamily

_REGISTRY: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    if family.model_type in _REGISTRY:
        raise ValueError(f"model_type {family.model_type!r} is already registered")
    _REGISTRY[family.model_type] = family
    return family


def supported_model_types() -> list[str]:
    return sorted(_REGISTRY)


def get_family(model_type: str) -> ModelFamily:
    try:
        return _REGISTRY[model_type]
    except KeyError:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not supported by butler-zoo; supported: {supported_model_types()}. "
            "A new decoder-only family is one file in butler_zoo/families/ that calls register_family()."
        ) from None


# Families register themselves on import.
from butler_zoo.families import llama, mistral  # noqa: E402,F401

__all__ = ["ModelFamily", "register_family", "get_family", "supported_model_types"]
