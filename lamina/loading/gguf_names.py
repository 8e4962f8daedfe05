"""llama.cpp's GGUF names -> Hugging Face's: config keys, tensor names, and layout fixes, per architecture.

A GGUF describes a model with `{arch}.*` metadata keys and `blk.N.attn_q.weight`-style tensor
names; Lamina's models use HF config keys and parameter names. A `GGUFArchitecture` holds the
tables that translate one into the other for one llama.cpp architecture, the HF config values
llama.cpp assumes instead of storing them, and undoes what llama.cpp's converter changed in the
tensors (row reorderings in `gguf_layout`, Gemma's stored (1 + w) norms, GPT-2's transposed
Conv1D weights), so `read` returns tensors as HF stores them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch

from lamina.errors import CheckpointError
from lamina.loading.gguf_layout import (
    RowOrder,
    interleave_qkv_per_head,
    regroup_falcon_qkv,
    unpermute_qk_rows,
)

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
PHI2_LAYERS = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.dense",
    "ffn_up": "mlp.fc1",
    "ffn_down": "mlp.fc2",
}
GPT2_LAYERS = {
    "attn_norm": "ln_1",
    "attn_qkv": "attn.c_attn",
    "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2",
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
}
BLOOM_LAYERS = {
    "attn_norm": "input_layernorm",
    "attn_qkv": "self_attention.query_key_value",
    "attn_output": "self_attention.dense",
    "ffn_norm": "post_attention_layernorm",
    "ffn_up": "mlp.dense_h_to_4h",
    "ffn_down": "mlp.dense_4h_to_h",
}
# Falcon's attention and MLP read the same normed input (7B) ...
FALCON_LAYERS = {k: v for k, v in BLOOM_LAYERS.items() if k != "ffn_norm"}
# ... or one norm each (40B): llama.cpp's `attn_norm` is the one feeding the MLP.
FALCON_40B_LAYERS = {**FALCON_LAYERS, "attn_norm": "ln_mlp", "attn_norm_2": "ln_attn"}
GPTNEOX_LAYERS = {
    **BLOOM_LAYERS,
    "attn_qkv": "attention.query_key_value",
    "attn_output": "attention.dense",
}
LLAMA_GLOBALS = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
PHI2_GLOBALS = {**LLAMA_GLOBALS, "output_norm": "model.final_layernorm"}
GPT2_GLOBALS = {
    "token_embd": "transformer.wte",
    "position_embd": "transformer.wpe",
    "output_norm": "transformer.ln_f",
    "output": "lm_head",
}
BLOOM_GLOBALS = {
    "token_embd": "transformer.word_embeddings",
    "token_embd_norm": "transformer.word_embeddings_layernorm",
    "output_norm": "transformer.ln_f",
    "output": "lm_head",
}
FALCON_GLOBALS = {k: v for k, v in BLOOM_GLOBALS.items() if k != "token_embd_norm"}
GPTNEOX_GLOBALS = {
    "token_embd": "gpt_neox.embed_in",
    "output_norm": "gpt_neox.final_layer_norm",
    "output": "embed_out",
}
# T5's encoder and decoder blocks: `enc.` / `dec.` before `blk.N.`; the final norms `enc.output_norm`, ...
T5_GLOBALS = {
    "token_embd": "shared",
    "enc.output_norm": "encoder.final_layer_norm",
    "dec.output_norm": "decoder.final_layer_norm",
    "output": "lm_head",
}
_T5_ATTENTION = {"q": "q", "k": "k", "v": "v", "o": "o", "rel_b": "relative_attention_bias"}
_T5_SELF_ATTENTION = {
    "attn_norm": "layer.0.layer_norm",
    **{f"attn_{short}": f"layer.0.SelfAttention.{hf}" for short, hf in _T5_ATTENTION.items()},
}
_T5_CROSS_ATTENTION = {
    "cross_attn_norm": "layer.1.layer_norm",
    **{f"cross_attn_{short}": f"layer.1.EncDecAttention.{hf}" for short, hf in _T5_ATTENTION.items()},
}


def _t5_ffn(layer: int, gated: bool) -> dict[str, str]:
    """The feed-forward of T5 layer `layer` (1 in the encoder, 2 in the decoder): llama.cpp's ffn_up is
    `wi` of a plain one and `wi_1` of a gated one, whose `wi_0` is ffn_gate."""
    ff = f"layer.{layer}.DenseReluDense"
    gate = {"ffn_gate": f"{ff}.wi_0", "ffn_up": f"{ff}.wi_1"} if gated else {"ffn_up": f"{ff}.wi"}
    return {"ffn_norm": f"layer.{layer}.layer_norm", **gate, "ffn_down": f"{ff}.wo"}


def _t5_stacks(gated: bool) -> dict[str, tuple[str, Mapping[str, str]]]:
    """T5's encoder and decoder blocks: llama.cpp's block prefix -> (HF block prefix, layer table)."""
    return {
        "enc.blk": ("encoder.block", {**_T5_SELF_ATTENTION, **_t5_ffn(1, gated)}),
        "dec.blk": ("decoder.block", {**_T5_SELF_ATTENTION, **_T5_CROSS_ATTENTION, **_t5_ffn(2, gated)}),
    }


LAYER_NAME = re.compile(r"^((?:[a-z]+\.)?blk)\.(\d+)\.([a-z_0-9]+)\.(weight|bias)$")
GLOBAL_NAME = re.compile(r"^([a-z_0-9.]+)\.(weight|bias)$")
# LongRoPE's per-frequency factors: config values in HF, vectors in a GGUF (Phi-3 128k, Phi-3.5, Phi-4-mini)
ROPE_FACTOR_TENSORS = {"rope_factors_short.weight": "short_factor", "rope_factors_long.weight": "long_factor"}


@dataclass(frozen=True)
class GGUFArchitecture:
    """How one llama.cpp architecture maps onto an HF architecture."""

    hf_architecture: str
    layers: Mapping[str, str] = field(default_factory=lambda: LLAMA_LAYERS)
    globals: Mapping[str, str] = field(default_factory=lambda: LLAMA_GLOBALS)
    layer_prefix: str = "model.layers"
    hparams: Mapping[str, str] = field(default_factory=dict)  # overrides of the shared table
    # HF name suffix -> (config -> how to put llama.cpp's rows back in HF's order)
    row_orders: Mapping[str, Callable[[dict[str, Any]], RowOrder]] = field(default_factory=dict)
    norm_offset: float = 0.0  # llama.cpp stores Gemma's norms as (1 + w); HF stores w
    transposed: tuple[str, ...] = ()  # HF name suffixes stored [in, out] by HF (GPT-2's Conv1D)
    rope_dims_are_head_dim: bool = True  # False: rope.dimension_count is a partial rotary width
    implied: Mapping[str, Any] = field(default_factory=dict)  # HF config values llama.cpp assumes
    derive: Callable[[dict[str, Any]], None] | None = None  # fills values llama.cpp computes from others
    # (tensor, spec): a second HF layout under the same llama.cpp name, told apart by that tensor
    variant: tuple[str, GGUFArchitecture] | None = None
    # llama.cpp short name -> HF names of its [q | k | v] row blocks, where the HF model keeps them apart
    fused_qkv: Mapping[str, tuple[str, str, str]] = field(default_factory=dict)
    # block name prefix other than `blk` (T5's `enc.blk`, `dec.blk`) -> (HF layer prefix, layer table)
    stacks: Mapping[str, tuple[str, Mapping[str, str]]] = field(default_factory=dict)
    required: tuple[str, ...] = ()  # `{arch}.` metadata keys without which the HF config is incomplete

    def for_file(self, gguf_names: Collection[str]) -> GGUFArchitecture:
        """The spec for a file with these tensors: this one, or the variant whose marker tensor it holds."""
        if self.variant is not None and self.variant[0] in gguf_names:
            return self.variant[1]
        return self

    def hf_tensor_name(self, gguf_name: str) -> str:
        """The HF parameter name for a llama.cpp tensor name (unknown names are returned unchanged)."""
        if m := LAYER_NAME.match(gguf_name):
            stack, layer, short, kind = m.groups()
            prefix, layers = self.stacks.get(
                stack, (self.layer_prefix, self.layers if stack == "blk" else {})
            )
            if short in layers:
                return f"{prefix}.{layer}.{layers[short]}.{kind}"
        elif (m := GLOBAL_NAME.match(gguf_name)) and m.group(1) in self.globals:
            return f"{self.globals[m.group(1)]}.{m.group(2)}"
        return gguf_name  # the loader reports it as unexpected

    def split_rows(
        self, gguf_name: str, rows: int, config: dict[str, Any]
    ) -> list[tuple[str, int, int]] | None:
        """(HF name, first row, end row) of each part of a fused q/k/v tensor (None: not one)."""
        m = LAYER_NAME.match(gguf_name)
        if m is None or m.group(1) != "blk" or m.group(3) not in self.fused_qkv:
            return None
        _, layer, short, kind = m.groups()
        heads = config["num_attention_heads"]
        kv_heads = config.get("num_key_value_heads", heads)
        if rows % (heads + 2 * kv_heads):
            raise CheckpointError(
                f"{gguf_name} has {rows} rows, which q, k and v of {heads} query and {kv_heads} KV heads "
                "cannot split; the GGUF's head counts disagree with its tensors"
            )
        head_dim = rows // (heads + 2 * kv_heads)
        ends = [heads * head_dim, (heads + kv_heads) * head_dim, rows]
        names = [f"{self.layer_prefix}.{layer}.{part}.{kind}" for part in self.fused_qkv[short]]
        return [(name, start, end) for name, start, end in zip(names, [0, *ends[:2]], ends, strict=True)]

    def row_order(self, name: str, config: dict[str, Any]) -> RowOrder | None:
        """How to put the rows of HF tensor `name` back in HF's order (None: llama.cpp kept them)."""
        for suffix, order in self.row_orders.items():
            if name.endswith(suffix):
                return order(config)
        return None

    def to_hf_layout(self, name: str, tensor: torch.Tensor, config: dict[str, Any]) -> torch.Tensor:
        """A dequantized tensor [HF shape] as HF's checkpoint holds it."""
        if (order := self.row_order(name, config)) is not None:
            tensor = order(tensor)
        if self.norm_offset and name.endswith("norm.weight"):
            tensor = tensor - self.norm_offset
        if name.endswith(self.transposed):
            tensor = tensor.t().contiguous()
        return tensor


def _q_rows(config: dict[str, Any]) -> RowOrder:
    """Llama's q rows: RoPE pairs interleaved per query head."""
    return partial(unpermute_qk_rows, num_heads=config["num_attention_heads"])


def _k_rows(config: dict[str, Any]) -> RowOrder:
    """Llama's k rows: RoPE pairs interleaved per KV head."""
    return partial(
        unpermute_qk_rows, num_heads=config.get("num_key_value_heads", config["num_attention_heads"])
    )


def _qkv_per_head_rows(config: dict[str, Any]) -> RowOrder:
    """BLOOM's and GPT-NeoX's fused qkv (weight and bias): q, k and v of each head together in HF."""
    return partial(interleave_qkv_per_head, num_heads=config["num_attention_heads"])


def _falcon_qkv_rows(config: dict[str, Any]) -> RowOrder:
    """Falcon's fused qkv: grouped per KV head in HF."""
    heads = config["num_attention_heads"]
    return partial(regroup_falcon_qkv, num_heads=heads, num_kv_heads=config.get("num_kv_heads", heads))


def _gemma2_config(config: dict[str, Any]) -> None:
    """llama.cpp's Gemma 2: a 4096-token window unless stored (every other layer slides, as the
    registry says for all Gemma 2 configs without `layer_types`)."""
    config.setdefault("sliding_window", 4096)
    config["query_pre_attn_scalar"] = _gemma_query_scalar(config, layers_27b=46)


def _gemma3_config(config: dict[str, Any]) -> None:
    """llama.cpp's Gemma 3: with a window, 5 sliding layers (RoPE base 10000 unless stored) per global one."""
    if config.get("sliding_window"):
        config["sliding_window_pattern"] = 6
        config.setdefault("rope_local_base_freq", 10000.0)
    else:
        config.pop("rope_local_base_freq", None)
    config["query_pre_attn_scalar"] = _gemma_query_scalar(config, layers_27b=62)


def _gemma_query_scalar(config: dict[str, Any], layers_27b: int) -> int:
    """Gemma 2/3's attention score scale is 1/sqrt(this); the GGUF does not store it.

    llama.cpp (after gemma_pytorch) uses hidden/heads for the 27B models, which it recognizes by
    their layer count, and head_dim for the others; the published configs agree (144 and 168 for
    the 27Bs, 256 = head_dim for the rest).
    """
    if config.get("num_hidden_layers") == layers_27b:
        return _ratio(config, "hidden_size", "num_attention_heads")
    return config.get("head_dim") or _ratio(config, "hidden_size", "num_attention_heads")


_CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
_LLAMA_ROWS = {"q_proj.weight": _q_rows, "k_proj.weight": _k_rows}
_PER_HEAD_QKV = {"query_key_value.weight": _qkv_per_head_rows, "query_key_value.bias": _qkv_per_head_rows}
_FALCON = dict(
    layers=FALCON_LAYERS,
    globals=FALCON_GLOBALS,
    layer_prefix="transformer.h",
    hparams={
        "attention.head_count_kv": "num_kv_heads",
        "attention.layer_norm_epsilon": "layer_norm_epsilon",
        "feed_forward_length": "ffn_hidden_size",
    },
    row_orders={"query_key_value.weight": _falcon_qkv_rows},
    # llama.cpp's Falcon is RoPE, parallel attention/MLP, no linear biases; its fused qkv, once
    # regrouped, is HF's grouped layout (Falcon-7B's multi-query is the one-group case).
    implied={"new_decoder_architecture": True, "num_ln_in_parallel_attn": 1},
)
_T5 = dict(
    globals=T5_GLOBALS,
    hparams={
        "context_length": "n_positions",
        "embedding_length": "d_model",
        "feed_forward_length": "d_ff",
        "block_count": "num_layers",
        "decoder_block_count": "num_decoder_layers",
        "attention.head_count": "num_heads",
        "attention.key_length": "d_kv",
        "attention.layer_norm_epsilon": "layer_norm_epsilon",
        "attention.layer_norm_rms_epsilon": "layer_norm_epsilon",
        "attention.relative_buckets_count": "relative_attention_num_buckets",
        "decoder_start_token_id": "decoder_start_token_id",
    },
    required=(
        "embedding_length",
        "feed_forward_length",
        "block_count",
        "attention.head_count",
        "attention.key_length",
    ),
)
# llama.cpp's T5 runs a ReLU feed-forward, or a gated GELU one where the file has ffn_gate (T5 v1.1,
# Flan-T5), and buckets relative positions up to a fixed distance of 128, T5's default.
_T5_IMPLIED = {"relative_attention_max_distance": 128}

# GGUF `general.architecture` -> how to read it.
GGUF_ARCHITECTURES = {
    "llama": GGUFArchitecture("LlamaForCausalLM", row_orders=_LLAMA_ROWS),
    "mistral": GGUFArchitecture("MistralForCausalLM", row_orders=_LLAMA_ROWS),
    "qwen2": GGUFArchitecture("Qwen2ForCausalLM"),
    "qwen3": GGUFArchitecture("Qwen3ForCausalLM", layers={**LLAMA_LAYERS, **QK_NORMS}),
    "gemma": GGUFArchitecture("GemmaForCausalLM", norm_offset=1.0),
    "gemma2": GGUFArchitecture(
        "Gemma2ForCausalLM",
        layers=GEMMA2_LAYERS,
        norm_offset=1.0,
        implied={"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0},  # llama.cpp's defaults
        derive=_gemma2_config,
    ),
    "gemma3": GGUFArchitecture(
        "Gemma3ForCausalLM",
        layers={**GEMMA2_LAYERS, **QK_NORMS},
        hparams={"rope.freq_base_swa": "rope_local_base_freq"},
        norm_offset=1.0,
        derive=_gemma3_config,
    ),
    "phi2": GGUFArchitecture(
        "PhiForCausalLM",
        layers=PHI2_LAYERS,
        globals=PHI2_GLOBALS,
        rope_dims_are_head_dim=False,
        # files converted from Phi-2's first checkpoint (mixer.Wqkv) keep q, k and v in one tensor
        fused_qkv={"attn_qkv": ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")},
    ),
    "phi3": GGUFArchitecture("Phi3ForCausalLM", layers=PHI3_LAYERS, rope_dims_are_head_dim=False),
    "gpt2": GGUFArchitecture(
        "GPT2LMHeadModel",
        layers=GPT2_LAYERS,
        globals=GPT2_GLOBALS,
        layer_prefix="transformer.h",
        hparams={"attention.layer_norm_epsilon": "layer_norm_epsilon"},
        transposed=_CONV1D,
    ),
    "gptneox": GGUFArchitecture(
        "GPTNeoXForCausalLM",
        layers=GPTNEOX_LAYERS,
        globals=GPTNEOX_GLOBALS,
        layer_prefix="gpt_neox.layers",
        hparams={"use_parallel_residual": "use_parallel_residual"},
        row_orders=_PER_HEAD_QKV,
        rope_dims_are_head_dim=False,
    ),
    "bloom": GGUFArchitecture(
        "BloomForCausalLM",
        layers=BLOOM_LAYERS,
        globals=BLOOM_GLOBALS,
        layer_prefix="transformer.h",
        hparams={"attention.layer_norm_epsilon": "layer_norm_epsilon"},
        row_orders=_PER_HEAD_QKV,
    ),
    "falcon": GGUFArchitecture(
        "FalconForCausalLM",
        **_FALCON,
        # Falcon-40B/180B: a second norm per layer (llama.cpp's attn_norm_2)
        variant=(
            "blk.0.attn_norm_2.weight",
            GGUFArchitecture(
                "FalconForCausalLM",
                **{
                    **_FALCON,
                    "layers": FALCON_40B_LAYERS,
                    "implied": {"new_decoder_architecture": True, "num_ln_in_parallel_attn": 2},
                },
            ),
        ),
    ),
    "t5": GGUFArchitecture(
        "T5ForConditionalGeneration",
        **_T5,
        stacks=_t5_stacks(gated=False),
        implied={**_T5_IMPLIED, "feed_forward_proj": "relu"},
        variant=(
            "enc.blk.0.ffn_gate.weight",
            GGUFArchitecture(
                "T5ForConditionalGeneration",
                **_T5,
                stacks=_t5_stacks(gated=True),
                implied={**_T5_IMPLIED, "feed_forward_proj": "gated-gelu"},
            ),
        ),
    ),
}


def hf_config_from_gguf(
    metadata: dict[str, Any],
    spec: GGUFArchitecture,
    gguf_names: Collection[str],
    rope_factors: dict[str, list[float]] | None = None,
) -> dict[str, Any]:
    """An HF-style config dict from GGUF metadata, the file's tensor names and its LongRoPE factors."""
    arch = metadata["general.architecture"]
    prefix = f"{arch}."
    if missing := [prefix + key for key in spec.required if prefix + key not in metadata]:
        raise CheckpointError(f"the GGUF lacks {', '.join(missing)}; the file is incomplete")
    config: dict[str, Any] = {"architectures": [spec.hf_architecture], "model_type": arch, **spec.implied}
    for key, hf_key in {**_HPARAMS, **spec.hparams}.items():
        if prefix + key in metadata:
            config[hf_key] = metadata[prefix + key]
    if not config.get("sliding_window"):  # llama.cpp writes 0 for "no window" (Phi-4-mini)
        config.pop("sliding_window", None)
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
    if rope_factors:
        config["rope_scaling"] = _longrope_scaling(metadata, prefix, rope_factors)
    if spec.derive is not None:
        spec.derive(config)
    config["tie_word_embeddings"] = "output.weight" not in gguf_names
    for key in ("bos", "eos", "padding"):
        token_id = metadata.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None:
            config["pad_token_id" if key == "padding" else f"{key}_token_id"] = (
                token_id  # type-checked by the config
            )
    config["torch_dtype"] = "float32"
    return config


def _longrope_scaling(
    metadata: dict[str, Any], prefix: str, factors: dict[str, list[float]]
) -> dict[str, Any]:
    """HF's `longrope` rope_scaling from llama.cpp's factor tensors and rope.scaling.* keys."""
    if set(factors) != set(ROPE_FACTOR_TENSORS.values()):
        raise CheckpointError(
            f"the GGUF has LongRoPE factors {sorted(factors)} but needs both short and long"
        )
    original = metadata.get(prefix + "rope.scaling.original_context_length")
    if original is None:
        raise CheckpointError(
            "the GGUF has LongRoPE factors but no rope.scaling.original_context_length; "
            "the file is incomplete"
        )
    scaling = {"rope_type": "longrope", **factors, "original_max_position_embeddings": original}
    if (attention_factor := metadata.get(prefix + "rope.scaling.attn_factor")) is not None:
        scaling["attention_factor"] = attention_factor
    return scaling


def _ratio(config: dict[str, Any], numerator: str, denominator: str) -> int:
    if numerator not in config or denominator not in config:
        raise CheckpointError(f"GGUF metadata lacks {numerator!r} or {denominator!r}; the file is incomplete")
    return config[numerator] // config[denominator]
