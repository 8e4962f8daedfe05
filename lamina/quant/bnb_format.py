"""Checkpoints transformers saved with bitsandbytes (`quantization_config.quant_method` "bitsandbytes":
`load_in_4bit` NF4 / FP4, double-quantized or not, and `load_in_8bit` LLM.int8()), loaded as stored
into Lamina's `NF4Linear` and `LLMInt8Linear` (`Int8Linear` with a threshold of 0).

4-bit, per linear NAME (bitsandbytes' `QuantState.as_dict(packed=True)`):
- NAME.weight: uint8 [N K / 2, 1] (or the same bytes in another storage dtype): the flattened weight's
  codes, two a byte, the first in the high nibble;
- NAME.weight.quant_map: the float32 [16] code book, which must be bitsandbytes' NF4 or FP4 one;
- NAME.weight.absmax: float32 [N K / B], one per block of B weights; or, double-quantized, uint8 codes
  into NAME.weight.nested_quant_map [256] scaled by NAME.weight.nested_absmax (one per 256 blocks)
  plus the state's nested_offset: absmax = nested_quant_map[c] * nested_absmax[i // 256] + offset,
  in float32 as bitsandbytes computes it;
- NAME.weight.quant_state.bitsandbytes__nf4 (or __fp4): uint8 bytes of a JSON object with quant_type,
  blocksize, shape, nested_blocksize, nested_offset.
w = quant_map[code] * absmax, exactly the values bitsandbytes dequantizes to before casting them to
the checkpoint's dtype. A double-quantized absmax keeps its 8-bit codes where it is in `NF4Linear`'s
own form (blocks of 64, 256 per scale, bitsandbytes' dynamic map: the usual case), else it is expanded
to float32 once, at load. Block sizes that are multiples of 64 are read as blocks of 64.

8-bit: NAME.weight int8 [N, K], NAME.SCB float32 [N] (each row's absmax: w = q SCB / 127) and
NAME.weight_format (0: row-major, the only layout bitsandbytes saves now).
"""

from __future__ import annotations

import json

import torch

from lamina.errors import CheckpointError
from lamina.quant.base import QuantizedLinear
from lamina.quant.int8 import Int8Linear
from lamina.quant.llm_int8 import LLMInt8Linear
from lamina.quant.nf4 import BLOCK_SIZE, CODE_BOOKS, DQ_BLOCK_SIZE, NF4Linear, dynamic_map

#: The companions that mark a linear as stored by bitsandbytes, 4-bit and 8-bit.
ABSMAX, SCB = "weight.absmax", "SCB"
STATE_PREFIX = "weight.quant_state.bitsandbytes__"
FOUR_BIT_PARTS = ("weight", "weight.quant_map", ABSMAX)
NESTED_PARTS = ("weight.nested_absmax", "weight.nested_quant_map")
EIGHT_BIT_PARTS = ("weight", SCB)
ROW_MAJOR = 0  # weight_format


def bnb_parts(name: str, stored: set[str]) -> list[str] | None:
    """The checkpoint tensors (suffixes after `name.`) of linear `name` stored by bitsandbytes, or None
    when it is not (a float layer)."""
    state = (
        [p for p in stored if p.startswith(f"{name}.{STATE_PREFIX}")] if f"{name}.weight" in stored else []
    )
    if f"{name}.{ABSMAX}" in stored or state:
        nested = [p for p in NESTED_PARTS if f"{name}.{p}" in stored]
        return [*FOUR_BIT_PARTS, *nested, *(p.removeprefix(f"{name}.") for p in state)]
    if f"{name}.{SCB}" in stored:
        return [*EIGHT_BIT_PARTS, *(["weight_format"] if f"{name}.weight_format" in stored else [])]
    return None


def bnb_linear(
    tensors: dict[str, torch.Tensor],
    shape: tuple[int, int],
    name: str,
    bias: torch.Tensor | None,
    threshold: float,
) -> QuantizedLinear:
    """The layer for one linear's bitsandbytes tensors (`bnb_parts`); `shape` is the model's [N, K]."""
    if ABSMAX in tensors:
        return _four_bit(tensors, shape, name, bias)
    return _eight_bit(tensors, shape, name, bias, threshold)


def _four_bit(
    tensors: dict[str, torch.Tensor], shape: tuple[int, int], name: str, bias: torch.Tensor | None
) -> NF4Linear:
    n, k = shape
    state = _quant_state(tensors, name)
    quant_type, block = state.get("quant_type"), state.get("blocksize")
    problem = (
        f"quant_type {quant_type!r}, not nf4 or fp4"
        if not isinstance(quant_type, str) or quant_type not in CODE_BOOKS
        else f"block size {block!r}, not a multiple of {BLOCK_SIZE}"
        if not (isinstance(block, int) and block > 0 and block % BLOCK_SIZE == 0)
        else f"shape {state.get('shape')}, the model's layer is [{n}, {k}]"
        if state.get("shape") != [n, k]
        else f"block size {block}, which does not divide the layer's {n * k} weights"
        if (n * k) % block
        else None
    )
    if problem is not None:
        raise CheckpointError(
            f"{name}'s bitsandbytes state has {problem}; the checkpoint does not fit this model"
        )
    code = torch.tensor(CODE_BOOKS[quant_type])
    if not torch.equal(tensors["weight.quant_map"].float().flatten(), code):
        raise CheckpointError(
            f"{name}.weight.quant_map is not bitsandbytes' {quant_type} code book; Lamina reads the standard ones only"
        )
    # stored as uint8, or as the same bytes in another dtype (bnb_4bit_quant_storage)
    packed = tensors["weight"].contiguous().view(torch.uint8).flatten()
    _expect(packed, (n * k // 2,), f"{name}.weight")
    codes = torch.stack([packed >> 4, packed & 15], dim=-1).reshape(n, k)  # high nibble first
    absmax = _absmax(tensors, state, n * k // block, name)
    layer = NF4Linear(codes, absmax.repeat_interleave(block // BLOCK_SIZE), quant_type, False, bias)
    if _double_quant_as_lamina_stores_it(tensors, state, block):  # keep the 8-bit absmax as stored
        layer._set_double_quant(
            tensors[ABSMAX], tensors["weight.nested_absmax"].float(), torch.tensor([state["nested_offset"]])
        )
    return layer


def _double_quant_as_lamina_stores_it(tensors: dict[str, torch.Tensor], state: dict, block: int) -> bool:
    """Whether the double-quantized absmax is in `NF4Linear`'s own form (blocks of 64, 256 absmax per
    scale, bitsandbytes' dynamic map), so its codes can be kept rather than expanded to float32."""
    return (
        "weight.nested_absmax" in tensors
        and block == BLOCK_SIZE
        and state.get("nested_blocksize") == DQ_BLOCK_SIZE
        and torch.equal(tensors["weight.nested_quant_map"].float(), dynamic_map())
    )


def _quant_state(tensors: dict[str, torch.Tensor], name: str) -> dict:
    states = [key for key in tensors if key.startswith(STATE_PREFIX)]
    if len(states) != 1:
        raise CheckpointError(
            f"{name} has {len(states)} bitsandbytes quant_state tensors, not one; the checkpoint is damaged"
        )
    try:
        state = json.loads(bytes(tensors[states[0]].flatten().tolist()).decode("utf-8"))
    except (TypeError, ValueError) as exc:  # not bytes, not UTF-8, not JSON (all ValueErrors but the first)
        raise CheckpointError(f"{name}.{states[0]} is not JSON ({exc}); the checkpoint is damaged") from None
    if not isinstance(state, dict):
        raise CheckpointError(f"{name}.{states[0]} is not a JSON object; the checkpoint is damaged")
    return state


def _absmax(tensors: dict[str, torch.Tensor], state: dict, blocks: int, name: str) -> torch.Tensor:
    """float32 [blocks]: as stored, or expanded from double quantization as bitsandbytes does."""
    absmax = tensors[ABSMAX]
    if "weight.nested_absmax" not in tensors:
        # bitsandbytes' CPU kernels turn a state's absmax into bf16 [rows, blocks per row] when they
        # first run, and a model saved after that stores it so: the same values, any float dtype
        _expect(absmax.flatten(), (blocks,), f"{name}.{ABSMAX}")
        if not absmax.is_floating_point():
            raise CheckpointError(f"{name}.{ABSMAX} is {absmax.dtype}, not float, without nested absmax")
        return absmax.float().flatten()
    _expect(absmax, (blocks,), f"{name}.{ABSMAX}", torch.uint8)
    nested_block, offset = state.get("nested_blocksize"), state.get("nested_offset")
    if not (isinstance(nested_block, int) and nested_block > 0 and isinstance(offset, (int, float))):
        raise CheckpointError(
            f"{name}'s bitsandbytes state lacks a valid nested_blocksize / nested_offset; the checkpoint is damaged"
        )
    scales, book = tensors["weight.nested_absmax"].float(), tensors["weight.nested_quant_map"].float()
    _expect(scales, (-(-blocks // nested_block),), f"{name}.weight.nested_absmax")
    _expect(book, (256,), f"{name}.weight.nested_quant_map")
    values = book[absmax.long()] * scales.repeat_interleave(nested_block)[:blocks]  # [blocks]
    return values + torch.tensor(offset, dtype=torch.float32)


def _eight_bit(
    tensors: dict[str, torch.Tensor],
    shape: tuple[int, int],
    name: str,
    bias: torch.Tensor | None,
    threshold: float,
) -> QuantizedLinear:
    n, k = shape
    weight, row_absmax = tensors["weight"], tensors[SCB]
    _expect(weight, (n, k), f"{name}.weight", torch.int8)
    _expect(row_absmax, (n,), f"{name}.{SCB}")
    layout = tensors.get("weight_format")
    if layout is not None and layout.flatten().tolist() != [ROW_MAJOR]:
        raise CheckpointError(
            f"{name}.weight_format is {layout.flatten().tolist()}, not row-major ({ROW_MAJOR}): a GPU tile "
            "layout of old bitsandbytes; save the model again with a current bitsandbytes"
        )
    scales = row_absmax.float() / 127  # [N]: w = q * scale
    if threshold > 0:
        return LLMInt8Linear(weight, scales, threshold, bias)
    return Int8Linear(weight, scales, bias)


def _expect(t: torch.Tensor, shape: tuple[int, ...], name: str, dtype: torch.dtype | None = None) -> None:
    if tuple(t.shape) != shape or (dtype is not None and t.dtype != dtype):
        needs = f"{dtype} {shape}" if dtype is not None else f"shape {shape}"
        raise CheckpointError(
            f"tensor {name} is {t.dtype} {tuple(t.shape)} but the layer needs {needs}; "
            "the config and the weights disagree"
        )
