"""`butler-zoo train`: distil a predictor (a thin front end of ``python -m butler_training.train``)."""

from __future__ import annotations

import sys

import click


@click.command("train", context_settings={"ignore_unknown_options": True, "allow_extra_args": True,
                                          "help_option_names": []}, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def train_cmd(args):
    """Distil a TokenButler predictor from a frozen base model (`butler-zoo train -h` for the options).

    \b
    Examples:
      butler-zoo train --list-recipes
      butler-zoo train --recipe smollm2-135m-instruct --out runs/smollm2
    """
    from butler_training.train import main

    sys.exit(main(list(args), prog_command="butler-zoo train " + " ".join(args)))


def register(main: click.Group) -> None:
    main.add_command(train_cmd)
