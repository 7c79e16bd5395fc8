"""Distillation targets and the v2 loss (METHOD.md §3).

One teacher-forced forward of the frozen base captures, for a set of sampled query rows:

* the post-RoPE queries of those rows and the post-RoPE keys of every position, per layer ``l >= 1``,
  from a registered transformers attention function (``butler_capture``) that records them and then
  delegates to ``sdpa``: RoPE is the model's own, never re-implemented;
* the attention mask of those rows as the model built it (causal, or sliding-window for Mistral);
* the residual stream *output* of every producer layer ``k*G`` at those rows, from forward hooks on
  the decoder layers: the same input the runtime's producer hooks read at decode;
* the base's rotary angles ``(cos, sin)`` of every position, as the model passed them to its decoder
  layers: a position-consistent predictor (format 2) un-rotates the keys and rotates sketch and queries
  with them, exactly as at decode.

Nothing of size ``[L, L]`` is ever built: the teacher of a layer is ``[B, H_kv, R, L]`` for ``R``
sampled rows, the mean over each KV head's query heads of their masked causal softmax (a selection
shared by the group captures that mean mass). The student is the predictor's score of every key for
the same rows, from ``butler_kernels.reference.score_tokens`` (max over the group when the predictor
emits one query per query head), masked the same way. The loss is their cross-entropy, averaged over
rows, heads, batch and layers.
"""

from __future__ import annotations

import dataclasses
import math

import torch
from torch import nn

from butler_kernels.reference import score_tokens
from butler_zoo.families import get_family
from butler_zoo.predictor import ButlerPredictor

__all__ = [
    "CAPTURE_IMPLEMENTATION",
    "Captured",
    "TeacherCapture",
    "distill_loss",
    "sample_rows",
    "student_logits",
    "teacher_probs",
    "rows_allowed",
]

CAPTURE_IMPLEMENTATION = "butler_capture"


def _capture_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Registered as ``butler_capture``: record q (sampled rows) and k, then run sdpa."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    capture = getattr(module, "_butler_capture", None)
    if scaling is None:
        scaling = 1.0 / math.sqrt(query.shape[-1])
    if capture is not None:
        capture.record(module.layer_idx, query, key, attention_mask, scaling)
    return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)


def register_capture_attention() -> None:
    """Register ``butler_capture`` with transformers (idempotent); its mask is sdpa's."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, sdpa_mask
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if CAPTURE_IMPLEMENTATION not in ALL_ATTENTION_FUNCTIONS.valid_keys():
        ALL_ATTENTION_FUNCTIONS.register(CAPTURE_IMPLEMENTATION, _capture_attention)
        ALL_MASK_ATTENTION_FUNCTIONS.register(CAPTURE_IMPLEMENTATION, sdpa_mask)


@dataclasses.dataclass
class Captured:
    """What one forward captured. ``rows [R]`` are the sampled query positions (sorted, on device).

    hidden: producer ``k`` -> residual stream after layer ``k*G`` at the rows, ``[B, R, E]``.
    q: layer -> post-RoPE queries at the rows, ``[B, H_q, R, D]``.
    k: layer -> post-RoPE keys of every position, ``[B, H_kv, L, D]``.
    allowed: layer -> ``bool [B, R, L]`` from the model's mask, or ``None`` (plain causal).
    scaling: layer -> the attention's softmax scale.
    rope: the base's ``(cos, sin)`` ``[B or 1, L, D]`` of every position.
    """

    rows: torch.Tensor
    length: int
    hidden: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    q: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    k: dict[int, torch.Tensor] = dataclasses.field(default_factory=dict)
    allowed: dict[int, torch.Tensor | None] = dataclasses.field(default_factory=dict)
    scaling: dict[int, float] = dataclasses.field(default_factory=dict)
    rope: tuple[torch.Tensor, torch.Tensor] | None = None


def _mask_rows(attention_mask: torch.Tensor | None, rows: torch.Tensor, length: int) -> torch.Tensor | None:
    """``bool [B, R, L]`` (True = may attend) of the sampled rows, or ``None`` for a plain causal mask."""
    if attention_mask is None:
        return None
    m = attention_mask[:, 0] if attention_mask.dim() == 4 else attention_mask
    m = m.index_select(-2, rows)
    ok = m if m.dtype == torch.bool else m == 0
    if ok.shape[-1] != length:
        raise ValueError(f"attention mask covers {ok.shape[-1]} keys, expected {length}")
    return ok


def rows_allowed(cap: Captured, layer: int, batch: int) -> torch.Tensor:
    """``bool [B, 1, R, L]``: the keys each sampled row may attend in ``layer`` (never a future one)."""
    causal = torch.arange(cap.length, device=cap.rows.device)[None, :] <= cap.rows[:, None]  # [R, L]
    m = cap.allowed.get(layer)
    out = causal[None] if m is None else (m & causal[None])
    return out.expand(batch, -1, -1)[:, None]


class TeacherCapture:
    """Capture teacher q/k and producer inputs of a frozen transformers model (Llama/Mistral family).

    Use as ``with TeacherCapture(model, config) as cap: captured = cap.run(input_ids, rows)``.
    While installed the model runs its attention through ``butler_capture`` (= sdpa + recording);
    on exit its attention implementation and hooks are restored.
    """

    def __init__(self, model: nn.Module, config, layers: list[int] | None = None):
        self.model = model
        self.config = config
        self.family = get_family(model.config.model_type)
        self.layers = list(range(1, config.num_hidden_layers)) if layers is None else list(layers)
        self._wanted = set(self.layers)
        self._producer_index = {layer: k for k, layer in enumerate(config.producer_layers)}
        self._handles: list = []
        self._current: Captured | None = None
        self._old_impl = None

    # ----- installation -----------------------------------------------------------------------
    def __enter__(self) -> "TeacherCapture":
        register_capture_attention()
        layers = self.family.decoder_layers(self.model)
        for layer_idx, k in self._producer_index.items():
            self._handles.append(layers[layer_idx].register_forward_hook(self._producer_hook(k)))
        self._handles.append(layers[0].register_forward_pre_hook(self._rope_hook, with_kwargs=True))
        for layer in layers:
            self.family.attention(layer)._butler_capture = self
        self._old_impl = self.model.config._attn_implementation
        self.model.config._attn_implementation = CAPTURE_IMPLEMENTATION
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for layer in self.family.decoder_layers(self.model):
            self.family.attention(layer).__dict__.pop("_butler_capture", None)
        self.model.config._attn_implementation = self._old_impl

    def _producer_hook(self, producer: int):
        def hook(module, args, output):
            cap = self._current
            if cap is not None:
                hidden = output[0] if isinstance(output, tuple) else output
                cap.hidden[producer] = hidden.detach().index_select(1, cap.rows)

        return hook

    def _rope_hook(self, module, args, kwargs):
        from butler_zoo.compat import find_rope

        cap = self._current
        rope = find_rope(module, args, kwargs)
        if cap is not None and rope is not None:
            cap.rope = tuple(t.detach() for t in rope)

    def record(self, layer: int, query: torch.Tensor, key: torch.Tensor, attention_mask, scaling: float) -> None:
        cap = self._current
        if cap is None or layer not in self._wanted:
            return
        cap.q[layer] = query.detach().index_select(2, cap.rows)
        cap.k[layer] = key.detach()
        cap.allowed[layer] = _mask_rows(attention_mask, cap.rows, key.shape[2])
        cap.scaling[layer] = float(scaling)

    # ----- one forward ------------------------------------------------------------------------
    def run(self, input_ids: torch.Tensor, rows: torch.Tensor, autocast_dtype: torch.dtype | None = None) -> Captured:
        """Run the decoder (no LM head) on ``input_ids [B, L]`` and return the captured tensors."""
        if self._old_impl is None:
            raise RuntimeError("TeacherCapture.run() must be called inside `with TeacherCapture(...)`")
        cap = Captured(rows=rows.to(input_ids.device), length=input_ids.shape[1])
        self._current = cap
        decoder = self.model.get_decoder() if hasattr(self.model, "get_decoder") else self.model.model
        device_type = input_ids.device.type
        try:
            with torch.no_grad(), torch.autocast(device_type, dtype=autocast_dtype or torch.bfloat16,
                                                 enabled=autocast_dtype is not None):
                decoder(input_ids=input_ids, use_cache=False)
        finally:
            self._current = None
        if cap.rope is None:
            raise RuntimeError("the capture got no rotary angles: the model's decoder layers were not called with "
                               "position_embeddings")
        missing = sorted(self._wanted - set(cap.k))
        if missing or len(cap.hidden) != len(self._producer_index):
            raise RuntimeError(
                f"the capture missed layers {missing[:5]} / producers {sorted(set(range(len(self._producer_index))) - set(cap.hidden))}: "
                "the model does not route attention through config._attn_implementation"
            )
        return cap


def sample_rows(length: int, num_rows: int, tail_fraction: float, generator: torch.Generator | None = None,
                device: torch.device | str | None = None) -> torch.Tensor:
    """Sorted query rows for the loss: the final row plus ``num_rows - 1`` distinct rows drawn
    uniformly from the last ``tail_fraction`` of the window (excluding the final row).

    Distinct rows (the paper draws with replacement and de-duplicates) keep every step's shapes equal,
    and the draw stays on ``generator``'s device (no host sync)."""
    if not 0.0 < tail_fraction <= 1.0:
        raise ValueError(f"tail_fraction must be in (0, 1], got {tail_fraction}")
    lo = min(int(length * (1.0 - tail_fraction)), length - 1)
    pool = length - 1 - lo  # candidates lo .. length-2
    n = min(num_rows - 1, pool)
    dev = generator.device if generator is not None else device
    pick = torch.rand(pool, generator=generator, device=dev).argsort()[:n] + lo
    rows = torch.cat([pick, torch.full((1,), length - 1, dtype=pick.dtype, device=dev)]).sort().values
    return rows.to(device) if device is not None else rows


def teacher_probs(q_rows: torch.Tensor, keys: torch.Tensor, scaling: float, allowed: torch.Tensor) -> torch.Tensor:
    """Group-mean teacher ``[B, H_kv, R, L]`` (float32): for each KV head the mean over its query
    heads of ``softmax(q k^T * scaling)`` over the allowed keys. ``q_rows [B, H_q, R, D]``,
    ``keys [B, H_kv, L, D]``, ``allowed bool [B, 1, R, L]``."""
    b, hq, r, d = q_rows.shape
    hkv = keys.shape[1]
    q = q_rows.float().view(b, hkv, hq // hkv, r, d)
    logits = torch.einsum("bhgrd,bhld->bhgrl", q, keys.float()) * scaling
    logits = logits.masked_fill(~allowed[:, :, None], float("-inf"))
    return torch.softmax(logits, dim=-1).mean(dim=2)


def student_logits(predictor: ButlerPredictor, layer: int, producer_out: torch.Tensor, keys: torch.Tensor,
                   rope=None) -> torch.Tensor:
    """Predicted scores ``[B, H_kv, R, L]`` of layer ``layer`` for the rows in ``producer_out``
    (the producer's output ``[B, R, n, H_sel, d']``, already given the rows' positions by
    ``ButlerPredictor.position_queries``) over every key, exactly as decode scores them; ``rope`` the
    base's ``(cos, sin)`` of every key position."""
    q_sel = predictor.layer_queries(layer, producer_out)  # [B, R, H_sel, d']
    sketch = predictor.project_keys(layer, keys, rope)  # [B, H_kv, L, d']
    return score_tokens(q_sel, sketch, keys.shape[1]).transpose(1, 2)


def row_rope(cap: Captured):
    """The rotary angles ``[B or 1, R, D]`` of the sampled rows."""
    return tuple(t.index_select(1, cap.rows) for t in cap.rope)


def distill_loss(predictor: ButlerPredictor, cap: Captured) -> tuple[torch.Tensor, torch.Tensor]:
    """The v2 loss: ``mean_l CE(P_l, Q_l)`` over the sampled rows; returns ``(loss, kl)`` where ``kl``
    (no gradient) is the loss minus the teacher's entropy, 0 for a perfect student."""
    cfg = predictor.config
    rows_rope = row_rope(cap)
    outs = {k: predictor.position_queries(predictor.producer_queries(k, h), rows_rope) for k, h in cap.hidden.items()}
    ces, ents = [], []
    for layer in sorted(cap.k):
        producer, _ = cfg.producer_of(layer)
        keys = cap.k[layer]
        allowed = rows_allowed(cap, layer, keys.shape[0])
        with torch.no_grad():
            p = teacher_probs(cap.q[layer], keys, cap.scaling[layer], allowed)
            ents.append(-(torch.xlogy(p, p)).sum(-1).mean())
        s = student_logits(predictor, layer, outs[producer], keys, cap.rope)
        logq = torch.log_softmax(s.masked_fill(~allowed, float("-inf")), dim=-1)
        ces.append(-(p * logq.masked_fill(~allowed, 0.0)).sum(-1).mean())
    loss = torch.stack(ces).mean()
    kl = loss.detach() - torch.stack(ents).mean()
    return loss, kl
