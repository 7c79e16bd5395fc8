"""Exceptions raised by butler-zoo. Each message names the problem and the fix."""


class ButlerError(Exception):
    """Base class of every butler-zoo error."""


class ButlerConfigError(ButlerError, ValueError):
    """A predictor config is missing fields, has wrong values or was written by an unknown format."""


class PredictorMismatchError(ButlerError, ValueError):
    """A predictor does not fit the model it is attached to (base model or shapes differ)."""


class PredictorWeightsError(ButlerError, OSError):
    """Predictor weights are missing, corrupted, or hold unknown or misshapen tensors."""


class UnsupportedModelError(ButlerError, NotImplementedError):
    """The model family (transformers `model_type`) or a cache/attention setting is not supported."""


class BudgetError(ButlerError, ValueError):
    """A sparse-decode policy value (budget, sinks, window, interval) is out of range."""
