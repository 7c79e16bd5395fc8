"""Publishing a predictor: build the adapter-only repo folder, then upload it or commit it to a local hub.

The repo folder holds the predictor (``config.json`` + ``model.safetensors``, copied byte for byte),
the model card (``README.md``, :mod:`butler_zoo.cards`), the trainer's ``training_log.json`` /
``loss.png`` and the evaluator's ``eval.json`` / ``eval_ppl.png`` when the predictor folder has them,
and optionally the ``torch.export`` programs (:mod:`butler_zoo.export`). Upload goes through
``huggingface_hub`` (``create_repo`` + ``upload_folder``, plus ``create_branch`` for a new branch),
with a commit message that names the training commit. ``to_local_hub`` instead commits the folder to
a git repository laid out as ``DIR/models/ORG/NAME``, which :func:`butler_zoo.hub.serve_local_hub`
(olah) serves through the Hub API.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from butler_zoo.config import CONFIG_NAME, WEIGHTS_NAME, ButlerConfig
from butler_zoo.errors import ButlerError, network_cause
from butler_zoo.hub import CARD_NAME, EXPORT_FILES, REPO_FILES, check_repo_id, local_hub_repo_dir

__all__ = ["PushError", "RepoFolder", "PushResult", "check_upload_allowed", "build_repo_folder", "push_predictor",
           "commit_to_local_hub", "training_commit"]

# Where the trainer may record the code commit it ran: keys of config.training, then of
# training_log.json["versions"] (first match wins).
COMMIT_KEYS = ("code_commit", "git_commit", "commit", "butler_zoo_commit", "git")


class PushError(ButlerError):
    """Publishing is not possible as asked (no token, offline, bad repo id, bad folder)."""


@dataclass
class RepoFolder:
    """A built repo folder: its path, the files it holds (repo paths) and the commit message."""

    path: Path
    files: list[str]
    commit_message: str
    training_commit: str | None

    def describe(self) -> list[str]:
        lines = []
        for name in self.files:
            f = self.path / name
            lines.append(f"{name:<22} {f.stat().st_size:>12,} bytes  sha256 {hashlib.sha256(f.read_bytes()).hexdigest()[:16]}")
        return lines


@dataclass
class PushResult:
    folder: RepoFolder
    repo_id: str
    revision: str | None
    target: str  # "hub", "local-hub" or "dry-run"
    commit_oid: str | None = None
    commit_url: str | None = None
    extra: dict = field(default_factory=dict)


def check_upload_allowed(token: str | None = None) -> str:
    """The token to upload with; raises :class:`PushError` when offline or when there is none."""
    from huggingface_hub import constants, get_token

    # huggingface_hub reads HF_HUB_OFFLINE once, at import; read it again for a caller that set it since.
    if constants.is_offline_mode() or os.environ.get("HF_HUB_OFFLINE", "").upper() in {"1", "ON", "YES", "TRUE"}:
        raise PushError(
            "cannot push: offline mode is on (HF_HUB_OFFLINE=1). Unset it to upload, use --dry-run to only build the "
            "repo folder, or --to-local-hub DIR to commit it to a local hub"
        )
    token = token or get_token()
    if not token:
        raise PushError(
            "cannot push: no Hugging Face token. Log in with `hf auth login`, set HF_TOKEN, or pass --token; "
            "use --dry-run to only build the repo folder"
        )
    return token


def training_commit(config: ButlerConfig, training_log: dict | None) -> str | None:
    """The code commit the predictor was trained with, as recorded by the trainer (or ``None``)."""
    sources = [config.training or {}, (training_log or {}).get("versions") or {}]
    for source in sources:
        for key in COMMIT_KEYS:
            value = source.get(key)
            if isinstance(value, str) and value.strip():
                return value.strip()
    return None


def _commit_message(repo_id: str, config: ButlerConfig, commit: str | None) -> str:
    trained = f"training commit {commit}" if commit else "training commit not recorded"
    return f"Upload {repo_id.split('/')[-1]}: TokenButler predictor for {config.base_model} ({trained})"


def _check_predictor_folder(predictor_dir: Path) -> ButlerConfig:
    if not predictor_dir.is_dir():
        raise PushError(f"{predictor_dir} is not a folder; pass the folder that holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    for name in (CONFIG_NAME, WEIGHTS_NAME):
        if not (predictor_dir / name).is_file():
            raise PushError(f"{predictor_dir} has no {name}: not a predictor folder (write one with ButlerPredictor.save_pretrained)")
    config = ButlerConfig.load(predictor_dir)
    if (config.training or {}).get("smoke_test"):
        raise PushError(f"{predictor_dir} was trained as a smoke test ({config.training['smoke_test']}); train on the real "
                        "base weights (butler-zoo train --recipe NAME without --base-config) before publishing")
    if not _is_hub_id(config.base_model):
        raise PushError(
            f"{predictor_dir}/{CONFIG_NAME} pins the base model {config.base_model!r}, which is not a Hub repo id; a published "
            "predictor must name its base as ORG/NAME (set base_model, and base_model_revision, in the config)"
        )
    return config


def _is_hub_id(name: str) -> bool:
    try:
        check_repo_id(name)
    except ButlerError:
        return False
    return not Path(name).expanduser().exists()


def build_repo_folder(
    predictor_dir: str | Path,
    out_dir: str | Path,
    *,
    repo_id: str,
    export: bool = False,
    recipe=None,
    template_path: str | Path | None = None,
) -> RepoFolder:
    """Write the repo folder of ``predictor_dir`` into ``out_dir`` (created; must be empty or absent).

    The predictor is loaded once to check that its weights match its config. ``export=True`` adds
    ``predictor.pt2`` / ``predictor-score.pt2`` (those already in ``predictor_dir`` are copied anyway)."""
    from butler_zoo.cards import build_card, card_inputs_for_folder, recipe_by_name, validate_card
    from butler_zoo.predictor import ButlerPredictor

    predictor_dir, out_dir = Path(predictor_dir), Path(out_dir)
    check_repo_id(repo_id)
    if isinstance(recipe, str):
        recipe = recipe_by_name(recipe)
    config = _check_predictor_folder(predictor_dir)
    predictor = ButlerPredictor.from_pretrained(predictor_dir)  # refuses weights that do not match the config
    if out_dir.exists() and any(out_dir.iterdir()):
        raise PushError(f"{out_dir} is not empty; the repo folder is built into an empty or new folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in (n for n in REPO_FILES if (predictor_dir / n).is_file()):
        shutil.copyfile(predictor_dir / name, out_dir / name)
    if export:
        from butler_zoo.export import export_predictor

        export_predictor(predictor, out_dir / EXPORT_FILES[0])
    inputs = card_inputs_for_folder(out_dir, repo_id=repo_id, recipe=recipe)
    card = build_card(inputs, template_path)
    validate_card(card, eval_json=inputs.eval, eval_extra_json=inputs.eval_extra, eval_by_length_json=inputs.eval_by_length)
    card.save(out_dir / CARD_NAME)
    files = sorted(p.name for p in out_dir.iterdir() if p.is_file())
    commit = training_commit(config, inputs.training_log)
    return RepoFolder(out_dir, files, _commit_message(repo_id, config, commit), commit)


def push_predictor(
    predictor_dir: str | Path,
    repo_id: str,
    *,
    revision: str | None = None,
    private: bool = False,
    token: str | None = None,
    dry_run: bool = False,
    out_dir: str | Path | None = None,
    export: bool = False,
    to_local_hub: str | Path | None = None,
    endpoint: str | None = None,
    recipe=None,
    template_path: str | Path | None = None,
) -> PushResult:
    """Build the repo folder of ``predictor_dir`` and publish it as ``repo_id``.

    Targets: the Hub (``endpoint``, default ``HF_ENDPOINT`` / huggingface.co) with ``huggingface_hub``;
    ``to_local_hub=DIR``: a commit in the git repo ``DIR/models/ORG/NAME``; ``dry_run``: build only.
    ``revision`` is the branch to commit to (created from ``main`` if new; default ``main``).
    Uploading needs a token and online mode; both are checked before anything is built. The folder is
    built in ``out_dir`` (kept) or in a temporary folder (removed after an upload, kept for a dry run).
    """
    check_repo_id(repo_id)
    upload = not dry_run and to_local_hub is None
    if upload:
        token = check_upload_allowed(token)
    predictor_dir = Path(predictor_dir)
    _check_predictor_folder(predictor_dir)
    keep = out_dir is not None or dry_run
    work = Path(out_dir) if out_dir is not None else Path(tempfile.mkdtemp(prefix=f"butler-push-{repo_id.split('/')[-1]}-"))
    try:
        folder = build_repo_folder(predictor_dir, work, repo_id=repo_id, export=export, recipe=recipe, template_path=template_path)
        if dry_run:
            return PushResult(folder, repo_id, revision, "dry-run")
        if to_local_hub is not None:
            sha = commit_to_local_hub(folder, to_local_hub, repo_id, revision=revision)
            return PushResult(folder, repo_id, revision, "local-hub", commit_oid=sha,
                              extra={"repo_dir": str(local_hub_repo_dir(to_local_hub, repo_id))})
        return _upload(folder, repo_id, revision=revision, private=private, token=token, endpoint=endpoint)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


def _upload(folder: RepoFolder, repo_id: str, *, revision, private, token, endpoint) -> PushResult:
    from huggingface_hub import HfApi

    from huggingface_hub.errors import HfHubHTTPError

    api = HfApi(endpoint=endpoint or os.environ.get("HF_ENDPOINT") or None, token=token)
    where = api.endpoint
    try:
        api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        info = api.upload_folder(
            repo_id=repo_id,
            repo_type="model",
            folder_path=str(folder.path),
            revision=revision,
            commit_message=folder.commit_message,
        )
    except HfHubHTTPError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise PushError(f"the Hub at {where} answered the upload to {repo_id} with an error ({first}); check the repo id "
                        "and that your token may write to it (`hf auth whoami`)") from e
    except Exception as e:
        if network_cause(e) is None:
            raise
        raise PushError(f"cannot push: the Hub at {where} cannot be reached ({type(e).__name__}: {e}). Check the network "
                        "connection and HF_ENDPOINT, or use --dry-run to only build the repo folder, or --to-local-hub DIR "
                        "to commit it to a local hub") from e
    return PushResult(folder, repo_id, revision, "hub", commit_oid=info.oid, commit_url=info.commit_url)


# ----- local hub (git) ---------------------------------------------------------------------------------

_GIT_ENV = {
    "GIT_AUTHOR_NAME": "butler-zoo push",
    "GIT_AUTHOR_EMAIL": "butler-zoo@localhost",
    "GIT_COMMITTER_NAME": "butler-zoo push",
    "GIT_COMMITTER_EMAIL": "butler-zoo@localhost",
}


def _git(repo: Path, *args: str) -> str:
    env = {**os.environ, **_GIT_ENV, "GIT_CONFIG_NOSYSTEM": "1"}
    try:
        done = subprocess.run(["git", *args], cwd=repo, env=env, check=True, capture_output=True, text=True)
    except FileNotFoundError as e:
        raise PushError("--to-local-hub needs the `git` command, which is not installed") from e
    except subprocess.CalledProcessError as e:
        raise PushError(f"git {' '.join(args)} failed in {repo}: {e.stderr.strip() or e.stdout.strip()}") from e
    return done.stdout.strip()


def commit_to_local_hub(folder: RepoFolder, hub_dir: str | Path, repo_id: str, *, revision: str | None = None) -> str:
    """Commit ``folder``'s files to branch ``revision`` (default ``main``) of ``hub_dir/models/ORG/NAME``.

    Like ``upload_folder``: files are added or replaced, other files of the branch stay. A new branch
    starts from ``main``. Returns the commit sha (which is also a valid ``revision`` to download)."""
    repo = local_hub_repo_dir(hub_dir, repo_id)
    branch = revision or "main"
    if not (repo / ".git").is_dir():
        repo.mkdir(parents=True, exist_ok=True)
        _git(repo, "init", "-q", "-b", "main")
    has_commits = subprocess.run(["git", "rev-parse", "-q", "--verify", "HEAD"], cwd=repo, capture_output=True).returncode == 0
    if has_commits:
        if _git(repo, "status", "--porcelain"):
            raise PushError(f"{repo} has uncommitted changes; commit or discard them before pushing to it")
        exists = subprocess.run(["git", "rev-parse", "-q", "--verify", f"refs/heads/{branch}"], cwd=repo, capture_output=True).returncode == 0
        if exists:
            _git(repo, "checkout", "-q", branch)
        else:
            _git(repo, "checkout", "-q", "-b", branch, "main")
    elif branch != "main":
        raise PushError(f"{repo_id} has no commit in {hub_dir} yet: push to main first, then to branch {branch!r}")
    for name in folder.files:
        shutil.copyfile(folder.path / name, repo / name)
    _git(repo, "add", "--", *folder.files)
    _git(repo, "commit", "-q", "--allow-empty", "-m", folder.commit_message)
    sha = _git(repo, "rev-parse", "HEAD")
    if branch != "main":
        _git(repo, "checkout", "-q", "main")  # the work tree shows main, as the Hub's default branch
    return sha


def dry_run_report(result: PushResult, *, revision: str | None, private: bool, kept: bool = True) -> str:
    """What a dry run would upload, as printed by ``butler-zoo push --dry-run`` (``kept``: the folder stays)."""
    f = result.folder
    where = f"Repo folder: {f.path}" if kept else "The repo folder was temporary and is removed (--out-dir DIR keeps it)."
    lines = [
        f"dry run: nothing uploaded. {where}",
        f"would upload to {result.repo_id} (branch {revision or 'main'}, {'private' if private else 'public'}) with "
        "huggingface_hub create_repo + upload_folder:",
        *[f"  {line}" for line in f.describe()],
        f"commit message: {f.commit_message}",
    ]
    return "\n".join(lines)


def result_json(result: PushResult) -> str:
    return json.dumps({
        "repo_id": result.repo_id, "revision": result.revision, "target": result.target, "folder": str(result.folder.path),
        "files": result.folder.files, "commit_message": result.folder.commit_message, "commit_oid": result.commit_oid,
        "commit_url": result.commit_url, **result.extra,
    }, indent=2)
