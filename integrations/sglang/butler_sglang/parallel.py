"""Tensor and pipeline parallelism of the ``tokenbutler`` backend, without SGLang (plain torch and butler_zoo).

* **Tensor parallelism.** An attention-TP rank holds the K/V of some KV heads only
  (:func:`kv_heads_of_rank`, SGLang's ``QKVParallelLinear`` layout). Everything the backend keeps per KV
  head follows them: the rank's sketch store, its producers' queries and its selection. The predictor
  is sliced once at load (:func:`shard_predictor`): the key projections of the rank's KV heads and the
  rows of each producer's output layer that emit those heads' queries; the producers' LayerNorm and
  first layer are replicated (they read the residual stream, which every rank holds whole after
  SGLang's all-reduce, so no extra communication is needed). A single GPU is rank 0 of 1 and takes the
  same path with the full slice.
* **Pipeline parallelism.** Producer ``k`` reads the residual stream after layer ``k*G`` and serves
  layers ``k*G+1 .. k*G+G``. A stage receives from the previous one the residual stream after the layer
  before its first: enough for a producer that is exactly that layer, not for an earlier one (its
  stream is gone). :func:`stage_problem` says when a stage would need a producer it cannot run;
  :func:`pipeline_problem` checks a whole partition and proposes one that works
  (``SGLANG_PP_LAYER_PARTITION``).

The backend (``butler_sglang.backend``) and the startup checks (``butler_sglang.settings``) call these;
CI tests them in the project's venv (``tests/test_sglang_parallel.py``) as well as inside SGLang.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

__all__ = [
    "PARTITION_ENV",
    "kv_heads_of_rank",
    "shard_predictor",
    "producer_layer",
    "stage_problem",
    "pipeline_problem",
    "aligned_partition",
]

# SGLang's variable for an explicit pipeline partition: layers per stage, comma-separated
# (sglang.srt.distributed.utils.get_pp_indices).
PARTITION_ENV = "SGLANG_PP_LAYER_PARTITION"


def kv_heads_of_rank(num_kv_heads: int, tp_size: int, tp_rank: int) -> range:
    """The KV heads attention-TP rank ``tp_rank`` of ``tp_size`` holds, as SGLang's ``QKVParallelLinear``
    shards them: ``num_kv_heads / tp_size`` consecutive heads each when there are at least as many heads as
    ranks; otherwise one head each, every head replicated on ``tp_size / num_kv_heads`` consecutive ranks."""
    if not 0 <= tp_rank < tp_size:
        raise ValueError(f"attention-TP rank {tp_rank} is outside a group of {tp_size}")
    if num_kv_heads >= tp_size:
        if num_kv_heads % tp_size:
            raise ValueError(
                f"{num_kv_heads} KV heads do not split over {tp_size} attention-TP ranks: use a --tp-size that divides "
                f"{num_kv_heads} (or a multiple of it)"
            )
        n = num_kv_heads // tp_size
        return range(tp_rank * n, (tp_rank + 1) * n)
    if tp_size % num_kv_heads:
        raise ValueError(
            f"{num_kv_heads} KV heads cannot be replicated evenly over {tp_size} attention-TP ranks: use a --tp-size "
            f"that is a multiple of {num_kv_heads} (or divides it)"
        )
    head = tp_rank // (tp_size // num_kv_heads)
    return range(head, head + 1)


def shard_predictor(predictor, kv_heads: range):
    """The predictor of one attention-TP rank: a ``ButlerPredictor`` whose config counts the KV heads
    ``kv_heads`` only (``num_key_value_heads = len(kv_heads)``, the query heads of their groups), with

    * ``key_proj[:, kv_heads]`` (layer ``l``'s sketch of those heads' keys),
    * each producer's output rows of the predicted queries of those heads (``fc2``, laid out
      ``[served layers, predictor heads, d']``; a KV head's predictor heads are ``group`` consecutive
      ones, ``group = num_query_heads / num_key_value_heads``),
    * the producers' LayerNorm and first layer whole (they read the replicated residual stream).

    Its producer queries, sketches and selections are the slices of the full predictor's for those heads
    (the same products over the same reduction axes). The full range returns a copy of the whole
    predictor. Tensors keep their dtype and device, copied (a slice must not pin the full weights)."""
    from butler_zoo.predictor import ButlerPredictor

    cfg = predictor.config
    if not kv_heads or kv_heads.step != 1 or kv_heads.start < 0 or kv_heads.stop > cfg.num_key_value_heads:
        raise ValueError(f"{kv_heads} is not a run of the predictor's {cfg.num_key_value_heads} KV heads")
    lo, hi = kv_heads.start, kv_heads.stop
    group = cfg.num_query_heads // cfg.num_key_value_heads  # predictor heads per KV head
    q_per_kv = cfg.num_attention_heads // cfg.num_key_value_heads
    local = dataclasses.replace(cfg, num_key_value_heads=hi - lo, num_attention_heads=(hi - lo) * q_per_kv)

    state = predictor.state_dict()
    sliced = {}
    for name, tensor in state.items():
        parts = name.split(".")
        if name == "key_proj":  # [layers - 1, H_kv, D, d']
            sliced[name] = tensor[:, lo:hi]
        elif parts[0] == "producers" and parts[2:] == ["fc2", "weight"]:  # [n * H_sel * d', I]
            out_shape = predictor.producers[int(parts[1])].out_shape
            sliced[name] = tensor.unflatten(0, out_shape)[:, lo * group : hi * group].flatten(0, 2)
        elif parts[0] == "producers" and parts[2] in ("norm", "fc1"):
            sliced[name] = tensor
        else:
            # a tensor this function does not know would silently keep its random initial value
            raise ValueError(
                f"shard_predictor does not know how to slice the predictor's tensor {name!r} over KV heads: update "
                "butler_sglang.parallel.shard_predictor with the predictor's layout"
            )
    shard = ButlerPredictor(local)
    shard.load_state_dict({k: v.clone(memory_format=torch.contiguous_format) for k, v in sliced.items()}, assign=True)
    return shard.to(device=predictor.key_proj.device)


def producer_layer(config, layer: int) -> int | None:
    """The decoder layer whose residual stream feeds the producer of ``layer`` (``None`` for layer 0)."""
    found = config.producer_of(layer)
    return None if found is None else found[0] * config.producer_stride


def stage_problem(config, start_layer: int, end_layer: int) -> str | None:
    """Why a pipeline stage serving decoder layers ``[start_layer, end_layer)`` cannot run its producers,
    else ``None``. The stage holds the residual stream after every layer it runs and, as its input, the
    stream after layer ``start_layer - 1``; a served layer whose producer reads an earlier layer's stream
    (on a previous stage, not carried between stages) cannot be served."""
    for layer in range(max(start_layer, 1), end_layer):
        p = producer_layer(config, layer)
        if p < start_layer - 1:
            return (
                f"the stage of layers {start_layer}-{end_layer - 1} serves layer {layer}, whose predictor producer reads "
                f"the residual stream after layer {p}, which runs on an earlier stage and is not passed between "
                f"stages (only the stream after layer {start_layer - 1} is)"
            )
    return None


def aligned_partition(num_layers: int, pp_size: int, stride: int) -> list[int] | None:
    """Layers per stage (``SGLANG_PP_LAYER_PARTITION``) whose every stage after the first starts right
    after a producer layer (at ``k * stride + 1``), near the even split; ``None`` if there are fewer
    such starts than stages."""
    starts = [0]
    candidates = [k * stride + 1 for k in range(num_layers) if k * stride + 1 < num_layers]
    for i in range(1, pp_size):
        target = i * num_layers / pp_size
        usable = [c for c in candidates if c > starts[-1]]
        # leave enough candidates for the stages after this one
        usable = usable[: max(len(usable) - (pp_size - 1 - i), 0)]
        if not usable:
            return None
        starts.append(min(usable, key=lambda c: (abs(c - target), c)))
    bounds = starts + [num_layers]
    return [b - a for a, b in zip(bounds, bounds[1:])]


def pipeline_problem(config, pp_size: int, stage_layers: Callable[[int], tuple[int, int]]) -> str | None:
    """Why the pipeline partition ``stage_layers(rank) -> (start, end)`` (SGLang's ``get_pp_indices``)
    cannot serve the predictor ``config``, with the partition that would, else ``None``."""
    for rank in range(pp_size):
        start, end = stage_layers(rank)
        problem = stage_problem(config, start, end)
        if problem is None:
            continue
        fix = aligned_partition(config.num_hidden_layers, pp_size, config.producer_stride)
        how = (
            f"set {PARTITION_ENV}={','.join(map(str, fix))} (every stage then starts right after a producer layer, "
            f"at a multiple of the producer stride {config.producer_stride} plus 1)"
            if fix
            else f"use a --pp-size of at most {config.num_producers + 1} (stages must start right after a producer layer)"
        )
        return f"--pp-size {pp_size}: stage {rank}: {problem}; {how}"
    return None
