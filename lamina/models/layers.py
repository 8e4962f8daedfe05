"""Building blocks shared by the model families: norms, rotary embeddings, attention, MLPs.

Each family file composes these; a variant (a norm offset, a bias, a window) is a constructor
argument here, not a copy of the block in another file.
"""

from __future__ import annotations

import math
from functools import partial
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from lamina.errors import CheckpointError, UnsupportedModelError
from lamina.kernels import native
from lamina.models.sdpa import decode_attention, one_row_at_a_time, repeat_kv, sdpa

#: New query rows up to which attention over a cache runs on the native decode kernel (decode steps,
#: speculative verify passes); longer prompts take SDPA's flash kernel.
NATIVE_ATTENTION_ROWS = 16


class LayerCache(Protocol):
    """What attention needs from a KV cache: write new keys/values, get all of them back. A cache may
    also offer `layer_tensors(layer_idx) -> (keys, values)`, its whole [B, Hkv, max_len, D] tensors,
    which the native decoder layer (`native_layer.py`) writes and reads itself."""

    max_len: int  # positions it holds: the longest sequence it serves

    def update(
        self, layer_idx: int, start_pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 like the reference implementations.

    `offset=1.0` is Gemma's variant: the stored weight is a delta, the scale is (1 + weight), and
    the scaling happens in float32 before the cast back (as Gemma's reference does).
    """

    def __init__(self, dim: int, eps: float = 1e-6, offset: float = 0.0) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        if dtype == torch.float32 and not self.offset:  # skip the no-op casts: each still costs a dispatch
            return self.weight * F.rms_norm(x, x.shape[-1:], eps=self.eps)
        x = F.rms_norm(x.float(), x.shape[-1:], eps=self.eps)  # x * rsqrt(mean(x^2) + eps), one op
        if self.offset:
            return (x * (self.offset + self.weight.float())).to(dtype)
        return self.weight * x.to(dtype)


ACTIVATIONS = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


def activation(name: str) -> Any:
    """The activation function an HF config names."""
    if name not in ACTIVATIONS:
        raise UnsupportedModelError(f"activation {name!r} is not supported; supported: {sorted(ACTIVATIONS)}")
    return ACTIVATIONS[name]


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)): the SwiGLU / GeGLU feed-forward."""

    def __init__(self, hidden: int, intermediate: int, act: str, bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.up_proj = nn.Linear(hidden, intermediate, bias=bias)
        self.down_proj = nn.Linear(intermediate, hidden, bias=bias)
        self.act = activation(act)
        self.gate_up_proj: nn.Module | None = None  # set by `fuse`

    def fuse(self) -> bool:
        """Replace gate/up by one [2I, H] projection (one mat-vec per token instead of two).

        A pass after loading, so checkpoints keep loading by HF name. Float layers and int4/int8
        quantized ones fuse (see `_fuse_linears`).
        """
        fused = None if self.gate_up_proj is not None else _fuse_linears(self.gate_proj, self.up_proj)
        if fused is None:
            return False
        self.gate_up_proj = fused
        del self.gate_proj, self.up_proj
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_proj is not None:
            gate, up = self.gate_up_proj(x).chunk(2, dim=-1)  # [B, T, 2I] -> 2 x [B, T, I]
            return self.down_proj(self.act(gate) * up)
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


def _fuse_linears(*layers: nn.Module) -> nn.Module | None:
    """One layer computing all `layers` (outputs concatenated), or None when they cannot merge.

    Plain float linears merge here; a quantized scheme merges its own kind through its
    `concatenate` (int4, int8); mixed kinds and offloaded (meta) weights stay separate.
    """
    kind = type(layers[0])
    if any(type(layer) is not kind for layer in layers):
        return None
    if kind is not nn.Linear:
        concatenate = getattr(kind, "concatenate", None)
        return concatenate(list(layers)) if concatenate is not None else None
    if any(layer.weight.device.type == "meta" for layer in layers):
        return None
    has_bias = [layer.bias is not None for layer in layers]
    weight = torch.cat([layer.weight for layer in layers])  # [sum(out), in]
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=any(has_bias), device="meta")
    fused.weight = nn.Parameter(weight, requires_grad=False)
    if any(has_bias):
        biases = [
            layer.bias if layer.bias is not None else weight.new_zeros(layer.out_features) for layer in layers
        ]
        fused.bias = nn.Parameter(torch.cat(biases), requires_grad=False)
    return fused


def rope_inverse_frequencies(
    head_dim: int, theta: float, scaling: dict[str, Any] | None, long: bool = False
) -> torch.Tensor:
    """Per-pair rotation frequencies [head_dim/2] for the RoPE variants HF configs describe.

    `long` picks LongRoPE's factors for sequences past its original context (else its short ones).
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    rope_type = (scaling or {}).get("rope_type", "default")
    if rope_type == "longrope":
        return 1.0 / (
            _longrope_factors(scaling, "long_factor" if long else "short_factor", head_dim) * theta**exponents
        )
    inv_freq = 1.0 / (theta**exponents)
    if rope_type == "default":
        return inv_freq
    if rope_type == "linear":
        return inv_freq / scaling["factor"]
    if rope_type == "llama3":
        return _llama3_frequencies(inv_freq, scaling)
    raise UnsupportedModelError(
        f"rope scaling type {rope_type!r} is not supported; supported: default, linear, llama3, longrope"
    )


def _longrope_factors(scaling: dict[str, Any], key: str, head_dim: int) -> torch.Tensor:
    """LongRoPE's per-frequency divisors [head_dim/2] (Phi-3 128k, Phi-3.5, Phi-4-mini)."""
    factors = scaling.get(key)
    if factors is None or len(factors) != head_dim // 2:
        found = "none" if factors is None else f"{len(factors)} values"
        raise CheckpointError(
            f"rope_scaling 'longrope' needs {head_dim // 2} {key} values for a rotary width of {head_dim}, "
            f"found {found}; the config is inconsistent"
        )
    return torch.tensor(factors, dtype=torch.float32)


def rope_attention_factor(scaling: dict[str, Any] | None) -> float:
    """LongRoPE's scale on cos/sin, 1.0 for the other variants: the config's `attention_factor`, else
    sqrt(1 + ln(factor) / ln(original context)) once the context was extended (transformers' default)."""
    if (scaling or {}).get("rope_type") != "longrope":
        return 1.0
    if scaling.get("attention_factor") is not None:
        return scaling["attention_factor"]
    factor = scaling["factor"]
    if factor <= 1.0:
        return 1.0
    return math.sqrt(1 + math.log(factor) / math.log(scaling["original_max_position_embeddings"]))


def _llama3_frequencies(inv_freq: torch.Tensor, scaling: dict[str, Any]) -> torch.Tensor:
    """Llama 3.1's scaling: long wavelengths slowed by `factor`, short kept, a smooth band between."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context = scaling["original_max_position_embeddings"]
    low_wavelen, high_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(is_medium, smoothed, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for given positions, computed on the fly (no [context, dim] buffer).

    LongRoPE has two sets of frequencies: the long one for a sequence longer than
    `original_max_position_embeddings`, the short one otherwise, for all of its positions. A call
    with a KV cache passes the cache's length as the sequence's (as llama.cpp picks by context size),
    so every key in a cache is rotated alike however the prompt is chunked; a call without one
    counts up to its last position, as transformers does (chosen on the device: no host sync).
    """

    def __init__(self, head_dim: int, theta: float, scaling: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.head_dim, self.theta, self.scaling = head_dim, theta, scaling
        self.attention_factor = rope_attention_factor(scaling)
        longrope = (scaling or {}).get("rope_type") == "longrope"
        self._long_from = scaling["original_max_position_embeddings"] if longrope else None
        # (short or only, long) frequencies, built on first use on the positions' device
        self._inv_freq: tuple[torch.Tensor, torch.Tensor | None] | None = None

    def _frequencies(self, positions: torch.Tensor, seq_len: int | None) -> torch.Tensor:
        """The frequencies [head_dim/2] for `positions` [T] (ascending) of a sequence of `seq_len`."""
        if self._inv_freq is None or self._inv_freq[0].device != positions.device:
            build = partial(rope_inverse_frequencies, self.head_dim, self.theta, self.scaling)
            long = build(long=True).to(positions.device) if self._long_from is not None else None
            self._inv_freq = (build().to(positions.device), long)
        short, long = self._inv_freq
        if long is None:
            return short
        if seq_len is not None:
            return long if seq_len > self._long_from else short
        return torch.where(positions[-1] >= self._long_from, long, short)  # last position + 1 > original

    def forward(
        self, positions: torch.Tensor, dtype: torch.dtype, seq_len: int | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """positions [T] -> cos, sin [T, head_dim], computed in float32 and returned in `dtype`.

        `seq_len`: the length of the sequence the positions belong to (default: up to the last one).
        """
        freqs = positions.float()[:, None] * self._frequencies(positions, seq_len)[None, :]  # [T, head_dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [T, head_dim]
        cos, sin = emb.cos(), emb.sin()
        if self.attention_factor != 1.0:
            cos, sin = cos * self.attention_factor, sin * self.attention_factor
        return cos.to(dtype), sin.to(dtype)


def split_heads(x: torch.Tensor, heads: int, head_dim: int) -> torch.Tensor:
    """[B, T, H*D] -> [B, T, H, D] -> [B, H, T, D]."""
    return x.view(x.shape[0], x.shape[1], heads, head_dim).transpose(1, 2)


def merge_heads(x: torch.Tensor) -> torch.Tensor:
    """[B, H, T, D] -> [B, T, H, D] -> [B, T, H*D]."""
    return x.transpose(1, 2).reshape(x.shape[0], x.shape[2], x.shape[1] * x.shape[3])


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [B, H, T, D] by cos/sin [T, R] in HF's half-split layout.

    R < D is partial rotary (GPT-NeoX, Phi-2): the first R features rotate, the rest pass through.
    """
    if cos.shape[-1] < x.shape[-1]:
        rot, rest = x[..., : cos.shape[-1]], x[..., cos.shape[-1] :]
        return torch.cat((apply_rotary(rot, cos, sin), rest), dim=-1)
    first, second = x.chunk(2, dim=-1)
    rotated = torch.cat((-second, first), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Multi-head attention with grouped KV heads, RoPE, an optional sliding window and KV cache."""

    def __init__(
        self,
        layer_idx: int,
        hidden: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        qkv_bias: bool = False,
        o_bias: bool = False,
        sliding_window: int | None = None,
        *,
        scale: float | None = None,
        softcap: float | None = None,
        qk_norm_eps: float | None = None,
        norm_offset: float = 0.0,
    ) -> None:
        """`scale`: score scale (default 1/sqrt(head_dim)); `softcap`: Gemma 2's tanh cap on scores;
        `qk_norm_eps`: RMS-normalize each query/key head (Qwen3, Gemma 3) with this epsilon."""
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.sliding_window = sliding_window
        self.scale, self.softcap = scale, softcap
        self.q_proj = nn.Linear(hidden, num_heads * head_dim, bias=qkv_bias)
        self.k_proj = nn.Linear(hidden, num_kv_heads * head_dim, bias=qkv_bias)
        self.v_proj = nn.Linear(hidden, num_kv_heads * head_dim, bias=qkv_bias)
        self.o_proj = nn.Linear(num_heads * head_dim, hidden, bias=o_bias)
        if qk_norm_eps is not None:
            self.q_norm = RMSNorm(head_dim, qk_norm_eps, norm_offset)
            self.k_norm = RMSNorm(head_dim, qk_norm_eps, norm_offset)
        else:
            self.q_norm = self.k_norm = None

        self.qkv_proj: nn.Module | None = None  # set by `fuse`

    def fuse(self) -> bool:
        """Replace q/k/v by one projection (one mat-vec per token instead of three); see GatedMLP.fuse."""
        fused = None if self.qkv_proj is not None else _fuse_linears(self.q_proj, self.k_proj, self.v_proj)
        if fused is None:
            return False
        self.qkv_proj = fused
        del self.q_proj, self.k_proj, self.v_proj
        return True

    def _project(
        self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, T, hidden] -> q [B, T, H, D], k and v [B, T, Hkv, D], q and k normed and rotated.

        With fused q/k/v, the query and key heads sit side by side in one output and rotate together.
        """
        batch, seq, _ = x.shape
        heads, kv_heads, dim = self.num_heads, self.num_kv_heads, self.head_dim
        cos, sin = rope[0][:, None], rope[1][:, None]  # [T, D] -> [T, 1, D], broadcast over heads
        if self.qkv_proj is not None and self.q_norm is None:
            qkv = self.qkv_proj(x).view(batch, seq, heads + 2 * kv_heads, dim)  # [B, T, H+2Hkv, D]
            qk, v = qkv.split([heads + kv_heads, kv_heads], dim=2)
            q, k = apply_rotary(qk, cos, sin).split([heads, kv_heads], dim=2)  # rotated [B, T, H+Hkv, D]
            return q, k, v
        if self.qkv_proj is not None:
            q, k, v = self.qkv_proj(x).split([heads * dim, kv_heads * dim, kv_heads * dim], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        q = q.view(batch, seq, heads, dim)  # [B, T, H*D] -> [B, T, H, D]
        k = k.view(batch, seq, kv_heads, dim)  # [B, T, Hkv*D] -> [B, T, Hkv, D]
        v = v.view(batch, seq, kv_heads, dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v

    def forward(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: LayerCache | None = None,
        start_pos: int | torch.Tensor = 0,
    ) -> torch.Tensor:
        """`start_pos` is an int, or a 1-element tensor for the static-shape (compiled) decode step."""
        batch, seq, _ = x.shape
        q, k, v = (t.transpose(1, 2) for t in self._project(x, rope))  # [B, T, h, D] -> [B, h, T, D]
        out = cached_attend(
            q,
            k,
            v,
            cache,
            self.layer_idx,
            start_pos,
            self.sliding_window,
            scale=self.scale,
            softcap=self.softcap,
        )  # [B, H, T, D]
        # [B, H, T, D] -> [B, T, H*D]
        return self.o_proj(out.transpose(1, 2).reshape(batch, seq, self.num_heads * self.head_dim))


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, start_pos: int | torch.Tensor, window: int | None
) -> torch.Tensor:
    """Causal attention of q [B, H, T, D] (positions start_pos..) over k/v [B, Hkv, L, D] (positions 0..L-1).

    Picks the cheapest exact form: no mask for one new token, SDPA's built-in causal mask for a
    fresh prompt, an explicit [T, L] boolean mask otherwise (a window, or a prompt continuing a cache).
    A tensor `start_pos` means k/v are a whole static-size cache and shapes never change: one token
    attends over the filled prefix through the opaque `decode_attention` op (on CPU), anything else
    over the whole cache, masked.
    """
    seq, kv_len = q.shape[2], k.shape[2]
    if isinstance(start_pos, torch.Tensor):
        if seq == 1 and q.device.type != "cuda":  # CUDA graphs cannot replay the op's host read
            return decode_attention(q, k, v, start_pos, window or 0)
        return sdpa(q, k, v, mask=_causal_mask(start_pos, seq, kv_len, window, q.device))
    needs_window = window is not None and kv_len > window
    if seq == 1 and not needs_window:
        return sdpa(q, k, v)
    if start_pos == 0 and seq == kv_len and not needs_window:
        return sdpa(q, k, v, causal=True)
    return sdpa(
        q, k, v, mask=_causal_mask(start_pos, seq, kv_len, window if needs_window else None, q.device)
    )


def _causal_mask(
    start_pos: int | torch.Tensor, seq: int, kv_len: int, window: int | None, device: torch.device
) -> torch.Tensor:
    """[T, L] boolean: query at start_pos + t sees keys at positions <= it (and within `window`)."""
    q_pos = (start_pos + torch.arange(seq, device=device))[:, None]  # [T, 1]
    k_pos = torch.arange(kv_len, device=device)[None, :]  # [1, L]
    mask = k_pos <= q_pos
    if window is not None:
        mask &= k_pos > q_pos - window
    return mask


def cached_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cache: LayerCache | None,
    layer_idx: int,
    start_pos: int | torch.Tensor,
    window: int | None = None,
    *,
    scale: float | None = None,
    softcap: float | None = None,
    alibi: ALiBi | None = None,
) -> torch.Tensor:
    """Write k/v [B, Hkv, T, D] to the cache (if any), then attend: q [B, H, T, D] -> [B, H, T, D].

    The common case goes through `attend` (SDPA); score soft-capping and ALiBi need the scores
    themselves, so they take `attend_eager`. Under `sdpa.decode_order_attention`, several new tokens
    continuing a cache attend one row at a time, each over its own prefix (as decoding would).
    """
    if cache is not None:
        k, v = cache.update(layer_idx, start_pos, k, v)
    if softcap is None and alibi is None:
        native_out = native_attend(q, k, v, start_pos, window, scale)
        if native_out is not None:
            return native_out
    seq = q.shape[2]
    if seq > 1 and isinstance(start_pos, int) and start_pos > 0 and one_row_at_a_time():
        rows = []
        for t in range(seq):
            end = start_pos + t + 1  # row t sees positions 0..start_pos + t, as its decode step would
            row = _attend_filled(
                q[:, :, t : t + 1], k[:, :, :end], v[:, :, :end], end - 1, window, scale, softcap, alibi
            )
            rows.append(row)
        return torch.cat(rows, dim=2)  # T x [B, H, 1, D] -> [B, H, T, D]
    return _attend_filled(q, k, v, start_pos, window, scale, softcap, alibi)


def native_attend(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start_pos: int | torch.Tensor,
    window: int | None,
    scale: float | None,
) -> torch.Tensor | None:
    """Decode attention on Lamina's CPU kernel: q [B, H, T, D] for a few new rows (T <= 16) at
    positions start_pos.. over cached k/v [B, Hkv, L, D] -> [B, H, T, D], each row over its own
    prefix as decoding computes it (so a verify pass equals its decode steps bit for bit). None
    when the kernel does not apply (GPU, not float32, a long prompt, an unsupported shape): SDPA then."""
    if (
        isinstance(start_pos, torch.Tensor)  # the compiled step: `decode_attention` calls the kernel
        or q.device.type != "cpu"
        or q.dtype != torch.float32
        or k.dtype != torch.float32
        or q.shape[2] > NATIVE_ATTENTION_ROWS
    ):
        return None
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out = native.decode_attention(q.transpose(1, 2), k, v, start_pos, window or 0, scale)  # [B, T, H, D]
    return None if out is None else out.transpose(1, 2)  # [B, T, H, D] -> [B, H, T, D]


def _attend_filled(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start_pos: int | torch.Tensor,
    window: int | None,
    scale: float | None,
    softcap: float | None,
    alibi: ALiBi | None,
) -> torch.Tensor:
    """`cached_attend` after the cache write: q [B, H, T, D] over k/v [B, Hkv, L, D]."""
    if softcap is None and alibi is None:
        if scale is not None:
            q = q * (scale * math.sqrt(q.shape[-1]))  # SDPA divides by sqrt(D) itself
        return attend(q, k, v, start_pos, window)
    bias = alibi(k.shape[2], q.device, q.dtype) if alibi is not None else None
    return attend_eager(q, k, v, start_pos, window, scale, softcap, bias)


def attend_eager(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    start_pos: int | torch.Tensor,
    window: int | None,
    scale: float | None = None,
    softcap: float | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """`attend` with the scores materialized: capped to softcap * tanh(s / softcap), plus `bias` [H, 1, L]."""
    heads, seq, dim = q.shape[1], q.shape[2], q.shape[3]
    kv_len = k.shape[2]
    k, v = repeat_kv(k, v, heads // k.shape[1])
    scores = torch.matmul(q, k.transpose(-1, -2)) * (dim**-0.5 if scale is None else scale)  # [B, H, T, L]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias
    scores = scores.masked_fill(~_causal_mask(start_pos, seq, kv_len, window, q.device), float("-inf"))
    return torch.matmul(F.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype), v)


class ALiBi:
    """ALiBi's attention bias: slope[h] * key position, [H, 1, L], added to the scaled scores.

    Softmax ignores the per-query constant that the `slope * (key - query)` form adds, so key
    positions alone give the same weights. `scale` multiplies the bias (Falcon adds it before the
    1/sqrt(D) scaling); `bf16_products` rounds slopes and products to bfloat16 as Falcon's
    reference does, which its checkpoints were trained with.
    """

    def __init__(self, num_heads: int, scale: float = 1.0, bf16_products: bool = False) -> None:
        self.num_heads, self.scale, self.bf16_products = num_heads, scale, bf16_products
        self._slopes: torch.Tensor | None = None  # built on first use (models are built on "meta")

    def __call__(self, kv_len: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        positions = torch.arange(kv_len, device=device)
        if self._slopes is None or self._slopes.device != device:  # once, not per layer and token
            slopes = alibi_slopes(self.num_heads).to(device)
            self._slopes = slopes.bfloat16() if self.bf16_products else slopes
        slopes = self._slopes
        bias = (slopes[:, None] * positions[None, :]).to(dtype)  # [H, L]
        return (bias * self.scale)[:, None, :]  # [H, 1, L]


def alibi_slopes(num_heads: int) -> torch.Tensor:
    """ALiBi's per-head slopes [H]: a geometric sequence, interleaved extras when H is not a power of 2."""
    closest = 2 ** math.floor(math.log2(num_heads))
    base = 2 ** (-(2 ** -(math.log2(closest) - 3)))
    slopes = base ** torch.arange(1, 1 + closest, dtype=torch.float32, device="cpu")
    if closest != num_heads:
        extra_base = 2 ** (-(2 ** -(math.log2(2 * closest) - 3)))
        remaining = min(closest, num_heads - closest)
        extra = extra_base ** torch.arange(1, 1 + 2 * remaining, 2, dtype=torch.float32, device="cpu")
        slopes = torch.cat([slopes, extra])
    return slopes


def soft_cap(x: torch.Tensor, cap: float | None) -> torch.Tensor:
    """cap * tanh(x / cap): Gemma 2's bound on logits (identity when cap is None)."""
    return x if cap is None else torch.tanh(x / cap) * cap
