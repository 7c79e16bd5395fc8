"""The ``butler-zoo`` command line. Each command lives in its own module of this package.

Commands from other packages plug in through the ``butler_zoo.commands`` entry-point group (``train``
and ``eval`` come from ``butler_training.cli`` that way), so this package never imports them by name.

One error path for every command (:class:`ButlerGroup`): a failure prints one ``Error: ...`` line that
names the problem and the fix and exits 1 (2 for a bad argument, click's convention); the traceback
only with ``butler-zoo --debug`` or ``BUTLER_DEBUG=1``. Command modules import nothing heavy at module
level (torch, transformers are imported inside the commands), so ``--help`` and ``--version`` are fast.
"""

from __future__ import annotations

import importlib
import sys

import click

from butler_zoo import __version__
from butler_zoo.cli.errors import user_message

# Modules that add commands to `main` (each defines `register(main)`).
COMMAND_MODULES = [
    "butler_zoo.cli.generate",
    "butler_zoo.cli.demo",
    "butler_zoo.cli.info",
    "butler_zoo.cli.hub",
    "butler_zoo.cli.export",
]
# Entry-point group of the commands other packages add (each entry: a click command).
PLUGIN_GROUP = "butler_zoo.commands"

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class ButlerGroup(click.Group):
    """A click group that turns every error of a command into one ``Error: ...`` line (exit 1).

    Errors click already reports (usage errors: exit 2, ``click.ClickException``: exit 1) pass through
    unchanged; ``SystemExit("message")`` (the training modules' way to stop) becomes ``Error: message``;
    anything else becomes :func:`butler_zoo.cli.errors.user_message`. With ``--debug`` the exception
    propagates with its traceback.
    """

    def invoke(self, ctx: click.Context):
        debug = bool(ctx.params.get("debug"))
        try:
            return super().invoke(ctx)
        except (click.ClickException, click.exceptions.Exit, click.Abort, KeyboardInterrupt):
            raise
        except SystemExit as e:
            if isinstance(e.code, str) and not debug:
                raise click.ClickException(e.code.strip()) from None
            raise
        except Exception as e:  # noqa: BLE001 - the one place where errors become messages
            if debug:
                raise
            raise click.ClickException(user_message(e)) from None


@click.group(cls=ButlerGroup, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, prog_name="butler-zoo")
@click.option("--debug", is_flag=True, envvar="BUTLER_DEBUG",
              help="Show the full traceback of an error (also: BUTLER_DEBUG=1).")
def main(debug):
    """TokenButler learned sparse decoding for Llama and Mistral models.

    A tiny predictor scores every cached token per layer and KV head; decode attends only to
    sinks + a local window + the top-B predicted tokens, while the full KV cache is kept.

    \b
    Examples:
      butler-zoo demo                      # dense vs TokenButler on a 3.4K-token context
      butler-zoo generate "The capital of France is"
      butler-zoo generate "Tell me a story." --budget 0.1 --compare-dense
      butler-zoo info ./my-predictor
    """


def _plugin_entry_points():
    """The group's entry points of every distribution on sys.path. Not ``entry_points(group=...)``: that keeps
    one distribution per name, and a stale ``*.egg-info`` in the current folder (a source checkout) would
    then hide the installed one's."""
    from importlib.metadata import distributions

    for dist in distributions():
        for ep in dist.entry_points:
            if ep.group == PLUGIN_GROUP:
                yield ep


def _add_plugin_commands(group: click.Group) -> None:
    for ep in _plugin_entry_points():
        if ep.name in group.commands:
            continue  # one distribution seen twice on sys.path
        try:
            command = ep.load()
        except Exception as e:  # noqa: BLE001 - a broken plugin must not take the other commands down
            print(f"butler-zoo: the command {ep.name!r} ({ep.value}) could not be loaded: {user_message(e)}", file=sys.stderr)
            continue
        group.add_command(command, ep.name)


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(main)
_add_plugin_commands(main)
