"""llama.cpp's reorderings of projection rows, undone: each function takes the converter's row order
back to the one Hugging Face stores.

llama.cpp's converter moves whole rows of some projections (its kernels want q, k and v contiguous,
or RoPE pairs interleaved). Moving rows commutes with per-row block quantization, so the same
function applies to a float matrix, its bias, or the codes and scales of its quantized blocks
(anything whose first dimension is the output rows).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from lamina.errors import CheckpointError

RowOrder = Callable[[torch.Tensor], torch.Tensor]


def unpermute_qk_rows(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undo llama.cpp's `permute` of q/k rows (interleaved rotary pairs -> HF's half-split layout)."""
    rows, rest = weight.shape[0], weight.shape[1:]
    _check_rows(rows, 2 * num_heads, f"{num_heads} heads of even size")
    # [heads * head_dim, ...] -> [heads, head_dim/2, 2, ...] -> [heads, 2, head_dim/2, ...] -> back
    return weight.reshape(num_heads, rows // num_heads // 2, 2, *rest).transpose(1, 2).reshape(rows, *rest)


def interleave_qkv_per_head(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """BLOOM / GPT-NeoX: llama.cpp's [all q | all k | all v] rows -> HF's per-head [q_h | k_h | v_h]."""
    rows, rest = weight.shape[0], weight.shape[1:]
    _check_rows(rows, 3 * num_heads, f"q, k and v of {num_heads} heads")
    # [3 * H * D, ...] -> [3, H, D, ...] -> [H, 3, D, ...] -> [3 * H * D, ...]
    return weight.reshape(3, num_heads, -1, *rest).transpose(0, 1).reshape(rows, *rest)


def regroup_falcon_qkv(weight: torch.Tensor, num_heads: int, num_kv_heads: int) -> torch.Tensor:
    """Falcon: llama.cpp's [all q | all k | all v] rows -> HF's per-KV-group [q_1 .. q_g | k | v].

    With one KV head (Falcon-7B) both orders are [q heads | k | v] and nothing moves.
    """
    rows, rest = weight.shape[0], weight.shape[1:]
    _check_rows(rows, num_heads + 2 * num_kv_heads, f"{num_heads} query and {num_kv_heads} KV heads")
    if num_heads % num_kv_heads:
        raise CheckpointError(f"Falcon's {num_heads} query heads do not split into {num_kv_heads} KV groups")
    head_dim = rows // (num_heads + 2 * num_kv_heads)
    q, k, v = weight.split([num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim])
    # q [H * D, ...] -> [Hkv, H / Hkv, D, ...]; k and v [Hkv * D, ...] -> [Hkv, 1, D, ...]
    q = q.reshape(num_kv_heads, num_heads // num_kv_heads, head_dim, *rest)
    k, v = (t.reshape(num_kv_heads, 1, head_dim, *rest) for t in (k, v))
    return torch.cat([q, k, v], dim=1).reshape(rows, *rest)  # [Hkv, H / Hkv + 2, D, ...] -> rows


def _check_rows(rows: int, parts: int, what: str) -> None:
    if rows % parts:
        raise CheckpointError(
            f"a projection has {rows} rows, which {what} cannot split; "
            "the GGUF's head counts disagree with its tensors"
        )
