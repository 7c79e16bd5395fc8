"""Shared option types and argument checks of the CLI."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

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
                     help="Positions each decode step reads per layer and KV head in all, sinks and window included: a count "
                          "(512), a fraction (0.1) or a percentage (10%) of the context. Default: the predictor's.")(f)
    return f


def output_path_problem(path: str | os.PathLike, kind: str = "dir") -> str | None:
    """Why ``path`` cannot be written as a ``kind`` (``"dir"`` or ``"file"``), or ``None`` if it can.

    Checked before any model is loaded, creating nothing: the path must not be the other kind, no
    part of it may be a file, and its nearest existing folder must take a new file (tried for real,
    since ``os.access`` says yes to root on a read-only file system)."""
    path = Path(path).expanduser()
    if path.exists():
        if kind == "dir" and not path.is_dir():
            return f"{path} is a file, not a folder"
        if kind == "file" and path.is_dir():
            return f"{path} is a folder; give a file name"
    folder = path if kind == "dir" else path.parent
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        return f"{folder} is a file, so {path} cannot be created under it"
    try:
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".butler-write-check-")
    except OSError as e:
        return f"cannot write in {folder} ({e.strerror or e})"
    os.close(fd)
    os.unlink(probe)
    return None


def check_output_path(path, kind: str = "dir", option: str = "--out") -> None:
    """Raise a click usage error (exit 2) naming ``option`` when ``path`` cannot be written."""
    problem = output_path_problem(path, kind)
    if problem:
        raise click.BadParameter(f"{problem}; choose a path you can write to", param_hint=f"'{option}'")


class OutPath(click.ParamType):
    """A file or folder the command will write: checked when parsed (see :func:`output_path_problem`)."""

    def __init__(self, kind: str = "dir"):
        self.kind = kind
        self.name = "DIR" if kind == "dir" else "FILE"

    def convert(self, value, param, ctx):
        path = Path(value)
        problem = output_path_problem(path, self.kind)
        if problem:
            self.fail(f"{problem}; choose a path you can write to", param, ctx)
        return path
