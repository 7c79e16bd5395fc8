"""Resumable training checkpoints: predictor, optimizer, scheduler, data position and RNG states.

A checkpoint is one ``state.pt`` (``torch.save`` of tensors, numbers, strings and lists only, so it
loads with ``weights_only=True``) written to a temporary name and renamed into place: a run killed
while saving keeps its previous checkpoint. The shipped predictor is never a checkpoint: it is
written with ``ButlerPredictor.save_pretrained`` (safetensors) when training ends.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

__all__ = ["CHECKPOINT_FILE", "save_checkpoint", "load_checkpoint", "checkpoint_path"]

CHECKPOINT_FILE = "state.pt"


def checkpoint_path(directory: str | os.PathLike) -> Path:
    return Path(directory) / CHECKPOINT_FILE


def save_checkpoint(directory: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` atomically to ``directory/state.pt``; returns the path."""
    path = checkpoint_path(directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)
    return path


def load_checkpoint(directory: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict[str, Any] | None:
    """The checkpoint in ``directory``, or ``None`` if there is none."""
    path = checkpoint_path(directory)
    if not path.is_file():
        return None
    return torch.load(path, map_location=map_location, weights_only=True)
