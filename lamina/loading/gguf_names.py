"""llama.cpp's GGUF names -> Hugging Face's: config keys, tensor names, and layout fixes, per architecture.

A GGUF describes a model with `{arch}.*` metadata keys and `blk.N.attn_q.weight`-style tensor
names; Lamina's models use HF config keys and parameter names. A `GGUFArchitecture` holds the
tables that translate one into the other for one llama.cpp architecture, and undoes what
llama.cpp's converter changed in the tensors (Llama's q/k row permutation, Gemma's stored
(1 + w) norms, GPT-2's transposed Conv1D weights), so `read` returns tensors as HF stores them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from lamina.errors import CheckpointError

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
    "attn_logit_softcapping": "attn_logit_softcapping",
    "final_logit_softcapping": "final_logit_softcapping",
    "rope.freq_base": "rope_theta",
    "vocab_size": "vocab_size",
}

# llama.cpp per-layer tensor names -> HF names under the layer prefix (`model.layers.{i}.`).
LLAMA_LAYERS = {
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
QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
# Gemma 2/3: norms around attention and around the MLP; llama.cpp's `ffn_norm` is the pre-MLP one.
GEMMA2_LAYERS = {
    **LLAMA_LAYERS,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
PHI3_LAYERS = {
    "attn_norm": "input_layernorm",
    "attn_qkv": "self_attn.qkv_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_norm": "post_attention_layernorm",
    "ffn_up": "mlp.gate_up_proj",  # llama.cpp keeps Phi-3's gate and up fused under this name
    "ffn_down": "mlp.down_proj",
}
GPT2_LAYERS = {
    "attn_norm": "ln_1",
    "attn_qkv": "attn.c_attn",
    "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2",
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
}
LLAMA_GLOBALS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
GPT2_GLOBALS = {
    "token_embd": "transformer.wte",
    "position_embd": "transformer.wpe",
    "output_norm": "transformer.ln_f",
    "output": "lm_head",
}
LAYER_NAME = re.compile(r"^blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)$")
GLOBAL_NAME = re.compile(r"^([a-z_0-9]+)\.(weight|bias)$")


@dataclass(frozen=True)
class GGUFArchitecture:
    """How one llama.cpp architecture maps onto an HF architecture."""

    hf_architecture: str
    layers: Mapping[str, str] = field(default_factory=lambda: LLAMA_LAYERS)
    globals: Mapping[str, str] = field(default_factory=lambda: LLAMA_GLOBALS)
    layer_prefix: str = "model.layers"
    hparams: Mapping[str, str] = field(default_factory=dict)  # overrides of the shared table
    permute_qk: bool = False  # llama.cpp interleaved q/k rows for its RoPE layout
    norm_offset: float = 0.0  # llama.cpp stores Gemma's norms as (1 + w); HF stores w
    transposed: tuple[str, ...] = ()  # HF name suffixes stored [in, out] by HF (GPT-2's Conv1D)
    rope_dims_are_head_dim: bool = True  # False: rope.dimension_count is a partial rotary width

    def hf_tensor_name(self, gguf_name: str) -> str:
        """The HF parameter name for a llama.cpp tensor name (unknown names are returned unchanged)."""
        if m := LAYER_NAME.match(gguf_name):
            layer, short, kind = m.groups()
            if short in self.layers:
                return f"{self.layer_prefix}.{layer}.{self.layers[short]}.{kind}"
        elif (m := GLOBAL_NAME.match(gguf_name)) and m.group(1) in self.globals:
            return f"{self.globals[m.group(1)]}.{m.group(2)}"
        return gguf_name  # the loader reports it as unexpected

    def to_hf_layout(self, name: str, tensor: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
        """A dequantized tensor [HF shape] as HF's checkpoint holds it."""
        if self.permute_qk and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            tensor = unpermute_qk_rows(tensor, heads)
        if self.norm_offset and name.endswith("norm.weight"):
            tensor = tensor - self.norm_offset
        if name.endswith(self.transposed):
            tensor = tensor.t().contiguous()
        return tensor


_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")

# GGUF `general.architecture` -> how to read it.
GGUF_ARCHITECTURES = {
    "llama": GGUFArchitecture("LlamaForCausalLM", permute_qk=True),
    "mistral": GGUFArchitecture("MistralForCausalLM", permute_qk=True),
    "qwen2": GGUFArchitecture("Qwen2ForCausalLM"),
    "qwen3": GGUFArchitecture("Qwen3ForCausalLM", layers={**LLAMA_LAYERS, **QK_NORMS}),
    "gemma": GGUFArchitecture("GemmaForCausalLM", norm_offset=1.0),
    "phi3": GGUFArchitecture("Phi3ForCausalLM", layers=PHI3_LAYERS, rope_dims_are_head_dim=False),
    "gpt2": GGUFArchitecture(
        "GPT2LMHeadModel",
        layers=GPT2_LAYERS,
        globals=GPT2_GLOBALS,
        layer_prefix="transformer.h",
        hparams={"attention.layer_norm_epsilon": "layer_norm_epsilon"},
        transposed=_CONV1D,
    ),
}


def hf_config_from_gguf(metadata: dict[str, Any], arch: str, tied: bool) -> dict[str, Any]:
    """An HF-style config dict from GGUF metadata (`tied`: the file has no separate output matrix)."""
    spec = GGUF_ARCHITECTURES[arch]
    prefix = f"{arch}."
    config: dict[str, Any] = {"architectures": [spec.hf_architecture], "model_type": arch}
    for key, hf_key in {**_HPARAMS, **spec.hparams}.items():
        if prefix + key in metadata:
            config[hf_key] = metadata[prefix + key]
    tokens = metadata.get("tokenizer.ggml.tokens")
    if "vocab_size" not in config and tokens is not None:
        config["vocab_size"] = len(tokens)
    rope_dims = metadata.get(prefix + "rope.dimension_count")
    if rope_dims is not None:
        if spec.rope_dims_are_head_dim:
            config.setdefault("head_dim", rope_dims)
        else:
            head_dim = config.get("head_dim") or _ratio(config, "hidden_size", "num_attention_heads")
            config["partial_rotary_factor"] = rope_dims / head_dim
    if metadata.get(prefix + "rope.scaling.type") == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": metadata[prefix + "rope.scaling.factor"]}
    config["tie_word_embeddings"] = tied
    for key in ("bos", "eos", "padding"):
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            config["pad_token_id" if key == "padding" else f"{key}_token_id"] = int(token_id)
    config["torch_dtype"] = "float32"
    return config


def _ratio(config: dict[str, Any], numerator: str, denominator: str) -> int:
    if numerator not in config or denominator not in config:
        raise CheckpointError(f"GGUF metadata lacks {numerator!r} or {denominator!r}; the file is incomplete")
    return config[numerator] // config[denominator]


def unpermute_qk_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's `permute` of q/k rows (interleaved rotary pairs -> HF's half-split layout)."""
    rows = weight.shape[0]
    rest = weight.shape[1:]
    if rows % (2 * num_heads):
        raise CheckpointError(
            f"a q/k projection has {rows} rows, which {num_heads} heads of even size cannot split; "
            "the GGUF's head counts disagree with its tensors"
        )
    # [heads * head_dim, ...] -> [heads, head_dim/2, 2, ...] -> [heads, 2, head_dim/2, ...] -> back
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)
