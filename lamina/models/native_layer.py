"""A Llama-family decoder layer run by one native call (`lamina/kernels/llama_layer.c`) per step.

For a few new rows (decode steps, speculative verify passes) the Python glue between the kernels
costs more than the kernels: ~45 dispatched ops a layer. When every projection of a layer is
either a quantized layer in the native block layout (a GGUF kept as blocks, or an int4 / int8 /
LLM.int8 / NF4 / FP4 layer repacked for it, on an x86-64 CPU with AVX-512 VNNI or AVX2), 16-bit weights
(`--quantize bf16|fp16`) or a float linear (float32 at call time), fused or not, and the
layer has no variant the C code does not implement (biases, q/k norms, partial rotary, another
activation), `attach_native_layers` gives it a `NativeLlamaLayer`, and `LlamaDecoderLayer.forward`
hands it the step. Streamed layers qualify too: the weights are looked up on every call, after
the streaming hooks have bound them. Longer inputs (prompts), tensor positions (a compiled step),
other caches or devices take the module path. Both paths compute the same function; the native
one rounds differently in its norms, RoPE and SiLU (float32, ~1e-7 relative), as any two kernels do.
"""

from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from lamina.kernels import native
from lamina.models.layers import NATIVE_ATTENTION_ROWS, LayerCache, RMSNorm


class _Weight(ctypes.Structure):
    _fields_ = [
        ("codes", ctypes.c_void_p),
        ("d", ctypes.c_void_p),
        ("m", ctypes.c_void_p),
        ("dense", ctypes.c_void_p),
        ("out_features", ctypes.c_int64),
        ("in_features", ctypes.c_int64),
        ("bits", ctypes.c_int32),
        ("offset", ctypes.c_int32),
        ("lut", ctypes.c_void_p),
        ("scale_block", ctypes.c_int64),
        ("dense_kind", ctypes.c_int64),
        ("outlier_scales", ctypes.c_void_p),
        ("threshold", ctypes.c_float),
        ("order", ctypes.c_void_p),
        ("dense_scales", ctypes.c_void_p),
        ("scale_rows", ctypes.c_int64),
        ("scale_cols", ctypes.c_int64),
    ]


class _Projection(ctypes.Structure):
    _fields_ = [("parts", _Weight * 3), ("count", ctypes.c_int64)]


class _LlamaLayer(ctypes.Structure):
    _fields_ = [
        ("norm1", ctypes.c_void_p),
        ("norm2", ctypes.c_void_p),
        ("qkv", _Projection),
        ("o", _Projection),
        ("gate_up", _Projection),
        ("down", _Projection),
        *(
            (name, ctypes.c_int64)
            for name in ("hidden", "heads", "kv_heads", "head_dim", "intermediate", "window")
        ),
        ("eps", ctypes.c_float),
        ("scale", ctypes.c_float),
    ]


def _weight_tensors(module: nn.Module) -> tuple[torch.Tensor | None, ...]:
    """The tensors the C struct points at: (codes, d, m, None, outlier scales) for blocks (the scales:
    LLM.int8's float32 row scales, `native_outliers()`, else None), (None, None, None, weight, None)
    for a float linear or 16-bit weights (`native_dense()`), (None, None, None, e4m3 codes, block
    scales) for FP8 weights (`native_e4m3()`)."""
    if isinstance(module, nn.Linear):
        return None, None, None, module.weight, None
    if hasattr(module, "native_dense"):
        return None, None, None, module.native_dense(), None
    if hasattr(module, "native_e4m3"):
        codes, scales, _ = module.native_e4m3()
        return None, None, None, codes, scales
    codes, d, m, _, _, _ = module.native_blocks()
    scales = module.native_outliers()[0] if hasattr(module, "native_outliers") else None
    return codes, d, m, None, scales


def _input_order(module: nn.Module) -> torch.Tensor | None:
    """The int64 [K] gather a projection applies to its input first (`native_order()`: a GPTQ
    act-order layer), or None."""
    return module.native_order() if hasattr(module, "native_order") else None


def _fill(projection: _Projection, modules: tuple[nn.Module, ...]) -> None:
    projection.count = len(modules)
    for part, module in zip(projection.parts, modules, strict=False):
        tensors = _weight_tensors(module)
        codes, d, m, dense, scales = (None if t is None else t.data_ptr() for t in tensors)
        part.codes, part.d, part.m, part.dense = codes, d, m, dense
        order = _input_order(module)
        part.order = None if order is None else order.data_ptr()
        part.out_features, part.in_features = module.out_features, module.in_features
        part.outlier_scales = part.dense_scales = None
        if hasattr(module, "native_e4m3"):  # float8 codes with block scales (`quant/fp8.py`)
            part.dense_scales = scales
            part.scale_rows, part.scale_cols = module.native_e4m3()[2]
            part.bits = part.offset = part.scale_block = part.dense_kind = 0
            part.lut = None
            continue
        part.outlier_scales = scales
        if dense is not None:
            part.bits = part.offset = part.scale_block = 0
            part.lut = None
            part.dense_kind = native.DENSE_KINDS[tensors[3].dtype]
            continue
        _, d, _, part.bits, part.offset, lut = module.native_blocks()
        part.lut = None if lut is None else lut.data_ptr()  # a shared table that never moves
        part.scale_block = module.in_features // d.shape[1]  # weights per scale: 32, or 16
        part.threshold = module.native_outliers()[1] if hasattr(module, "native_outliers") else 0.0


def _native_projection(module: nn.Module) -> bool:
    """A float linear (its dtype is checked per call), 16-bit weights (`native_dense()`), or a quantized
    layer in the native block layout (`native_blocks()`: kept GGUF blocks, int4/int8/LLM.int8/NF4/FP4
    repacked for it); no bias."""
    if isinstance(module, nn.Linear):
        return module.bias is None
    if hasattr(module, "native_dense"):  # 16-bit weights (`quant/half.py`)
        return module.bias is None and module.native_dense() is not None
    if hasattr(module, "native_e4m3"):  # FP8 weights (`quant/fp8.py`)
        return module.bias is None and module.native_e4m3() is not None
    blocks = getattr(module, "native_blocks", None)
    return getattr(module, "bias", None) is None and blocks is not None and blocks() is not None


def _plain_norm(norm: nn.Module) -> bool:
    return type(norm) is RMSNorm and not norm.offset


def _projections(layer: nn.Module) -> tuple[tuple[nn.Module, ...], ...]:
    """(q/k/v parts, o, gate/up parts, down) as the layer holds them now, fused or not."""
    attn, mlp = layer.self_attn, layer.mlp
    qkv = (attn.qkv_proj,) if attn.qkv_proj is not None else (attn.q_proj, attn.k_proj, attn.v_proj)
    gate_up = (mlp.gate_up_proj,) if mlp.gate_up_proj is not None else (mlp.gate_proj, mlp.up_proj)
    return qkv, (attn.o_proj,), gate_up, (mlp.down_proj,)


def _owners(layer: nn.Module) -> list[tuple[dict, str, nn.Module]]:
    """(parent's module dict, name, module) of every projection: a cheap check that none was replaced."""
    found = []
    for parent in (layer.self_attn, layer.mlp):
        for parts in _projections(layer):
            found += [
                (parent._modules, n, m) for n, m in parent._modules.items() if any(m is p for p in parts)
            ]
    return found


def _slots(layer: nn.Module, projections: tuple[tuple[nn.Module, ...], ...]) -> list[tuple[dict, str]]:
    """(parameter or buffer dict, name) of every tensor the C struct points at, in `_refresh`'s order,
    so a step reads the current pointers with dict lookups (streaming rebinds them every step)."""
    slots = [
        (layer.input_layernorm._parameters, "weight"),
        (layer.post_attention_layernorm._parameters, "weight"),
    ]
    for parts in projections:
        for module in parts:
            if isinstance(module, nn.Linear):
                slots.append((module._parameters, "weight"))
                continue
            if hasattr(module, "native_dense"):
                slots.append((module._buffers, "weight16"))
                continue
            tiles = [t for t in _weight_tensors(module) if t is not None]
            holder = getattr(module, "inner", module)  # a reordered layer's tiles are its inner layer's
            slots += [(holder._buffers, n) for t in tiles for n, b in holder._buffers.items() if b is t]
            if _input_order(module) is not None:
                slots.append((module._buffers, "order"))
    return slots


class NativeLlamaLayer:
    """The native form of one `LlamaDecoderLayer`; `run` returns None when a call does not qualify."""

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        attn, mlp = layer.self_attn, layer.mlp
        self.projections = _projections(layer)
        self.owners = _owners(layer)
        self.slots: list[tuple[dict, str]] = []  # set by `_refresh` once the weights are valid
        self.tensors_seen: tuple[int, ...] = ()
        self.spec = _LlamaLayer()
        self.spec.hidden, self.spec.heads = layer.input_layernorm.weight.shape[0], attn.num_heads
        self.spec.kv_heads, self.spec.head_dim = attn.num_kv_heads, attn.head_dim
        self.spec.intermediate = mlp.down_proj.in_features
        self.spec.window = attn.sliding_window or 0
        self.spec.eps = layer.input_layernorm.eps
        self.spec.scale = attn.head_dim**-0.5 if attn.scale is None else attn.scale

    @staticmethod
    def supports(layer: nn.Module) -> bool:
        """Whether the C layer implements this layer exactly (the shapes its kernels take included)."""
        attn, mlp = layer.self_attn, layer.mlp
        return (
            native.library() is not None
            and all(_native_projection(p) for parts in _projections(layer) for p in parts)
            and attn.q_norm is None
            and attn.softcap is None
            and mlp.act is F.silu
            and _plain_norm(layer.input_layernorm)
            and _plain_norm(layer.post_attention_layernorm)
            and layer.input_layernorm.eps == layer.post_attention_layernorm.eps
            and attn.head_dim % 16 == 0
            and attn.head_dim <= 256
            and attn.num_heads // attn.num_kv_heads <= 16
            and mlp.down_proj.in_features % 16 == 0
        )

    def _current(self) -> tuple[int, ...] | None:
        """The weights' pointers now (dict lookups only), or None when a slot is gone."""
        try:
            return tuple(owner[name].data_ptr() for owner, name in self.slots)
        except (KeyError, AttributeError):  # a buffer dropped (a layout change) or renamed
            return None

    def _refresh(self) -> bool:
        """Point the C struct at the weights' current memory (streamed layers move every step); False
        when one is off the CPU, of a dtype the kernels do not take, or not contiguous. Pointers that
        did not move since the last valid check are trusted without checking again."""
        if self.slots and self._current() == self.tensors_seen:
            return True
        layer = self.layer
        norms = [layer.input_layernorm.weight, layer.post_attention_layernorm.weight]
        dense_weights, blocks, float32_vectors, orders = [], [], list(norms), []
        for parts in self.projections:
            for module in parts:
                codes, d, m, dense, scales = (
                    _weight_tensors(module) if _native_projection(module) else (None,) * 5
                )
                if codes is None and dense is None:
                    return False  # a quantized layer off the block layout (moved to another device)
                e4m3 = hasattr(module, "native_e4m3")  # uint8 codes, which `dense_kernel_takes` refuses
                dense_weights += [] if dense is None or e4m3 else [dense]
                blocks += [t for t in (codes, d, m, dense if e4m3 else None) if t is not None]
                float32_vectors += [] if scales is None else [scales]
                order = _input_order(module)
                orders += [] if order is None else [order]
        if any(t.device.type != "cpu" for t in float32_vectors + dense_weights + blocks + orders):
            return False
        if any(t.dtype != torch.int64 or not t.is_contiguous() for t in orders):
            return False
        if any(t.dtype != torch.float32 or not t.is_contiguous() for t in float32_vectors):
            return False
        if any(not native.dense_kernel_takes(t) for t in dense_weights):
            return False
        self.spec.norm1, self.spec.norm2 = norms[0].data_ptr(), norms[1].data_ptr()
        for field, modules in zip(("qkv", "o", "gate_up", "down"), self.projections, strict=True):
            _fill(getattr(self.spec, field), modules)
        self.slots = _slots(layer, self.projections)
        self.tensors_seen = self._current()
        return True

    def run(
        self,
        x: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        cache: LayerCache | None,
        start_pos: int,
    ) -> torch.Tensor | None:
        """x [B, T, hidden] at positions start_pos.. -> the layer's output, or None to take the module path."""
        layer = self.layer
        if any(parent.get(name) is not module for parent, name, module in self.owners):
            return None  # a projection was replaced (fused, quantized) since
        if not hasattr(cache, "layer_tensors"):  # a cache that does not hand out its tensors
            return None
        keys, values = cache.layer_tensors(layer.self_attn.layer_idx)  # [B, Hkv, max_len, D] each
        batch, rows, _ = x.shape
        cos, sin = rope
        if (
            rows > NATIVE_ATTENTION_ROWS
            or keys.shape[0] != batch
            or start_pos + rows > keys.shape[2]
            or x.dtype != torch.float32
            or x.device.type != "cpu"
            or keys.dtype != torch.float32
            or keys.device.type != "cpu"
            or not (keys.is_contiguous() and values.is_contiguous())
            or cos.shape != (rows, self.spec.head_dim)
            or cos.dtype != torch.float32
            or not self._refresh()
        ):
            return None
        out = x.contiguous().clone()  # [B, T, hidden], updated in place by the layer
        cos, sin = cos.contiguous(), sin.contiguous()
        status = native.library().lamina_llama_layer(
            ctypes.byref(self.spec), out.data_ptr(), batch, rows, cos.data_ptr(), sin.data_ptr(),
            keys.data_ptr(), values.data_ptr(), keys.stride(0), keys.stride(1), start_pos,
        )  # fmt: skip
        return out if status == 0 else None


def attach_native_layers(model: nn.Module) -> int:
    """Give each decoder layer the C path supports a `NativeLlamaLayer` (`layer.native`); returns how many."""
    count = 0
    for layer in model.decoder_layers() if hasattr(model, "decoder_layers") else ():
        if hasattr(layer, "native") and NativeLlamaLayer.supports(layer):
            layer.native = NativeLlamaLayer(layer)
            count += 1
    return count
