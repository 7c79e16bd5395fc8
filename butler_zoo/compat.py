"""The transformers releases butler-zoo supports, and how it finds the cache in an attention call.

``SUPPORTED_TRANSFORMERS`` is the range pyproject.toml declares (a test keeps the two equal) and the
range CI tests: the oldest release and the newest the registry serves, each in its own venv
(``scripts/compat_venvs.sh``).
"""

from __future__ import annotations

import functools
import inspect

__all__ = ["SUPPORTED_TRANSFORMERS", "transformers_version", "versions_line", "find_argument", "find_cache", "find_rope",
           "cache_kwarg", "output_cache"]

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


# The base's rotary angles (cos, sin) reach decoder layers and attention modules under this name in
# every supported release.
ROPE_ARGUMENTS = ("position_embeddings",)


@functools.lru_cache(maxsize=None)
def _positional_index(forward, names: tuple[str, ...]) -> int | None:
    """Position of the first of ``names`` in ``forward(*args)`` (self excluded), or None."""
    try:
        params = [p for p in inspect.signature(forward).parameters.values() if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    except (TypeError, ValueError):
        return None
    present = [p.name for p in params if p.name != "self"]
    for name in names:
        if name in present:
            return present.index(name)
    return None


def find_argument(module, args: tuple, kwargs: dict, names: tuple[str, ...]):
    """``(found, value)`` of the first of ``names`` a module's forward was called with (keyword or
    positional). ``found`` is False when the call names none of them, which differs from passing None."""
    for name in names:
        if name in kwargs:
            return True, kwargs[name]
    index = _positional_index(type(module).forward, names)
    if index is not None and index < len(args):
        return True, args[index]
    return False, None


def find_cache(module, args: tuple, kwargs: dict):
    """``(found, cache)``: the cache an attention module's forward was called with."""
    return find_argument(module, args, kwargs, CACHE_ARGUMENTS)


def find_rope(module, args: tuple, kwargs: dict):
    """The base's ``(cos, sin)`` a decoder layer or attention module was called with, or None."""
    return find_argument(module, args, kwargs, ROPE_ARGUMENTS)[1]


def cache_kwarg(model) -> str:
    """The name under which ``model.forward`` / ``generate`` take a cache: ``cache`` from transformers 5.24
    on, ``past_key_values`` before (and until its removal in 5.40)."""
    return "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"


def output_cache(output):
    """The cache a model output returns, under either name."""
    cache = getattr(output, "cache", None)
    return cache if cache is not None else getattr(output, "past_key_values", None)
