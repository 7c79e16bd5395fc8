"""Mistral: Llama's layout plus a sliding window, which decode must never look past."""

from butler_zoo.families import register_family
from butler_zoo.families.base import ModelFamily

MISTRAL = register_family(ModelFamily(model_type="mistral", sliding_window_attr="sliding_window"))
