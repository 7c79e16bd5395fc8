"""Budgeted-gather decode for TokenButler: plain-torch reference and Triton kernels.

``butler_kernels.reference`` defines the policy (sinks + window + top-B per KV head) and is what
every fast path is tested against. ``sparse_decode`` is the entry point of the runtimes; the
``butler::score_select`` and ``butler::budgeted_attention`` custom ops (registered on import, also
reachable as ``torch.ops.butler.*``) and the Triton launchers are exported for direct use. The
submodules ``score_select`` and ``budgeted_attention`` keep their names, so the op handles are
exported as ``score_select_op`` and ``budgeted_attention_op``. Triton itself is imported only when
a kernel is first launched.
"""

from butler_kernels import ops, reference
from butler_kernels.budgeted_attention import AttentionConfig, NewSketch, budgeted_attention_triton, default_attention_config
from butler_kernels.dispatch import IMPLEMENTATIONS, default_impl, residual_layer_norm, select, sparse_decode, write_sketch
from butler_kernels.producer_norm import residual_layer_norm_triton
from butler_kernels.sketch_write import sketch_write_triton
from butler_kernels.ops import budgeted_attention as budgeted_attention_op
from butler_kernels.ops import score_select as score_select_op
from butler_kernels.score_select import (
    SelectConfig,
    default_select_config,
    score_select_reference,
    score_select_triton,
    workspace_bytes,
)

__all__ = [
    "reference",
    "sparse_decode",
    "select",
    "write_sketch",
    "sketch_write_triton",
    "residual_layer_norm",
    "residual_layer_norm_triton",
    "IMPLEMENTATIONS",
    "default_impl",
    "ops",
    "score_select_op",
    "budgeted_attention_op",
    "score_select_triton",
    "score_select_reference",
    "budgeted_attention_triton",
    "SelectConfig",
    "AttentionConfig",
    "NewSketch",
    "default_select_config",
    "default_attention_config",
    "workspace_bytes",
]
