"""Write a tiny transformers model as a GGUF the way llama.cpp's converter does, for round-trip tests.

Names come from the `gguf` package's own HF -> llama.cpp tensor map (independent of Lamina's
tables). Metadata keys and tensor changes follow llama.cpp's `convert_hf_to_gguf.py`, one function
per architecture: Llama's q/k row permutation, Gemma's (1 + w) norms, GPT-2's transposed Conv1D
weights, BLOOM's and GPT-NeoX's fused qkv regrouped to [q | k | v], Falcon's per-KV-group qkv
likewise, the output matrix GPT-2 and BLOOM duplicate from the embedding, and Phi-3's LongRoPE
factors as tensors.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import torch

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")


def llama_cpp_permute(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's `LlamaModel.permute`: half-split rotary rows -> interleaved pairs."""
    return (
        weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def per_head_qkv_to_blocks(tensor: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's BLOOM/GPT-NeoX converter: per-head [q_h | k_h | v_h] rows -> [all q | all k | all v]."""
    qkv = tensor.reshape(heads, 3, tensor.shape[0] // heads // 3, *tensor.shape[1:])  # [H, 3, D, ...]
    return torch.cat([qkv[:, i].reshape(-1, *tensor.shape[1:]) for i in range(3)])


def falcon_qkv_to_blocks(tensor: torch.Tensor, heads: int, kv_heads: int) -> torch.Tensor:
    """llama.cpp's Falcon converter: per-KV-group [q_1 .. q_g | k | v] rows -> [all q | all k | all v]."""
    head_dim = tensor.shape[0] // (heads + 2 * kv_heads)
    qkv = tensor.view(kv_heads, heads // kv_heads + 2, head_dim, tensor.shape[1])
    q = qkv[:, :-2].reshape(heads * head_dim, tensor.shape[1])
    k = qkv[:, [-2]].reshape(kv_heads * head_dim, tensor.shape[1])
    v = qkv[:, [-1]].reshape(kv_heads * head_dim, tensor.shape[1])
    return torch.cat((q, k, v)).reshape_as(tensor)


def falcon_kv_heads(cfg) -> int:
    """The KV heads the converter reads from a Falcon's original config.json: `num_kv_heads` for the
    new decoder architecture, else none written, so 1 (transformers' re-saved configs add
    num_kv_heads = num_attention_heads to multi-query models, which the converter would misread)."""
    return cfg.num_kv_heads if cfg.new_decoder_architecture else 1


def f16_rounded(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with its matrices rounded to float16 and back, as `write_gguf` stores them."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2 and "norm" not in name:
                param.copy_(param.half().float())
    return model


def _rope(cfg) -> dict:
    return getattr(cfg, "rope_parameters", None) or {}


def _head_dim(cfg) -> int:
    return getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads


def _llama_hparams(writer, cfg) -> None:
    """Llama, Mistral, Qwen2/3, Gemma (the converter's generic TextModel keys)."""
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(_rope(cfg)["rope_theta"])
    writer.add_rope_dimension_count(_head_dim(cfg))
    writer.add_key_length(_head_dim(cfg))
    writer.add_value_length(_head_dim(cfg))


def _phi3_hparams(writer, cfg) -> None:
    """Phi3MiniModel: partial rotary width, window 0 for none, LongRoPE's original context and scale."""
    rope = _rope(cfg)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_rope_scaling_orig_ctx_len(cfg.original_max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(
        int(rope.get("partial_rotary_factor", 1.0) * cfg.hidden_size) // cfg.num_attention_heads
    )
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_sliding_window(cfg.sliding_window or 0)
    if rope.get("rope_type") == "longrope":
        scale = cfg.max_position_embeddings / cfg.original_max_position_embeddings
        original = cfg.original_max_position_embeddings
        writer.add_rope_scaling_attn_factors(
            math.sqrt(1 + math.log(scale) / math.log(original)) if scale > 1 else 1.0
        )


def _gemma2_hparams(writer, cfg) -> None:
    """Gemma2Model: no RoPE base (llama.cpp's 10000), soft-caps and window stored."""
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_attn_logit_softcapping(cfg.attn_logit_softcapping)
    writer.add_final_logit_softcapping(cfg.final_logit_softcapping)
    writer.add_sliding_window(cfg.sliding_window)


def _gemma3_hparams(writer, cfg) -> None:
    """Gemma3Model: the generic keys with the global layers' RoPE (linear scaling), the local base as
    rope.freq_base_swa, and the window; no layer pattern (llama.cpp fixes 5 sliding : 1 global)."""
    full, local = _rope(cfg)["full_attention"], _rope(cfg)["sliding_attention"]
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    if full.get("rope_type") == "linear":
        import gguf

        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(full["factor"])
    writer.add_rope_freq_base(full["rope_theta"])
    writer.add_rope_freq_base_swa(local["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_sliding_window(cfg.sliding_window)


def _gpt2_hparams(writer, cfg) -> None:
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.n_positions)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(4 * cfg.hidden_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_layer_norm_eps(cfg.layer_norm_epsilon)


def _phi2_hparams(writer, cfg) -> None:
    """Phi2Model: feed-forward length written as 4 * hidden, rotary width int(fraction * hidden) // heads."""
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(4 * cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_attention_heads)
    writer.add_layer_norm_eps(cfg.layer_norm_eps)
    writer.add_rope_dimension_count(
        int(_rope(cfg)["partial_rotary_factor"] * cfg.hidden_size) // cfg.num_attention_heads
    )


def _gptneox_hparams(writer, cfg) -> None:
    """GPTNeoXModel: rotary width from the rotary fraction, parallel residual flag, no RoPE base."""
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_rope_dimension_count(int(_rope(cfg)["partial_rotary_factor"] * _head_dim(cfg)))
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_parallel_residual(cfg.use_parallel_residual)
    writer.add_layer_norm_eps(cfg.layer_norm_eps)


def _bloom_hparams(writer, cfg) -> None:
    """BloomModel: context length falls back to the width (BLOOM has no positions)."""
    writer.add_context_length(cfg.hidden_size)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(4 * cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_attention_heads)
    writer.add_layer_norm_eps(cfg.layer_norm_epsilon)


def _falcon_hparams(writer, cfg) -> None:
    """FalconModel: fixed context 2048, feed-forward 4 * hidden, no RoPE base."""
    writer.add_context_length(2048)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(4 * cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(falcon_kv_heads(cfg))
    writer.add_layer_norm_eps(cfg.layer_norm_epsilon)


def _t5_hparams(writer, cfg) -> None:
    """T5Model: context 512 unless n_positions, both epsilon keys, the decoder's start token."""
    writer.add_context_length(getattr(cfg, "n_positions", None) or 512)
    writer.add_embedding_length(cfg.d_model)
    writer.add_feed_forward_length(cfg.d_ff)
    writer.add_block_count(cfg.num_layers)
    writer.add_decoder_block_count(cfg.num_decoder_layers)
    writer.add_head_count(cfg.num_heads)
    writer.add_key_length(cfg.d_kv)
    writer.add_value_length(cfg.d_kv)
    writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
    writer.add_relative_attn_buckets_count(cfg.relative_attention_num_buckets)
    writer.add_layer_norm_rms_eps(cfg.layer_norm_epsilon)
    writer.add_decoder_start_token_id(cfg.decoder_start_token_id)


HPARAMS = {
    "phi3": _phi3_hparams,
    "gemma2": _gemma2_hparams,
    "gemma3": _gemma3_hparams,
    "gpt2": _gpt2_hparams,
    "phi2": _phi2_hparams,
    "gptneox": _gptneox_hparams,
    "bloom": _bloom_hparams,
    "falcon": _falcon_hparams,
    "t5": _t5_hparams,
}


def to_llama_cpp(arch: str, hf_name: str, tensor: torch.Tensor, cfg) -> torch.Tensor:
    """What the converter's `modify_tensors` does to one HF tensor."""
    if arch in ("llama", "mistral") and hf_name.endswith("q_proj.weight"):
        return llama_cpp_permute(tensor, cfg.num_attention_heads)
    if arch in ("llama", "mistral") and hf_name.endswith("k_proj.weight"):
        return llama_cpp_permute(tensor, cfg.num_key_value_heads)
    if arch in ("gemma", "gemma2", "gemma3") and hf_name.endswith("norm.weight"):
        return tensor + 1
    if arch == "gpt2" and hf_name.endswith(CONV1D):
        return tensor.t()
    if arch in ("bloom", "gptneox") and ".query_key_value." in hf_name:
        return per_head_qkv_to_blocks(tensor, cfg.num_attention_heads)
    if arch == "falcon" and hf_name.endswith("query_key_value.weight"):
        return falcon_qkv_to_blocks(tensor, cfg.num_attention_heads, falcon_kv_heads(cfg))
    return tensor


def _tied_head(cfg, arch: str) -> bool:
    """Whether the checkpoint has no lm_head of its own. transformers >= 5 ties every T5 and tells
    original T5's tied, scaled head by `scale_decoder_outputs`; Flan-T5's checkpoints store an lm_head."""
    return cfg.scale_decoder_outputs if arch == "t5" else cfg.tie_word_embeddings


def hf_tensors(model: torch.nn.Module, arch: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The tensors a converter reads from the model's checkpoint: tied heads once, no mask buffers,
    and the output matrix GPT-2's and BLOOM's converters add as a copy of the embedding."""
    duplicated_head = arch in ("gpt2", "bloom")
    for hf_name, tensor in model.state_dict().items():
        if hf_name.endswith(".attn.bias") or hf_name.endswith(".masked_bias"):
            continue
        if hf_name == "lm_head.weight" and _tied_head(model.config, arch) and not duplicated_head:
            continue  # llama.cpp writes no output matrix for tied models
        if arch == "t5" and hf_name.endswith("embed_tokens.weight"):
            continue  # T5Model writes `shared` once; the stacks' copies are the same tensor
        if arch == "bloom":
            hf_name = hf_name.removeprefix("transformer.")  # the converter strips it before mapping
        yield hf_name, tensor.detach().float()


def fuse_qkv(tensors: Iterator[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """Phi's q/k/v projections as Phi-2's first checkpoint stored them: one `mixer.Wqkv` [q | k | v],
    which GGUFs converted from it keep as one attn_qkv tensor."""
    parts: dict[tuple[str, str], list[torch.Tensor]] = {}
    for name, tensor in tensors:
        if m := re.match(r"model\.layers\.(\d+)\.self_attn\.[qkv]_proj\.(weight|bias)$", name):
            parts.setdefault(m.groups(), []).append(tensor)  # state dicts list q, k, v in order
            if len(parts[m.groups()]) == 3:
                yield f"transformer.h.{m.group(1)}.mixer.Wqkv.{m.group(2)}", torch.cat(parts.pop(m.groups()))
        else:
            yield name, tensor


def add_unigram_vocabulary(writer, tokens: list[str], scores: list[float], types: list[int]) -> None:
    """T5Model.set_vocab: a SentencePiece Unigram vocabulary, tokenizer model "t5", pad 0, EOS 1,
    unknown 2 (T5's ids), EOS added to each prompt and no BOS."""
    writer.add_tokenizer_model("t5")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_add_space_prefix(True)
    writer.add_remove_extra_whitespaces(True)
    writer.add_pad_token_id(0)
    writer.add_eos_token_id(1)
    writer.add_unk_token_id(2)
    writer.add_add_bos_token(False)
    writer.add_add_eos_token(True)


#: Type gguf cannot quantize to -> (byte offsets of its fp16 (super-)block scales, their range): ranges
#: that give weights of a few hundredths, as a model's (|w| ~ 256 d for Q4_K, 512 d Q5_K, 1000 d Q6_K,
#: 128 d Q3_K, 20 d Q2_K, 100 d IQ4_NL, 2000 d IQ4_XS).
KQUANT_SCALES = {
    "Q4_K": ((0, 2), (1e-4, 4e-4)),
    "Q5_K": ((0, 2), (5e-5, 2e-4)),
    "Q6_K": ((208,), (6.2e-5, 2e-4)),
    "Q3_K": ((108,), (2e-4, 5e-4)),
    "Q2_K": ((80, 82), (1e-3, 3e-3)),
    "IQ4_NL": ((0,), (2e-4, 5e-4)),
    "IQ4_XS": ((0,), (6.2e-5, 1.5e-4)),
    # grid types (|w| ~ 170 d for IQ2, 470 d IQ3, 17 d IQ1_S, d for TQ)
    "IQ1_S": ((0,), (1e-3, 3e-3)),
    "IQ1_M": ((), (1e-3, 3e-3)),  # its fp16 d is spread over the top nibbles of four scale words
    "IQ2_XXS": ((0,), (1e-4, 3e-4)),
    "IQ2_XS": ((0,), (1e-4, 3e-4)),
    "IQ2_S": ((0,), (1e-4, 3e-4)),
    "IQ3_XXS": ((0,), (5e-5, 1.5e-4)),
    "IQ3_S": ((0,), (5e-5, 1.5e-4)),
    "TQ1_0": ((52,), (0.02, 0.05)),
    "TQ2_0": ((64,), (0.02, 0.05)),
    "NVFP4": ((), (2e-3, 8e-3)),  # four UE4M3 scales (one per 16 weights) at byte 0; |w| ~ 5 d
}


def random_kquant(shape: tuple[int, int], ggml_type: str, rng: np.random.Generator) -> np.ndarray:
    """Well-formed bytes uint8 [N, row bytes] of a `KQUANT_SCALES` type for a [N, K] matrix (gguf cannot
    quantize to these): random codes and packed sub-block scales, fp16 (super-)block scales in range."""
    import gguf

    block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[ggml_type]]
    n, k = shape
    data = rng.integers(0, 256, (n * k // block, size), dtype=np.uint8)
    offsets, (low, high) = KQUANT_SCALES[ggml_type]
    for offset in offsets:
        scales = rng.uniform(low, high, (data.shape[0], 1)).astype(np.float16)
        data[:, offset : offset + 2] = scales.view(np.uint8)
    if ggml_type == "NVFP4":
        data[:, 0:4] = gguf.quants.NVFP4.fp32_to_ue4m3(
            rng.uniform(low, high, (data.shape[0], 4)).astype(np.float32)
        )
    if ggml_type == "IQ1_M":  # 16-bit words at byte 48: 3-bit scales below, one nibble of d on top each
        d_bits = rng.uniform(low, high, (data.shape[0], 1)).astype(np.float16).view(np.uint16)
        nibbles = (d_bits >> np.array([0, 4, 8, 12], dtype=np.uint16)) & 0xF  # [blocks, 4]
        words = data[:, 48:56].copy().view(np.uint16)
        data[:, 48:56] = ((words & 0x0FFF) | (nibbles << 12)).view(np.uint8)
    return data.reshape(n, k // block * size)


def write_gguf(
    model: torch.nn.Module,
    arch: str,
    path: Path,
    vocab_size: int,
    spm: tuple[list[str], list[float], list[int]] | None = None,
    matrix_type: str = "F16",
    fused_qkv: bool = False,
    type_of: Callable[[str], str] | None = None,
) -> Path:
    """`model`'s weights and config as a llama.cpp-style GGUF of architecture `arch`.

    The vocabulary is `vocab_size` placeholder tokens, or `spm`'s (tokens, scores, token types)
    as a SentencePiece-style tokenizer: for T5 a Unigram one (see `add_unigram_vocabulary`), else
    a "llama" one with BOS 1 and EOS 2. Matrices are stored as
    `matrix_type` (F16, llama.cpp's usual float type, or a type gguf quantizes to, e.g. Q8_0), or
    `type_of(gguf name)` per matrix; K-quants (Q4_K, Q6_K) hold random codes instead of the model's
    weights (`random_kquant`). Vectors are F32. `fused_qkv`: Phi's q/k/v as one tensor, as in GGUFs
    of Phi-2's first checkpoint.
    """
    import gguf

    cfg = model.config
    model_arch = {name: enum for enum, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
    names = gguf.get_tensor_name_map(model_arch, cfg.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), arch)
    HPARAMS.get(arch, _llama_hparams)(writer, cfg)
    if spm is None:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list([f"<t{i}>" for i in range(vocab_size)])
    elif arch == "t5":
        add_unigram_vocabulary(writer, *spm)
    else:
        tokens, scores, types = spm
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
    tensors = hf_tensors(model, arch)
    rng = np.random.default_rng(0)
    for hf_name, tensor in fuse_qkv(tensors) if fused_qkv else tensors:
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, hf_name
        array = to_llama_cpp(arch, hf_name, tensor, cfg).contiguous().numpy()
        stored_type = matrix_type if type_of is None else type_of(gguf_name)
        if tensor.ndim == 1 or "norm" in hf_name:
            writer.add_tensor(gguf_name, array.astype(np.float32))
        elif stored_type == "F16":
            writer.add_tensor(gguf_name, array.astype(np.float16))
        elif stored_type in KQUANT_SCALES:
            qtype = gguf.GGMLQuantizationType[stored_type]
            writer.add_tensor(gguf_name, random_kquant(array.shape, stored_type, rng), raw_dtype=qtype)
        else:
            qtype = gguf.GGMLQuantizationType[stored_type]
            writer.add_tensor(gguf_name, gguf.quants.quantize(array, qtype), raw_dtype=qtype)
    if _rope(cfg).get("rope_type") == "longrope":  # Phi3MiniModel.generate_extra_tensors
        writer.add_tensor("rope_factors_long.weight", np.array(_rope(cfg)["long_factor"], dtype=np.float32))
        writer.add_tensor("rope_factors_short.weight", np.array(_rope(cfg)["short_factor"], dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
