"""Finding predictor files on disk, in the Hugging Face cache or on the Hub."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import hf_hub_download
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

__all__ = ["resolve_predictor_files"]


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
    if model_id.count("/") != 1 or model_id.startswith(("/", ".", "~")):
        raise ButlerError(
            f"{model_id!r} is neither an existing folder nor a Hub repo id of the form ORG/NAME"
        )
    kwargs = dict(
        repo_id=model_id,
        revision=revision,
        cache_dir=cache_dir,
        force_download=force_download,
        local_files_only=local_files_only,
        token=token,
    )
    where = f"{model_id}" + (f"@{revision}" if revision else "")
    try:
        config = hf_hub_download(filename=CONFIG_NAME, **kwargs)
    except RevisionNotFoundError as e:
        raise ButlerError(f"revision {revision!r} does not exist in the predictor repo {model_id}; check the branch, tag or commit sha") from e
    except RepositoryNotFoundError as e:
        raise ButlerError(f"predictor repo {model_id} not found on {_endpoint()} (or it is private: pass token=... or run `hf auth login`)") from e
    except (LocalEntryNotFoundError, OfflineModeIsEnabled) as e:
        raise ButlerError(
            f"{where} is not in the local Hugging Face cache and the Hub cannot be reached (offline mode or no network). "
            f"Download it once with `hf download {model_id}` while online, or pass a local folder"
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


def _endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT
