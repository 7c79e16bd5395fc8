"""Finding predictor files on disk, in the Hugging Face cache or on the Hub; the repo layout; a local Hub.

A predictor repo is adapter-only: ``config.json`` + ``model.safetensors`` (the predictor), ``README.md``
(the model card), and, when they exist, the trainer's ``training_log.json`` / ``loss.png``, the
evaluator's ``eval.json`` / ``eval_ppl.png`` and ``torch.export`` programs (``predictor.pt2``,
``predictor-score.pt2``). The base model is never copied.

A *local hub* is a folder of git repositories laid out as ``DIR/models/ORG/NAME``: the layout the
``olah`` Hub server serves (:func:`serve_local_hub`), so the real ``huggingface_hub`` download path
(``hf download``, ``snapshot_download``, ``from_pretrained(repo_id)`` with ``HF_ENDPOINT``) works
against it on loopback, without the real Hub.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Iterator

from huggingface_hub import HfApi, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from butler_zoo.config import CONFIG_NAME, WEIGHTS_NAME
from butler_zoo.errors import ButlerError, PredictorWeightsError

__all__ = [
    "resolve_predictor_files",
    "local_path_problem",
    "check_repo_id",
    "local_hub_repo_dir",
    "serve_local_hub",
    "CARD_NAME",
    "TRAINING_FILES",
    "EVAL_FILES",
    "LENGTH_FILES",
    "EXPORT_FILES",
    "REPO_FILES",
]

CARD_NAME = "README.md"
TRAINING_FILES = ("training_log.json", "loss.png")  # written by the trainer
# written by `butler-zoo eval`; eval_extra.json: a further evaluation with the same schema (other methods,
# windows or machine), shown in its own table because its numbers are not comparable cell for cell
EVAL_FILES = ("eval.json", "eval_ppl.png", "eval_extra.json")
# written by `butler-zoo eval --seq-lens`: quality by context length, with its plots
LENGTH_FILES = ("eval_by_length.json", "eval_by_length.png", "recall_by_position.png")
EXPORT_FILES = ("predictor.pt2", "predictor-score.pt2")  # written by `butler-zoo export`
# Every file a predictor repo may hold besides its card, in a fixed order.
REPO_FILES = (CONFIG_NAME, WEIGHTS_NAME, *TRAINING_FILES, *EVAL_FILES, *LENGTH_FILES, *EXPORT_FILES)


def resolve_predictor_files(
    model_id: str,
    *,
    revision: str | None = None,
    cache_dir=None,
    force_download: bool = False,
    local_files_only: bool = False,
    token=None,
) -> tuple[Path, Path]:
    """``(config.json, model.safetensors)`` of a predictor given as a folder or a Hub repo id."""
    local = Path(model_id).expanduser()
    if local.is_dir():
        if revision is not None:
            raise ButlerError(f"revision={revision!r} was given for the local folder {local}; revisions apply to Hub repo ids only")
        return local / CONFIG_NAME, local / WEIGHTS_NAME
    if local.exists():
        raise ButlerError(f"{local} is a file; pass the folder that holds {CONFIG_NAME} and {WEIGHTS_NAME}")
    problem = local_path_problem(str(model_id))
    kwargs = dict(
        repo_id=model_id,
        revision=revision,
        cache_dir=cache_dir,
        force_download=force_download,
        local_files_only=local_files_only,
        token=token,
    )
    where = f"{model_id}" + (f"@{revision}" if revision else "")
    if problem and not _is_repo_id_form(model_id):
        raise ButlerError(problem)
    if problem:
        # ORG/NAME whose ORG is a folder here: read as a local path, never sent to the Hub; a repo of that
        # name already in the local cache still loads.
        try:
            return (Path(hf_hub_download(filename=CONFIG_NAME, **{**kwargs, "local_files_only": True})),
                    Path(hf_hub_download(filename=WEIGHTS_NAME, **{**kwargs, "local_files_only": True})))
        except Exception as e:  # noqa: BLE001 - any failure means "not in the cache": report the missing folder
            raise ButlerError(problem) from e
    try:
        config = hf_hub_download(filename=CONFIG_NAME, **kwargs)
    except RevisionNotFoundError as e:
        raise ButlerError(f"revision {revision!r} does not exist in the predictor repo {model_id}; check the branch, tag or commit sha") from e
    except RepositoryNotFoundError as e:
        # Some Hub servers (olah, mirrors) answer 401 "repository not found" for a missing revision or
        # file too: look at the repo's refs to tell the three apart.
        raise ButlerError(_not_found_message(model_id, revision, token, where)) from e
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        raise ButlerError(
            f"{where} is not in the local Hugging Face cache and the Hub cannot be reached (offline mode or no network), "
            f"and there is no folder {model_id} here. Download it once with `hf download {model_id}` while online, "
            "or pass a local folder"
        ) from e
    except EntryNotFoundError as e:
        raise ButlerError(f"{where} has no {CONFIG_NAME}: it is not a butler-zoo predictor repo") from e
    except HfHubHTTPError as e:
        raise ButlerError(f"could not fetch {CONFIG_NAME} of {where} from {_endpoint()}: {e}") from e
    try:
        weights = hf_hub_download(filename=WEIGHTS_NAME, **kwargs)
    except (EntryNotFoundError, LocalEntryNotFoundError) as e:
        raise PredictorWeightsError(f"{where} has a config but no {WEIGHTS_NAME} (incomplete upload or cache)") from e
    except HfHubHTTPError as e:
        raise PredictorWeightsError(f"could not fetch {WEIGHTS_NAME} of {where}: {e}") from e
    return Path(config), Path(weights)


def local_path_problem(name: str, *, bare_names_are_ids: bool = False) -> str | None:
    """Why ``name``, which is not an existing path, must be a local path the user mistyped rather than a Hub
    repo id; ``None`` if it may be a repo id (``ORG/NAME`` whose ``ORG`` is no folder here).

    A name is read as a local path when it starts like one (``/``, ``.``, ``~``), has several ``/`` (or
    none, unless ``bare_names_are_ids``: some base models have ids like ``gpt2``), or its first part is an
    existing folder (``runs/my-predictor`` with ``runs/`` here)."""
    if name.count("/") != 0 and not _is_repo_id_form(name):
        return f"no such folder: {name}; check the path (a Hub repo id has the form ORG/NAME)"
    if name.count("/") == 0:
        if bare_names_are_ids and not name.startswith((".", "~")):
            return None
        return f"no such folder: {name!r} (and it is not a Hub repo id, which has the form ORG/NAME); check the name"
    first = name.split("/")[0]
    if Path(first).is_dir():
        return (f"no such folder: {name} (the folder {first}/ exists here, so {name!r} is read as a local path); check "
                f"the path, or for the Hub repo {name} run `hf download {name}` first (a repo in the local cache is found)")
    return None


def _is_repo_id_form(name: str) -> bool:
    return name.count("/") == 1 and not name.startswith(("/", ".", "~")) and "\\" not in name


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def _not_found_message(repo_id: str, revision: str | None, token, where: str) -> str:
    """Why a download answered "repository not found": no repo, no such revision, or no such file.

    Best effort (two more requests); any failure of the probes counts as "repo not found"."""
    api = HfApi()
    try:
        refs = api.list_repo_refs(repo_id, token=token)
    except Exception:  # noqa: BLE001 - a diagnosis must not replace the original error
        return (f"predictor repo {repo_id} not found on {_endpoint()} (or it is private: pass token=... or run `hf auth login`), "
                f"and there is no folder {repo_id} here; check the name")
    try:
        api.model_info(repo_id, revision=revision or "main", token=token)
    except Exception:  # noqa: BLE001
        branches = ", ".join(b.name for b in refs.branches) or "none"
        tags = ", ".join(t.name for t in refs.tags)
        return (
            f"revision {revision or 'main'!r} does not exist in the predictor repo {repo_id} on {_endpoint()}; "
            f"its branches: {branches}" + (f"; its tags: {tags}" if tags else "") + " (or pass a full commit sha)"
        )
    return f"{where} has no {CONFIG_NAME}: it is not a butler-zoo predictor repo"


def check_repo_id(repo_id: str) -> str:
    """Return ``repo_id`` if it has the ``ORG/NAME`` form of a Hub model repo, else raise."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError as e:
        raise ButlerError(f"{repo_id!r} is not a valid Hub repo id: {e}") from e
    if repo_id.count("/") != 1:
        raise ButlerError(f"{repo_id!r} is not a Hub repo id of the form ORG/NAME (e.g. butler-zoo/SmolLM2-135M-Instruct-butler)")
    return repo_id


def local_hub_repo_dir(hub_dir: str | Path, repo_id: str) -> Path:
    """Folder of the git repository of model ``repo_id`` in a local hub (``DIR/models/ORG/NAME``)."""
    org, name = check_repo_id(repo_id).split("/")
    return Path(hub_dir) / "models" / org / name


# ----- a local Hub server -------------------------------------------------------------------------

OLAH_PIN = "olah==0.5.4"


def _olah_cli() -> str:
    for candidate in (Path(sys.executable).parent / "olah-cli", shutil.which("olah-cli")):
        if candidate and Path(candidate).is_file():
            return str(candidate)
    raise ButlerError(
        f"the olah Hub server is not installed (no `olah-cli` next to {sys.executable} or on PATH); "
        f"install it with `pip install {OLAH_PIN}`"
    )


def _free_port(host: str) -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=2).close()
    except urllib.error.HTTPError:
        return True  # any HTTP status means the server is up
    except (urllib.error.URLError, OSError):
        return False
    return True


@contextlib.contextmanager
def serve_local_hub(
    hub_dir: str | Path,
    *,
    host: str = "127.0.0.1",
    port: int | None = None,
    startup_timeout: float = 60.0,
    workdir: str | Path | None = None,
) -> Iterator[str]:
    """Serve a local hub (git repos under ``hub_dir/models/ORG/NAME``) with ``olah`` and yield its URL.

    The server is read-only and offline: it never contacts the real Hub. Point the Hugging Face
    tooling at it with ``HF_ENDPOINT=<url>`` (and ``HF_HUB_DOWNLOAD_TIMEOUT=120``). Its config and
    logs go to ``workdir`` (a temporary folder by default). The server is stopped on exit, also on
    errors. Quirk: olah answers 401 for a missing file or revision, which ``huggingface_hub`` reports
    as ``RepositoryNotFoundError`` (:func:`resolve_predictor_files` tells them apart).

    Example::

        with serve_local_hub("hub") as url:
            subprocess.run(["hf", "download", "org/name", "--local-dir", "x"], env={**os.environ, "HF_ENDPOINT": url})
    """
    hub_dir = Path(hub_dir).resolve()
    if not (hub_dir / "models").is_dir():
        raise ButlerError(f"{hub_dir} is not a local hub: it has no models/ folder (push with `butler-zoo push --to-local-hub {hub_dir}`)")
    cli = _olah_cli()
    port = port or _free_port(host)
    with contextlib.ExitStack() as stack:
        work = Path(workdir) if workdir else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="olah-")))
        work.mkdir(parents=True, exist_ok=True)
        config = work / "olah.toml"
        config.write_text(
            "[basic]\n"
            f'host = "{host}"\nport = {port}\n'
            f'repos-path = "{work / "repos"}"\n'
            f'mirrors-path = ["{hub_dir}"]\n'
            'mirror-scheme = "http"\n'
            f'mirror-netloc = "{host}:{port}"\nmirror-lfs-netloc = "{host}:{port}"\n'
            "[accessibility]\noffline = true\n"
        )
        log_path = work / "olah.log"
        log = stack.enter_context(open(log_path, "wb"))
        proc = subprocess.Popen([cli, "-c", str(config)], cwd=work, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        stack.callback(_stop, proc)
        url = f"http://{host}:{port}"
        deadline = time.monotonic() + startup_timeout
        while not _answers(f"{url}/api/models/butler-zoo/readiness-probe/revision/main"):
            if proc.poll() is not None or time.monotonic() > deadline:
                tail = log_path.read_bytes()[-3000:].decode(errors="replace")
                what = f"exited with status {proc.returncode}" if proc.poll() is not None else f"did not answer within {startup_timeout:.0f} s"
                raise ButlerError(f"the olah Hub server on {url} {what}; its log ({log_path}):\n{tail}")
            time.sleep(0.2)
        yield url


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
