"""The ``butler-zoo`` command line. Each command lives in its own module of this package."""

from __future__ import annotations

import importlib

import click

from butler_zoo import __version__

# Modules that add commands to `main` (each defines `register(main)`).
COMMAND_MODULES = [
    "butler_zoo.cli.generate",
    "butler_zoo.cli.info",
    "butler_zoo.cli.hub",
    "butler_zoo.cli.export",
    "butler_zoo.cli.train",
    "butler_zoo.cli.evaluate",
]

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


@click.group(context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, prog_name="butler-zoo")
def main():
    """TokenButler learned sparse decoding for Llama and Mistral models.

    A tiny predictor scores every cached token per layer and KV head; decode attends only to
    sinks + a local window + the top-B predicted tokens, while the full KV cache is kept.

    \b
    Examples:
      butler-zoo generate "The capital of France is"
      butler-zoo generate "Tell me a story." --budget 0.1 --compare-dense
      butler-zoo info ./my-predictor
    """


for _name in COMMAND_MODULES:
    importlib.import_module(_name).register(main)
