"""`butler-zoo demo`: dense and TokenButler decode side by side on a long context (see butler_zoo.demo)."""

from __future__ import annotations

import click

from butler_zoo.cli.generate import DTYPES, _device
from butler_zoo.cli.options import policy_options


@click.command("demo")
@click.option("--predictor", "-p", default=None, metavar="PATH_OR_REPO_ID",
              help="Predictor folder or Hub repo id. Default: the SmolLM2-135M-Instruct predictor shipped with butler-zoo.")
@policy_options
@click.option("--max-new-tokens", "-n", type=click.IntRange(min=1), default=8, show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda or cuda:N.")
@click.option("--dtype", type=click.Choice(["auto", *DTYPES]), default="auto", show_default=True,
              help="auto: bfloat16 on CUDA, float32 on CPU.")
def demo_cmd(predictor, budget, sinks, window, prediction_interval, max_new_tokens, device, dtype):
    """Show TokenButler on a 3.4K-token context: dense and sparse decode side by side.

    The prompt names a ship in a note, then runs through Genesis 1-4, then asks to finish a sentence
    that only the note answers. Prints both answers, whether they name the ship, the fraction of the KV
    cache the sparse decode read, and the time of each (about a minute on a 2-core CPU).
    """
    import torch

    from butler_zoo.auto import AutoButler
    from butler_zoo.demo import run_demo
    from butler_zoo.zoo import default_predictor

    device = _device(device)
    torch_dtype = getattr(torch, dtype) if dtype != "auto" else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    predictor = predictor or str(default_predictor())
    click.echo(f"Loading {predictor} ...", err=True)
    model = AutoButler.from_pretrained(predictor, budget=budget, sinks=sinks, window=window,
                                       prediction_interval=prediction_interval, dtype=torch_dtype).to(device)
    tokenizer = AutoButler.tokenizer(predictor)
    run_demo(model, tokenizer, max_new_tokens=max_new_tokens, echo=click.echo)


def register(main: click.Group) -> None:
    main.add_command(demo_cmd)
