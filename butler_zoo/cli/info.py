"""`butler-zoo info`: what a predictor is for, its shape and its policy."""

from __future__ import annotations

import json
import re

import click

# An absolute path in a recorded value: a folder of the machine the predictor was trained on.
_ABS_PATH = re.compile(r"(?<![\w.])/(?:[^\s/()]+/)*([^\s/()]+)")


def _value(v) -> str:
    """One recorded value in words: numbers with separators, lists joined, machine-local paths cut."""
    if isinstance(v, bool) or v is None:
        return str(v).lower() if v is not None else "none"
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e6 else f"{v:,.0f}"
    if isinstance(v, (list, tuple)):
        return ", ".join(_value(x) for x in v) or "none"
    return _ABS_PATH.sub(lambda m: f".../{m.group(1)}", str(v))


def _training_lines(training: dict, indent: str = "  ") -> list[str]:
    lines = []
    for key, v in sorted(training.items()):
        if key == "base_weights" and isinstance(v, str):
            m = re.fullmatch(r"(/\S+) \((.+)\)", v)  # "<folder on the training machine> (<file>)"
            v = f"{m.group(2)} (a local copy)" if m else v
        if isinstance(v, dict):
            lines.append(f"{indent}{key}:")
            lines += _training_lines(v, indent + "  ")
        else:
            lines.append(f"{indent}{key}: {_value(v)}")
    return lines


@click.command("info")
@click.argument("predictor", required=False, metavar="[PATH_OR_REPO_ID]")
@click.option("--revision", default=None, help="Revision of the predictor repo.")
@click.option("--json", "as_json", is_flag=True, help="Print the full config as JSON.")
def info_cmd(predictor, revision, as_json):
    """Describe a predictor: its base model, shapes, size, default policy and training provenance.

    Without PREDICTOR: the default predictor shipped with butler-zoo."""
    from butler_zoo.predictor import ButlerPredictor
    from butler_zoo.zoo import default_predictor

    shipped = predictor is None
    predictor = predictor or str(default_predictor())
    p = ButlerPredictor.from_pretrained(predictor, revision=revision)
    c = p.config
    if as_json:
        click.echo(json.dumps({**c.to_dict(), "num_parameters": p.num_parameters()}, indent=2, sort_keys=True))
        return
    rev = f" @ {c.base_model_revision}" if c.base_model_revision else ""
    lines = [
        f"predictor:      {predictor}" + (" (the default, shipped with butler-zoo)" if shipped else ""),
        f"base model:     {c.base_model}{rev} (model_type {c.base_model_type})",
    ]
    if c.base_model_source:
        src = c.base_model_source
        lines.append(f"base weights:   {src.get('kind')} {src.get('package', '')}=={src.get('version', '')} {src.get('gguf_file', '')}".rstrip())
        if src.get("note"):
            lines.append(f"                {src['note']}")
    lines += [
        f"base shapes:    {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} query / "
        f"{c.num_key_value_heads} KV heads, head dim {c.head_dim}" + (f", sliding window {c.sliding_window}" if c.sliding_window else ""),
        f"predictor:      {p.num_parameters():,} parameters; {c.num_producers} producers every {c.producer_stride} layers "
        f"(layer 0 dense), sketch d'={c.sketch_dim}, MLP {c.mlp_dim}, queries per {'KV' if c.query_heads == 'kv' else 'query'} head",
        f"default policy: {c.default_policy.describe()}",
    ]
    if c.training:
        lines.append("training:")
        lines += _training_lines(c.training)
    else:
        lines.append("training:       none recorded (untrained or hand-made predictor)")
    click.echo("\n".join(lines))


def register(main: click.Group) -> None:
    main.add_command(info_cmd)
