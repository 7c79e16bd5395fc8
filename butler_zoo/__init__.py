"""butler-zoo: TokenButler learned sparse decoding for transformers and SGLang.

Quick start::

    from butler_zoo import AutoButler
    model = AutoButler.from_pretrained("path/to/predictor", budget=0.1)
    # model.generate(...) now decodes sparsely; model.butler holds the predictor and the policy
"""

from butler_zoo.attach import attach_butler, check_compatible, detach_butler
from butler_zoo.auto import AutoButler
from butler_zoo.config import ButlerConfig
from butler_zoo.errors import (
    BudgetError,
    ButlerConfigError,
    ButlerError,
    PredictorMismatchError,
    PredictorWeightsError,
    UnsupportedModelError,
)
from butler_zoo.families import get_family, register_family, supported_model_types
from butler_zoo.policy import SparsePolicy
from butler_zoo.predictor import ButlerPredictor

__version__ = "0.1.0"

__all__ = [
    "AutoButler",
    "ButlerConfig",
    "ButlerPredictor",
    "SparsePolicy",
    "attach_butler",
    "detach_butler",
    "check_compatible",
    "get_family",
    "register_family",
    "supported_model_types",
    "ButlerError",
    "ButlerConfigError",
    "BudgetError",
    "PredictorMismatchError",
    "PredictorWeightsError",
    "UnsupportedModelError",
]
