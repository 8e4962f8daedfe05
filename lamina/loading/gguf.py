"""GGUF files (llama.cpp's format), read with the `gguf` package over a memory map.

The metadata becomes an HF-style config dict and llama.cpp's tensor names become HF parameter
names, so the rest of Lamina treats a GGUF like any other checkpoint. `read` dequantizes one tensor
to float32 and undoes the row permutation llama.cpp's converter applies to Llama q/k projections.
`read_raw` returns the stored blocks for code that keeps weights quantized.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lamina.errors import CheckpointError, UnsupportedModelError
from lamina.loading.checkpoint import Checkpoint

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
_LAYER_NAME = re.compile(r"^blk\.(\d+)\.([a-z_0-9]+)\.(weight|bias)$")
_GLOBAL_NAME = re.compile(r"^([a-z_0-9]+)\.(weight|bias)$")

# GGUF architecture -> (HF architecture, whether llama.cpp permuted q/k rows for its RoPE layout).
GGUF_ARCHITECTURES = {
    "llama": ("LlamaForCausalLM", True),
    "mistral": ("MistralForCausalLM", True),
    "qwen2": ("Qwen2ForCausalLM", False),
}


@dataclass(frozen=True)
class RawTensor:
    """A tensor as stored: GGML type name, logical shape (HF order) and the bytes/elements."""

    ggml_type: str
    shape: tuple[int, ...]
    data: np.ndarray


class GGUFCheckpoint(Checkpoint):
    """A .gguf file: metadata as an HF config, tensors by HF name."""

    def __init__(self, path: Path) -> None:
        import gguf

        self.path = path
        try:
            self.reader = gguf.GGUFReader(str(path))
        except Exception as exc:  # the reader raises ValueError/IndexError/struct errors on bad bytes
            raise CheckpointError(f"{path} is not a valid GGUF file, truncated or corrupt ({exc})") from None
        self.metadata = {name: _field_value(f) for name, f in self.reader.fields.items()}
        arch = self.metadata.get("general.architecture")
        if arch not in GGUF_ARCHITECTURES:
            supported = ", ".join(sorted(GGUF_ARCHITECTURES))
            raise UnsupportedModelError(
                f"GGUF architecture {arch!r} in {path.name} is not supported; supported: {supported}"
            )
        self.architecture = arch
        hf_arch, self._permute_qk = GGUF_ARCHITECTURES[arch]
        self._tensors = {self._hf_name(t.name): t for t in self.reader.tensors}
        self.config = self._hf_config(hf_arch)

    def tensor_names(self) -> list[str]:
        return list(self._tensors)

    def read_raw(self, name: str) -> RawTensor:
        """The stored blocks of one tensor (no dequantization, no q/k un-permutation)."""
        t = self._tensor(name)
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))
        return RawTensor(t.tensor_type.name, shape, t.data)

    def read(self, name: str) -> torch.Tensor:
        import gguf

        raw = self.read_raw(name)
        try:
            if raw.ggml_type == "BF16":
                # gguf exposes BF16 as raw 16-bit words; reinterpret them.
                array = np.ascontiguousarray(raw.data).view(np.int16)
                tensor = torch.from_numpy(array.copy()).view(torch.bfloat16).float()
            elif raw.ggml_type in ("F32", "F16"):
                tensor = torch.from_numpy(np.array(raw.data, dtype=np.float32))
            else:
                tensor = torch.from_numpy(gguf.quants.dequantize(raw.data, self._tensor(name).tensor_type))
        except (NotImplementedError, ValueError) as exc:
            raise CheckpointError(
                f"cannot dequantize {name} ({raw.ggml_type}) from {self.path.name}: {exc}"
            ) from None
        tensor = tensor.reshape(raw.shape)
        if self._permute_qk and name.endswith(("q_proj.weight", "k_proj.weight")):
            heads = self.config["num_attention_heads" if "q_proj" in name else "num_key_value_heads"]
            tensor = unpermute_qk_rows(tensor, heads)
        return tensor

    def close(self) -> None:
        self._tensors.clear()

    def _tensor(self, name: str) -> Any:
        t = self._tensors.get(name)
        if t is None:
            raise CheckpointError(f"{self.path.name} has no tensor for {name!r}")
        return t

    def _hf_name(self, gguf_name: str) -> str:
        if m := _LAYER_NAME.match(gguf_name):
            layer, short, kind = m.groups()
            if short in _LAYER_TENSORS:
                return f"model.layers.{layer}.{_LAYER_TENSORS[short]}.{kind}"
        elif (m := _GLOBAL_NAME.match(gguf_name)) and m.group(1) in _GLOBAL_TENSORS:
            return f"{_GLOBAL_TENSORS[m.group(1)]}.{m.group(2)}"
        return gguf_name  # unknown names stay as they are; the loader reports them as unexpected

    def _hf_config(self, hf_arch: str) -> dict[str, Any]:
        prefix = f"{self.architecture}."
        config: dict[str, Any] = {"architectures": [hf_arch], "model_type": self.architecture}
        for key, hf_key in _HPARAMS.items():
            if prefix + key in self.metadata:
                config[hf_key] = self.metadata[prefix + key]
        tokens = self.metadata.get("tokenizer.ggml.tokens")
        if "vocab_size" not in config and tokens is not None:
            config["vocab_size"] = len(tokens)
        if "head_dim" not in config and prefix + "rope.dimension_count" in self.metadata:
            config["head_dim"] = self.metadata[prefix + "rope.dimension_count"]
        scaling_type = self.metadata.get(prefix + "rope.scaling.type")
        if scaling_type == "linear":
            factor = self.metadata[prefix + "rope.scaling.factor"]
            config["rope_scaling"] = {"rope_type": "linear", "factor": factor}
        config["tie_word_embeddings"] = "lm_head.weight" not in self._tensors
        for key in ("bos", "eos", "padding"):
            token_id = self.metadata.get(f"tokenizer.ggml.{key}_token_id")
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


def _field_value(field: Any) -> Any:
    value = field.contents()
    return value.tolist() if isinstance(value, np.ndarray) else value
