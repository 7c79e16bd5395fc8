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


# Exception class names (anywhere in a class's MRO) that mean "the network or the server could not be
# reached": httpx's (huggingface_hub >= 1.0), requests' and the builtin ones. Matched by name, so that
# recognising one never imports a network library.
_NETWORK_ERRORS = frozenset({"TransportError", "ConnectError", "ConnectTimeout", "ReadTimeout", "TimeoutException",
                             "NetworkError", "ConnectionError", "URLError"})


def network_cause(e: BaseException | None) -> BaseException | None:
    """The connection, DNS or timeout failure in ``e``'s chain (``__cause__`` / ``__context__``), or ``None``."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if any(cls.__name__ in _NETWORK_ERRORS for cls in type(e).__mro__):
            return e
        e = e.__cause__ or e.__context__
    return None
