"""llama.cpp's GGUF names -> Hugging Face's: config keys, tensor names, and layout fixes.

A GGUF describes a model with `{arch}.*` metadata keys and `blk.N.attn_q.weight`-style tensor
names; Lamina's models use HF config keys and parameter names. This module holds the tables that
translate one into the other, per GGUF architecture.
"""

from __future__ import annotations

import re
from typing import Any

import torch

# `{arch}.` metadata keys -> HF config keys, shared by the llama.cpp architectures Lamina runs.
_HPARAMS = {
    "block_count": "num_hidden_layers",
    "context_length": "max_position_embeddings",
    "embedding_length": "hidden_size",
    "feed_forward_length": "intermediate_size",
    "attention.head_count": "num_attention_heads",
    "attention.head_count_kv": "num_key_value_heads",
    "attention.key_length": "head_dim",
    "attention.layer_norm_rms_epsilon": "rms_norm_eps",
    "attention.layer_norm_epsilon": "layer_norm_eps",
    "attention.sliding_window": "sliding_window",
    "rope.freq_base": "rope_theta",
    "vocab_size": "vocab_size",
}

# llama.cpp per-layer tensor names -> HF names under `model.layers.{i}.`.
_LAYER_TENSORS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
LAYER_NAME = re.compile(r"^blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)$")
GLOBAL_NAME = re.compile(r"^([a-z_0-9]+)\.(weight|bias)$")

# GGUF architecture -> (HF architecture, whether llama.cpp permuted q/k rows for its RoPE layout).
GGUF_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", True),
    "mistral": ("MistralForCausalLM", True),
    "qwen2": ("Qwen2ForCausalLM", False),
}


def hf_tensor_name(gguf_name: str) -> str:
    """The HF parameter name for a llama.cpp tensor name (unknown names are returned unchanged)."""
    if m := LAYER_NAME.match(gguf_name):
        layer, short, kind = m.groups()
        if short in _LAYER_TENSORS:
            return f"model.layers.{layer}.{_LAYER_TENSORS[short]}.{kind}"
    elif (m := GLOBAL_NAME.match(gguf_name)) and m.group(1) in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[m.group(1)]}.{m.group(2)}"
    return gguf_name  # the loader reports it as unexpected


def hf_config_from_gguf(metadata: dict[str, Any], arch: str, hf_arch: str, tied: bool) -> dict[str, Any]:
    """An HF-style config dict from GGUF metadata (`tied`: the file has no separate output matrix)."""
    prefix = f"{arch}."
    config: dict[str, Any] = {"architectures": [hf_arch], "model_type": arch}
    for key, hf_key in _HPARAMS.items():
        if prefix + key in metadata:
            config[hf_key] = metadata[prefix + key]
    tokens = metadata.get("tokenizer.ggml.tokens")
    if "vocab_size" not in config and tokens is not None:
        config["vocab_size"] = len(tokens)
    if "head_dim" not in config and prefix + "rope.dimension_count" in metadata:
        config["head_dim"] = metadata[prefix + "rope.dimension_count"]
    if metadata.get(prefix + "rope.scaling.type") == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": metadata[prefix + "rope.scaling.factor"]}
    config["tie_word_embeddings"] = tied
    for key in ("bos", "eos", "padding"):
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            config["pad_token_id" if key == "padding" else f"{key}_token_id"] = int(token_id)
    config["torch_dtype"] = "float32"
    return config


def unpermute_qk_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's `permute` of q/k rows (interleaved rotary pairs -> HF's half-split layout)."""
    rows = weight.shape[0]
    rest = weight.shape[1:]
    # [heads * head_dim, ...] -> [heads, head_dim/2, 2, ...] -> [heads, 2, head_dim/2, ...] -> back
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)
