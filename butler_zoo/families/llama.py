"""Llama (Llama 2, Llama 3.x, SmolLM2 and other `model_type == "llama"` checkpoints)."""

from butler_zoo.families import register_family
from butler_zoo.families.base import ModelFamily

LLAMA = register_family(ModelFamily(model_type="llama"))
