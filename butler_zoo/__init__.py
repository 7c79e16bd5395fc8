"""butler-zoo: TokenButler learned sparse decoding for transformers and SGLang.

Quick start::

    from butler_zoo import AutoButler
    model = AutoButler.from_pretrained("path/to/predictor", budget=0.1)
    # model.generate(...) now decodes sparsely; model.butler holds the predictor and the policy

The names below are imported on first use (PEP 562), so that ``import butler_zoo`` and the CLI's
``--help`` / ``--version`` do not pay for torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "AutoButler": "butler_zoo.auto",
    "ButlerConfig": "butler_zoo.config",
    "ButlerPredictor": "butler_zoo.predictor",
    "SparsePolicy": "butler_zoo.policy",
    "attach_butler": "butler_zoo.attach",
    "detach_butler": "butler_zoo.attach",
    "check_compatible": "butler_zoo.attach",
    "get_family": "butler_zoo.families",
    "register_family": "butler_zoo.families",
    "supported_model_types": "butler_zoo.families",
    "ButlerError": "butler_zoo.errors",
    "ButlerConfigError": "butler_zoo.errors",
    "BudgetError": "butler_zoo.errors",
    "PredictorMismatchError": "butler_zoo.errors",
    "PredictorWeightsError": "butler_zoo.errors",
    "UnsupportedModelError": "butler_zoo.errors",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'butler_zoo' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next access skips this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


if TYPE_CHECKING:  # for type checkers and IDEs: the same names, imported eagerly
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
