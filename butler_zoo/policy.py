"""The decode policy: sinks + local window + top-B predicted tokens per layer and KV head.

**One meaning of the budget** everywhere (this class, the CLI's ``--budget``, SGLang's
``--tokenbutler-budget``, the evaluation and the docs): the number of cached positions a decode step reads
per layer and KV head **in all**, sinks, window and the current token included. ``512`` reads 512 positions,
``0.1`` or ``"10%"`` reads 10% of the row's context (rounded up). The predictor picks what is left after the
sinks and the window (``max_budget``); sinks and window are always read, so a budget below ``sinks +
window`` reads exactly those. A context that fits in the budget is attended densely.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, replace

from butler_zoo.errors import BudgetError

__all__ = ["SparsePolicy", "parse_budget"]


@dataclass(frozen=True)
class SparsePolicy:
    """How a decode step chooses what to attend to.

    Args:
        sinks: first tokens of the context that every step attends to (attention sinks).
        window: most recent tokens every step attends to, the current token included (>= 1).
        budget: cached positions each decode step reads per layer and KV head in all, sinks and window
            included. An ``int`` is a count; a ``float`` in ``(0, 1]`` is a fraction of the context (per row,
            rounded up); a string is parsed by :func:`parse_budget` (``"512"``, ``"0.1"``, ``"10%"``).
        prediction_interval: run the predictor every ``i``-th decode step and reuse its selection in
            between (the window keeps moving). ``i > 1`` turns on neighbor fetching, which can double
            the selected set (TokenButler v2, METHOD.md §4).
    """

    sinks: int = 4
    window: int = 64
    budget: int | float = 0.25
    prediction_interval: int = 1

    def __post_init__(self):
        if isinstance(self.budget, str):
            object.__setattr__(self, "budget", parse_budget(self.budget))
        for name in ("sinks", "window", "prediction_interval"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise BudgetError(f"{name} must be an int, got {value!r}")
        if self.sinks < 0:
            raise BudgetError(f"sinks must be >= 0, got {self.sinks}")
        if self.window < 1:
            raise BudgetError(f"window must be >= 1 (it always holds the current token), got {self.window}")
        if self.prediction_interval < 1:
            raise BudgetError(f"prediction_interval must be >= 1, got {self.prediction_interval}")
        b = self.budget
        if isinstance(b, bool) or not isinstance(b, (int, float)):
            raise BudgetError(f"budget must be a count of positions (int), a fraction of the context (float) or a string "
                              f"such as '10%', got {b!r}")
        if isinstance(b, float) and not (0.0 < b <= 1.0 and math.isfinite(b)):
            raise BudgetError(
                f"a fractional budget must be in (0, 1], got {b}; pass an int for a token count "
                "(e.g. budget=512) or a fraction (e.g. budget=0.1 for 10% of the context)"
            )
        if isinstance(b, int) and b < 0:
            raise BudgetError(f"a token budget must be >= 0 (positions read in all), got {b}")

    @property
    def neighbor_fetch(self) -> bool:
        return self.prediction_interval > 1

    def read_budget(self, context: int) -> int:
        """Positions a decode step over ``context`` cached positions may read in all (before the floor of
        sinks + window)."""
        if isinstance(self.budget, float):
            return min(context, math.ceil(self.budget * context))
        return min(context, self.budget)

    def max_budget(self, context: int) -> int:
        """Predicted (selected) slots for a context of ``context`` positions: what the budget leaves after the
        sinks and the window; a static bound for kernels."""
        return max(0, self.read_budget(context) - self.sinks - self.window)

    def with_overrides(self, **overrides) -> "SparsePolicy":
        """A copy with the given fields replaced (``None`` values are ignored)."""
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def to_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        b = f"{self.budget:.0%} of the context" if isinstance(self.budget, float) else f"{self.budget} positions"
        s = f"{b} read per step in all: {self.sinks} sinks + {self.window}-token window + the top predicted tokens"
        if self.prediction_interval > 1:
            s += f", predicted every {self.prediction_interval} steps with neighbor fetching"
        return s


def parse_budget(text: str | int | float) -> int | float:
    """A budget from text, with one meaning (the module docstring): ``512`` or ``1e3`` (positions read in
    all), ``0.1`` or ``10%`` (a fraction of the context). A number with a decimal point or an exponent is a
    fraction when it is at most 1 and a count when it is a larger whole number; checked by
    :class:`SparsePolicy`. Raises :class:`BudgetError` naming the fix. The CLI's ``--budget`` and SGLang's
    ``--tokenbutler-budget`` both parse with this."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value: int | float = text
    else:
        s = str(text).strip()
        try:
            if s.endswith("%"):
                value = float(s[:-1]) / 100.0
            elif any(c in s for c in ".eE"):
                value = float(s)
            else:
                value = int(s)
        except ValueError:
            raise BudgetError(
                f"{text!r} is not a budget: give a count of positions read per step (e.g. 512) or a fraction of the "
                "context (0.1 or 10%)"
            ) from None
        if isinstance(value, float) and value > 1.0 and not s.endswith("%"):
            if not value.is_integer():
                raise BudgetError(
                    f"{text!r} is not a budget: a number above 1 is a count of positions and must be whole "
                    "(e.g. 512); a fraction of the context is at most 1 (0.1 or 10%)"
                )
            value = int(value)
    try:
        SparsePolicy(budget=value)
    except BudgetError as e:
        raise BudgetError(f"{text!r} is not a budget: {e}") from None
    return value
