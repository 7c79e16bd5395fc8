"""`AutoButler`: predictor id in, sparse-decoding transformers model out (the peft AutoPeftModel pattern)."""

from __future__ import annotations

from pathlib import Path

import torch

from butler_zoo.attach import attach_butler
from butler_zoo.base import load_base_model, load_tokenizer
from butler_zoo.policy import SparsePolicy
from butler_zoo.predictor import ButlerPredictor

__all__ = ["AutoButler"]


class AutoButler:
    """Load a TokenButler predictor together with the base model it was trained for.

    Example::

        from butler_zoo import AutoButler
        model = AutoButler.from_pretrained("path/or/org-name", dtype=torch.bfloat16, budget=0.1)
        tok = AutoButler.tokenizer("path/or/org-name")
        out = model.generate(**tok("Hello", return_tensors="pt"), max_new_tokens=32)
    """

    def __init__(self):
        raise EnvironmentError("AutoButler is not instantiated; use AutoButler.from_pretrained(...)")

    @classmethod
    def from_pretrained(
        cls,
        predictor_id_or_path: str | Path,
        *,
        base_model: str | None = None,
        base_model_revision: str | None = None,
        revision: str | None = None,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        force_download: bool = False,
        policy: SparsePolicy | None = None,
        budget: int | float | None = None,
        sinks: int | None = None,
        window: int | None = None,
        prediction_interval: int | None = None,
        predictor_dtype: torch.dtype | None = None,
        allow_other_base: bool = False,
        **model_kwargs,
    ):
        """Load predictor and base, attach, return the base model (``model.butler`` holds the runtime).

        Args:
            predictor_id_or_path: predictor folder or Hub repo id (``ORG/NAME``).
            base_model, base_model_revision: override the base pinned in the predictor's config.
            revision: revision (branch, tag, commit) of the predictor repo.
            policy, budget, sinks, window, prediction_interval: decode policy (defaults: the predictor's).
            model_kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` (``dtype``, ``device_map``...).
        """
        predictor = ButlerPredictor.from_pretrained(
            predictor_id_or_path,
            revision=revision,
            token=token,
            cache_dir=cache_dir,
            local_files_only=local_files_only,
            force_download=force_download,
        )
        model = load_base_model(
            predictor.config,
            base_model,
            base_model_revision,
            **({"token": token} if token is not None else {}),
            **model_kwargs,
        )
        return attach_butler(
            model,
            predictor,
            policy=policy,
            budget=budget,
            sinks=sinks,
            window=window,
            prediction_interval=prediction_interval,
            predictor_dtype=predictor_dtype,
            allow_other_base=allow_other_base or base_model is not None,
        )

    @staticmethod
    def tokenizer(predictor_id_or_path: str | Path, *, base_model: str | None = None, revision: str | None = None, **kwargs):
        """The tokenizer of the base model a predictor was trained for."""
        predictor_config = ButlerPredictor.from_pretrained(predictor_id_or_path, revision=revision, **kwargs).config
        return load_tokenizer(predictor_config, base_model)
