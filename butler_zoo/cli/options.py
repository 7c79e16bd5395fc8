"""Shared option types of the CLI."""

from __future__ import annotations

import click

from butler_zoo.errors import BudgetError
from butler_zoo.policy import parse_budget


class BudgetType(click.ParamType):
    """A token count (``512``), a fraction (``0.1``) or a percentage (``10%``) of the context."""

    name = "BUDGET"

    def convert(self, value, param, ctx):
        try:
            return parse_budget(value)
        except BudgetError as e:
            self.fail(str(e), param, ctx)


BUDGET = BudgetType()


def policy_options(f):
    """--budget / --sinks / --window / --interval, defaulting to the predictor's policy."""
    f = click.option("--interval", "prediction_interval", type=click.IntRange(min=1), default=None,
                     help="Run the predictor every N decode steps (N > 1 adds neighbor fetching). Default: the predictor's.")(f)
    f = click.option("--window", type=click.IntRange(min=1), default=None,
                     help="Most recent tokens always attended, the current one included. Default: the predictor's.")(f)
    f = click.option("--sinks", type=click.IntRange(min=0), default=None,
                     help="First tokens always attended. Default: the predictor's.")(f)
    f = click.option("--budget", type=BUDGET, default=None,
                     help="Predicted tokens per layer and KV head: a count (512), fraction (0.1) or percentage (10%) of the context. Default: the predictor's.")(f)
    return f
