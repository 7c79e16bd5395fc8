"""The ``tokenbutler`` attention backend: SGLang's Triton backend with a budgeted decode.

What it reuses and what it adds
-------------------------------
* Metadata, prefill/extend and the CUDA-graph state are ``TritonAttnBackend``'s own. Where the
  supported SGLang releases differ (0.5.12, 0.5.23), the code goes through the named adapters of
  ``butler_sglang.compat``; the CUDA-graph metadata entry points of both releases are defined here and
  share :meth:`TokenButlerAttnBackend._graph_metadata`.
* **Predictor** (:class:`ButlerState`, one per model runner): butler-zoo's ``ButlerPredictor``,
  the same module the transformers runtime and training use. A hook per producer layer ``k*G``
  (``compat.install_producer_hook``: a forward hook on it in SGLang 0.5.12, a ``capture_output``
  callback of layer ``k*G+1`` in 0.5.23) turns the residual stream after it (0.5.12: ``hidden_states +
  residual``, SGLang's Llama layers defer the residual add, which ``butler_kernels.residual_layer_norm``
  fuses into the producer's LayerNorm) into that producer's queries for the decode tokens, written into a
  preallocated buffer, and selects for every layer the producer serves at once
  (:meth:`ButlerState.select_served_layers`); the hooks are installed when the backend is built,
  before CUDA-graph capture, and never sync with the host.
* **Sketch cache**: one ``[H_kv, layers, slots, d']`` tensor, a ``[slots, H_kv, d']`` view per
  served layer, indexed by KV slot like the KV pool (radix-cache prefix sharing stays valid),
  counted in the pool sizing (see ``plugin``). Extend (prefill) writes the new tokens' sketches
  through a wrapper of the pool's ``set_kv_buffer``; a budgeted decode writes them in its
  attention launch.
* **Decode** of a served layer: the parent's K/V pool write, then ``butler_kernels.sparse_decode``
  on the whole batch with the producer's selection (top-B per KV head; selected in the layer if
  no producer did) and the step's sketch write: budgeted attention over sinks, window and the
  selection, the kernels of ``butler_kernels``, whose semantics are ``butler_kernels.reference``.
  A row whose context fits in
  ``sinks + window + budget`` has at most ``budget`` candidates, so the selection keeps all of
  them and the row attends every position (the dense fallback of ``reference.select_topk``,
  decided row by row, equal to SGLang's dense decode up to rounding). When the budget covers
  every context the table can hold (e.g. ``--tokenbutler-budget 1.0``) every layer is the
  parent's decode, bit-identical to the ``triton`` backend. Shapes are static and nothing reads
  a device value on the host, so the step is CUDA-graph capturable. Layer 0 runs dense, as
  everywhere in butler-zoo.

  Earlier versions attended the rows within the budget with the parent's kernel and merged the
  two results with ``torch.where``: with CUDA graphs that launched the parent's two kernels for
  nothing on every served layer of a batch of long rows (12.7 us per layer at 8 x 32K on the
  H100, ``integrations/sglang/gpu/profile_server.py``).
* **Parallelism** (``butler_sglang.parallel``): under tensor parallelism an attention-TP rank holds the K/V
  of its own KV heads (``compat.attention_tp``, SGLang's sharding, replicated heads included); its
  sketch store, producer queries and selections cover those heads only, from the predictor sliced to
  them at load (``parallel.shard_predictor``; one GPU is rank 0 of 1, the full slice). The residual
  stream a producer reads is whole on every rank after SGLang's all-reduce: no extra communication.
  A pipeline stage runs the producers of the layers it serves; one that is the layer right before the
  stage's first reads the stage's input (``parallel.stage_problem`` refuses other partitions).
* **Format-2 predictors** (``predictor.position_consistent``): a key's sketch is projected from the
  un-rotated key and rotated on ``rope_pairs`` at the key's position, the producer's queries at the
  decode token's (``reference.project_sketch(..., rope=)``, ``ButlerPredictor.position_queries``),
  with the base's own angles: rows of the served model's ``rotary_emb.cos_sin_cache`` (checked at
  startup: neox layout over the whole head). The angles of the tokens a forward writes
  (:attr:`ButlerState.key_angles`, ``[n, D]`` = cos | sin, in ``forward_batch.positions`` order, the
  order ``set_kv_buffer`` receives the keys) are gathered by a wrapper of ``model_runner.forward`` for
  extend batches (always eager: the piecewise CUDA graph of prefill runs the attention, hence the
  sketch write, outside its graphs) and, for decode, by a forward pre-hook on the first decoder layer
  into a preallocated buffer (inside the captured region: graph replays re-gather them from the
  static positions). The producer hooks rotate their queries in place with them. A decode step
  writes the sketch with its own launch (``butler::write_sketch_rope``) before the attention, not in
  the attention launch (the fused write takes no angles); the selection never reads the current
  token, which is in the window. Format-1 predictors take none of these paths.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch

from butler_kernels import NewSketch, reference, residual_layer_norm, select, sketch_write_triton, sparse_decode, write_sketch
from butler_kernels.dispatch import default_impl
from butler_kernels.score_select import layers_per_launch, workspace_bytes
from butler_sglang import BACKEND_NAME
from butler_sglang.compat import api, release_note
from butler_sglang.parallel import kv_heads_of_rank, shard_predictor, stage_problem
from butler_sglang.settings import Resolved, TokenButlerStartupError, describe, resolve
from sglang.srt.layers.attention.triton_backend import TritonAttnBackend

logger = logging.getLogger(__name__)

__all__ = ["ButlerState", "TokenButlerAttnBackend", "base_rotary", "create_backend", "resolve_for_runner"]

_STATE_ATTR = "_tokenbutler_state"
# Scratch of one selection launch over several layers (score_select.workspace_bytes per layer):
# layers are batched up to this, one at a time beyond.
_SELECTION_SCRATCH_CAP = 256 * 2**20


def resolve_for_runner(model_runner) -> Resolved:
    """:func:`settings.resolve` plus the checks only a model runner can make."""
    from sglang.srt.configs.model_config import AttentionArch
    from sglang.srt.mem_cache.memory_pool import MHATokenToKVPool

    resolved = resolve(model_runner.server_args, model_runner.model_config.hf_config)
    problems = []
    if model_runner.model_config.attention_arch == AttentionArch.MLA:
        problems.append("MLA models are not supported")
    if getattr(model_runner, "is_draft_worker", False):
        problems.append("draft workers (speculative decoding) are not supported")
    if model_runner.sliding_window_size is not None:
        problems.append(f"sliding-window attention (window {model_runner.sliding_window_size}) is not supported yet")
    pool = model_runner.token_to_kv_pool
    if type(pool) is not MHATokenToKVPool:
        problems.append(f"KV pool {type(pool).__name__} is not supported (only MHATokenToKVPool)")
    problems += api().runner_problems(model_runner)
    if problems:
        raise TokenButlerStartupError("cannot serve with tokenbutler:\n  - " + "\n  - ".join(problems))
    return resolved


class ButlerState:
    """Predictor, sketch cache, producer-query buffers and hooks of one model runner."""

    def __init__(self, model_runner, resolved: Resolved):
        from butler_zoo.families import get_family
        from butler_zoo.predictor import ButlerPredictor

        self.resolved = resolved
        self.policy = resolved.policy
        self.device = torch.device(model_runner.device)
        self.dtype = model_runner.dtype
        pool = model_runner.token_to_kv_pool
        self.pool = pool
        self.num_kv_heads = pool.head_num
        self.head_dim = pool.head_dim
        full = resolved.config
        # Tensor parallelism: this rank's KV heads (a single GPU is rank 0 of 1 and holds them all); the
        # sketch store, the producers' queries and the selection cover these heads only.
        self.tp_rank, self.tp_size = api().attention_tp(model_runner)
        try:
            self.kv_heads = kv_heads_of_rank(full.num_key_value_heads, self.tp_size, self.tp_rank)
        except ValueError as e:
            raise TokenButlerStartupError(str(e)) from None
        if self.num_kv_heads != len(self.kv_heads) or self.head_dim != full.head_dim:
            raise TokenButlerStartupError(
                f"the KV pool of attention-TP rank {self.tp_rank} of {self.tp_size} holds {self.num_kv_heads} KV heads of dim "
                f"{self.head_dim} per layer, the predictor expects {len(self.kv_heads)} (of {full.num_key_value_heads}) of "
                f"dim {full.head_dim}"
            )
        start = getattr(model_runner, "start_layer", 0)
        end = getattr(model_runner, "end_layer", full.num_hidden_layers)
        problem = stage_problem(full, start, end)
        if problem:
            raise TokenButlerStartupError(f"cannot serve with tokenbutler: {problem}; see docs/sglang.md (Parallelism)")

        # sliced on the CPU, where from_pretrained loads it: only the rank's slice reaches the device
        predictor = ButlerPredictor.from_pretrained(resolved.predictor, local_files_only=bool(os.environ.get("HF_HUB_OFFLINE")))
        predictor = shard_predictor(predictor, self.kv_heads)
        self.predictor = predictor.to(device=self.device, dtype=self.dtype).eval().requires_grad_(False)
        self.config = cfg = self.predictor.config  # this rank's heads; layers, stride and widths as the full one

        slots = pool.get_key_buffer(start).shape[0]
        # Sketch of layer l (l >= 1) at slot s: predictor.project_keys of the post-RoPE key in K pool slot s.
        # Indexed [slot, head] like the K pool, stored head-major: a selection program scores one KV
        # head over a run of slots, which then is one contiguous read (slot-major storage spreads it
        # over 32-byte pieces 256 bytes apart: 27% slower scoring at batch 8 x 32K on the H100).
        # All layers live in one [H_kv, layers, slots, d'] tensor, so that the layers of one producer
        # are a single [layers, slots, H_kv, d'] view for the selection over all of them at once.
        self.first_served = max(start, 1)
        self._sketch_store = torch.zeros(
            (self.num_kv_heads, max(end - self.first_served, 0), slots, cfg.sketch_dim), dtype=self.dtype, device=self.device
        )
        self.sketch: dict[int, torch.Tensor] = {
            layer: self._sketch_store[:, layer - self.first_served].transpose(0, 1) for layer in range(self.first_served, end)
        }
        rows = max(int(model_runner.req_to_token_pool.size) + 1, api().cuda_graph_max_bs(model_runner.server_args), 1)
        self.queries = [
            torch.zeros((rows, len(cfg.served_layers(k)), cfg.num_query_heads, cfg.sketch_dim), dtype=self.dtype, device=self.device)
            for k in range(cfg.num_producers)
        ]
        self.sketch_bytes = self._sketch_store.numel() * self._sketch_store.element_size()
        # Tickets of the attention kernel's splits, left zeroed by every call (one stream).
        self.split_counters = torch.zeros(rows * self.num_kv_heads, dtype=torch.int32, device=self.device)
        # Set by the backend for a budgeted decode step (its _StepMeta and static budget); the
        # producer hooks then select for their served layers at once, into `selections`.
        self.decode_step = None
        self.decode_budget = 0
        self.selections: dict[int, torch.Tensor] = {}

        family = get_family(cfg.base_model_type)
        layers = family.decoder_layers(model_runner.model)
        # Format 2: the angles [n, D] (cos | sin) of the tokens whose keys the pool receives next (see
        # the module docstring); the decode steps' live in `_decode_angles`, which CUDA graphs read.
        self.position_consistent = bool(self.predictor.position_consistent)
        self.key_angles: torch.Tensor | None = None
        self._runner = None
        self._handles = []
        if self.position_consistent:
            self._rotary = base_rotary(family, layers, start, end, self.head_dim)
            self._decode_angles = torch.zeros((rows, self.head_dim), dtype=self.dtype, device=self.device)
            self._handles.append(layers[start].register_forward_pre_hook(self._decode_angles_hook, with_kwargs=True))
            self._wrap_runner_forward(model_runner)
        # the residual stream after each producer layer, at decode steps (how depends on the release), for
        # the producers of this stage's served layers; one on the previous stage is the layer right before
        # this stage's first (stage_problem), whose stream is the stage's input
        self._handles += [
            api().install_producer_hook(layers, p, self._producer_hook(k), start_layer=start)
            for k, p in enumerate(cfg.producer_layers)
            if any(start <= l < end for l in cfg.served_layers(k))
        ]
        self._wrap_pool(pool)

    # ----- sketch ----------------------------------------------------------------------------
    def _wrap_pool(self, pool) -> None:
        original = pool.set_kv_buffer
        write_loc = api().write_loc

        # (layer, loc, cache_k, cache_v, k_scale, v_scale, layer_id_override[, dcp_kv_mask]); loc is the
        # slots tensor in 0.5.12, a KVWriteLoc (or a tensor) in 0.5.23
        def set_kv_buffer(layer, loc, cache_k, cache_v, *args, **kwargs):
            original(layer, loc, cache_k, cache_v, *args, **kwargs)
            layer_id_override = kwargs.get("layer_id_override", args[2] if len(args) > 2 else None)
            layer_id = layer_id_override if layer_id_override is not None else layer.layer_id
            self.write_sketch(layer_id, write_loc(loc), cache_k)

        set_kv_buffer.__wrapped__ = original
        pool.set_kv_buffer = set_kv_buffer

    def write_sketch(self, layer_id: int, loc: torch.Tensor, keys: torch.Tensor) -> None:
        """Sketch of the new tokens' post-RoPE keys ``[n, H_kv(*D)]`` into their slots ``loc`` (format 2:
        with the angles of :attr:`key_angles`)."""
        buf = self.sketch.get(layer_id)
        if buf is None:
            return
        # predictor.project_keys in the pool's token-major layout, projection and store in one launch
        keys = keys.reshape(-1, self.num_kv_heads, self.head_dim)
        weight = self.predictor.key_proj[layer_id - 1]
        if self.position_consistent:
            _write_sketch_rope(buf, loc, keys, weight, self.key_rope(keys.shape[0]))
        else:
            write_sketch(buf, loc, keys, weight)

    def new_sketch(self, layer_id: int, loc: torch.Tensor, keys: torch.Tensor, bs: int) -> NewSketch:
        """:meth:`write_sketch` of a decode step (one new token per row), for the attention launch."""
        keys = keys.reshape(bs, self.num_kv_heads, self.head_dim)
        return NewSketch(self.sketch[layer_id], loc, keys, self.predictor.key_proj[layer_id - 1])

    # ----- format 2: the base's rotary angles ------------------------------------------------
    def _wrap_runner_forward(self, model_runner) -> None:
        original = getattr(model_runner, "forward", None)
        if not callable(original):
            raise TokenButlerStartupError(
                "a format-2 (position-consistent) predictor needs the model runner's forward, to read the positions "
                f"of each batch; {type(model_runner).__name__} has none"
            )

        def forward(forward_batch, *args, **kwargs):
            self.begin_forward(forward_batch)
            return original(forward_batch, *args, **kwargs)

        forward.__wrapped__ = original
        model_runner.forward = forward
        self._runner = model_runner

    def angles_of(self, positions: torch.Tensor) -> torch.Tensor:
        """The base's rotary angles ``[n, D]`` (cos | sin, in the predictor's dtype) at ``positions [n]``.
        The table is read at each call: SGLang may replace it (longer, or cast) before CUDA-graph capture."""
        return self._rotary.cos_sin_cache.index_select(0, positions).to(self.dtype)

    def begin_forward(self, forward_batch) -> None:
        """Before a forward (``model_runner.forward``): the angles of an extend batch's tokens, eagerly.
        A decode step's are gathered in the forward itself (:meth:`_decode_angles_hook`)."""
        positions = getattr(forward_batch, "positions", None)
        if forward_batch.forward_mode.is_decode() or positions is None:
            self.key_angles = None
            return
        self.key_angles = self.angles_of(positions)

    def _decode_angles_hook(self, module, args, kwargs):
        """Forward pre-hook of the first decoder layer: a decode step's angles, from the positions the
        layer receives (the CUDA graph's static buffer under capture), into the preallocated buffer."""
        if torch.compiler.is_compiling():
            return None
        fb = args[2] if len(args) > 2 else kwargs.get("forward_batch")
        if fb is None or not fb.forward_mode.is_decode():
            return None
        positions = fb.positions
        n = positions.shape[0]
        if n > self._decode_angles.shape[0]:  # eager batches only: CUDA-graph batches fit the preallocated rows
            self._decode_angles = torch.zeros((n, self.head_dim), dtype=self.dtype, device=self.device)
        angles = self._decode_angles[:n]
        angles.copy_(self._rotary.cos_sin_cache.index_select(0, positions))
        self.key_angles = angles
        return None

    def key_rope(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(cos, sin, pairs)`` of the next ``n`` keys the pool receives (``reference.write_sketch``'s
        ``rope``). Tokens no forward positioned (the padding of a piecewise CUDA graph, the dummy batches of
        warm-up and capture, all written to scratch slots) get the identity rotation."""
        angles = self.key_angles
        have = 0 if angles is None else angles.shape[0]
        if have < n:
            pad = torch.zeros((n - have, self.head_dim), dtype=self.dtype, device=self.device)
            pad[:, : self.head_dim // 2] = 1.0
            angles = self.key_angles = pad if angles is None else torch.cat([angles, pad])
        elif have > n:
            angles = angles[:n]
        half = self.head_dim // 2
        return angles[:, :half], angles[:, half:], self.predictor.rope_pairs

    # ----- producer queries ------------------------------------------------------------------
    def _producer_hook(self, producer: int):
        """``on_stream(hidden, residual)`` of producer ``producer`` for ``compat.install_producer_hook``: called
        at every decode step (never in extend, nor while the piecewise prefill graph is traced) with the
        residual stream after the producer layer, ``hidden + residual`` (``residual`` is ``None`` where
        SGLang hands the summed stream)."""

        def on_stream(hidden, residual):
            n = hidden.shape[0]
            step = self.decode_step
            if step is not None and n != step.end.shape[0]:
                # the selection pairs query row i with batch row i: rows split over ranks would pair wrong rows
                raise RuntimeError(
                    f"tokenbutler: producer {producer} received the residual stream of {n} rows for a decode batch of "
                    f"{step.end.shape[0]}: a parallel layout that splits the rows over ranks is not supported"
                )
            buf = self.queries[producer]
            if n > buf.shape[0]:  # eager batches only: CUDA-graph batches fit the preallocated rows
                buf = self.queries[producer] = torch.zeros((n, *buf.shape[1:]), dtype=buf.dtype, device=buf.device)
            # predictor.producer_queries of the residual stream after the layer (hidden + residual:
            # the add is deferred), the add fused into the norm and the MLP writing into the buffer
            norm = self.predictor.producers[producer].norm
            normed = residual_layer_norm(hidden, residual, norm.weight, norm.bias, norm.eps)
            self.predictor.producer_queries_from_normed(producer, normed, out=buf[:n].view(n, -1))
            if self.position_consistent:
                # predictor.position_queries with the decode tokens' angles (gathered by the first layer's pre-hook)
                angles = self._decode_angles[:n]
                half = self.head_dim // 2
                buf[:n].copy_(self.predictor.position_queries(buf[:n], (angles[:, :half], angles[:, half:])))
            if self.decode_step is not None:
                self.select_served_layers(producer, n)

        return on_stream

    def select_served_layers(self, producer: int, bs: int) -> None:
        """Top-B of every layer this producer serves, before those layers run, in as few launches
        as the scratch cap allows (one at batch 8 x 32K).

        A served layer's selection needs only its producer's queries and the sketches of positions
        before its window, all written by earlier steps (the window, >= 1 token, holds the current
        one, whose sketch the layer writes later): the selection of layer l run here equals the one
        run in layer l's attention, and the layers share the launches, waves and serial tails of one
        selection over L times the rows (``score_select_triton`` with a layer axis)."""
        step = self.decode_step
        layers = [l for l in self.config.served_layers(producer) if l in self.sketch]
        if not layers:
            return
        h_kv = self.num_kv_heads
        per_layer = workspace_bytes(bs, h_kv, step.token_table.shape[1])
        per_call = max(1, min(len(layers), _SELECTION_SCRATCH_CAP // per_layer, layers_per_launch(bs * h_kv)))
        _, first_slot = self.config.producer_of(layers[0])
        queries = self.queries[producer][:bs]
        for i in range(0, len(layers), per_call):
            group = layers[i : i + per_call]
            j0 = group[0] - self.first_served
            q = queries[:, first_slot + i : first_slot + i + len(group)].transpose(0, 1)  # [L, B, H_sel, d']
            sketch = self._sketch_store[:, j0 : j0 + len(group)].permute(1, 2, 0, 3)  # [L, slots, H_kv, d']
            sel = select(
                q, sketch, step.start, step.end, sinks=self.policy.sinks, window=self.policy.window,
                budget=self.decode_budget, token_table=step.token_table, budget_per_row=step.budget_per_row,
            )
            for j, layer in enumerate(group):
                self.selections[layer] = sel[j]

    def serves(self, layer_id: int) -> bool:
        return layer_id in self.sketch

    def layer_queries(self, layer_id: int, bs: int) -> torch.Tensor:
        producer, _ = self.config.producer_of(layer_id)
        return self.predictor.layer_queries(layer_id, self.queries[producer][:bs])

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        wrapped = getattr(self.pool.set_kv_buffer, "__wrapped__", None)
        if wrapped is not None:
            self.pool.set_kv_buffer = wrapped
        if self._runner is not None:
            self._runner.forward = self._runner.forward.__wrapped__
            self._runner = None


def base_rotary(family, layers, start: int, end: int, head_dim: int):
    """The served model's rotary embedding, whose ``cos_sin_cache [max_pos, D]`` (cos | sin) a format-2
    predictor takes its angles from; :class:`TokenButlerStartupError` unless every layer of
    ``[start, end)`` rotates the whole head in the neox ("rotate half") layout with one table."""
    what = "a format-2 (position-consistent) predictor"
    found = None
    for i in range(start, end):
        try:
            rotary = getattr(family.attention(layers[i]), "rotary_emb", None)
        except AttributeError:
            rotary = None
        if rotary is None:
            raise TokenButlerStartupError(
                f"{what} needs the base's rotary angles, but decoder layer {i} has no `self_attn.rotary_emb`"
            )
        cache = getattr(rotary, "cos_sin_cache", None)
        if not isinstance(cache, torch.Tensor) or cache.dim() != 2:
            raise TokenButlerStartupError(
                f"{what} needs the base's rotary angles as a `cos_sin_cache` table [positions, head_dim]; decoder layer "
                f"{i}'s {type(rotary).__name__} has none"
            )
        problem = api().rotary_problem(rotary)
        if problem:
            raise TokenButlerStartupError(f"{what} needs the base's rotary angles at cos_sin_cache[position]; decoder layer {i}: {problem}")
        if not getattr(rotary, "is_neox_style", False):
            raise TokenButlerStartupError(
                f"{what} assumes the neox (\"rotate half\") rotary layout of Llama and Mistral; decoder layer {i}'s "
                f"{type(rotary).__name__} is interleaved (is_neox_style=False)"
            )
        rot_dim = getattr(rotary, "rotary_dim", cache.shape[-1])
        if rot_dim != head_dim or cache.shape[-1] != head_dim:
            raise TokenButlerStartupError(
                f"{what} needs a rotary embedding over the whole head (rotary_dim == head_dim {head_dim}); decoder "
                f"layer {i} rotates {rot_dim} dims (table width {cache.shape[-1]})"
            )
        if found is None:
            found = rotary
        elif rotary is not found and (
            cache.shape != found.cos_sin_cache.shape or not torch.equal(cache, found.cos_sin_cache.to(cache))
        ):
            raise TokenButlerStartupError(f"{what} needs one rotary table for all layers; decoder layer {i}'s differs")
    if found is None:
        raise TokenButlerStartupError(f"{what} needs the base's rotary angles, but this model runner serves no layer")
    return found


def _write_sketch_rope(pool, loc, keys, weight, rope) -> None:
    """``butler_kernels.write_sketch`` of a format-2 sketch (``rope = (cos, sin, pairs)``), dispatched
    like it (``BUTLER_KERNELS_IMPL``)."""
    impl = default_impl()
    if impl == "auto":
        torch.ops.butler.write_sketch_rope(pool, loc, keys, weight, *rope)
    elif impl == "triton":
        sketch_write_triton(pool, loc, keys, weight, rope=rope)
    else:
        reference.write_sketch(pool, loc, keys, weight, rope=rope)


@dataclass
class _StepMeta:
    """Per decode step, shared by every served layer: ``_alloc`` makes the storage for up to
    ``rows`` rows (the CUDA graphs read it in place), ``_build_step`` fills and returns the batch's
    views of it."""

    start: torch.Tensor  # [bs] zeros
    end: torch.Tensor  # [bs] context length (int32)
    budget_per_row: torch.Tensor | None  # [bs] for a fractional budget, else None
    token_table: torch.Tensor  # [bs, T] slots of each position
    no_selection: torch.Tensor  # [bs, H_kv, 0]: the dense layers' (empty) selection


class TokenButlerAttnBackend(TritonAttnBackend):
    """``TritonAttnBackend`` whose decode of served layers is budgeted (see the module docstring)."""

    def __init__(self, model_runner, state: ButlerState):
        super().__init__(model_runner)
        self.state = state
        policy = state.policy
        self.sinks, self.window = policy.sinks, policy.window
        self.fraction = policy.budget if isinstance(policy.budget, float) else None
        self.table_len = int(self.req_to_token.shape[1])
        self.budget = state.resolved.static_budget(self.table_len)
        # Every context the table can hold fits in the budget (or in sinks + window): no row can go sparse.
        self.all_dense = (self.fraction is None or self.fraction >= 1.0) and (
            self.sinks + self.window + self.budget >= self.table_len
        )
        self._step: _StepMeta | None = None
        self._graph: _StepMeta | None = None

    # ----- per-step metadata -------------------------------------------------------------------
    def _alloc(self, rows: int) -> _StepMeta:
        i32 = dict(dtype=torch.int32, device=self.device)
        return _StepMeta(
            start=torch.zeros(rows, **i32),
            end=torch.ones(rows, **i32),
            budget_per_row=torch.zeros(rows, dtype=torch.int64, device=self.device),
            token_table=torch.zeros((rows, self.table_len), **i32),
            no_selection=torch.empty((rows, self.state.num_kv_heads, 0), **i32),
        )

    def _build_step(self, bs: int, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, buf: _StepMeta) -> _StepMeta:
        """Fill ``buf[:bs]`` in place from the batch (device ops only: CUDA-graph replay safe)."""
        start, end = buf.start[:bs], buf.end[:bs]
        end.copy_(seq_lens[:bs])
        bpr = None
        if self.fraction is not None:
            bpr = buf.budget_per_row[:bs]
            bpr.copy_(reference.budget_for_rows(self.fraction, start, end, self.budget, fixed=self.sinks + self.window))
        torch.index_select(self.req_to_token, 0, req_pool_indices[:bs], out=buf.token_table[:bs])
        return _StepMeta(start, end, bpr, buf.token_table[:bs], buf.no_selection[:bs])

    def _budgeted(self, forward_mode, spec_info) -> bool:
        return not self.all_dense and forward_mode.is_decode() and spec_info is None

    def _activate(self, step: _StepMeta | None) -> None:
        """This step's metadata, for forward_decode and for the producer hooks' selections."""
        self._step = step
        self.state.decode_step = step
        self.state.decode_budget = self.budget
        self.state.selections.clear()

    # Every layer of a budgeted decode step runs butler_kernels (the dense ones too, see
    # forward_decode), so the parent's decode metadata, a table of every context's KV indices
    # (36.7 us per step at batch 8 x 32K on the H100, gpu/results/server_profile_b8x32k.md), is not built for it.
    def init_forward_metadata(self, forward_batch):
        bs = forward_batch.batch_size
        if self._budgeted(forward_batch.forward_mode, forward_batch.spec_info) and bs > 0:
            self._activate(self._build_step(bs, forward_batch.req_pool_indices, forward_batch.seq_lens, self._alloc(bs)))
            return
        super().init_forward_metadata(forward_batch)
        self._activate(None)

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int, *args, **kwargs):
        super().init_cuda_graph_state(max_bs, max_num_tokens, *args, **kwargs)
        self._graph = self._alloc(max(max_bs, max_num_tokens))

    def _graph_metadata(self, capture: bool, bs, req_pool_indices, seq_lens, forward_mode, spec_info, parent) -> None:
        """CUDA-graph metadata of one capture (``capture``) or replay, whichever entry point the release
        calls (the three methods below). ``parent()`` builds the parent's. At capture the parent's is
        built in every mode and the step's buffers are filled from the dummy batch; at replay a budgeted
        step rewrites the captured buffers in place (the graph reads them and none of the parent's)."""
        budgeted = self._budgeted(forward_mode, spec_info)
        if capture or not budgeted:
            parent()
        if budgeted:
            self._activate(self._build_step(bs, req_pool_indices, seq_lens, self._graph))
        elif capture:
            self._activate(None)

    # SGLang 0.5.12: one method for capture, one for replay
    def init_forward_metadata_capture_cuda_graph(self, bs, num_tokens, req_pool_indices, seq_lens, encoder_lens, forward_mode, spec_info):
        self._graph_metadata(
            True, bs, req_pool_indices, seq_lens, forward_mode, spec_info,
            lambda: super(TokenButlerAttnBackend, self).init_forward_metadata_capture_cuda_graph(
                bs, num_tokens, req_pool_indices, seq_lens, encoder_lens, forward_mode, spec_info
            ),
        )

    def init_forward_metadata_replay_cuda_graph(self, bs, req_pool_indices, seq_lens, seq_lens_sum, encoder_lens, forward_mode, spec_info, seq_lens_cpu):
        self._graph_metadata(
            False, bs, req_pool_indices, seq_lens, forward_mode, spec_info,
            lambda: super(TokenButlerAttnBackend, self).init_forward_metadata_replay_cuda_graph(
                bs, req_pool_indices, seq_lens, seq_lens_sum, encoder_lens, forward_mode, spec_info, seq_lens_cpu
            ),
        )

    # SGLang 0.5.23: one method for both, before the capture (in_capture=True) and before each replay;
    # the parent also serves eager batches of other backends' modes through it
    def init_forward_metadata_out_graph(self, forward_batch, in_capture: bool = False):
        fb = forward_batch
        self._graph_metadata(
            in_capture, fb.batch_size, fb.req_pool_indices, fb.seq_lens, fb.forward_mode, fb.spec_info,
            lambda: super(TokenButlerAttnBackend, self).init_forward_metadata_out_graph(fb, in_capture),
        )

    # ----- decode ----------------------------------------------------------------------------
    def forward_decode(self, q, k, v, layer, forward_batch, save_kv_cache=True, sinks=None, **kwargs):
        # kwargs: score_mod, aux_tensors (0.5.23), for the parent's kernel only
        step = self._step
        if step is None:
            return super().forward_decode(q, k, v, layer, forward_batch, save_kv_cache, sinks, **kwargs)
        if sinks is not None:  # no supported family has attention sinks; the parent's metadata is not built
            raise NotImplementedError(f"tokenbutler: layer {layer.layer_id} has attention sinks, which it does not support")
        extra = sorted(name for name, value in kwargs.items() if value is not None)
        if extra:
            raise NotImplementedError(f"tokenbutler: layer {layer.layer_id} passes {', '.join(extra)}, which it does not support")
        pool = self.state.pool  # the model runner's (0.5.23's ForwardBatch no longer carries it)
        bs = step.end.shape[0]
        if not self.state.serves(layer.layer_id):
            # Dense (layer 0): the same kernel with a window as long as the table and no selection,
            # each row's splits sized by its own context (H100, batch 8 x 32K: 366 us against
            # 440 us for SGLang's decode_attention_fwd with 64 splits, benchmarks/bench_decode_fusions.py).
            if save_kv_cache:
                pool.set_kv_buffer(layer, api().decode_write_loc(forward_batch), k, v, layer.k_scale, layer.v_scale)
            out, _ = sparse_decode(
                q.reshape(bs, layer.tp_q_head_num, layer.qk_head_dim), pool.get_key_buffer(layer.layer_id),
                pool.get_value_buffer(layer.layer_id), None, None, step.start, step.end, sinks=0, window=self.table_len,
                budget=0, scale=layer.scaling, token_table=step.token_table, selection=step.no_selection,
                split_counters=self._counters(bs),
            )
            return out.reshape(bs, -1)
        new_sketch = None
        if save_kv_cache:
            # K/V as the parent writes them; the new tokens' sketch goes with the attention launch
            # (the selection, made by the producer, never reads the current token's)
            set_kv = getattr(pool.set_kv_buffer, "__wrapped__", pool.set_kv_buffer)
            set_kv(layer, api().decode_write_loc(forward_batch), k, v, layer.k_scale, layer.v_scale)
            if self.state.position_consistent:
                # format 2: the fused write takes no angles, so the sketch gets its own launch, before
                # the attention (the selection never reads the current token: it is in the window)
                self.state.write_sketch(layer.layer_id, forward_batch.out_cache_loc, k)
            else:
                new_sketch = self.state.new_sketch(layer.layer_id, forward_batch.out_cache_loc, k, bs)
        # Selected by the producer hook with the other layers of its producer; else here.
        selection = self.state.selections.get(layer.layer_id)
        out, _ = sparse_decode(
            q.reshape(bs, layer.tp_q_head_num, layer.qk_head_dim),
            pool.get_key_buffer(layer.layer_id),
            pool.get_value_buffer(layer.layer_id),
            None if selection is not None else self.state.layer_queries(layer.layer_id, bs),
            None if selection is not None else self.state.sketch[layer.layer_id],
            step.start,
            step.end,
            sinks=self.sinks,
            window=self.window,
            budget=self.budget,
            scale=layer.scaling,
            token_table=step.token_table,
            budget_per_row=step.budget_per_row,
            selection=selection,
            split_counters=self._counters(bs),
            new_sketch=new_sketch,
        )
        return out.reshape(bs, -1)

    def _counters(self, bs: int) -> torch.Tensor | None:
        counters = self.state.split_counters
        return counters if bs * self.state.num_kv_heads <= counters.numel() else None


def create_backend(model_runner) -> TokenButlerAttnBackend:
    """Factory registered as attention backend ``tokenbutler`` (runs in each scheduler process)."""
    state = getattr(model_runner, _STATE_ATTR, None)
    if state is None:
        resolved = resolve_for_runner(model_runner)
        for note in resolved.notes:
            logger.warning("TokenButler: %s", note)
        state = ButlerState(model_runner, resolved)
        setattr(model_runner, _STATE_ATTR, state)
        backend = TokenButlerAttnBackend(model_runner, state)
        heads = state.kv_heads
        logger.info(
            "%s; sketch cache %.2f GB over %d layers, KV heads %d-%d of %d (attention-TP rank %d of %d) (%s backend on %s)",
            describe(resolved, backend.table_len), state.sketch_bytes / 2**30, len(state.sketch), heads.start,
            heads.stop - 1, resolved.config.num_key_value_heads, state.tp_rank, state.tp_size, BACKEND_NAME, release_note(),
        )
        return backend
    return TokenButlerAttnBackend(model_runner, state)
