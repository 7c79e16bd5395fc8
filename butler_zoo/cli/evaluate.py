"""`butler-zoo eval`: decode-simulated evaluation (a thin front end of ``python -m butler_training.evaluate``)."""

from __future__ import annotations

import sys

import click


@click.command("eval", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                         "help_option_names": []}, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def eval_cmd(args):
    """Perplexity, attention-mass recall, generation agreement and co-reference accuracy of TokenButler
    and the baselines at equal budgets (`butler-zoo eval -h` for the options).

    \b
    Examples:
      butler-zoo eval --out runs/eval                      # the shipped SmolLM2 predictor
      butler-zoo eval --predictor runs/smollm2 --windows 8 --methods tokenbutler oracle h2o
    """
    from butler_training.evaluate import main

    sys.exit(main(list(args), prog_command="butler-zoo eval " + " ".join(args)))


def register(main: click.Group) -> None:
    main.add_command(eval_cmd)
