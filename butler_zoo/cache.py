"""The sketch lives in the transformers ``Cache``, next to K/V, and is written whenever they are.

Each cache layer of a served decoder layer is given a subclass of its own class
(``DynamicLayer`` -> ``SketchedDynamicLayer``...) whose ``update`` writes K/V as before and then the
projected keys of the new tokens into a *sketch layer*: a second cache layer of the same class with
keys of width d' and zero-width values. Sharing the class keeps the sketch aligned with K/V for
every layout transformers has (growing, sliding, static, static ring buffer) across versions, and
``reset``/``crop``/``reorder_cache``/batch ops are mirrored, so beam search and cache reuse keep it
consistent. The subclasses are named module attributes, so caches stay picklable and deep-copyable.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from transformers import cache_utils

from butler_zoo.errors import UnsupportedModelError

if TYPE_CHECKING:
    from butler_zoo.runtime import ButlerRuntime

__all__ = ["SketchedLayerMixin", "ensure_sketched", "strip_sketch", "SUPPORTED_LAYER_TYPES"]


def _empty_like_sketch(layer):
    """A fresh, uninitialised cache layer of the same class and size as ``layer``."""
    base = _base_class(type(layer))
    if base is cache_utils.DynamicLayer:
        return cache_utils.DynamicLayer()
    if base is cache_utils.DynamicSlidingWindowLayer:
        return cache_utils.DynamicSlidingWindowLayer(sliding_window=layer.sliding_window)
    if base is cache_utils.StaticSlidingWindowLayer:
        return cache_utils.StaticSlidingWindowLayer(max_cache_len=layer.max_cache_len, sliding_window=layer.max_cache_len)
    if base is cache_utils.StaticLayer:
        return cache_utils.StaticLayer(max_cache_len=layer.max_cache_len)
    raise AssertionError(base)


SUPPORTED_LAYER_TYPES = (
    cache_utils.DynamicLayer,
    cache_utils.DynamicSlidingWindowLayer,
    cache_utils.StaticLayer,
    cache_utils.StaticSlidingWindowLayer,
)


class SketchedLayerMixin(cache_utils.CacheLayerMixin):
    """Adds a sketch (projected keys) and the reused selection to a transformers cache layer."""

    # Deriving from CacheLayerMixin (and adding no slots) keeps the instance layout of the layer
    # classes, which is what lets `ensure_sketched` swap `__class__` in place.
    _butler_runtime: "ButlerRuntime"
    _butler_layer: int

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        keys, values = super().update(key_states, value_states, *args, **kwargs)
        runtime = self._butler_runtime
        new = runtime.predictor.project_keys(self._butler_layer, key_states, rope=runtime.key_rope)
        sketch, _ = self._butler_sketch.update(new, new[..., :0])
        self._butler_runtime.sketch_written(self._butler_layer, sketch, self)
        return keys, values

    def reset(self) -> None:
        super().reset()
        self._butler_sketch.reset()
        self._butler_selection = None

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self._butler_sketch.crop(tokens_to_remove)
        self._butler_selection = None

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self._butler_sketch.is_initialized:
            self._butler_sketch.reorder_cache(beam_idx)
        self._butler_selection = None

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        self._butler_sketch.batch_repeat_interleave(repeats)
        self._butler_selection = None

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        self._butler_sketch.batch_select_indices(indices)
        self._butler_selection = None

    def offload(self):
        super().offload()
        if self._butler_sketch.is_initialized:
            self._butler_sketch.offload()

    def prefetch(self):
        super().prefetch()
        if self._butler_sketch.is_initialized:
            self._butler_sketch.prefetch()

    def position_offset(self, length: int) -> int:
        """Absolute position of index 0 of the ``length`` keys this layer just returned.

        Non-zero only for sliding layers, which drop (or roll out) the oldest tokens."""
        if not self.is_sliding:
            return 0
        return max(int(self.get_seq_length()) - length, 0)


def _base_class(cls: type) -> type:
    for base in cls.__mro__:
        if base in SUPPORTED_LAYER_TYPES:
            return base
    raise UnsupportedModelError(
        f"cache layer type {cls.__name__} is not supported by butler-zoo's sparse decode; use the default "
        "DynamicCache or a StaticCache (cache_implementation='static'); quantized and offloaded caches are not supported"
    )


_SKETCHED: dict[type, type] = {}
for _base in SUPPORTED_LAYER_TYPES:
    _cls = type(f"Sketched{_base.__name__}", (SketchedLayerMixin, _base), {"__module__": __name__})
    globals()[_cls.__name__] = _cls
    _SKETCHED[_base] = _cls
    __all__.append(_cls.__name__)


def ensure_sketched(cache, layer_idx: int, runtime: "ButlerRuntime") -> None:
    """Give ``cache.layers[layer_idx]`` a sketch, before its first K/V write."""
    layers = getattr(cache, "layers", None)
    if layers is None:
        raise UnsupportedModelError(
            f"{type(cache).__name__} is not a transformers `Cache` with `.layers`; pass a DynamicCache or StaticCache"
        )
    if len(layers) <= layer_idx:
        if getattr(cache, "layer_class_to_replicate", None) is None:
            raise UnsupportedModelError(f"{type(cache).__name__} has no layer {layer_idx}")
        # the cache would append these lazily in its own update(); appending first lets us sketch them
        while len(layers) <= layer_idx:
            layers.append(cache.layer_class_to_replicate())
    layer = layers[layer_idx]
    if isinstance(layer, SketchedLayerMixin):
        if layer._butler_runtime is not runtime:
            layer._butler_runtime = runtime  # re-attached predictor: new runtime, same sketch semantics
        return
    if type(layer) not in _SKETCHED:
        _base_class(type(layer))  # raises the helpful error
        raise UnsupportedModelError(f"subclassed cache layer {type(layer).__name__} is not supported")
    if layer.is_initialized and int(layer.get_seq_length()) > 0:
        raise UnsupportedModelError(
            f"past_key_values already holds {int(layer.get_seq_length())} tokens written without a predictor, so they "
            "have no sketch; attach the predictor before the prefill (start from the prompt with a fresh cache)"
        )
    sketch = _empty_like_sketch(layer)
    layer.__class__ = _SKETCHED[type(layer)]
    layer._butler_runtime = runtime
    layer._butler_layer = layer_idx
    layer._butler_sketch = sketch
    layer._butler_selection = None


def strip_sketch(cache) -> None:
    """Turn sketched layers back into plain transformers layers (used by ``detach``)."""
    for layer in getattr(cache, "layers", []):
        if isinstance(layer, SketchedLayerMixin):
            layer.__class__ = _base_class(type(layer))
            for attr in ("_butler_runtime", "_butler_layer", "_butler_sketch", "_butler_selection"):
                layer.__dict__.pop(attr, None)
