"""`butler-zoo train` and `butler-zoo eval`: front ends of ``python -m butler_training.train`` and
``python -m butler_training.evaluate`` (same options).

They plug into the ``butler-zoo`` command line through the ``butler_zoo.commands`` entry points
(pyproject.toml), so that the library never imports the training package. Before anything is loaded
they check what can be checked from the arguments alone (the recipe name, the data sources, that
``--out`` can be written, that a local ``--predictor`` / ``--base-model`` exists), so a typo costs no
model loading; errors then go through the CLI's one error path (``Error: ...``, exit 1 or 2).
This module imports only click and argparse at import time: ``butler-zoo --help`` loads it.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

# The options are argparse's (they are shared with `python -m ...`): click passes the arguments through.
_PASSTHROUGH = {"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []}


def _wants_help(args) -> bool:
    return any(a in ("-h", "--help") for a in args)


def _print_help(parser) -> None:
    from butler_training.common import HelpFormatter

    parser.formatter_class = HelpFormatter  # each default once; no "(default: None)", no "(default: True)" on --no-*
    parser.print_help()


def _pre_parse(parser, args):
    """The arguments as the module will read them; argparse's own errors (exit 2) surface here."""
    known, _ = parser.parse_known_args(list(args))
    return known


def _check_common(known, split: str) -> None:
    """--out, --predictor, --base-model and --data, as far as they can be checked without loading anything."""
    from butler_zoo.cli.options import output_path_problem
    from butler_zoo.hub import local_path_problem

    out = getattr(known, "out", None)
    if out:
        problem = output_path_problem(out, "dir")
        if problem:
            raise click.UsageError(f"--out {out}: {problem}; choose a folder you can write to")
    for option, value, bare_ok in (("--predictor", getattr(known, "predictor", None), False),
                                   ("--base-model", getattr(known, "base_model", None), True)):
        if value and not Path(value).expanduser().exists():
            problem = local_path_problem(value, bare_names_are_ids=bare_ok)
            if problem:
                raise click.UsageError(f"{option} {value}: {problem}")
    data = getattr(known, "data", None)
    if data:
        from butler_training.data import DataSourceError, resolve_sources

        try:
            resolve_sources(data, split, getattr(known, "data_dir", None))
        except DataSourceError as e:
            raise click.UsageError(f"--data: {e}") from None


@click.command("train", context_settings=_PASSTHROUGH, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def train_cmd(args):
    """Distil a TokenButler predictor from a frozen base model (`butler-zoo train -h` for the options).

    \b
    Examples:
      butler-zoo train --list-recipes
      butler-zoo train --recipe smollm2-135m-instruct --out runs/smollm2
    """
    from butler_training import train

    if _wants_help(args):
        _print_help(train.build_parser())
        return
    known = _pre_parse(train.build_parser(), args)
    if not known.list_recipes:
        if known.recipe is not None:
            from butler_zoo.recipes import UnknownRecipeError, get_recipe

            try:
                get_recipe(known.recipe)
            except UnknownRecipeError as e:
                raise click.UsageError(f"--recipe: {e}") from None
        _check_common(known, "train")
    sys.exit(train.main(list(args), prog_command="butler-zoo train " + " ".join(args)))


@click.command("eval", context_settings=_PASSTHROUGH, add_help_option=False)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def eval_cmd(args):
    """Perplexity, attention-mass recall, generation agreement and co-reference accuracy of TokenButler
    and the baselines at equal budgets (`butler-zoo eval -h` for the options).

    \b
    Examples:
      butler-zoo eval --out runs/eval                      # the shipped SmolLM2 predictor
      butler-zoo eval --predictor runs/smollm2 --windows 8 --methods tokenbutler oracle h2o
    """
    args = list(args)
    if args[:1] != ["--table"]:
        if "--seq-lens" in args:
            from butler_training.by_length import build_parser
        else:
            from butler_training.evaluate import build_parser
        if _wants_help(args):
            _print_help(build_parser())
            return
        _check_common(_pre_parse(build_parser(), args), "all")
    from butler_training.evaluate import main

    sys.exit(main(args, prog_command="butler-zoo eval " + " ".join(args)))
