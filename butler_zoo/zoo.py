"""Predictors shipped inside the butler-zoo package (no download needed)."""

from __future__ import annotations

from pathlib import Path

from butler_zoo.errors import ButlerError

SHIPPED_DIR = Path(__file__).parent / "predictors"
DEFAULT_PREDICTOR = "SmolLM2-135M-Instruct-butler"


def shipped_predictors() -> dict[str, Path]:
    """Name -> folder of every predictor shipped with the package."""
    if not SHIPPED_DIR.is_dir():
        return {}
    return {p.name: p for p in sorted(SHIPPED_DIR.iterdir()) if (p / "config.json").is_file()}


def default_predictor() -> Path:
    """The predictor `butler-zoo generate` uses when none is given."""
    path = SHIPPED_DIR / DEFAULT_PREDICTOR
    if not (path / "config.json").is_file():
        raise ButlerError(
            f"the default predictor {DEFAULT_PREDICTOR} is not in this installation ({path}); "
            "pass --predictor PATH_OR_REPO_ID"
        )
    return path
