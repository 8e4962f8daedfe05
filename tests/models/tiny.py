"""Tiny random checkpoints of every family, built by transformers from configs shaped like real ones.

Each entry keeps the flags of a real checkpoint (fused projections, windows, soft-caps, rotary
fractions) at tiny sizes. Windows are 8 tokens, so the 12-token prompts of the tests outgrow them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

VOCAB = 320
WINDOW = 8
LONGROPE_ORIGINAL_CONTEXT = 64
_COMMON = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4)
_GQA = dict(_COMMON, intermediate_size=128, num_key_value_heads=2, max_position_embeddings=256)

# family -> (transformers config class, its keyword arguments)
TINY: dict[str, tuple[str, dict[str, Any]]] = {
    # Qwen3-8B-like: explicit head_dim != hidden/heads; the second layer slides (max_window_layers=1)
    "qwen3": (
        "Qwen3Config",
        dict(_GQA, head_dim=32, use_sliding_window=True, sliding_window=WINDOW, max_window_layers=1),
    ),
    # Phi-3-mini-4k-like: window; Phi-4-mini-like partial rotary
    "phi3": (
        "Phi3Config",
        dict(
            _GQA,
            sliding_window=WINDOW,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        ),
    ),
    # Phi-4-mini-like: LongRoPE on a partial rotary width, no window. The tests' prompts stay within
    # the original 64-token context (short factors); test_longrope_* go past it (long factors).
    "phi3_longrope": (
        "Phi3Config",
        dict(
            _GQA,
            original_max_position_embeddings=LONGROPE_ORIGINAL_CONTEXT,
            pad_token_id=0,
            bos_token_id=1,
            eos_token_id=2,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "partial_rotary_factor": 0.75,
                "short_factor": [1.0, 1.05, 1.1, 1.2, 1.3, 1.5],
                "long_factor": [1.5, 2.0, 3.0, 5.0, 8.0, 12.0],
            },
        ),
    ),
    # Gemma-2B-like: multi-query, head_dim != hidden/heads
    "gemma": ("GemmaConfig", dict(_GQA, num_key_value_heads=1, head_dim=32)),
    # Gemma-2-2B-like, with caps small enough to bite on random weights
    "gemma2": (
        "Gemma2Config",
        dict(
            _GQA,
            head_dim=16,
            query_pre_attn_scalar=24,
            sliding_window=WINDOW,
            attn_logit_softcapping=0.5,
            final_logit_softcapping=0.3,
        ),
    ),
    # Gemma-3-4B-like: local/global layers, linear RoPE scaling on the global ones only
    "gemma3": (
        "Gemma3TextConfig",
        dict(
            _GQA,
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=WINDOW,
            layer_types=["sliding_attention", "full_attention"],
            rope_parameters={
                "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "linear", "factor": 8.0, "rope_theta": 1000000.0},
            },
        ),
    ),
    # GPT-2-small-like (Conv1D weights, learned positions, tied head)
    "gpt2": ("GPT2Config", dict(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256)),
    # Pythia-like: parallel residual, rotary on a quarter of each head
    "gpt_neox": (
        "GPTNeoXConfig",
        dict(
            _COMMON,
            intermediate_size=128,
            max_position_embeddings=256,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.25},
        ),
    ),
    # StableLM-base-alpha-like: sequential residual, untied
    "gpt_neox_seq": (
        "GPTNeoXConfig",
        dict(_COMMON, intermediate_size=128, max_position_embeddings=256, use_parallel_residual=False),
    ),
    # Phi-2-like: parallel attention/MLP, rotary on 40% of each head
    "phi": (
        "PhiConfig",
        dict(
            _COMMON,
            intermediate_size=128,
            max_position_embeddings=256,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.4},
        ),
    ),
    # Falcon-7B-like: multi-query, one norm shared by the parallel branches
    "falcon7b": ("FalconConfig", dict(_COMMON, max_position_embeddings=256)),
    # Falcon-40B-like "new decoder architecture": grouped KV heads, ln_attn + ln_mlp
    "falcon40b": (
        "FalconConfig",
        dict(_COMMON, max_position_embeddings=256, new_decoder_architecture=True, num_kv_heads=2),
    ),
    # Falcon-RW-like: ALiBi, sequential blocks, per-head fused qkv, biases
    "falcon_alibi": (
        "FalconConfig",
        dict(
            _COMMON,
            max_position_embeddings=256,
            alibi=True,
            multi_query=False,
            parallel_attn=False,
            bias=True,
        ),
    ),
    # BLOOM-560m-like: ALiBi with a head count that is not a power of two
    "bloom": ("BloomConfig", dict(vocab_size=VOCAB, hidden_size=72, n_layer=2, n_head=6)),
    # OPT-125m-like: pre-norm, tied head
    "opt": ("OPTConfig", dict(_COMMON, ffn_dim=128, max_position_embeddings=256, pad_token_id=1)),
    # OPT-350m-like: post-norm, project_in/out around a wider decoder
    "opt350m": (
        "OPTConfig",
        dict(
            _COMMON,
            ffn_dim=128,
            max_position_embeddings=256,
            pad_token_id=1,
            do_layer_norm_before=False,
            word_embed_proj_dim=32,
        ),
    ),
}


def tiny_hf_model(family: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A random transformers model of `family` (config keys in `overrides` replaced), float32, eval mode."""
    import transformers

    class_name, kwargs = TINY[family]
    config = getattr(transformers, class_name)(**{**kwargs, **overrides})
    config.initializer_range = 0.1  # larger than the default 0.02 so every term moves the logits
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(config).float().eval()


def save_tiny(family: str, directory: Path) -> torch.nn.Module:
    """Save `family`'s tiny model to `directory` (safetensors + config.json) and return it."""
    model = tiny_hf_model(family)
    model.save_pretrained(directory)
    return model
