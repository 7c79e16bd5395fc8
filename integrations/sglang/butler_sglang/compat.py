"""Version adapters: every place where the supported SGLang releases differ, one small named method each.

The plugin and the backend have one code path. Where SGLang 0.5.12 and 0.5.23 disagree, they go
through :func:`api`, the adapter of the installed release (``SGLang0512``, and ``SGLang0523`` overriding
what 0.5.23 changed). Read from the two wheels:

* ``model_config(server_args)``: ``server_args.get_model_config()`` (0.5.12);
  ``arg_groups.overrides.model_config_of(server_args)`` (0.5.23, which dropped the method).
* ``setting(server_args, name)``: the ``ServerArgs`` field, resolved in place (0.5.12); in 0.5.23
  ``ServerArgs`` is a sealed msgspec Struct that keeps the operator's input and resolution writes its
  decisions as declarations, read through ``resolving_view(server_args)``.
* ``cuda_graph_max_bs(server_args)``: ``cuda_graph_max_bs`` (0.5.12), ``cuda_graph_max_bs_decode`` (0.5.23).
* ``extra_unsupported(server_args)``: settings only 0.5.23 has that the backend refuses: attention data
  parallelism (``--attn-dp-size``, which replaced ``--enable-dp-attention``), decode context parallelism
  (``--dcp-size``), the unified and page-major KV pools, HiSparse.
* ``cell_size_inputs(arg)``: the pool-sizing hook target is ``DefaultPoolConfigurator._compute_cell_size``
  in both, but its argument is the ``ModelRunner`` in 0.5.12 and the ``KVCacheConfigurator`` in 0.5.23
  (``layer_info.start_layer``, ``model_dtype``, ``runtime_context.get_parallel().attn_tp_size``).
* ``write_loc(loc)``: ``MHATokenToKVPool.set_kv_buffer(layer, loc, k, v, k_scale, v_scale,
  layer_id_override)`` takes the slots tensor in 0.5.12; in 0.5.23 its ``loc_info`` is a ``KVWriteLoc``
  (or a tensor) and ``dcp_kv_mask`` follows.
* ``decode_write_loc(forward_batch)``: what the parent's decode passes as that location:
  ``forward_batch.out_cache_loc`` (0.5.12), ``KVWriteLoc.for_batch(forward_batch)`` (0.5.23).
* ``runner_problems(model_runner)``: in 0.5.23 a translating ``KVIndexTranslator`` (unified or fused-draft
  pool: ``req_to_token`` then holds virtual ids) and a non-NHD pool layout (``SGLANG_USE_HND_KVCACHE``)
  are refused.
* ``rotary_problem(rotary)``: 0.5.23's ``RotaryEmbedding`` has ``position_start`` (table row 0 is that
  position); format-2 predictors need it to be 0.
* ``install_producer_hook(layers, p, on_stream, start_layer)``: 0.5.12's Llama layers return ``(hidden_states,
  residual)`` with the add deferred, so a forward hook on layer ``p`` sees the stream (on a pipeline stage
  that starts at ``p + 1``, a forward pre-hook on that layer sees it as the stage's input); 0.5.23's return
  one tensor and keep the residual in ``forward_batch.residual_stream``, and their ``capture_output`` callback
  receives the updated stream before the attention, so a forward pre-hook on layer ``p + 1`` chains one in.
* ``attention_tp(model_runner)``: this process's attention-TP rank and size, which fix the KV heads it
  holds: ``dp_attention.get_attention_tp_rank/size()`` (0.5.12), the runtime context's
  ``get_parallel().attn_tp_rank/attn_tp_size`` (0.5.23).

The CUDA-graph metadata entry points differ too: 0.5.12 calls ``init_forward_metadata_capture_cuda_graph``
and ``init_forward_metadata_replay_cuda_graph``; 0.5.23 removed them and calls
``init_forward_metadata_out_graph(forward_batch, in_capture)``. The backend defines all three, each a
call of one method (``TokenButlerAttnBackend._graph_metadata``); a release calls only its own.
Unchanged: the ``sglang.srt.plugins`` entry-point group and ``load_plugins``, ``HookRegistry`` (AROUND /
AFTER hooks on ``ServerArgs.add_cli_args``, ``from_cli_args`` and ``check_server_args``, which the
launcher still calls, after ``resolve_once`` in 0.5.23), ``register_attention_backend`` and
``add_attention_backend_choices``, ``MHATokenToKVPool``'s ``[slots, H_kv, D]`` buffers,
``ReqToTokenPool.req_to_token``, ``sglang.srt.distributed.utils.get_pp_indices`` (a pipeline stage's layers,
``SGLANG_PP_LAYER_PARTITION``), ``QKVParallelLinear``'s KV-head sharding, the Triton backend's constructor ``(model_runner)``,
``init_forward_metadata`` and ``init_cuda_graph_state``, the first arguments of ``forward_decode`` (0.5.23
adds ``score_mod`` and ``aux_tensors``), and the rotary ``cos_sin_cache`` layout (``[max_pos, D]``, cos | sin).

:data:`GPU_TESTED` lists the releases the GPU checks (``integrations/sglang/gpu``) ran on; the others are
CPU-tested only, which the startup log lines say (:func:`release_note`).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any, Callable, NamedTuple

__all__ = ["GPU_TESTED", "SGLang0512", "SGLang0523", "ADAPTERS", "api", "release_note"]

# Releases the GPU functional check and benchmarks ran on (integrations/sglang/gpu/results).
GPU_TESTED = ("0.5.12",)


class CellSizeInputs(NamedTuple):
    """What the pool-sizing hook needs, whatever SGLang hands ``_compute_cell_size``."""

    server_args: Any
    hf_config: Any
    start_layer: int
    num_kv_heads: int  # per attention-TP rank
    element_size: int  # bytes of one sketch element (the model dtype's)


def _forward_batch_of(args, kwargs):
    """The ``forward_batch`` of a decoder layer call ``(positions, hidden_states, forward_batch, ...)``."""
    return args[2] if len(args) > 2 else kwargs.get("forward_batch")


def _decode_step(args, kwargs):
    """The forward batch of a decode step's layer call, else ``None`` (extend batches, and the
    piecewise prefill graph while torch.compile traces it: producers only matter at decode)."""
    import torch

    if torch.compiler.is_compiling():
        return None
    fb = _forward_batch_of(args, kwargs)
    if fb is None or not fb.forward_mode.is_decode():
        return None
    return fb


class SGLang0512:
    """SGLang 0.5.12 (torch 2.11): CPU tests in CI and the GPU checks of integrations/sglang/gpu."""

    version = "0.5.12"

    # ----- server arguments ------------------------------------------------------------------------
    def model_config(self, server_args):
        return server_args.get_model_config()

    def setting(self, server_args, name: str, default=None):
        """A server setting as SGLang resolved it (``default`` where the release has no such field)."""
        return getattr(server_args, name, default)

    def cuda_graph_max_bs(self, server_args) -> int:
        return int(self.setting(server_args, "cuda_graph_max_bs") or 0)

    def extra_unsupported(self, server_args) -> list[str]:
        """Settings of this release only that the backend refuses (each with its fix)."""
        return []

    def pp_indices(self, num_layers: int, pp_rank: int, pp_size: int) -> tuple[int, int]:
        """The decoder layers ``[start, end)`` of pipeline stage ``pp_rank``, as the model builds them
        (``SGLANG_PP_LAYER_PARTITION`` or the even split)."""
        from sglang.srt.distributed.utils import get_pp_indices

        return get_pp_indices(num_layers, pp_rank, pp_size)

    # ----- parallel groups -------------------------------------------------------------------------
    def attention_tp(self, model_runner) -> tuple[int, int]:
        """``(rank, size)`` of this process in its attention-TP group (the group the KV heads are sharded
        over; the TP group itself without DP attention, which the plugin refuses)."""
        from sglang.srt.layers.dp_attention import get_attention_tp_rank, get_attention_tp_size

        return int(get_attention_tp_rank()), int(get_attention_tp_size())

    # ----- KV pool ---------------------------------------------------------------------------------
    def cell_size_inputs(self, configurator_arg) -> CellSizeInputs:
        """``DefaultPoolConfigurator._compute_cell_size(self, ARG, num_layers)``: ARG is the ModelRunner."""
        from sglang.srt.layers.dp_attention import get_attention_tp_size

        mr = configurator_arg
        dtype = mr.dtype
        return CellSizeInputs(
            server_args=mr.server_args,
            hf_config=mr.model_config.hf_config,
            start_layer=int(getattr(mr, "start_layer", 0)),
            num_kv_heads=mr.model_config.get_num_kv_heads(get_attention_tp_size()),
            element_size=dtype.itemsize if hasattr(dtype, "itemsize") else 2,
        )

    def write_loc(self, loc_info):
        """The slots tensor of what ``set_kv_buffer`` receives as its location."""
        return loc_info

    def decode_write_loc(self, forward_batch):
        """The location argument of the parent's decode K/V write (``set_kv_buffer``)."""
        return forward_batch.out_cache_loc

    def runner_problems(self, model_runner) -> list[str]:
        """Model-runner properties of this release only that the backend refuses."""
        return []

    # ----- model -----------------------------------------------------------------------------------
    def rotary_problem(self, rotary) -> str | None:
        """Why the rotary table cannot give a format-2 predictor its angles at ``cos_sin_cache[position]``."""
        return None

    def install_producer_hook(self, layers, producer_layer: int, on_stream: Callable, start_layer: int = 0):
        """Call ``on_stream(hidden, residual)`` at every decode step with the residual stream after decoder
        layer ``producer_layer`` (``hidden + residual``; ``residual`` may be ``None`` when ``hidden`` is the
        whole stream). Installed before CUDA-graph capture, so it runs inside the captured decode graphs.
        Returns the hook's handle. ``start_layer``: the first layer of this pipeline stage; a producer layer
        before it must be ``start_layer - 1``, whose stream is the stage's input.

        0.5.12: layers return ``(hidden_states, residual)`` with the residual add deferred; a forward
        hook on the producer layer sees both. On a stage that starts right after the producer layer, the
        stage's first layer receives them (``pp_proxy_tensors``) as ``(positions, hidden_states,
        forward_batch, residual)``: a forward pre-hook on it sees the same stream."""
        if producer_layer < start_layer:
            return self._stage_input_hook(layers, producer_layer, on_stream, start_layer)

        def hook(module, args, kwargs, output):
            if _decode_step(args, kwargs) is None:
                return None
            if isinstance(output, tuple):
                on_stream(output[0], output[1] if len(output) > 1 else None)
            else:
                on_stream(output, None)
            return None

        return layers[producer_layer].register_forward_hook(hook, with_kwargs=True)

    def _stage_input_hook(self, layers, producer_layer: int, on_stream: Callable, start_layer: int):
        if producer_layer != start_layer - 1:
            raise ValueError(
                f"producer layer {producer_layer} runs on an earlier pipeline stage than layer {start_layer}; only the "
                f"stream after layer {start_layer - 1} reaches this stage (butler_sglang.parallel.stage_problem)"
            )

        def pre_hook(module, args, kwargs):
            if _decode_step(args, kwargs) is None:
                return None
            hidden = args[1] if len(args) > 1 else kwargs["hidden_states"]
            residual = args[3] if len(args) > 3 else kwargs.get("residual")
            on_stream(hidden, residual)
            return None

        return layers[start_layer].register_forward_pre_hook(pre_hook, with_kwargs=True)


class SGLang0523(SGLang0512):
    """SGLang 0.5.23 (torch 2.14.1, CUDA 13): CPU tests in CI; not run on a GPU yet."""

    version = "0.5.23"

    def model_config(self, server_args):
        from sglang.srt.arg_groups.overrides import model_config_of

        return model_config_of(server_args)

    def setting(self, server_args, name: str, default=None):
        # ServerArgs is a sealed msgspec Struct holding the operator's input; resolution writes its
        # decisions as declarations, which the resolving view reads over the input.
        from sglang.srt.arg_groups.overrides import resolving_view

        try:
            return getattr(resolving_view(server_args), name)
        except AttributeError:
            return default

    def cuda_graph_max_bs(self, server_args) -> int:
        return int(self.setting(server_args, "cuda_graph_max_bs_decode") or 0)

    def extra_unsupported(self, server_args) -> list[str]:
        g = lambda name, default=None: self.setting(server_args, name, default)  # noqa: E731
        out = []
        if (g("attn_dp_size") or 1) > 1:
            out.append(
                f"--attn-dp-size {g('attn_dp_size')} (attention data parallelism) is not supported with tokenbutler: it moves "
                "the tokens between attention-DP groups at every layer boundary, so a producer's residual stream does not "
                "hold its rank's decode rows (untested); for Llama/Mistral use --tp-size, and --dp-size for replicas"
            )
        if (g("dcp_size") or 1) > 1:
            out.append(f"--dcp-size {g('dcp_size')} (decode context parallelism) is not supported with tokenbutler")
        for name, flag in (
            ("enable_unified_memory", "--enable-unified-memory"),
            ("enable_page_major_kv_layout", "--enable-page-major-kv-layout"),
            ("enable_hisparse", "--enable-hisparse"),
        ):
            if g(name):
                out.append(f"{flag} is not supported with tokenbutler (the sketch cache is indexed by physical KV slot)")
        return out

    def attention_tp(self, model_runner) -> tuple[int, int]:
        from sglang.srt.runtime_context import get_parallel

        parallel = get_parallel()
        return int(parallel.attn_tp_rank), int(parallel.attn_tp_size)

    def cell_size_inputs(self, configurator_arg) -> CellSizeInputs:
        """0.5.23: ARG is the ``KVCacheConfigurator`` (``mem_cache.kv_cache_configurator``)."""
        from sglang.srt.runtime_context import get_parallel

        kvc = configurator_arg
        dtype = kvc.model_dtype
        return CellSizeInputs(
            server_args=kvc.server_args,
            hf_config=kvc.model_config.hf_config,
            start_layer=int(kvc.layer_info.start_layer),
            num_kv_heads=kvc.model_config.get_num_kv_heads(get_parallel().attn_tp_size),
            element_size=dtype.itemsize if hasattr(dtype, "itemsize") else 2,
        )

    def write_loc(self, loc_info):
        from sglang.srt.mem_cache.memory_pool import unwrap_write_loc

        return unwrap_write_loc(loc_info)[0]

    def decode_write_loc(self, forward_batch):
        from sglang.srt.mem_cache.memory_pool import KVWriteLoc

        return KVWriteLoc.for_batch(forward_batch)

    def runner_problems(self, model_runner) -> list[str]:
        out = []
        translator = getattr(model_runner, "kv_index_translator", None)
        if translator is not None and getattr(translator, "is_translating", False):
            out.append(
                "a KV pool whose req_to_token holds virtual ids (unified / fused-draft pool) is not supported: the "
                "sketch cache and the selection index physical KV slots"
            )
        layout = getattr(model_runner.token_to_kv_pool, "kv_cache_layout", "nhd")
        if layout != "nhd":
            out.append(f"KV cache layout {layout!r} is not supported (only the default NHD [slots, heads, dim]; unset SGLANG_USE_HND_KVCACHE)")
        return out

    def rotary_problem(self, rotary) -> str | None:
        start = getattr(rotary, "position_start", 0) or 0
        if start != 0:
            return f"{type(rotary).__name__}'s table starts at position {start} (position_start), not 0"
        return None

    def install_producer_hook(self, layers, producer_layer: int, on_stream: Callable, start_layer: int = 0):
        """0.5.23: a layer returns one tensor and keeps the residual in ``forward_batch.residual_stream``;
        its ``capture_output`` callback receives the updated residual stream (the previous layer's output
        plus the residual, what a transformers decoder layer outputs) before its attention. A forward
        pre-hook on layer ``producer_layer + 1`` chains ``on_stream`` into that callback (after any
        callback SGLang passes, e.g. Eagle's auxiliary hidden states); the value is borrowed storage,
        which ``on_stream`` only reads. On a pipeline stage that starts at ``producer_layer + 1`` that layer
        is the stage's first, which receives the stream from the previous stage (``attn_boundary.from_pp``)
        and captures it the same way."""
        if producer_layer < start_layer - 1:
            raise ValueError(
                f"producer layer {producer_layer} runs on an earlier pipeline stage than layer {start_layer}; only the "
                f"stream after layer {start_layer - 1} reaches this stage (butler_sglang.parallel.stage_problem)"
            )
        consumer = producer_layer + 1

        def pre_hook(module, args, kwargs):
            if _decode_step(args, kwargs) is None:
                return None
            previous = kwargs.get("capture_output")

            def capture(value, owned: bool = False):
                if previous is not None:
                    previous(value, owned=owned)
                on_stream(value, None)

            return args, {**kwargs, "capture_output": capture}

        return layers[consumer].register_forward_pre_hook(pre_hook, with_kwargs=True)


ADAPTERS = {a.version: a for a in (SGLang0512(), SGLang0523())}


@lru_cache(maxsize=None)
def installed_version() -> str | None:
    """The installed ``sglang`` release (read once per process)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("sglang")
    except PackageNotFoundError:
        return None


@lru_cache(maxsize=None)
def _api_for(version: str | None) -> SGLang0512:
    if version not in ADAPTERS:
        from butler_sglang import SUPPORTED_SGLANG_VERSIONS

        raise RuntimeError(
            f"no butler_sglang adapter for SGLang {version or '(not installed)'} "
            f"(supported: {', '.join(SUPPORTED_SGLANG_VERSIONS)})"
        )
    return ADAPTERS[version]


def api(version: str | None = None) -> SGLang0512:
    """The adapter of ``version`` (default: the installed SGLang); ``RuntimeError`` for another release
    (the plugin checks the version first, see ``settings.check_sglang_version``). Cached: cheap enough for
    the decode path."""
    return _api_for(installed_version() if version is None else version)


def release_note(version: str | None = None) -> str:
    """``SGLang 0.5.12 (GPU-tested)`` or ``SGLang 0.5.23 (CPU-tested only: ...)`` for the startup log lines."""
    v = installed_version() if version is None else version
    if v in GPU_TESTED:
        return f"SGLang {v} (GPU-tested)"
    return f"SGLang {v} (CPU-tested only: the GPU functional check and benchmarks have not run on it)"
