"""`butler-zoo push`, `butler-zoo list` and `butler-zoo card`: the zoo on the Hub."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import click

from butler_zoo.cli.options import OutPath, check_output_path

_SEARCH = click.option("--search", "search_dirs", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
                       metavar="DIR", help="Also look for trained predictors in DIR/<repo name> (repeatable). "
                       "Predictors shipped with butler-zoo are always found.")


@click.command("push")
@click.argument("predictor_dir", type=click.Path(path_type=Path))
@click.option("--repo-id", required=True, metavar="ORG/NAME", help="Hub repo to publish to (the recipes' ids: `butler-zoo list`).")
@click.option("--revision", default=None, metavar="BRANCH", help="Branch to commit to (created from main if new). Default: main.")
@click.option("--private", is_flag=True, help="Create the repo as private (ignored if it exists).")
@click.option("--dry-run", is_flag=True, help="Build the repo folder and print what would be uploaded; upload nothing.")
@click.option("--out-dir", type=OutPath("dir"), default=None,
              help="Build the repo folder here (kept). Default: a temporary folder, removed when done.")
@click.option("--export", "export", is_flag=True, help="Add torch.export programs (predictor.pt2, predictor-score.pt2).")
@click.option("--to-local-hub", type=click.Path(file_okay=False, path_type=Path), default=None, metavar="DIR",
              help="Commit to the git repo DIR/models/ORG/NAME instead of uploading (the layout olah serves).")
@click.option("--token", default=None, help="Hugging Face token. Default: HF_TOKEN or `hf auth login`'s.")
@click.option("--recipe", default=None, help="Recipe the predictor was trained with (for the card). Default: matched by repo id / base model.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
def push_cmd(predictor_dir, repo_id, revision, private, dry_run, out_dir, export, to_local_hub, token, recipe, as_json):
    """Publish PREDICTOR_DIR (config.json + model.safetensors [+ training_log.json, eval.json, plots]).

    Builds the adapter-only repo folder (predictor, model card, logs, optional exported programs) and
    uploads it with huggingface_hub (create_repo + upload_folder); the commit message names the
    training commit. Uploading needs a token and online mode, checked before anything is built.

    \b
    Examples:
      butler-zoo push runs/smollm2 --repo-id butler-zoo/SmolLM2-135M-Instruct-butler --dry-run
      butler-zoo push runs/smollm2 --repo-id butler-zoo/SmolLM2-135M-Instruct-butler
      butler-zoo push runs/smollm2 --repo-id butler-zoo/SmolLM2-135M-Instruct-butler --to-local-hub ./hub
    """
    from butler_zoo.push import dry_run_report, push_predictor, result_json

    if dry_run and to_local_hub is not None:
        raise click.UsageError("--dry-run and --to-local-hub exclude each other")
    if dry_run and out_dir is None:
        # push_predictor keeps a dry run's folder (its caller reads it); here it is only reported, then removed.
        with tempfile.TemporaryDirectory(prefix=f"butler-push-{repo_id.split('/')[-1]}-") as tmp:
            result = push_predictor(predictor_dir, repo_id, revision=revision, private=private, token=token, dry_run=True,
                                    out_dir=tmp, export=export, recipe=recipe)
            click.echo(result_json(result) if as_json else dry_run_report(result, revision=revision, private=private, kept=False))
        return
    result = push_predictor(predictor_dir, repo_id, revision=revision, private=private, token=token, dry_run=dry_run,
                            out_dir=out_dir, export=export, to_local_hub=to_local_hub, recipe=recipe)
    if as_json:
        click.echo(result_json(result))
    elif dry_run:
        click.echo(dry_run_report(result, revision=revision, private=private))
    elif result.target == "local-hub":
        click.echo(f"committed {len(result.folder.files)} files to {result.extra['repo_dir']} "
                   f"(branch {revision or 'main'}, commit {result.commit_oid})")
    else:
        click.echo(f"uploaded {len(result.folder.files)} files to {repo_id}: {result.commit_url}")


@click.command("list")
@_SEARCH
@click.option("--markdown", is_flag=True, help="Print a markdown table (the one in the docs).")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_cmd(search_dirs, markdown, as_json):
    """The zoo: every recipe with its base model, predictor size, status and repo id.

    Status: `measured` (trained weights with eval.json), `trained` (weights, no eval.json) or
    `recipe only` (no trained weights yet)."""
    from butler_zoo.cards import zoo_index, zoo_markdown_table

    entries = zoo_index(list(search_dirs))
    for d in search_dirs:
        if not any(e.folder is not None and e.folder.parent.resolve() == d.resolve() for e in entries):
            click.echo(f"note: no trained predictor in {d} (looked for {d}/<repo name>/config.json, e.g. "
                       f"{d / entries[0].repo_id.split('/')[-1]} for {entries[0].recipe})" if entries else
                       f"note: no trained predictor in {d}", err=True)
    if as_json:
        click.echo(json.dumps([{**e.__dict__, "folder": str(e.folder) if e.folder else None} for e in entries], indent=2))
        return
    if markdown:
        click.echo(zoo_markdown_table(entries))
        return
    rows = [("recipe", "base model", "predictor", "status", "repo id")]
    rows += [(e.recipe, e.base_model, f"{e.predictor_parameters / 1e6:.2f}M", e.status, e.repo_id) for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        click.echo("  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip())


@click.command("card")
@click.argument("target", required=False, metavar="[RECIPE_OR_DIR]")
@click.option("--all", "all_recipes", is_flag=True, help="Write the card of every recipe and the index into --out-dir.")
@click.option("--out", type=OutPath("file"), default=None, help="Write the card here (default: print it).")
@click.option("--out-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("model_cards"), show_default=True,
              help="With --all: the folder of the cards.")
@click.option("--check", is_flag=True, help="With --all: fail if the cards in --out-dir differ from freshly generated ones.")
@click.option("--repo-id", default=None, help="For a folder: the repo id the card names (default: its recipe's).")
@click.option("--recipe", default=None, help="For a folder: its recipe (default: matched by repo id / base model).")
@click.option("--template", type=click.Path(dir_okay=False, exists=True, path_type=Path), default=None,
              help="Template to render (default: butler_zoo/templates/model_card.md).")
@_SEARCH
def card_cmd(target, all_recipes, out, out_dir, check, repo_id, recipe, template, search_dirs):
    """Generate a model card from a recipe name or a trained predictor folder.

    Numbers come only from the folder's eval.json and training_log.json. A recipe without trained
    weights gets a card that says so in its first line. Cards are validated before they are written.

    \b
    Examples:
      butler-zoo card smollm2-135m-instruct
      butler-zoo card butler_zoo/predictors/SmolLM2-135M-Instruct-butler --out README.md
      butler-zoo card --all --out-dir model_cards          # regenerate every card
      butler-zoo card --all --out-dir model_cards --check  # CI: are they up to date?
    """
    from butler_zoo import cards

    if all_recipes:
        if target:
            raise click.UsageError("give either RECIPE_OR_DIR or --all")
        if not check:
            check_output_path(out_dir, "dir", "--out-dir")
        _all_cards(cards, out_dir, check, list(search_dirs), template)
        return
    if not target:
        raise click.UsageError("give a recipe name or a predictor folder, or --all (recipes: `butler-zoo list`)")
    if Path(target).is_dir():
        inputs = cards.card_inputs_for_folder(target, repo_id=repo_id, recipe=cards.recipe_by_name(recipe) if recipe else None)
    else:
        inputs = cards.card_inputs_for_recipe(cards.recipe_by_name(target), list(search_dirs))
    card = cards.build_card(inputs, template)
    cards.validate_card(card, eval_json=inputs.eval, eval_extra_json=inputs.eval_extra, eval_by_length_json=inputs.eval_by_length)
    if out is None:
        click.echo(str(card), nl=False)
    else:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(str(card))
        click.echo(f"wrote {out} ({inputs.status})", err=True)


def _all_cards(cards, out_dir: Path, check: bool, search_dirs, template) -> None:
    import tempfile

    if not check:
        for path in cards.generate_cards(out_dir, search_dirs, template):
            click.echo(f"wrote {path}")
        return
    with tempfile.TemporaryDirectory() as tmp:
        fresh = cards.generate_cards(tmp, search_dirs, template)
        stale = [p.name for p in fresh if not (out_dir / p.name).is_file() or (out_dir / p.name).read_text() != p.read_text()]
    if stale:
        raise click.ClickException(f"model cards out of date in {out_dir}: {', '.join(stale)}; regenerate with "
                                   f"`butler-zoo card --all --out-dir {out_dir}`")
    click.echo(f"{len(fresh)} model cards in {out_dir} are up to date")


def register(main: click.Group) -> None:
    main.add_command(push_cmd)
    main.add_command(list_cmd)
    main.add_command(card_cmd)
