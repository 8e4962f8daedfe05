"""Reference packers for GPTQ, AWQ, FP8 and FP4 checkpoints, for the tests and `benchmarks/hub_checkpoints.py`,
and `write_quantized`, which writes a tiny model's checkpoint with its projections packed by one.

They follow the writers line for line: GPTQModel's `pack_original` (gptqmodel/nn_modules/qlinear/
__init__.py: with P = 32 / bits, inputs Pi..Pi+P-1 into qweight row i at bits (bits j), outputs into
qzeros words) and its v2 -> v1 conversion (`convert_gptq_v2_to_v1_format_module`: 0x11111111, at 8
bits 0x01010101, subtracted from each qzeros word), and
AutoAWQ's `WQLinear_GEMM.from_linear` (awq/modules/linear/gemm.py: outputs packed in the order
0 2 4 6 1 3 5 7). They are independent of Lamina's reader (`lamina/quant/hub_formats.py`).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

AWQ_ORDER = [0, 2, 4, 6, 1, 3, 5, 7]
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
#: module name, float weight -> (its stored tensors by name suffix, the weight they stand for)
Packer = Callable[[str, torch.Tensor], tuple[dict[str, torch.Tensor], torch.Tensor]]


def write_quantized(src: Path, dst: Path, pack: Packer, quantization_config: dict) -> dict[str, torch.Tensor]:
    """A copy of the checkpoint directory `src` at `dst` whose decoder projections are stored as `pack`
    gives them, with `quantization_config` in config.json; returns each projection's weight as the
    stored tensors stand for it, by checkpoint name."""
    shutil.copytree(src, dst)
    out, reference = {}, {}
    for name, w in load_file(str(src / "model.safetensors")).items():
        module, _, leaf = name.rpartition(".")
        if leaf != "weight" or module.rpartition(".")[2] not in PROJECTIONS:
            out[name] = w
            continue
        parts, reference[name] = pack(module, w)
        out |= {f"{module}.{part}": t for part, t in parts.items()}
    save_file(out, str(dst / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (dst / "config.json").write_text(json.dumps(config))
    return reference


def quantize(
    w: torch.Tensor, group_size: int, sym: bool, bits: int = 4
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """RTN codes int [N, K], fp16-exact scales [N, ceil(K/G)] and integer zeros [N, ceil(K/G)] with
    w ~ s (q - z), groups of G adjacent inputs (the last one the rest, as GPTQ writes 576 at 128);
    GPTQ's grid: maxq = 2^bits - 1, a symmetric zero (maxq + 1) / 2."""
    maxq = 2**bits - 1
    codes, scales, zeros = [], [], []
    for start in range(0, w.shape[1], group_size):
        wg = w[:, start : start + group_size]  # [N, <=G]
        if sym:
            s = (2 * wg.abs().amax(-1) / maxq).clamp(min=1e-4).half().float()
            z = torch.full_like(s, (maxq + 1) // 2)
        else:
            lo, hi = wg.amin(-1), wg.amax(-1)
            s = ((hi - lo) / maxq).clamp(min=1e-4).half().float()
            z = torch.round(-lo / s).clamp(0, maxq)
        codes.append(torch.round(wg / s[:, None] + z[:, None]).clamp(0, maxq).int())
        scales.append(s)
        zeros.append(z.int())
    return torch.cat(codes, dim=1), torch.stack(scales, dim=1), torch.stack(zeros, dim=1)


def dequantized(q: torch.Tensor, s: torch.Tensor, z: torch.Tensor, g_idx: torch.Tensor) -> torch.Tensor:
    """w[n, k] = s[n, g_idx[k]] (q[n, k] - z[n, g_idx[k]]): the tools' own dequantization."""
    return s[:, g_idx] * (q - z[:, g_idx]).float()


def pack_gptq(q, s, z, g_idx, v1: bool, bits: int = 4) -> dict[str, torch.Tensor]:
    """GPTQModel's `pack_original` layout, then (v1) its v2 -> v1 word conversion."""
    per_word = 32 // bits
    int_weight = q.t().contiguous().numpy().astype(np.uint32)  # [K, N]
    qweight = np.zeros((int_weight.shape[0] // per_word, int_weight.shape[1]), dtype=np.uint32)
    for row in range(qweight.shape[0]):
        for j in range(per_word):
            qweight[row] |= int_weight[row * per_word + j] << (bits * j)
    zeros = z.t().contiguous().numpy().astype(np.uint32)  # [G, N]
    qzeros = np.zeros((zeros.shape[0], zeros.shape[1] // per_word), dtype=np.uint32)
    for col in range(qzeros.shape[1]):
        for j in range(per_word):
            qzeros[:, col] |= zeros[:, col * per_word + j] << (bits * j)
    if v1:  # uint32 arithmetic wraps, borrows included
        qzeros = qzeros - np.uint32(0x11111111 if bits == 4 else 0x01010101)
    return {
        "qweight": torch.from_numpy(qweight.view(np.int32)),
        "qzeros": torch.from_numpy(qzeros.view(np.int32)),
        "scales": s.t().contiguous().half(),
        "g_idx": g_idx.int(),
    }


def pack_awq(q, s, z) -> dict[str, torch.Tensor]:
    """AutoAWQ's `WQLinear_GEMM.from_linear` layout."""
    intweight = q.t().contiguous().numpy().astype(np.uint32)  # [K, N]
    qweight = np.zeros((intweight.shape[0], intweight.shape[1] // 8), dtype=np.uint32)
    for col in range(qweight.shape[1]):
        for i in range(8):
            qweight[:, col] |= intweight[:, col * 8 + AWQ_ORDER[i]] << (i * 4)
    zeros = z.t().contiguous().numpy().astype(np.uint32)  # [G, N]
    qzeros = np.zeros((zeros.shape[0], zeros.shape[1] // 8), dtype=np.uint32)
    for col in range(qzeros.shape[1]):
        for i in range(8):
            qzeros[:, col] |= zeros[:, col * 8 + AWQ_ORDER[i]] << (i * 4)
    return {
        "qweight": torch.from_numpy(qweight.view(np.int32)),
        "qzeros": torch.from_numpy(qzeros.view(np.int32)),
        "scales": s.t().contiguous().half(),
    }


E4M3_MAX = 448.0


def block_scales(w: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """float32 [ceil(N/rows), ceil(K/cols)]: each block's absmax / 448, as FP8 quantizers pick them."""
    n, k = w.shape
    padded = torch.nn.functional.pad(w.abs(), (0, -k % cols, 0, -n % rows))
    blocks = padded.reshape(
        padded.shape[0] // rows, rows, padded.shape[1] // cols, cols
    )  # [R, rows, C, cols]
    return blocks.amax(dim=(1, 3)) / E4M3_MAX


def pack_fp8_blocks(w: torch.Tensor, rows: int, cols: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """transformers' FineGrainedFP8 layout: (e4m3 weight [N, K], weight_scale_inv [R, C], the float32
    weight they stand for, weight * scale_inv)."""
    scale = block_scales(w, rows, cols)
    expanded = scale.repeat_interleave(rows, 0)[: w.shape[0]].repeat_interleave(cols, 1)[:, : w.shape[1]]
    q = (w / expanded).to(torch.float8_e4m3fn)
    return q, scale, q.float() * expanded


#: compressed-tensors' FP4 formats: their weights' quantization args (llm-compressor's NVFP4 / MXFP4 presets)
FP4_WEIGHTS = {
    "nvfp4": {
        "num_bits": 4,
        "type": "float",
        "symmetric": True,
        "strategy": "tensor_group",
        "group_size": 16,
    },
    "mxfp4": {"num_bits": 4, "type": "float", "symmetric": True, "strategy": "group", "group_size": 32},
}


def pack_fp4(w: torch.Tensor, fmt: str) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """compressed-tensors' NVFP4 or MXFP4 layout (`fmt`) by its own compressor: (the stored tensors,
    the float32 weight they stand for, from its own unpacking times the scales).
    NVFP4: a global scale putting the tensor's largest weight at e4m3 448 x E2M1 6, an e4m3 scale per
    16 at each group's largest / 6. MXFP4: a power-of-two scale per 32, the smallest that keeps the
    group's largest within E2M1's 6 (the compressor stores its exponent)."""
    from compressed_tensors.compressors.mxfp4.base import MXFP4PackedCompressor
    from compressed_tensors.compressors.nvfp4.base import NVFP4PackedCompressor
    from compressed_tensors.compressors.nvfp4.helpers import unpack_fp4_from_uint8
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    n, k = w.shape
    args = QuantizationArgs(**FP4_WEIGHTS[fmt])
    if fmt == "nvfp4":
        global_scale = (E4M3_MAX * 6 / w.abs().amax()).reshape(1).float()
        scale = w.reshape(n, k // 16, 16).abs().amax(-1) / 6 * global_scale  # [N, K/16], e4m3 units
        parts = {"weight": w, "weight_scale": scale, "weight_global_scale": global_scale}
        compressor = NVFP4PackedCompressor
    else:
        amax = w.reshape(n, k // 32, 32).abs().amax(-1).clamp(min=2**-100)  # [N, K/32]
        parts = {"weight": w, "weight_scale": torch.exp2(torch.ceil(torch.log2(amax / 6)))}
        compressor = MXFP4PackedCompressor
    packed = compressor.compress(parts, QuantizationScheme(targets=["Linear"], weights=args))
    values = unpack_fp4_from_uint8(packed["weight_packed"], n, k, dtype=torch.float32)  # [N, K]
    if fmt == "nvfp4":
        per_group = packed["weight_scale"].float() / packed["weight_global_scale"]
    else:
        per_group = torch.exp2(packed["weight_scale"].float() - 127)
    return packed, values * per_group.repeat_interleave(k // per_group.shape[1], dim=1)
