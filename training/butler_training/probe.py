"""Decode-simulated evaluation: the contract between selection methods and the evaluation harness.

The harness runs one teacher-forced forward pass over a window of ``L`` tokens. Rows ``i < P`` are a
dense causal prefill. Every row ``i >= P`` stands for a decode step: it may attend only to the
positions its method selected among ``0..i``, at most ``budgets[i]`` of them, always including ``i``
itself. Perplexity is measured on rows ``>= P``; layer 0 always runs dense.

Per layer, the harness captures post-RoPE ``q`` and ``k`` into an ``AttentionProbe``, asks each
``SelectionMethod`` for its allowed-mask (``bool [B, H, L, L]``, ``H`` = KV heads for one selection
shared by a query group, or query heads), and applies it with ``masked_attention``. Budgets count
every position a row reads (sinks, window, current token and selected tokens alike), so methods are
compared at equal KV reads; ``attended_fraction`` reports what each method really read (SnapKV reads
more than the budget during decode, see its module).

Sinks + window + top-scored is TokenButler's policy shape (``fixed_positions`` + ``select_top``):
the oracle and the learned predictor both go through it, so their gap is prediction quality alone.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F

__all__ = [
    "AttentionProbe",
    "DecodePlan",
    "SelectionMethod",
    "attended_fraction",
    "causal_allowed",
    "check_allowed",
    "default_scaling",
    "expand_heads",
    "fixed_positions",
    "mass_recall",
    "mass_recall_rows",
    "mass_recall_by_distance",
    "masked_attention",
    "select_top",
    "topk_overlap",
]


@dataclasses.dataclass
class DecodePlan:
    """Which rows of a window are decode steps, and how many positions each may read.

    ``budgets[i]`` counts every position row ``i`` attends, the current token included; only rows
    ``>= prefill_len`` are constrained, each to ``1 <= budgets[i] <= i + 1``. ``sinks`` and
    ``window`` parametrise the methods that keep them (the window includes the current token)."""

    prefill_len: int
    budgets: torch.Tensor
    sinks: int = 4
    window: int = 32

    def __post_init__(self) -> None:
        b = torch.as_tensor(self.budgets)
        if b.dim() != 1 or b.dtype.is_floating_point or b.dtype == torch.bool:
            raise ValueError(f"budgets must be a 1-D integer tensor [L], got {tuple(b.shape)} {b.dtype}")
        self.budgets = b.to(torch.int64)
        L, P = b.numel(), self.prefill_len
        if not 1 <= P <= L:
            raise ValueError(f"prefill_len must be in [1, L={L}], got {P}")
        if self.sinks < 0 or self.window < 1:
            raise ValueError(f"need sinks >= 0 and window >= 1 (the current token), got {self.sinks}, {self.window}")
        rows = torch.arange(P, L)
        dec = self.budgets[P:]
        bad = (dec < 1) | (dec > rows + 1)
        if bad.any():
            i = int(rows[bad][0])
            raise ValueError(f"budgets[{i}] = {int(self.budgets[i])} is outside [1, {i + 1}] (row {i} sees {i + 1} positions)")

    @property
    def length(self) -> int:
        return self.budgets.numel()

    @classmethod
    def fixed(cls, length: int, prefill_len: int, budget: int, **kw) -> "DecodePlan":
        """The same token budget for every decode row (capped at the row's context ``i + 1``)."""
        if budget < 1:
            raise ValueError(f"budget must be >= 1 token, got {budget}")
        return cls(prefill_len, torch.clamp(torch.arange(1, length + 1), max=budget), **kw)

    @classmethod
    def fraction(cls, length: int, prefill_len: int, fraction: float, **kw) -> "DecodePlan":
        """``ceil(fraction * (i + 1))`` positions for row ``i``, as the runtime's fractional budgets."""
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {fraction}")
        ctx = torch.arange(1, length + 1, dtype=torch.float64)
        b = torch.ceil(ctx * fraction).to(torch.int64)
        return cls(prefill_len, torch.clamp(b, min=1), **kw)


@dataclasses.dataclass
class AttentionProbe:
    """One layer of one batch of windows: post-RoPE ``q [B, H_q, L, D]``, ``k [B, H_kv, L, D]`` and
    the model's softmax scale. Dense logits/probabilities are computed on first use and cached; the
    harness drops the probe after the layer. Query head ``h`` belongs to KV head ``h // (H_q/H_kv)``
    (transformers' ``repeat_kv`` order)."""

    layer_idx: int
    q: torch.Tensor
    k: torch.Tensor
    scaling: float
    _logits: torch.Tensor | None = dataclasses.field(default=None, init=False, repr=False)
    _probs: torch.Tensor | None = dataclasses.field(default=None, init=False, repr=False)
    _group_probs: torch.Tensor | None = dataclasses.field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.q.dim() != 4 or self.k.dim() != 4:
            raise ValueError(f"q and k must be [B, H, L, D], got {tuple(self.q.shape)} and {tuple(self.k.shape)}")
        (b, hq, L, d), (bk, hkv, Lk, dk) = self.q.shape, self.k.shape
        if (b, L, d) != (bk, Lk, dk):
            raise ValueError(f"q {tuple(self.q.shape)} and k {tuple(self.k.shape)} disagree on batch, length or head dim")
        if hq % hkv:
            raise ValueError(f"{hq} query heads do not group evenly over {hkv} KV heads")

    @property
    def batch(self) -> int:
        return self.q.shape[0]

    @property
    def num_heads(self) -> int:
        return self.q.shape[1]

    @property
    def num_kv_heads(self) -> int:
        return self.k.shape[1]

    @property
    def group_size(self) -> int:
        return self.num_heads // self.num_kv_heads

    @property
    def length(self) -> int:
        return self.q.shape[2]

    def logits(self) -> torch.Tensor:
        """float32 ``[B, H_q, L, L]`` scaled scores, ``-inf`` above the diagonal."""
        if self._logits is None:
            b, hq, L, d = self.q.shape
            qg = self.q.float().view(b, self.num_kv_heads, self.group_size, L, d)
            s = torch.einsum("bhgid,bhjd->bhgij", qg, self.k.float()).reshape(b, hq, L, L) * self.scaling
            self._logits = s.masked_fill(~causal_allowed(L, s.device), float("-inf"))
        return self._logits

    def probs(self) -> torch.Tensor:
        """Dense causal attention ``[B, H_q, L, L]``."""
        if self._probs is None:
            self._probs = torch.softmax(self.logits(), dim=-1)
        return self._probs

    def group_probs(self) -> torch.Tensor:
        """``[B, H_kv, L, L]``: the mean of each KV head's query heads' attention, i.e. the mass a
        selection shared by the group captures on average (the distillation teacher, METHOD.md §3)."""
        if self._group_probs is None:
            b, hq, L, _ = self.q.shape
            self._group_probs = self.probs().view(b, self.num_kv_heads, self.group_size, L, L).mean(2)
        return self._group_probs


@runtime_checkable
class SelectionMethod(Protocol):
    """A baseline or learned selection. ``allowed`` returns ``bool [B, H, L, L]`` with ``H`` = H_kv
    (shared per KV head) or H_q: rows ``< P`` the causal mask; row ``i >= P`` a subset of ``0..i`` of
    size ``<= budgets[i]`` containing ``i``. A method that knowingly reads more than the budget
    (SnapKV keeps every decoded token) sets the class attribute ``respects_budget = False``."""

    name: str

    def allowed(self, probe: AttentionProbe, plan: DecodePlan) -> torch.Tensor: ...


def causal_allowed(length: int, device: torch.device | str | None = None) -> torch.Tensor:
    """``bool [L, L]``, True on and below the diagonal."""
    return torch.ones(length, length, dtype=torch.bool, device=device).tril()


def _check_plan(probe: AttentionProbe, plan: DecodePlan) -> None:
    if plan.length != probe.length:
        raise ValueError(f"plan covers {plan.length} rows but the probe has L={probe.length}")


def fixed_positions(plan: DecodePlan, device: torch.device | str | None = None) -> torch.Tensor:
    """``bool [L, L]``: what the sinks + window policy reads before any selection.

    Rows ``< P``: causal. Row ``i >= P``: the current token, then up to ``sinks`` first tokens, then
    the ``window - 1`` tokens before ``i``, each part cut so the total stays within ``budgets[i]``
    (so tiny budgets keep the current token and sinks first, as StreamingLLM does). With a budget of
    at least ``sinks + window`` this is exactly the runtime's sinks ``[0, S)`` and window
    ``[i - W + 1, i]`` (kernels/butler_kernels/reference.py)."""
    L, P = plan.length, plan.prefill_len
    b = plan.budgets.to(device)[:, None]
    i = torch.arange(L, device=device)[:, None]
    j = torch.arange(L, device=device)[None, :]
    n_sinks = torch.clamp(b - 1, max=plan.sinks)
    n_window = torch.minimum(torch.full_like(b, plan.window - 1), b - 1 - n_sinks)
    fixed = (j == i) | (j < n_sinks) | ((j >= i - n_window) & (j < i))
    fixed &= j <= i
    fixed[:P] = causal_allowed(L, device)[:P]
    return fixed


def select_top(scores: torch.Tensor, fixed: torch.Tensor, plan: DecodePlan) -> torch.Tensor:
    """``fixed`` plus, for each decode row, the highest-scoring other causal positions until the
    row's budget is full. ``scores [B, H, L, L]`` (NaN not allowed; ties broken by position, lower
    first); ``fixed [L, L]`` as from ``fixed_positions``. Returns ``bool [B, H, L, L]``."""
    if scores.dim() != 4 or scores.shape[-2:] != (plan.length, plan.length):
        raise ValueError(f"scores must be [B, H, {plan.length}, {plan.length}], got {tuple(scores.shape)}")
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN")
    L, P = plan.length, plan.prefill_len
    causal = causal_allowed(L, scores.device)
    cand = causal & ~fixed
    # A candidate scored -inf must still rank above every non-candidate.
    s = scores.float().clamp(min=torch.finfo(torch.float32).min).masked_fill(~cand, float("-inf"))
    extra = (plan.budgets.to(scores.device) - fixed.sum(-1)).clamp(min=0)  # [L]
    order = torch.sort(s, dim=-1, descending=True, stable=True).indices
    take = (torch.arange(L, device=scores.device)[None, :] < extra[:, None]).expand_as(order)
    out = torch.zeros(s.shape, dtype=torch.bool, device=s.device).scatter_(-1, order, take)
    out |= fixed
    out[..., :P, :] = causal[:P]
    return out


def expand_heads(allowed: torch.Tensor, num_heads: int) -> torch.Tensor:
    """View an allowed-mask ``[L, L]`` or ``[B, H, L, L]`` (``H`` in {1, H_kv, H_q}) per query head:
    ``[B or 1, num_heads or 1, L, L]``; a KV head's mask is repeated for its query group."""
    if allowed.dim() == 2:
        return allowed[None, None]
    if allowed.dim() != 4:
        raise ValueError(f"allowed must be [L, L] or [B, H, L, L], got {tuple(allowed.shape)}")
    h = allowed.shape[1]
    if h in (1, num_heads):
        return allowed
    if num_heads % h:
        raise ValueError(f"an allowed-mask of {h} heads does not group {num_heads} query heads")
    return allowed.repeat_interleave(num_heads // h, dim=1)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scaling: float) -> torch.Tensor:
    """Attention of ``q [B, H_q, L, D]`` over ``k, v [B, H_kv, L, D]`` restricted to ``allowed``
    (``[L, L]`` or ``[B, H, L, L]`` with ``H`` in {1, H_kv, H_q}; every row must allow at least its
    own position, which every method guarantees). Returns ``[B, H_q, L, D_v]`` in ``q``'s dtype."""
    hq, hkv = q.shape[1], k.shape[1]
    if hq % hkv or v.shape[1] != hkv:
        raise ValueError(f"q has {hq} heads, k {hkv}, v {v.shape[1]}: need H_q % H_kv == 0 and equal k/v heads")
    mask = expand_heads(allowed.to(torch.bool), hq).to(q.device)
    if hq != hkv:
        k = k.repeat_interleave(hq // hkv, dim=1)
        v = v.repeat_interleave(hq // hkv, dim=1)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scaling)


def _decode_rows(allowed: torch.Tensor, plan: DecodePlan) -> torch.Tensor:
    if plan.prefill_len >= plan.length:
        raise ValueError("the plan has no decode rows (prefill_len == L)")
    a = allowed if allowed.dim() == 4 else allowed[None, None]
    if a.shape[-2:] != (plan.length, plan.length):
        raise ValueError(f"allowed is {tuple(allowed.shape)}, the plan has L={plan.length}")
    return a[..., plan.prefill_len :, :]


def attended_fraction(allowed: torch.Tensor, plan: DecodePlan) -> float:
    """Mean over decode rows (and batch, heads) of ``attended positions / (i + 1)``: what a method
    really reads, whatever its nominal budget."""
    rows = _decode_rows(allowed, plan)
    ctx = torch.arange(plan.prefill_len + 1, plan.length + 1, device=rows.device, dtype=torch.float32)
    return float((rows.sum(-1).float() / ctx).mean())


def mass_recall(allowed: torch.Tensor, probe: AttentionProbe, plan: DecodePlan) -> float:
    """Fraction of the true attention mass a selection keeps, averaged over decode rows, heads and
    batch. Per KV head (or ``[L, L]``) masks are scored against the group-mean attention, which equals
    the mean over the group's query heads of the mass each keeps; per query head masks against each
    head's own attention."""
    _check_plan(probe, plan)
    kept, _ = _kept_and_teacher(allowed, probe, plan)
    return float(kept.sum(-1).mean())


def _kept_and_teacher(allowed: torch.Tensor, probe: AttentionProbe, plan: DecodePlan) -> tuple[torch.Tensor, torch.Tensor]:
    """``(p * allowed, p)`` over the decode rows: the attention ``p`` a mask of ``allowed``'s heads is scored
    against (each query head's own, or the group mean for per-KV-head and shared masks), kept and whole."""
    h = allowed.shape[1] if allowed.dim() == 4 else 1
    if h == probe.num_heads:
        p = probe.probs()
    elif h in (1, probe.num_kv_heads):
        p = probe.group_probs()
    else:
        raise ValueError(f"allowed has {h} heads; the probe has {probe.num_heads} query / {probe.num_kv_heads} KV heads")
    p = p[..., plan.prefill_len :, :]
    return p * _decode_rows(allowed, plan), p


def mass_recall_rows(allowed: torch.Tensor, probe: AttentionProbe, plan: DecodePlan) -> torch.Tensor:
    """:func:`mass_recall` of each decode row ``P .. L-1`` (mean over batch and heads): ``float [L - P]``,
    for recall by position in the context."""
    _check_plan(probe, plan)
    kept, _ = _kept_and_teacher(allowed, probe, plan)
    return kept.sum(-1).float().mean(dim=tuple(range(kept.dim() - 2)))


def distance_buckets(plan: DecodePlan, edges: tuple[int, ...], device=None) -> torch.Tensor:
    """``int8 [L - P, L]``: the bucket of ``distance = i - j`` of each decode row ``i`` and key ``j``
    (``edges`` ascending, bucket ``b`` is ``[edges[b], edges[b+1])``, the last open); ``-1`` for future
    keys. Distance 0 is the current token."""
    L, P = plan.length, plan.prefill_len
    dist = torch.arange(P, L, device=device)[:, None] - torch.arange(L, device=device)[None, :]
    out = torch.bucketize(dist, torch.tensor(edges[1:], device=device), right=True).to(torch.int8)
    return out.masked_fill(dist < 0, -1)


def mass_recall_by_distance(allowed: torch.Tensor, probe: AttentionProbe, plan: DecodePlan,
                            buckets: torch.Tensor, n_buckets: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kept, total)``, each ``float64 [n_buckets]``: the attention mass a selection keeps and the mass
    there is, summed over decode rows, heads and batch, by the key's distance to the query
    (``buckets`` from :func:`distance_buckets`). ``kept / total`` is the recall at each distance."""
    _check_plan(probe, plan)
    kept, p = _kept_and_teacher(allowed, probe, plan)
    k_sum, p_sum = kept.sum(dim=tuple(range(kept.dim() - 2))), p.sum(dim=tuple(range(p.dim() - 2)))
    out_k = torch.zeros(n_buckets, dtype=torch.float64, device=kept.device)
    out_p = torch.zeros_like(out_k)
    for b in range(n_buckets):
        m = buckets == b
        out_k[b] = k_sum[m].double().sum()
        out_p[b] = p_sum[m].double().sum()
    return out_k, out_p


def topk_overlap(allowed: torch.Tensor, oracle_allowed: torch.Tensor, plan: DecodePlan) -> float:
    """``|selected & oracle| / |oracle|`` per decode row, averaged. Masks with different head counts
    (per KV head vs per query head) are compared per query head. Forced positions (sinks, window,
    current token) count on both sides, as they do in what each method reads."""
    a, o = _decode_rows(allowed, plan), _decode_rows(oracle_allowed, plan)
    ha, ho = a.shape[1], o.shape[1]
    h = max(ha, ho)
    a, o = expand_heads(a, h), expand_heads(o, h)
    inter = (a & o).sum(-1).float()
    return float((inter / o.sum(-1).clamp(min=1).float()).mean())


def check_allowed(allowed: torch.Tensor, plan: DecodePlan, respects_budget: bool = True) -> None:
    """Raise ValueError unless ``allowed`` keeps the contract: bool ``[B, H, L, L]``, rows ``< P``
    causal, no future position, every decode row attends itself and (if ``respects_budget``) at
    most ``budgets[i]`` positions."""
    if allowed.dtype != torch.bool or allowed.dim() != 4 or allowed.shape[-2:] != (plan.length, plan.length):
        raise ValueError(f"allowed must be bool [B, H, {plan.length}, {plan.length}], got {allowed.dtype} {tuple(allowed.shape)}")
    L, P = plan.length, plan.prefill_len
    causal = causal_allowed(L, allowed.device)
    if (allowed & ~causal).any():
        raise ValueError("allowed attends future positions")
    if not torch.equal(allowed[..., :P, :], causal[:P].expand_as(allowed[..., :P, :])):
        raise ValueError(f"rows < prefill_len={P} must be the dense causal mask")
    diag = allowed.diagonal(dim1=-2, dim2=-1)[..., P:]
    if not diag.all():
        raise ValueError("a decode row does not attend its own position")
    if respects_budget:
        over = allowed[..., P:, :].sum(-1) > plan.budgets[P:].to(allowed.device)
        if over.any():
            i = P + int(over.nonzero()[0, -1])
            raise ValueError(f"row {i} attends more than budgets[{i}] = {int(plan.budgets[i])} positions")


def default_scaling(head_dim: int) -> float:
    """``1 / sqrt(D)``, the softmax scale of Llama/Mistral attention."""
    return 1.0 / math.sqrt(head_dim)
