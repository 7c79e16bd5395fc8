"""TokenButler as a :class:`~butler_training.probe.SelectionMethod` of the decode-simulated evaluation.

It selects exactly as decode does (:mod:`butler_zoo.sparse`): the producer queries come from forward
hooks on decoder layers ``k*G`` (the residual stream output, as in the runtime) and get their positions
from the base's rotary angles (a forward pre-hook on layer 0 reads the ``position_embeddings`` the model
passes its layers), every cached key is sketched with ``ButlerPredictor.project_keys``, scores come from ``reference.score_tokens`` and the
selection from ``reference.select_topk`` with the query rows as batch entries (``start = 0``,
``end = i + 1``, ``budget_per_row``); a prediction interval ``> 1`` refreshes the selection every
``interval`` rows with ``reference.expand_neighbors`` and, in between, reuses it while the window
moves (the runtime's ``_interval_selection``).

Budgets follow the harness: row ``i`` reads ``plan.budgets[i]`` positions in all. The fixed part is
the plan's sinks + window (``probe.fixed_positions``: the current token first, then sinks, then the
window, each cut so the total fits the budget, exactly what the oracle gets), and the predicted
budget is ``budgets[i] - |fixed part|`` (never negative). When the budget covers sinks + window this
is the runtime's policy with ``sinks = plan.sinks``, ``window = plan.window``; below that the sinks and
window shrink per row (passed to ``select_topk`` as per-row tensors).

Neighbor fetching can double the selected set. ``neighbor_budget="half"`` (default) selects half the
predicted budget so that the fetched set fits the row's budget (equal reads for every method);
``"full"`` selects the whole predicted budget and may read up to twice it, as the runtime does.
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import ClassVar

import torch

from butler_kernels import reference as ref
from butler_training.probe import AttentionProbe, DecodePlan, causal_allowed, fixed_positions
from butler_zoo.families import get_family
from butler_zoo.predictor import ButlerPredictor

__all__ = ["TokenButlerSelection", "plan_policy"]


def plan_policy(plan: DecodePlan, device=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per decode row ``i >= P``: ``(sinks, window, predicted budget, fixed)`` where sinks/window are the
    effective counts of ``fixed_positions`` (window includes the current token) and ``fixed [L, L]``."""
    P = plan.prefill_len
    b = plan.budgets.to(device)[P:]
    n_sinks = torch.clamp(b - 1, max=plan.sinks)
    window = torch.minimum(torch.full_like(b, plan.window - 1), b - 1 - n_sinks) + 1
    fixed = fixed_positions(plan, device)
    predicted = (b - fixed[P:].sum(-1)).clamp(min=0)
    return n_sinks, window, predicted, fixed


@dataclasses.dataclass
class TokenButlerSelection:
    """Learned selection, one set per KV head (``H = H_kv``). Attach with ``with method.hooks(model):``."""

    name: ClassVar[str] = "tokenbutler"
    predictor: ButlerPredictor
    interval: int = 1
    neighbor_budget: str = "half"
    _hidden: dict = dataclasses.field(default_factory=dict, init=False, repr=False)
    _queries: dict = dataclasses.field(default_factory=dict, init=False, repr=False)
    _rope: tuple | None = dataclasses.field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise ValueError(f"interval must be >= 1, got {self.interval}")
        if self.neighbor_budget not in ("half", "full"):
            raise ValueError(f"neighbor_budget must be 'half' or 'full', got {self.neighbor_budget!r}")

    @property
    def respects_budget(self) -> bool:
        return self.interval == 1 or self.neighbor_budget == "half"

    @contextlib.contextmanager
    def hooks(self, model):
        """Forward hooks on the producer layers (their output residual stream, all rows)."""
        family = get_family(model.config.model_type)
        layers = family.decoder_layers(model)
        handles = []
        for k, layer_idx in enumerate(self.predictor.config.producer_layers):
            def hook(module, args, output, k=k):
                hidden = output[0] if isinstance(output, tuple) else output
                self._hidden[k] = hidden
                self._queries.pop(k, None)

            handles.append(layers[layer_idx].register_forward_hook(hook))

        def rope_hook(module, args, kwargs):
            from butler_zoo.compat import find_rope

            self._rope = find_rope(module, args, kwargs)

        handles.append(layers[0].register_forward_pre_hook(rope_hook, with_kwargs=True))
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._hidden.clear()
            self._queries.clear()
            self._rope = None

    def _producer_out(self, producer: int) -> torch.Tensor:
        if producer not in self._hidden:
            raise RuntimeError("no producer hidden states: run the model inside `with method.hooks(model):`")
        if producer not in self._queries:
            queries = self.predictor.producer_queries(producer, self._hidden[producer])
            self._queries[producer] = self.predictor.position_queries(queries, self._rope)
        return self._queries[producer]

    @torch.no_grad()
    def allowed(self, probe: AttentionProbe, plan: DecodePlan) -> torch.Tensor:
        layer = probe.layer_idx
        cfg = self.predictor.config
        if cfg.producer_of(layer) is None:
            raise ValueError("layer 0 runs dense; the harness never asks for it")
        producer, _ = cfg.producer_of(layer)
        b, L, P, dev = probe.batch, probe.length, plan.prefill_len, probe.k.device
        hkv = probe.num_kv_heads
        q_sel = self.predictor.layer_queries(layer, self._producer_out(producer))  # [B, L, H_sel, d']
        if q_sel.shape[:2] != (b, L):
            raise RuntimeError(f"producer states {tuple(q_sel.shape[:2])} do not match the probe ({b}, {L})")
        sketch = self.predictor.project_keys(layer, probe.k, self._rope)  # [B, H_kv, L, d']
        n = L - P
        causal = causal_allowed(L, dev)
        if n == 0:
            return causal.expand(b, hkv, L, L)
        sinks, window, predicted, fixed = plan_policy(plan, dev)
        rows = torch.arange(P, L, device=dev)
        refresh = torch.arange(0, n, self.interval, device=dev)  # decode-row indices that predict
        budget_rows = predicted[refresh]
        if self.interval > 1 and self.neighbor_budget == "half":
            budget_rows = budget_rows // 2
        nr = refresh.numel()
        scores = ref.score_tokens(q_sel[:, P + refresh], sketch, hkv)  # [B, nr, H_kv, L]
        flat = scores.reshape(b * nr, hkv, L)
        end = (rows[refresh] + 1).repeat(b)
        start = torch.zeros_like(end)
        s_t, w_t = sinks[refresh].repeat(b), window[refresh].repeat(b)
        k = max(int(budget_rows.max()), 1) if nr else 1
        sel = ref.select_topk(flat, start, end, s_t, w_t, k, budget_rows.repeat(b))
        if self.interval > 1:
            sel = ref.expand_neighbors(sel, start, end, s_t, w_t, L)
        sel = sel.view(b, nr, hkv, -1).transpose(1, 2)  # [B, H_kv, nr, m]
        if self.interval > 1:
            # row i reuses the selection of its refresh row, minus what entered its window (runtime rule)
            sel = sel[:, :, torch.arange(n, device=dev) // self.interval]  # [B, H_kv, n, m]
            sink_hi, win_lo = ref.policy_ranges(torch.zeros_like(rows), rows + 1, sinks, window)
            keep = (sel >= sink_hi[:, None]) & (sel < win_lo[:, None])
            sel = torch.where(keep & (sel >= 0), sel, -1)
        out = torch.zeros(b, hkv, n, L + 1, dtype=torch.bool, device=dev)
        out.scatter_(-1, torch.where(sel >= 0, sel, L), True)
        out = out[..., :L] | fixed[P:]
        return torch.cat([causal[:P].expand(b, hkv, P, L), out], dim=2)
