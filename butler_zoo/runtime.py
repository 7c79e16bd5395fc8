"""Sparse decode inside a transformers model: hooks, per-step state and the attention function.

Attaching a predictor (:func:`butler_zoo.attach.attach_butler`) does four things:

1. registers the ``tokenbutler`` attention implementation (below) and switches the model to it;
   prefill and layer 0 delegate to the model's original implementation (``sdpa`` or ``eager``);
2. a forward hook on every producer layer ``k*G`` turns the residual stream of the token being
   decoded into that producer's queries;
3. a forward pre-hook on every attention module gives its cache layer a sketch before the first
   K/V write (:mod:`butler_zoo.cache`);
4. at each decode step, the attention of a served layer reads only sinks + window + the top-B
   positions by predicted score (:mod:`butler_zoo.sparse`); the whole cache stays in place.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, eager_mask, sdpa_mask
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from butler_zoo import sparse
from butler_zoo.cache import SketchedLayerMixin, ensure_sketched
from butler_zoo.compat import CACHE_ARGUMENTS, SUPPORTED_TRANSFORMERS, find_cache, find_rope, versions_line
from butler_zoo.config import ButlerConfig
from butler_zoo.errors import ButlerError, UnsupportedModelError
from butler_zoo.families import ModelFamily
from butler_zoo.policy import SparsePolicy
from butler_zoo.predictor import ButlerPredictor

__all__ = ["ButlerRuntime", "ATTN_IMPLEMENTATIONS", "CALL_KWARGS"]

# Attention implementation registered for each dense implementation we can delegate to. The mask
# format follows the delegate (boolean for sdpa, additive float for eager).
ATTN_IMPLEMENTATIONS = {"sdpa": "tokenbutler", "eager": "tokenbutler_eager"}
# Keyword arguments of `generate()` / `forward()` that change the policy for one call; transformers
# forwards unknown model kwargs down to the attention function.
CALL_KWARGS = ("butler_budget", "butler_sinks", "butler_window", "butler_prediction_interval", "butler_enabled")


def _eager_dense(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
    from transformers.models.llama.modeling_llama import eager_attention_forward

    return eager_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


_DENSE = {"tokenbutler": sdpa_attention_forward, "tokenbutler_eager": _eager_dense}


@dataclass
class DecodeStats:
    """KV positions read during decode by the layers a predictor serves, summed over rows, KV heads and
    layers (device tensors, no sync), and how many of those layer steps were budgeted (sparse)."""

    read: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    dense: torch.Tensor = field(default_factory=lambda: torch.zeros((), dtype=torch.float64))
    layer_steps: int = 0
    sparse_layer_steps: int = 0

    def add(self, read: torch.Tensor, dense: torch.Tensor, sparse: bool) -> None:
        if self.read.device != read.device:
            self.read, self.dense = self.read.to(read.device), self.dense.to(read.device)
        self.read += read.to(torch.float64)
        self.dense += dense.to(torch.float64)
        self.layer_steps += 1
        self.sparse_layer_steps += int(sparse)

    @property
    def fraction_read(self) -> float | None:
        """Positions read / positions a dense decode would read; ``None`` when no decode step was recorded
        (a ratio of nothing is not 100%)."""
        d = float(self.dense)
        return float(self.read) / d if d else None


class ButlerRuntime:
    """The state of one attached predictor. Reached as ``model.butler``."""

    def __init__(self, model: nn.Module, predictor: ButlerPredictor, family: ModelFamily, policy: SparsePolicy,
                 dense_implementation: str):
        self.predictor = predictor
        self.config: ButlerConfig = predictor.config
        self.family = family
        self.policy = policy
        self.dense_implementation = dense_implementation
        self._registered_name = ATTN_IMPLEMENTATIONS[dense_implementation]
        self.enabled = True
        self.num_kv_heads = self.config.num_key_value_heads
        self._call_overrides: dict = {}
        self._queries: list[torch.Tensor | None] = [None] * self.config.num_producers
        self._sketches: dict[int, tuple[torch.Tensor, SketchedLayerMixin]] = {}
        self._handles: list = []
        self.stats: DecodeStats | None = None
        # A context that fits in the budget (or in sinks + window) is attended densely (bit-identical to the base
        # model). Tests switch this off to check that the budgeted path itself equals dense attention.
        self.dense_fallback = True
        self.recorder: list | None = None
        self._layout_problem: str | None = None
        self.key_rope: tuple | None = None
        self._producer_index = {layer: k for k, layer in enumerate(self.config.producer_layers)}
        self._model_ref = model

    # A runtime is a service shared by every cache it sketches, not data: copying a cache must not copy it.
    def __deepcopy__(self, memo):
        return self

    # ----- hooks --------------------------------------------------------------------------------
    def install(self, model: nn.Module) -> None:
        layers = self.family.decoder_layers(model)
        for layer_idx, k in self._producer_index.items():
            self._handles.append(layers[layer_idx].register_forward_hook(self._make_producer_hook(k), with_kwargs=True))
        for layer_idx in range(1, self.config.num_hidden_layers):
            attn = self.family.attention(layers[layer_idx])
            attn._butler_runtime = self
            self._handles.append(attn.register_forward_pre_hook(self._cache_pre_hook, with_kwargs=True))
            self._handles.append(attn.register_forward_hook(self._bypass_check_hook, with_kwargs=True))

    def uninstall(self, model: nn.Module) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for layer in self.family.decoder_layers(model):
            self.family.attention(layer).__dict__.pop("_butler_runtime", None)

    def _make_producer_hook(self, producer: int):
        def hook(module, args, kwargs, output):
            hidden = output[0] if isinstance(output, tuple) else output
            # Only a decode step needs queries: prefill is dense.
            if hidden.shape[1] != 1:
                self._queries[producer] = None
                return
            queries = self.predictor.producer_queries(producer, hidden[:, -1])
            if self.predictor.position_consistent:
                rope = find_rope(module, args, kwargs)
                queries = self.predictor.position_queries(queries, None if rope is None else (rope[0][:, -1], rope[1][:, -1]))
            self._queries[producer] = queries

        return hook

    def _cache_pre_hook(self, module, args, kwargs):
        found, cache = find_cache(module, args, kwargs)
        # the angles of the tokens this call writes: a format-2 sketch un-rotates their keys with them
        self.key_rope = find_rope(module, args, kwargs)
        self._layout_problem = None
        if not found:
            self._layout_problem = (
                f"the attention module {type(module).__name__} was called with none of the cache arguments "
                f"{' / '.join(CACHE_ARGUMENTS)} (keyword arguments: {', '.join(sorted(kwargs)) or 'none'})"
            )
        elif cache is not None:
            ensure_sketched(cache, module.layer_idx, self)

    def _bypass_check_hook(self, module, args, kwargs, output):
        # The cache update wrote this step's sketch, but the attention function never took it: the model's
        # attention did not go through transformers' attention interface, so the step ran dense.
        entry = self._sketches.pop(module.layer_idx, None)
        hidden = kwargs.get("hidden_states", args[0] if args else None)
        if entry is None or hidden is None or hidden.shape[1] != 1 or not self._enabled_for_call(kwargs):
            return
        self._refuse_dense_step(module.layer_idx, entry[0].shape[2], self._policy_for_call(kwargs), (
            f"{type(module).__name__}.forward did not call transformers' attention interface "
            f"(config._attn_implementation={self._registered_name!r})"
        ))

    def _refuse_dense_step(self, layer_idx: int, context: int, policy: SparsePolicy, why: str) -> None:
        """Raise instead of letting a decode step that the policy makes sparse run densely."""
        if sparse.fits_dense(context, policy):
            return
        raise ButlerError(
            f"layer {layer_idx}: a decode step over {context} cached tokens would have run dense although the "
            f"policy ({policy.describe()}) makes it sparse: {why}. {versions_line()}: install a release in that "
            f"range (pip install 'transformers{SUPPORTED_TRANSFORMERS}'); if yours is inside it, this release changed "
            "how attention layers get the cache: please report it to butler-zoo"
        )

    def _enabled_for_call(self, kwargs) -> bool:
        return self.enabled if kwargs.get("butler_enabled") is None else bool(kwargs["butler_enabled"])

    def sketch_written(self, layer_idx: int, sketch: torch.Tensor, cache_layer: SketchedLayerMixin) -> None:
        self._sketches[layer_idx] = (sketch, cache_layer)

    # ----- policy -------------------------------------------------------------------------------
    def set_policy(self, policy: SparsePolicy | None = None, **overrides) -> SparsePolicy:
        """Change the default policy (``budget=``, ``sinks=``, ``window=``, ``prediction_interval=``)."""
        self.policy = (policy or self.policy).with_overrides(**overrides)
        return self.policy

    @contextlib.contextmanager
    def policy_override(self, **overrides):
        """Temporarily change the policy: ``with model.butler.policy_override(budget=0.1): model.generate(...)``."""
        old = self.policy
        self.policy = old.with_overrides(**overrides)
        try:
            yield self.policy
        finally:
            self.policy = old

    def _policy_for_call(self, kwargs) -> SparsePolicy:
        over = {name[len("butler_"):]: kwargs[name] for name in CALL_KWARGS[:4] if kwargs.get(name) is not None}
        return self.policy.with_overrides(**over) if over else self.policy

    @contextlib.contextmanager
    def call_scope(self, kwargs: dict):
        """Pop the ``butler_*`` keyword arguments of one ``generate()`` call and apply them for its duration."""
        found = {name: kwargs.pop(name) for name in CALL_KWARGS if name in kwargs}
        old_policy, old_enabled = self.policy, self.enabled
        try:
            self.policy = self._policy_for_call(found)
            if found.get("butler_enabled") is not None:
                self.enabled = bool(found["butler_enabled"])
            yield
        finally:
            self.policy, self.enabled = old_policy, old_enabled

    # ----- statistics and recording (for the CLI and tests) ----------------------------------------
    def track_stats(self) -> DecodeStats:
        self.stats = DecodeStats()
        return self.stats

    @contextlib.contextmanager
    def record(self):
        """Record every sparse decode step: ``(layer, selection, start, end, policy)``."""
        self.recorder = []
        try:
            yield self.recorder
        finally:
            self.recorder = None

    # ----- the attention function ---------------------------------------------------------------
    def attention(self, module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        """Dispatch one attention call: dense for prefill and layer 0, budgeted for decode."""
        layer_idx = module.layer_idx
        entry = self._sketches.pop(layer_idx, None)
        dense = _DENSE[self._registered_name]
        decoding = query.shape[2] == 1 and entry is not None
        enabled = self._enabled_for_call(kwargs)
        clean = {k: v for k, v in kwargs.items() if k not in CALL_KWARGS}
        policy = self._policy_for_call(kwargs)
        if query.shape[2] == 1 and entry is None and enabled:
            self._refuse_dense_step(layer_idx, key.shape[2], policy, self._layout_problem or (
                "the cache layer was not sketched (no sketch was written with this step's keys)"
            ))
        if not (decoding and enabled) or (self.dense_fallback and sparse.fits_dense(key.shape[2], policy)):
            if query.shape[2] == 1 and (self.stats is not None or self.recorder is not None):
                start, end = sparse.valid_range(attention_mask, key.shape[2], query.shape[0], query.device)
                if self.stats is not None:
                    n = ((end - start) * key.shape[1]).sum()
                    self.stats.add(n, n, sparse=False)
                if self.recorder is not None and decoding and not torch.compiler.is_compiling():
                    self.recorder.append((layer_idx, None, start.clone(), end.clone(), policy))
            return dense(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **clean)

        sketch, cache_layer = entry
        if sketch.shape[2] != key.shape[2]:
            raise ButlerError(
                f"layer {layer_idx}: the cache holds {key.shape[2]} keys but {sketch.shape[2]} sketches; the cache was "
                "modified outside the model (or filled before the predictor was attached)"
            )
        producer, _ = self.config.producer_of(layer_idx)
        q_out = self._queries[producer]
        if q_out is None:
            raise ButlerError(f"layer {layer_idx}: no predictor queries for this decode step (producer {producer} did not run)")
        q_sel = self.predictor.layer_queries(layer_idx, q_out)  # [B, H_sel, d']
        out, sel, start, end = sparse.decode_step(
            query[:, :, 0],
            key,
            value,
            q_sel,
            sketch,
            attention_mask,
            policy,
            scaling,
            cache_layer=cache_layer,
            check_mask=layer_idx == 1 and not torch.compiler.is_compiling(),
        )
        if self.stats is not None:
            read, full = sparse.read_counts(sel, start, end, policy)
            self.stats.add(read, full, sparse=True)
        if self.recorder is not None and not torch.compiler.is_compiling():
            self.recorder.append((layer_idx, sel.detach().clone(), start.clone(), end.clone(), policy))
        return out[:, None], None  # transformers expects [B, q_len, H, D]


def register_attention_functions() -> None:
    """Register the ``tokenbutler`` attention implementations with transformers (idempotent)."""
    for dense_name, name in ATTN_IMPLEMENTATIONS.items():
        if name in ALL_ATTENTION_FUNCTIONS.valid_keys():
            continue

        def fn(module, query, key, value, attention_mask, scaling=None, dropout=0.0, _name=name, **kwargs):
            runtime = getattr(module, "_butler_runtime", None)
            if scaling is None:
                scaling = 1.0 / math.sqrt(query.shape[-1])
            if runtime is None:  # layer 0 and models with no predictor attached
                clean = {k: v for k, v in kwargs.items() if k not in CALL_KWARGS}
                return _DENSE[_name](module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **clean)
            return runtime.attention(module, query, key, value, attention_mask, scaling, dropout, **kwargs)

        ALL_ATTENTION_FUNCTIONS.register(name, fn)
        ALL_MASK_ATTENTION_FUNCTIONS.register(name, sdpa_mask if dense_name == "sdpa" else eager_mask)


def dense_name_for(model: nn.Module) -> str:
    impl = model.config._attn_implementation
    if impl in ATTN_IMPLEMENTATIONS.values():
        raise ButlerError("a TokenButler predictor is already attached to this model; detach it first")
    if impl not in ATTN_IMPLEMENTATIONS:
        raise UnsupportedModelError(
            f"attention implementation {impl!r} is not supported for sparse decode; load the model with "
            f"attn_implementation='sdpa' (recommended) or 'eager'"
        )
    return impl
