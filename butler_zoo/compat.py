"""The transformers releases butler-zoo supports, and how it finds the cache in an attention call.

``SUPPORTED_TRANSFORMERS`` is the range pyproject.toml declares (a test keeps the two equal) and the
range CI tests: the oldest release and the newest the registry serves, each in its own venv
(``scripts/compat_venvs.sh``).
"""

from __future__ import annotations

import functools
import inspect

__all__ = ["SUPPORTED_TRANSFORMERS", "transformers_version", "versions_line", "find_cache", "cache_kwarg", "output_cache"]

SUPPORTED_TRANSFORMERS = ">=5.6"

# transformers 5.24 renamed the attention modules' cache argument from `past_key_values` to `cache`
# (the old name is deprecated and goes in 5.40). Both are looked up, the new name first.
CACHE_ARGUMENTS = ("cache", "past_key_values")


def transformers_version() -> str:
    import transformers

    return transformers.__version__


def versions_line() -> str:
    """For error messages: what is installed against what is supported."""
    return f"installed transformers {transformers_version()}; butler-zoo supports transformers{SUPPORTED_TRANSFORMERS}"


@functools.lru_cache(maxsize=None)
def _positional_cache_index(forward) -> int | None:
    """Position of the cache argument in ``forward(*args)`` (self excluded), or None."""
    try:
        params = [p for p in inspect.signature(forward).parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return None
    names = [p.name for p in params if p.name != "self"]
    for name in CACHE_ARGUMENTS:
        if name in names:
            return names.index(name)
    return None


def find_cache(module, args: tuple, kwargs: dict):
    """``(found, cache)``: the cache an attention module's forward was called with.

    ``found`` is False when the call names no cache argument this version of butler-zoo knows, which
    is different from a call that passes ``cache=None`` (no cache: nothing to sketch)."""
    for name in CACHE_ARGUMENTS:
        if name in kwargs:
            return True, kwargs[name]
    index = _positional_cache_index(type(module).forward)
    if index is not None and index < len(args):
        return True, args[index]
    return False, None


def cache_kwarg(model) -> str:
    """The name under which ``model.forward`` / ``generate`` take a cache: ``cache`` from transformers 5.24
    on, ``past_key_values`` before (and until its removal in 5.40)."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def output_cache(output):
    """The cache a model output returns, under either name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)
