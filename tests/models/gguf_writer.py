"""Write a tiny transformers model as a GGUF the way llama.cpp's converter does, for round-trip tests.

Names come from the `gguf` package's own HF -> llama.cpp tensor map (independent of Lamina's
tables), and the converter's layout changes are applied here: Llama's q/k row permutation,
Gemma's (1 + w) norms, GPT-2's transposed Conv1D weights and its duplicated output matrix.
"""

from __future__ import annotations

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


def f16_rounded(model: torch.nn.Module) -> torch.nn.Module:
    """`model` with its matrices rounded to float16 and back, as `write_gguf` stores them."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 2 and "norm" not in name:
                param.copy_(param.half().float())
    return model


def write_hparams(writer, arch: str, cfg) -> None:
    """The `{arch}.*` keys llama.cpp's converter writes for these tiny configs."""
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_head_count(cfg.num_attention_heads)
    if arch == "gpt2":
        writer.add_context_length(cfg.n_positions)
        writer.add_feed_forward_length(4 * cfg.hidden_size)
        writer.add_layer_norm_eps(cfg.layer_norm_epsilon)
        return
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    if arch == "phi3":
        writer.add_rope_dimension_count(int(head_dim * cfg.rope_parameters.get("partial_rotary_factor", 1.0)))
        if cfg.sliding_window:
            writer.add_sliding_window(cfg.sliding_window)
    else:
        writer.add_rope_dimension_count(head_dim)
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)


def write_gguf(
    model: torch.nn.Module,
    arch: str,
    path: Path,
    vocab_size: int,
    spm: tuple[list[str], list[float], list[int]] | None = None,
) -> Path:
    """`model`'s weights and config as a llama.cpp-style GGUF of architecture `arch`.

    The vocabulary is `vocab_size` placeholder tokens, or `spm`'s (tokens, scores, token types)
    as a SentencePiece-style ("llama") tokenizer with BOS 1 and EOS 2.
    """
    import gguf

    cfg = model.config
    model_arch = {name: enum for enum, name in gguf.MODEL_ARCH_NAMES.items()}[arch]
    names = gguf.get_tensor_name_map(model_arch, cfg.num_hidden_layers)
    writer = gguf.GGUFWriter(str(path), arch)
    write_hparams(writer, arch, cfg)
    if spm is None:
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list([f"<t{i}>" for i in range(vocab_size)])
    else:
        tokens, scores, types = spm
        writer.add_tokenizer_model("llama")
        writer.add_token_list(tokens)
        writer.add_token_scores(scores)
        writer.add_token_types(types)
        writer.add_bos_token_id(1)
        writer.add_eos_token_id(2)
    state = model.state_dict()
    tied = cfg.tie_word_embeddings
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and tied and arch != "gpt2":
            continue  # llama.cpp writes no output matrix for tied models (GPT-2 excepted)
        if hf_name.endswith(".attn.bias") or hf_name.endswith(".masked_bias"):
            continue
        tensor = tensor.detach().float()
        if arch in ("llama", "mistral") and hf_name.endswith("q_proj.weight"):
            tensor = llama_cpp_permute(tensor, cfg.num_attention_heads)
        if arch in ("llama", "mistral") and hf_name.endswith("k_proj.weight"):
            tensor = llama_cpp_permute(tensor, cfg.num_key_value_heads)
        if arch == "gemma" and hf_name.endswith("norm.weight"):
            tensor = tensor + 1
        if arch == "gpt2" and hf_name.endswith(CONV1D):
            tensor = tensor.t()
        gguf_name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        assert gguf_name is not None, hf_name
        # 2-D matrices as F16 (llama.cpp's usual float type), vectors as F32
        dtype = np.float16 if tensor.ndim == 2 and "norm" not in hf_name else np.float32
        writer.add_tensor(gguf_name, tensor.contiguous().numpy().astype(dtype))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
