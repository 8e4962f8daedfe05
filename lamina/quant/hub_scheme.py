"""Which quantization another tool saved an HF checkpoint with: `quantization_config` in config.json
(or, in older folders, AutoGPTQ's `quantize_config.json` or AutoAWQ's `quant_config.json`), checked
once before any tensor is read.

Lamina loads 4-bit GPTQ, AWQ (GEMM) and compressed-tensors pack-quantized checkpoints as int4 codes,
8-bit GPTQ and compressed-tensors ones (pack-quantized, or int-quantized: W8A8) as int8 codes
(`hub_formats.py`), compressed-tensors NVFP4 and MXFP4 as E2M1 codes (`fp4_format.py`), FP8 ones (transformers' fp8, compressed-tensors float-quantized) as 16-bit weights
(`fp8_format.py`), and transformers' bitsandbytes saves (`bnb_format.py`); any other scheme is a
one-line CheckpointError that names what it supports.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lamina.errors import CheckpointError
from lamina.loading.weight_files import is_autoawq_config
from lamina.quant.base import is_positive_int
from lamina.quant.blocks import BLOCK

#: quant_method -> the checkpoint formats (GPTQ's `checkpoint_format`, AWQ's `version`) Lamina reads.
SUPPORTED = {"gptq": ("gptq", "gptq_v2"), "awq": ("gemm",)}
BITSANDBYTES = "bitsandbytes"  # read by `bnb_format.py`: formats nf4, fp4 and llm.int8
COMPRESSED_TENSORS = "compressed-tensors"  # llm-compressor's checkpoints; "pack-quantized" and FP8
PACK_QUANTIZED = "pack-quantized"
INT_QUANTIZED = "int-quantized"  # compressed-tensors' int8 weights stored as int8 tensors (W8A8)
NVFP4_PACKED = "nvfp4-pack-quantized"  # compressed-tensors' NVFP4 (E2M1 codes, e4m3 scales per 16)
MXFP4_PACKED = "mxfp4-pack-quantized"  # compressed-tensors' MXFP4 (E2M1 codes, E8M0 scales per 32)
#: compressed-tensors FP4 format -> (its weights' `strategy`, group size)
FP4_GROUPS = {NVFP4_PACKED: ("tensor_group", 16), MXFP4_PACKED: ("group", 32)}
FLOAT_QUANTIZED = "float-quantized"  # compressed-tensors' FP8 weights, read by `fp8_format.py`
FP8 = "fp8"  # transformers' FineGrainedFP8 checkpoints (e4m3 weights, a scale per block), the same
#: quant_method -> the code widths of its checkpoints Lamina reads (compressed-tensors: int weights)
CODE_BITS = {"gptq": (4, 8), "awq": (4,), COMPRESSED_TENSORS: (4, 8)}
#: `HubScheme.stored_type()` values, as `lamina info` counts them.
HUB_STORED_TYPES = frozenset(
    [
        *(f"{method.upper()} {bits}-bit" for method, widths in CODE_BITS.items() for bits in widths),
        "COMPRESSED-TENSORS NVFP4",
        "COMPRESSED-TENSORS MXFP4",
        "BNB NF4",
        "BNB FP4",
        "BNB INT8",
        "FP8",
    ]
)
QUANTIZE_CONFIG_FILE = "quantize_config.json"  # older AutoGPTQ folders: the scheme beside config.json
AWQ_CONFIG_FILE = "quant_config.json"  # older AutoAWQ folders (the name of Lamina's own scheme file too)


@dataclass(frozen=True)
class HubScheme:
    """A checkpoint's `quantization_config`, checked: what the per-layer tensors mean."""

    method: str  # "gptq", "awq", "compressed-tensors" or "bitsandbytes"
    #: "gptq" (v1), "gptq_v2", AWQ's "gemm", "pack-quantized", "int-quantized"; bitsandbytes "nf4",
    #: "fp4", "llm.int8"
    checkpoint_format: str
    group_size: int  # -1: one group over all inputs (bitsandbytes: each layer's state has its own)
    #: declared: every zero point 2^(bits - 1) (GPTQ's `sym`; AWQ without `zero_point`)
    symmetric: bool = True
    bits: int = 4  # GPTQ, AWQ and compressed-tensors int codes: 4 or 8
    #: compressed-tensors' activation quantization, "int8" (w8a8, w4a8: per token at run time or with
    #: static scales) or "fp4" (NVFP4's W4A4); not applied: the native kernel quantizes activations
    #: per 32 inputs in two int8 passes, other paths keep them float
    activations: str | None = None
    double_quant: bool = False  # bitsandbytes 4-bit: absmax stored as 8-bit codes
    threshold: float = 6.0  # bitsandbytes 8-bit: LLM.int8's outlier threshold (0: plain int8)
    #: FP8: (rows, columns) of weights per scale; None: per output channel or per tensor (the scale's
    #: shape says which)
    weight_block: tuple[int, int] | None = None

    @property
    def is_fp8(self) -> bool:
        return self.method == FP8 or self.checkpoint_format == FLOAT_QUANTIZED

    @property
    def is_fp4(self) -> bool:
        return self.checkpoint_format in FP4_GROUPS

    def describe(self) -> str:
        if self.is_fp8:
            block = self.weight_block
            scales = "per channel or tensor" if block is None else f"per {block[0]}x{block[1]} block"
            maker = "" if self.method == FP8 else f"{self.method} "
            return f"{maker}fp8 (e4m3 weights, a scale {scales})"
        if self.method == BITSANDBYTES and self.checkpoint_format == "llm.int8":
            return f"bitsandbytes LLM.int8 (8-bit, outlier threshold {self.threshold:g})"
        if self.method == BITSANDBYTES:
            dq = ", double-quantized" if self.double_quant else ""
            return f"bitsandbytes {self.checkpoint_format} (4-bit{dq})"
        group = "per channel" if self.group_size == -1 else f"group size {self.group_size}"
        activations = f", {self.activations} activations" if self.activations else ""
        if self.checkpoint_format == NVFP4_PACKED:
            return f"{self.method} nvfp4 (e2m1 weights, an e4m3 scale per 16 and a global scale{activations})"
        if self.checkpoint_format == MXFP4_PACKED:
            return f"{self.method} mxfp4 (e2m1 weights, a power-of-two scale per 32{activations})"
        return (
            f"{self.method} {self.bits}-bit, {group}{'' if self.symmetric else ', asymmetric'}{activations}"
        )

    def stored_type(self) -> str:
        """How `lamina info` names the packed layers' storage (a `HUB_STORED_TYPES` entry)."""
        if self.is_fp8:
            return "FP8"
        if self.is_fp4:
            return f"COMPRESSED-TENSORS {self.checkpoint_format.split('-')[0].upper()}"
        if self.method == BITSANDBYTES:
            return (
                "BNB INT8"
                if self.checkpoint_format == "llm.int8"
                else f"BNB {self.checkpoint_format.upper()}"
            )
        return f"{self.method.upper()} {self.bits}-bit"

    def kept_bits(self) -> float:
        """Bits a weight takes as loaded on the native kernel: codes plus an fp16 scale per 32 weights
        (Q4_0, Q8_0), and an fp16 m per 32 where the zero points vary (Q4_1, Q8_M); bitsandbytes 4-bit keeps its
        float32 absmax per 64 next to them (`NF4Linear`; double-quantized: an 8-bit code per 64 and a
        float32 scale per 256 of those), 8-bit one float32 scale per row (left out, as a layer's offset)."""
        if self.is_fp8:  # e4m3 bytes and float32 block scales (`fp8.py`); 16 bits where blocks are
            # not 16 wide multiples (`fp8_format.py`); a scale per row or tensor left out, as above
            if self.weight_block is None:
                return 8.0
            rows, cols = self.weight_block
            return 16.0 if cols % 16 else 8 + 32 / (rows * cols)
        if self.is_fp4:  # the codes and an fp16 d per group (`fp4_format.py`)
            return 4 + 16 / self.group_size
        if self.method == BITSANDBYTES and self.checkpoint_format == "llm.int8":
            return 8 + 16 / BLOCK
        if self.method == BITSANDBYTES:
            absmax_bits = 8 / 64 + 32 / (64 * 256) if self.double_quant else 32 / 64
            return 4 + 16 / BLOCK + absmax_bits
        return self.bits + 16 * (1 if self.symmetric else 2) / BLOCK


def hub_scheme(config: dict[str, Any], directory: Path | None = None) -> HubScheme | None:
    """The quantization scheme an HF checkpoint was saved with, or None for a float checkpoint. Raises
    CheckpointError for a scheme Lamina cannot load, naming what it supports."""
    raw = config.get("quantization_config")
    source = "quantization_config in config.json"
    if raw is None and directory is not None and (directory / QUANTIZE_CONFIG_FILE).is_file():
        raw, source = _read_quantize_config(directory / QUANTIZE_CONFIG_FILE), QUANTIZE_CONFIG_FILE
    if raw is None and directory is not None and is_autoawq_config(directory / AWQ_CONFIG_FILE):
        raw, source = (
            {"quant_method": "awq", **_read_quantize_config(directory / AWQ_CONFIG_FILE)},
            AWQ_CONFIG_FILE,
        )
    if raw is None:
        return None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{source} is not a JSON object; the checkpoint's config is damaged")
    method = str(raw.get("quant_method", "gptq")).lower()  # AutoGPTQ's own file has no quant_method
    if method == BITSANDBYTES:
        return _bitsandbytes_scheme(raw, source)
    if method == COMPRESSED_TENSORS:
        return _compressed_tensors_scheme(raw, source)
    if method == FP8:
        return _fp8_scheme(raw, source)
    if method not in SUPPORTED:
        raise CheckpointError(
            f"the checkpoint is quantized with {method!r} ({source}), which Lamina cannot load; it loads "
            "4- and 8-bit gptq and compressed-tensors, 4-bit awq, fp8, and bitsandbytes checkpoints: use "
            "one of those, or the unquantized model"
        )
    fmt_key = "version" if method == "awq" else "checkpoint_format"
    default = "gemm" if method == "awq" else "gptq"
    fmt = str(raw.get(fmt_key, raw.get("format", default))).lower()
    if method == "gptq" and raw.get("is_marlin_format"):
        fmt = "marlin"
    bits, group_size = raw.get("bits", raw.get("w_bit")), raw.get("group_size", raw.get("q_group_size"))
    problem = (
        f"{fmt_key} {fmt!r}, Lamina reads {' and '.join(map(repr, SUPPORTED[method]))}"
        if fmt not in SUPPORTED[method]
        else f"{bits} bits, Lamina reads {' and '.join(map(str, CODE_BITS[method]))}-bit ones"
        if bits not in CODE_BITS[method]
        else f"group size {group_size!r}, Lamina reads -1 or a multiple of {BLOCK}"
        if not (
            isinstance(group_size, int) and (group_size == -1 or (group_size > 0 and group_size % BLOCK == 0))
        )
        else None
    )
    if problem is not None:
        raise CheckpointError(
            f"the checkpoint is {method} with {problem} ({source}); use a checkpoint of a supported kind"
        )
    symmetric = bool(raw.get("sym", True)) if method == "gptq" else not raw.get("zero_point", True)
    return HubScheme(method, fmt, group_size, symmetric, bits)


def _bitsandbytes_scheme(raw: dict[str, Any], source: str) -> HubScheme:
    """transformers' BitsAndBytesConfig as saved: `load_in_4bit` (bnb_4bit_quant_type nf4 / fp4,
    bnb_4bit_use_double_quant) or `load_in_8bit` (llm_int8_threshold)."""
    four, eight = bool(raw.get("load_in_4bit")), bool(raw.get("load_in_8bit"))
    quant_type = str(raw.get("bnb_4bit_quant_type", "fp4")).lower()
    threshold = raw.get("llm_int8_threshold", 6.0)
    problem = (
        "neither or both of load_in_4bit and load_in_8bit"
        if four == eight
        else f"bnb_4bit_quant_type {quant_type!r}, Lamina reads 'nf4' and 'fp4'"
        if four and quant_type not in ("nf4", "fp4")
        else f"llm_int8_threshold {threshold!r}, not a number >= 0"
        if not (isinstance(threshold, (int, float)) and not isinstance(threshold, bool) and threshold >= 0)
        else None
    )
    if problem is not None:
        raise CheckpointError(
            f"the checkpoint is bitsandbytes with {problem} ({source}); its config is damaged"
        )
    if four:
        return HubScheme(
            BITSANDBYTES, quant_type, 64, double_quant=bool(raw.get("bnb_4bit_use_double_quant"))
        )
    return HubScheme(BITSANDBYTES, "llm.int8", -1, threshold=float(threshold))


def _fp8_scheme(raw: dict[str, Any], source: str) -> HubScheme:
    """transformers' FineGrainedFP8Config as saved: e4m3 weights with `weight_scale_inv` per
    `weight_block_size` block (activations, quantized to FP8 per token at run time there, stay float32)."""
    block = raw.get("weight_block_size")
    if block is not None and not (
        isinstance(block, list) and len(block) == 2 and all(is_positive_int(v) for v in block)
    ):
        raise CheckpointError(
            f"the checkpoint is fp8 with weight_block_size {block!r}, not two positive sizes ({source}); "
            "its config is damaged"
        )
    return HubScheme(FP8, FP8, -1, weight_block=None if block is None else (block[0], block[1]))


def _compressed_tensors_fp8(first: dict[str, Any], groups: dict[str, Any], source: str) -> HubScheme:
    """compressed-tensors float-quantized: e4m3 weights with a scale per channel, per tensor or per
    block; FP8 activations (dynamic or static) are not applied: they stay float32, as vLLM runs such a
    checkpoint on GPUs without FP8 arithmetic."""
    strategy, block = first.get("strategy"), first.get("block_structure")
    activations = [g.get("input_activations") for g in groups.values() if g.get("input_activations")]
    problem = (
        f"weights {first.get('type')!r} {first.get('num_bits')}-bit, Lamina reads float 8-bit (e4m3)"
        if first.get("type") != "float" or first.get("num_bits") != 8
        else f"strategy {strategy!r}, Lamina reads 'channel', 'tensor' and 'block'"
        if strategy not in ("channel", "tensor", "block")
        else f"block_structure {block!r}, not two positive sizes"
        if strategy == "block"
        and not (isinstance(block, list) and len(block) == 2 and all(is_positive_int(v) for v in block))
        else "activations quantized other than to FP8"
        if any(
            not isinstance(a, dict) or a.get("type") != "float" or a.get("num_bits") != 8 for a in activations
        )
        else None
    )
    if problem is not None:
        raise CheckpointError(f"the checkpoint is {COMPRESSED_TENSORS} with {problem} ({source})")
    weight_block = (block[0], block[1]) if strategy == "block" else None
    return HubScheme(COMPRESSED_TENSORS, FLOAT_QUANTIZED, -1, weight_block=weight_block)


def _compressed_tensors_scheme(raw: dict[str, Any], source: str) -> HubScheme:
    """llm-compressor's `compressed-tensors` config: int4 or int8 weights, format pack-quantized
    ("w4a16", "w8a16") or int-quantized (int8 weights as int8 tensors, "w8a8"), activations float or
    int8 (not applied), strategy group (a multiple of 32) or channel, symmetric or not; or FP8 weights (float-quantized, `_compressed_tensors_fp8`); one weight scheme for every
    config group; no KV-cache quantization."""
    groups = raw.get("config_groups")
    if not isinstance(groups, dict) or not groups or not all(isinstance(g, dict) for g in groups.values()):
        raise CheckpointError(
            f"the checkpoint is compressed-tensors without config_groups ({source}); its config is damaged"
        )
    weights = [g.get("weights") for g in groups.values()]
    formats = {str(g.get("format") or raw.get("format")) for g in groups.values()}
    first = weights[0] if isinstance(weights[0], dict) else {}
    strategy, group_size = first.get("strategy"), first.get("group_size")
    common = (
        "differing weight schemes across its config groups, Lamina reads one"
        if any(w != first for w in weights)
        else "a quantized KV cache, which Lamina does not read"
        if raw.get("kv_cache_scheme")
        else f"quantization_status {raw.get('quantization_status')!r}, Lamina reads 'compressed'"
        if raw.get("quantization_status", "compressed") != "compressed"
        else None
    )
    if common is None and formats == {FLOAT_QUANTIZED}:
        return _compressed_tensors_fp8(first, groups, source)
    if common is None and len(formats) == 1 and next(iter(formats)) in FP4_GROUPS:
        return _compressed_tensors_fp4(next(iter(formats)), first, groups, source)
    (fmt,) = formats if len(formats) == 1 else (None,)
    bits = first.get("num_bits")
    activations = [g.get("input_activations") for g in groups.values() if g.get("input_activations")]
    problem = (
        common
        if common is not None
        else f"format {sorted(formats)}, Lamina reads {PACK_QUANTIZED!r}, {INT_QUANTIZED!r}, {NVFP4_PACKED!r}, {MXFP4_PACKED!r} and {FLOAT_QUANTIZED!r}"
        if fmt not in (PACK_QUANTIZED, INT_QUANTIZED)
        else f"weights {first.get('type')!r} {bits}-bit, Lamina reads int 4- and 8-bit ({INT_QUANTIZED}: 8-bit)"
        if first.get("type") != "int"
        or bits not in CODE_BITS[COMPRESSED_TENSORS]
        or (fmt == INT_QUANTIZED and bits != 8)
        else "quantized outputs, which Lamina does not apply"
        if any(g.get("output_activations") for g in groups.values())
        else "activations quantized other than to int8, which Lamina does not read"
        if activations and (not all(_int8(a) for a in activations) or len(activations) != len(groups))
        else f"strategy {strategy!r}, Lamina reads 'group' (a multiple of {BLOCK}) and 'channel'"
        if not (
            strategy == "channel"
            or (
                strategy == "group"
                and isinstance(group_size, int)
                and group_size > 0
                and group_size % BLOCK == 0
            )
        )
        else None
    )
    if problem is not None:
        raise CheckpointError(f"the checkpoint is {COMPRESSED_TENSORS} with {problem} ({source})")
    group = group_size if strategy == "group" else -1
    symmetric = bool(first.get("symmetric", True))
    return HubScheme(COMPRESSED_TENSORS, fmt, group, symmetric, bits, "int8" if activations else None)


def _compressed_tensors_fp4(
    fmt: str, first: dict[str, Any], groups: dict[str, Any], source: str
) -> HubScheme:
    """compressed-tensors' FP4 formats (llm-compressor's NVFP4A16 / NVFP4 and MXFP4A16 / MXFP4): E2M1
    weights with an e4m3 scale per 16 and a global scale per tensor (nvfp4-pack-quantized, strategy
    tensor_group) or a power-of-two scale per 32 (mxfp4-pack-quantized, strategy group); FP4
    activations are not applied."""
    strategy, group = FP4_GROUPS[fmt]
    activations = [g.get("input_activations") for g in groups.values() if g.get("input_activations")]
    problem = (
        f"weights {first.get('type')!r} {first.get('num_bits')}-bit, {first.get('strategy')!r} groups of "
        f"{first.get('group_size')!r}, Lamina reads float 4-bit (E2M1) in {strategy} groups of {group}"
        if (first.get("type"), first.get("num_bits"), first.get("strategy"), first.get("group_size"))
        != ("float", 4, strategy, group)
        or not first.get("symmetric", True)
        else "activations quantized other than to FP4, which Lamina does not read"
        if any(
            not isinstance(a, dict) or (a.get("type"), a.get("num_bits")) != ("float", 4) for a in activations
        )
        else None
    )
    if problem is not None:
        raise CheckpointError(f"the checkpoint is {COMPRESSED_TENSORS} with {problem} ({source})")
    return HubScheme(COMPRESSED_TENSORS, fmt, group, activations="fp4" if activations else None)


def _int8(activations: Any) -> bool:
    """Input activations quantized to int8, at run time or with stored scales (`input_scale`), as
    w8a8 and w4a8 checkpoints do."""
    return (
        isinstance(activations, dict)
        and activations.get("type") == "int"
        and activations.get("num_bits") == 8
    )


def _read_quantize_config(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"cannot read {path}: {exc}; the checkpoint's config is damaged") from exc
