"""The TokenButler predictor (paper v2 with our fixes, METHOD.md §2).

One module serves training, the transformers runtime, SGLang and ``torch.export``:

* producer ``k`` reads the residual stream after decoder layer ``k*G`` and emits, through
  ``LayerNorm -> Linear(E, I) -> SiLU -> Linear(I, n*H*d')``, one d'-dim query per head for each of
  the ``n <= G`` layers it serves (``k*G+1 .. k*G+G``); layer 0 runs dense;
* keys are not predicted: layer ``l`` projects its real keys with ``W_l [H_kv, D, d']`` (the
  *sketch*, cached next to K/V);
* the score of a cached token is ``<q~, k~> / sqrt(d')`` (``butler_kernels.reference.score_tokens``).

Format 2 (``config.format_version``) makes the score position-consistent: the keys are un-rotated
(pre-RoPE) before ``W_l``, and the sketch and the predicted query are rotated with the base's own
rotary angles at their positions on the pairs ``config.rope_pairs`` names. Every runtime passes the
base's ``(cos, sin)`` of the positions involved (``rope=``: ``[..., D]`` as transformers computes them,
or ``[..., D/2]``); a score then depends on a key's content and its distance to the query only. Format
1 projected post-RoPE keys and gave the query no position: a key's score depended on where it sat in
the context, which the predictor had only seen up to its training length.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from huggingface_hub import ModelHubMixin
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from butler_kernels.reference import rotate_pairs, unrotate_keys
from butler_zoo.config import CONFIG_NAME, WEIGHTS_NAME, ButlerConfig
from butler_zoo.errors import ButlerError, PredictorWeightsError

__all__ = ["ButlerPredictor", "QueryProducer"]


class QueryProducer(nn.Module):
    """LayerNorm + two-layer SiLU MLP emitting ``n_layers * n_heads`` queries of width ``d'``."""

    def __init__(self, hidden_size: int, mlp_dim: int, n_layers: int, n_heads: int, sketch_dim: int):
        super().__init__()
        self.out_shape = (n_layers, n_heads, sketch_dim)
        self.norm = nn.LayerNorm(hidden_size)
        self.fc1 = nn.Linear(hidden_size, mlp_dim, bias=False)
        self.fc2 = nn.Linear(mlp_dim, n_layers * n_heads * sketch_dim, bias=False)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., E] -> [..., n_layers, n_heads, d']``"""
        return self.from_normed(self.norm(hidden))

    def from_normed(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The MLP after the norm: ``[..., E] -> [..., n_layers, n_heads, d']``. ``out`` (``[n,
        n_layers * n_heads * d']`` for ``x [n, E]``) receives the result in place: a runtime's
        preallocated query buffer, without a copy."""
        h = nn.functional.silu(self.fc1(x))
        if out is None:
            return self.fc2(h).unflatten(-1, self.out_shape)
        torch.mm(h, self.fc2.weight.t(), out=out)
        return out.unflatten(-1, self.out_shape)


class ButlerPredictor(
    nn.Module,
    ModelHubMixin,
    library_name="butler-zoo",
    tags=["tokenbutler", "sparse-attention", "kv-cache"],
    repo_url="https://github.com/butler-zoo/butler-zoo",
    paper_url="https://arxiv.org/abs/2503.07518",
):
    """Scores every cached token for every served layer and KV head of a frozen base model.

    Save/load follow the ``huggingface_hub`` mixin conventions: ``save_pretrained(dir)`` writes
    ``config.json`` + ``model.safetensors`` (never pickle), ``from_pretrained(repo_or_dir)`` reads them
    from a folder, the Hub or the local HF cache, ``push_to_hub(repo_id)`` uploads.
    """

    def __init__(self, config: ButlerConfig):
        super().__init__()
        if isinstance(config, dict):
            config = ButlerConfig.from_dict(config)
        self.config = config
        c = config
        self.producers = nn.ModuleList(
            QueryProducer(c.hidden_size, c.mlp_dim, len(c.served_layers(k)), c.num_query_heads, c.sketch_dim)
            for k in range(c.num_producers)
        )
        # Row l-1 projects the keys of layer l (layer 0 runs dense and has no sketch).
        self.key_proj = nn.Parameter(torch.empty(c.num_hidden_layers - 1, c.num_key_value_heads, c.head_dim, c.sketch_dim))
        pairs = c.rope_pairs if c.format_version >= 2 else []
        self.register_buffer("rope_pairs", torch.tensor(pairs, dtype=torch.long), persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        for p in self.producers:
            p.norm.reset_parameters()
            for lin in (p.fc1, p.fc2):
                bound = math.sqrt(6.0 / (lin.in_features + lin.out_features))  # Xavier-uniform
                lin.weight.uniform_(-bound, bound, generator=generator)
        # A random projection keeps <q~, k~> informative from the start; scale keeps sketch ~ keys.
        self.key_proj.normal_(0.0, 1.0 / math.sqrt(self.config.head_dim), generator=generator)

    # ----- the method --------------------------------------------------------------------------
    def producer_queries(self, producer: int, hidden: torch.Tensor) -> torch.Tensor:
        """Queries of producer ``producer`` from the residual stream after layer ``producer*G``.

        ``hidden [..., E] -> [..., n_served, H_sel, d']`` in ``hidden``'s dtype."""
        mod = self.producers[producer]
        return mod(hidden.to(mod.fc1.weight.dtype)).to(hidden.dtype)

    def producer_queries_from_normed(self, producer: int, normed: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """:meth:`producer_queries` after the producer's LayerNorm (``producers[producer].norm``),
        for runtimes that fuse the norm with the base's deferred residual add
        (``butler_kernels.residual_layer_norm``): ``normed [n, E]`` in the predictor's dtype,
        ``out`` as in :meth:`QueryProducer.from_normed`."""
        return self.producers[producer].from_normed(normed, out)

    @property
    def position_consistent(self) -> bool:
        """Format 2: the sketch and the queries need the base's rotary angles (``rope=``)."""
        return self.config.format_version >= 2

    def _half_angles(self, rope, what: str) -> tuple[torch.Tensor, torch.Tensor]:
        if rope is None:
            raise ButlerError(
                f"this predictor (format {self.config.format_version}) needs the base's rotary angles of the {what}' "
                "positions (rope=(cos, sin)); the runtime did not pass them"
            )
        cos, sin = rope
        half = self.config.head_dim // 2
        if cos.shape[-1] == 2 * half:  # transformers' layout repeats the D/2 angles
            cos, sin = cos[..., :half], sin[..., :half]
        return cos, sin

    def project_keys(self, layer: int, keys: torch.Tensor, rope=None) -> torch.Tensor:
        """Sketch of layer ``layer``'s keys: ``keys [B, H_kv, T, D]`` post-RoPE -> ``[B, H_kv, T, d']``.

        Format 2: ``rope = (cos, sin)`` of the keys' positions, ``[B or 1, T, D or D/2]``."""
        w = self.key_proj[layer - 1]
        k = keys.to(w.dtype)
        if self.position_consistent:
            cos, sin = self._half_angles(rope, "keys")
            cos, sin = cos.to(w.dtype)[:, None], sin.to(w.dtype)[:, None]
            k = unrotate_keys(k, cos, sin)
        out = torch.einsum("bhtd,hde->bhte", k, w)
        if self.position_consistent:
            out = rotate_pairs(out, cos, sin, self.rope_pairs)
        return out.to(keys.dtype)

    def position_queries(self, queries: torch.Tensor, rope=None) -> torch.Tensor:
        """Give predicted queries ``[..., n, H_sel, d']`` their position: format 2 rotates them with
        ``rope = (cos, sin)`` ``[..., D or D/2]`` of the query tokens (leading dims as ``queries``');
        format 1 returns them unchanged."""
        if not self.position_consistent:
            return queries
        cos, sin = self._half_angles(rope, "queries")
        cos, sin = cos[..., None, None, :].to(queries.dtype), sin[..., None, None, :].to(queries.dtype)
        return rotate_pairs(queries, cos, sin, self.rope_pairs)

    def layer_queries(self, layer: int, producer_out: torch.Tensor) -> torch.Tensor:
        """Slice a producer's output for one served layer: ``[..., n, H_sel, d'] -> [..., H_sel, d']``."""
        _, slot = self.config.producer_of(layer)
        return producer_out[..., slot, :, :]

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # ----- hub mixin -----------------------------------------------------------------------------
    def _save_pretrained(self, save_directory: Path) -> None:
        self.config.save(save_directory)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(tensors, str(Path(save_directory) / WEIGHTS_NAME), metadata={"format": "pt", "butler_zoo": "predictor"})

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path: str | Path,
        *,
        force_download: bool = False,
        token: str | bool | None = None,
        cache_dir: str | Path | None = None,
        local_files_only: bool = False,
        revision: str | None = None,
        map_location: str | torch.device = "cpu",
    ) -> "ButlerPredictor":
        """Load a predictor from a local folder, a Hub repo id, or the local Hugging Face cache.

        Same signature as ``huggingface_hub``'s mixins; the config is read and validated by
        :class:`ButlerConfig` (the mixin's generic config handling is bypassed on purpose)."""
        return cls._from_pretrained(
            model_id=str(pretrained_model_name_or_path),
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
            map_location=map_location,
        )

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir,
        force_download: bool,
        local_files_only: bool,
        token,
        map_location: str | torch.device = "cpu",
        **kwargs,
    ) -> "ButlerPredictor":
        from butler_zoo.hub import resolve_predictor_files  # lazy: hub pulls in network code

        config_path, weights_path = resolve_predictor_files(
            model_id,
            revision=revision,
            cache_dir=cache_dir,
            force_download=force_download,
            local_files_only=local_files_only,
            token=token,
        )
        config = ButlerConfig.load(config_path)
        model = cls(config)
        model.load_weights(weights_path, map_location=map_location)
        return model

    def load_weights(self, path: str | Path, map_location: str | torch.device = "cpu") -> None:
        """Load ``model.safetensors``, refusing missing, unknown or misshapen tensors."""
        path = Path(path)
        if not path.is_file():
            raise PredictorWeightsError(f"predictor weights not found: {path} (expected `{WEIGHTS_NAME}` next to `{CONFIG_NAME}`)")
        try:
            state = load_file(str(path), device=str(map_location))
        except (SafetensorError, OSError, ValueError) as e:
            raise PredictorWeightsError(f"{path} is not a readable safetensors file ({e}); it is corrupted or truncated, download it again") from e
        expected = self.state_dict()
        unknown = sorted(set(state) - set(expected))
        missing = sorted(set(expected) - set(state))
        if unknown or missing:
            raise PredictorWeightsError(
                f"{path} does not match its config: unknown tensors {unknown[:8]}{'...' if len(unknown) > 8 else ''}, "
                f"missing tensors {missing[:8]}{'...' if len(missing) > 8 else ''}"
            )
        bad = [f"{k}: file {tuple(state[k].shape)} vs config {tuple(v.shape)}" for k, v in expected.items() if state[k].shape != v.shape]
        if bad:
            raise PredictorWeightsError(f"{path} has tensors whose shapes contradict its config: {bad[:4]}")
        self.load_state_dict(state)
