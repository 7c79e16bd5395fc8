"""What butler-zoo needs to know about a decoder-only transformers model family."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from butler_zoo.errors import UnsupportedModelError


@dataclass(frozen=True)
class ModelFamily:
    """A transformers decoder family laid out as ``<CausalLM>.model.layers[i].self_attn``.

    Llama-style families (Llama, Mistral, and most decoder-only models since) share this layout;
    a family with another layout overrides the two accessors.
    """

    model_type: str
    #: config attribute holding the sliding window, if the family has one
    sliding_window_attr: str | None = None

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        inner = getattr(model, "model", model)
        layers = getattr(inner, "layers", None)
        if not isinstance(layers, nn.ModuleList):
            raise UnsupportedModelError(
                f"{type(model).__name__} has no `.model.layers`; butler-zoo attaches to the causal-LM "
                f"classes of {self.model_type} (e.g. AutoModelForCausalLM)"
            )
        return layers

    def attention(self, layer: nn.Module) -> nn.Module:
        return layer.self_attn

    def shapes(self, config) -> dict:
        heads = config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        window = getattr(config, self.sliding_window_attr, None) if self.sliding_window_attr else None
        return {
            "num_hidden_layers": config.num_hidden_layers,
            "hidden_size": config.hidden_size,
            "num_attention_heads": heads,
            "num_key_value_heads": getattr(config, "num_key_value_heads", None) or heads,
            "head_dim": head_dim,
            "sliding_window": window,
        }
