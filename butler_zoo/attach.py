"""Attach a predictor to a transformers model the user already loaded, and detach it."""

from __future__ import annotations

import functools
import types
from pathlib import Path

import torch
from torch import nn

from butler_zoo.config import ButlerConfig
from butler_zoo.errors import ButlerError, PredictorMismatchError
from butler_zoo.families import get_family
from butler_zoo.policy import SparsePolicy
from butler_zoo.predictor import ButlerPredictor
from butler_zoo.runtime import ATTN_IMPLEMENTATIONS, ButlerRuntime, dense_name_for, register_attention_functions

__all__ = ["attach_butler", "detach_butler", "check_compatible"]


def _looks_like_hub_id(name: str) -> bool:
    return bool(name) and name.count("/") == 1 and not Path(name).expanduser().exists() and not name.startswith((".", "/", "~"))


def check_compatible(config: ButlerConfig, model_config, *, allow_other_base: bool = False) -> None:
    """Raise :class:`PredictorMismatchError` if the predictor was not made for this model."""
    name = getattr(model_config, "_name_or_path", "") or "<unnamed model>"
    if config.base_model_type != model_config.model_type:
        raise PredictorMismatchError(
            f"predictor for {config.base_model} (model_type {config.base_model_type!r}) cannot be attached to "
            f"{name} (model_type {model_config.model_type!r})"
        )
    shapes = get_family(model_config.model_type).shapes(model_config)
    diffs = [f"{k}: predictor {v} vs model {shapes[k]}" for k, v in config.shapes.items() if shapes[k] != v]
    if diffs:
        raise PredictorMismatchError(
            f"predictor for {config.base_model} does not fit {name}: " + "; ".join(diffs)
            + ". Use the predictor trained for this base model (see `butler-zoo list`)."
        )
    if (
        not allow_other_base
        and _looks_like_hub_id(name)
        and _looks_like_hub_id(config.base_model)
        and name.lower() != config.base_model.lower()
    ):
        raise PredictorMismatchError(
            f"predictor was trained for {config.base_model} but the model is {name}; the shapes match, so pass "
            "allow_other_base=True if you know the two share attention patterns (e.g. a fine-tune of the same base)"
        )


def attach_butler(
    model: nn.Module,
    predictor: ButlerPredictor | str | Path,
    *,
    policy: SparsePolicy | None = None,
    budget: int | float | None = None,
    sinks: int | None = None,
    window: int | None = None,
    prediction_interval: int | None = None,
    predictor_dtype: torch.dtype | None = None,
    allow_other_base: bool = False,
) -> nn.Module:
    """Make ``model.generate()`` decode sparsely with ``predictor``; returns ``model`` (modified in place).

    ``predictor`` may be a :class:`ButlerPredictor`, a folder or a Hub repo id. The policy defaults to
    the predictor's; ``budget`` is a token count (``int``) or a fraction of the context (``float``).
    The predictor is moved to the model's device and, unless ``predictor_dtype`` is given, dtype.
    Reach the attached state as ``model.butler`` and undo everything with :func:`detach_butler`.
    """
    if not isinstance(predictor, ButlerPredictor):
        predictor = ButlerPredictor.from_pretrained(predictor)
    if getattr(model, "butler", None) is not None:
        raise ButlerError("a TokenButler predictor is already attached to this model; call detach_butler(model) first")
    family = get_family(model.config.model_type)
    check_compatible(predictor.config, model.config, allow_other_base=allow_other_base)
    dense_impl = dense_name_for(model)
    policy = (policy or predictor.config.default_policy).with_overrides(
        budget=budget, sinks=sinks, window=window, prediction_interval=prediction_interval
    )
    ref = next(model.parameters())
    predictor.to(device=ref.device, dtype=predictor_dtype or ref.dtype).eval().requires_grad_(False)

    register_attention_functions()
    runtime = ButlerRuntime(model, predictor, family, policy, dense_impl)
    runtime.install(model)
    model.config._attn_implementation = ATTN_IMPLEMENTATIONS[dense_impl]
    model.butler = runtime
    model.generate = types.MethodType(_generate_with_policy(type(model).generate), model)
    return model


def _generate_with_policy(generate):
    """``generate`` that also takes ``butler_budget=``, ``butler_sinks=``, ``butler_window=``,
    ``butler_prediction_interval=`` and ``butler_enabled=`` for one call (transformers rejects unknown
    generate kwargs, so they are applied here rather than passed down)."""

    @functools.wraps(generate)
    def wrapper(self, *args, **kwargs):
        with self.butler.call_scope(kwargs):
            return generate(self, *args, **kwargs)

    return wrapper


def detach_butler(model: nn.Module, cache=None) -> ButlerPredictor:
    """Restore ``model`` to dense attention; returns the detached predictor.

    Pass a cache that was used while attached to strip its sketches too (it stays usable densely)."""
    runtime: ButlerRuntime | None = getattr(model, "butler", None)
    if runtime is None:
        raise ButlerError("no TokenButler predictor is attached to this model")
    runtime.uninstall(model)
    model.config._attn_implementation = runtime.dense_implementation
    del model.butler
    model.__dict__.pop("generate", None)
    if cache is not None:
        from butler_zoo.cache import strip_sketch

        strip_sketch(cache)
    return runtime.predictor
