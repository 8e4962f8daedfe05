"""What every model family offers the rest of Lamina, whatever its HF parameter names.

The loader, the KV cache, the generation loop, placement and quantization reach a model only
through these methods, so a family whose checkpoint says `transformer.wte` / `transformer.h`
(GPT-2) works as well as one that says `model.embed_tokens` / `model.layers` (Llama).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
from torch import nn

from lamina.config import ModelConfig


class CausalLM(nn.Module, ABC):
    """Base of the causal language models: token ids in, next-token logits out.

    A family sets `config_class`, `no_split_modules` (blocks placement must keep whole) and
    `ignored_checkpoint_keys` (regexes of stored tensors it recomputes), implements `forward`,
    `input_embeddings`, `decoder_layers` and `cache_layout`, and overrides `sanitize` when its
    checkpoint stores a weight in another layout than the module holds it.
    """

    config_class: type[ModelConfig]
    no_split_modules: tuple[str, ...] = ()
    ignored_checkpoint_keys: tuple[str, ...] = ()
    # Some checkpoints name tensors without the base model's prefix (GPT-2's `h.0...` for
    # `transformer.h.0...`, OPT's `decoder...` for `model.decoder...`); the loader adds it back.
    base_model_prefix: str = "model"
    config: ModelConfig

    @abstractmethod
    def input_embeddings(self) -> nn.Embedding:
        """The token embedding table (its device and dtype are the model's input side)."""

    def output_embeddings(self) -> nn.Linear:
        """The output projection to vocabulary logits."""
        return self.lm_head

    @abstractmethod
    def decoder_layers(self) -> nn.ModuleList:
        """The repeated blocks, in order; the KV cache keeps one slot per entry."""

    @abstractmethod
    def cache_layout(self) -> list[tuple[int, int]]:
        """(kv_heads, head_dim) of each decoder layer, for sizing a KV cache."""

    def tie_weights(self) -> None:
        """Share the embedding matrix with the output layer when the config says so (a GGUF's Q8_0
        embedding kept as blocks already shares its tiles with the head: nothing to tie)."""
        if self.config.tie_word_embeddings and isinstance(self.input_embeddings(), nn.Embedding):
            self.output_embeddings().weight = self.input_embeddings().weight

    def sanitize(self, name: str, tensor: torch.Tensor) -> torch.Tensor:
        """A checkpoint tensor in the layout this model's parameter `name` expects (default: as stored)."""
        return tensor
