"""`butler-zoo export`: the predictor's producer and score steps as torch.export programs (.pt2)."""

from __future__ import annotations

import click

from butler_zoo.cli.options import OutPath
from butler_zoo.errors import ButlerError

DTYPES = ("float32", "bfloat16", "float16")


@click.command("export")
@click.argument("predictor", metavar="PATH_OR_REPO_ID")
@click.option("--out", required=True, type=OutPath("file"), metavar="FILE.pt2",
              help="The producer-step program; the score step goes next to it as FILE-score.pt2.")
@click.option("--producer", type=click.IntRange(min=0), default=None,
              help="Export only producer K (hidden [B, E] -> queries), the unit a decode loop calls. Default: all producers at once.")
@click.option("--score/--no-score", default=True, show_default=True, help="Also export the score step (queries + sketch -> scores).")
@click.option("--revision", default=None, help="Revision of the predictor repo.")
@click.option("--dtype", type=click.Choice(DTYPES), default="float32", show_default=True)
@click.option("--check/--no-check", default=True, show_default=True,
              help="Reload each program with torch.export.load and compare it with eager on random inputs.")
def export_cmd(predictor, out, producer, score, revision, dtype, check):
    """torch.export the predictor's producer step (and its score step) to .pt2 files.

    An exported program runs without butler-zoo's Python model code: reload it with
    `torch.export.load(FILE).module()`, compile it ahead of time (AOTInductor), or hand it to a
    runtime that consumes .pt2 files. Batch (and, for the score step, context length) are dynamic.

    \b
    Inputs and outputs (E hidden size, P producers, n_k layers served by producer k, H_sel predicted
    heads, H_kv KV heads, d' sketch width, T context length):
      producer step, all:   hidden [P, B, E] -> tuple of P tensors [B, n_k, H_sel, d']
      producer step, --producer K: hidden [B, E] -> [B, n_K, H_sel, d']
      score step:           q_sel [B, H_sel, d'], sketch [B, H_kv, T, d'] -> float32 [B, H_kv, T]

    \b
    Examples:
      butler-zoo export ./my-predictor --out predictor.pt2
      butler-zoo export ./my-predictor --out producer3.pt2 --producer 3 --no-score
    """
    import torch

    from butler_zoo.export import check_exported, export_predictor
    from butler_zoo.predictor import ButlerPredictor

    model = ButlerPredictor.from_pretrained(predictor, revision=revision).to(getattr(torch, dtype)).eval()
    paths = export_predictor(model, out, producer=producer, score=score)
    tol = 1e-5 if dtype == "float32" else 1e-2
    for path in paths:
        line = f"wrote {path} ({path.stat().st_size:,} bytes)"
        if check:
            diff = check_exported(path, model)
            if diff > tol:
                raise ButlerError(f"{path}: the reloaded program differs from eager by {diff:.3g} (> {tol:g})")
            line += f"; reloaded with torch.export.load, max |exported - eager| = {diff:.3g}"
        click.echo(line)


def register(main: click.Group) -> None:
    main.add_command(export_cmd)
