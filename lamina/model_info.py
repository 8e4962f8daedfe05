"""What a checkpoint holds and what running it costs, without loading its weights.

The model is built on the meta device (shapes only) and the checkpoint is asked how each tensor is
stored, so describing a 70B model takes as long as reading its headers.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from lamina.loading.checkpoint import Checkpoint, open_checkpoint
from lamina.loading.loader import build_empty
from lamina.quant.apply import quantizable_linears
from lamina.quant.bnb_format import bnb_parts
from lamina.quant.hub_scheme import HubScheme

# Bytes per weight of the formats a model can run in; int8/int4 quantize the layers'
# nn.Linear weights (one scale per output row / per group of 128), everything else stays 16-bit.
RUN_FORMATS = {"float32": 4.0, "bfloat16": 2.0, "int8": 1.0 + 2 / 64, "int4": 0.5 + 2 / 128}
GGUF_TOKENIZERS = {"gpt2": "byte-level BPE", "llama": "SentencePiece BPE"}


@dataclass
class ModelInfo:
    source: Path
    architecture: str
    family: str  # the Lamina model class that runs it
    parameters: int
    linear_parameters: int  # in the layers' nn.Linear weights: what quantization shrinks
    stored_types: dict[str, int]  # storage type -> number of parameters stored that way
    #: the same, counting only the weights a CPU load keeps 16-bit when stored so: the quantizable
    #: linears', and the token embedding's and output head's
    linear_stored_types: dict[str, int]
    stored_bytes: int
    quantization: str | None  # the quantization the HF config declares
    context_length: int
    kv_bytes_per_token: dict[str, int]  # KV cache dtype -> bytes per token, all layers
    tokenizer: str
    chat_template: bool
    layers: int
    layer_parameters: int  # the largest decoder layer: the unit placement streams between tiers
    layer_linear_parameters: int
    prequantized_bits: float | None = None  # bits a weight another tool quantized takes as loaded

    def weight_bytes(self, run_format: str) -> int:
        """Estimated bytes of all weights when run in `run_format` (a key of RUN_FORMATS)."""
        return _bytes(self.linear_parameters, self.parameters - self.linear_parameters, run_format)

    def kept_bytes(self) -> int | None:
        """Estimated bytes of all weights as loading them on a CPU in float32 keeps them by default: a
        GGUF's quantized matrices as stored (native kernel), linear weights stored in 16 bits as 16-bit
        (`quant/half.py`), everything else float32; None when all of it would be float32."""
        from lamina.quant.hub_scheme import HUB_STORED_TYPES
        from lamina.quant.load import HALF_STORED

        total, narrow = 0.0, False
        for kind, count in self.stored_types.items():
            bits = kept_bits(kind) if kind not in HUB_STORED_TYPES else self.prequantized_bits
            half_linears = self.linear_stored_types.get(kind, 0) if kind in HALF_STORED else 0
            if bits is not None:
                total += count * bits / 8
            else:
                total += half_linears * 2 + (count - half_linears) * 4
            narrow = narrow or bits is not None or half_linears > 0
        return int(total) if narrow else None

    def layer_bytes(self, run_format: str) -> int:
        """Estimated bytes of the largest decoder layer when run in `run_format`."""
        return _bytes(
            self.layer_linear_parameters, self.layer_parameters - self.layer_linear_parameters, run_format
        )


def kept_bits(stored_type: str) -> float | None:
    """Bits a weight stored as this GGML type takes kept quantized on the native CPU kernel (codes plus
    fp16 scales and mins, `quant/blockq.py`), or None where it loads as float."""
    from lamina.quant.blockq import FORMATS, KEPT_TYPES, block_format

    if stored_type not in KEPT_TYPES:
        return None
    bits, _, has_m, scale_block = FORMATS[block_format(stored_type)]
    return bits + 16 * (1 + has_m) / scale_block


def _bytes(linear: int, other: int, run_format: str) -> int:
    if run_format in ("int8", "int4"):  # quantized linear weights, 16-bit everything else
        return int(linear * RUN_FORMATS[run_format] + other * RUN_FORMATS["bfloat16"])
    return int((linear + other) * RUN_FORMATS[run_format])


def describe(path: str | Path) -> ModelInfo:
    """A ModelInfo for an HF directory or GGUF file, read from metadata and headers only."""
    from lamina.quant.load import embeddings_can_stay_16_bit

    with open_checkpoint(path) as checkpoint:
        model, config = build_empty(checkpoint)
        linear_weights = {f"{name}.weight" for name in quantizable_linears(model)}
        if embeddings_can_stay_16_bit(model):
            # a 16-bit embedding and head stay 16-bit as the linears do
            linear_weights |= {
                _parameter_of(model, model.input_embeddings()),
                _parameter_of(model, model.output_embeddings()),
            }
        stored: Counter[str] = Counter()
        stored_in_linears: Counter[str] = Counter()
        scheme, quantization = _declared_quantization(checkpoint)
        names = set(checkpoint.tensor_names())
        for name in names:
            if scheme is not None and name.endswith((".qweight", ".weight_packed")):  # a layer's codes
                parameter = _parameter_name(model, name.rpartition(".")[0] + ".weight")
                kind = None
            elif scheme is not None and name.endswith(".weight") and _stored_by(scheme, name, names):
                parameter, kind = _parameter_name(model, name), None  # bitsandbytes' or fp8 codes
            else:
                parameter, kind = _parameter_name(model, name), checkpoint.stored_type(name)
            if parameter is None:
                continue
            kind, numel = kind or scheme.stored_type(), model.get_parameter(parameter).numel()
            stored[kind] += numel
            if parameter in linear_weights:
                stored_in_linears[kind] += numel
        # the blocks placement keeps whole: decoder layers, and a T5's encoder blocks too
        layers = [m for m in model.modules() if type(m).__name__ in model.no_split_modules]
        layout = model.cache_layout()
        per_token = sum(2 * heads * dim for heads, dim in layout)
        return ModelInfo(
            source=checkpoint.path,
            architecture=config.architecture,
            family=type(model).__name__,
            parameters=sum(p.numel() for p in model.parameters()),
            linear_parameters=sum(_linear_parameters(layer) for layer in layers),
            stored_types=dict(stored.most_common()),
            linear_stored_types=dict(stored_in_linears),
            stored_bytes=_stored_bytes(checkpoint),
            quantization=quantization,
            prequantized_bits=None if scheme is None else scheme.kept_bits(),
            context_length=config.max_position_embeddings,
            kv_bytes_per_token={"float32": per_token * 4, "bfloat16": per_token * 2},
            tokenizer=_tokenizer_kind(checkpoint),
            chat_template=_has_chat_template(checkpoint),
            layers=len(layers),
            layer_parameters=max(sum(p.numel() for p in layer.parameters()) for layer in layers),
            layer_linear_parameters=max(_linear_parameters(layer) for layer in layers),
        )


def _linear_parameters(module: nn.Module) -> int:
    return sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))


def _parameter_name(model: nn.Module, name: str) -> str | None:
    """The model's parameter a checkpoint tensor fills (None: not a parameter of this model)."""
    prefix = getattr(model, "base_model_prefix", "")
    for candidate in (name, f"{prefix}.{name}"):
        try:
            model.get_parameter(candidate)
        except AttributeError:
            continue
        return candidate
    return None


def _stored_by(scheme: HubScheme, weight: str, names: set[str]) -> bool:
    """Whether checkpoint tensor `weight` (a `.weight`) is a layer's codes in the scheme's own form:
    bitsandbytes' packed bytes, or FP8 or int8 (compressed-tensors int-quantized) values beside their
    scale."""
    from lamina.quant.fp8_format import fp8_parts
    from lamina.quant.hub_formats import packed_parts
    from lamina.quant.hub_scheme import INT_QUANTIZED

    layer = weight.removesuffix(".weight")
    if scheme.is_fp8:
        return f"{layer}.{fp8_parts(scheme)[0][0]}" in names
    if scheme.checkpoint_format == INT_QUANTIZED:
        return f"{layer}.{packed_parts(scheme)[0][0]}" in names
    return bnb_parts(layer, names) is not None


def _parameter_of(model: nn.Module, module: nn.Module) -> str:
    """The name `named_parameters` gives a module's weight (a tied one's first name)."""
    return next(name for name, p in model.named_parameters() if p is module.weight)


def _declared_quantization(checkpoint: Checkpoint) -> tuple[HubScheme | None, str | None]:
    """(The scheme another tool quantized the checkpoint with, when Lamina loads it, else None; how
    `lamina info` describes what the config declares, e.g. "gptq 4-bit, group size 128", or
    "fp8 (Lamina cannot load it)")."""
    from lamina.errors import CheckpointError
    from lamina.quant.load import prequantized_scheme

    try:
        scheme = prequantized_scheme(checkpoint)
    except CheckpointError:
        declared = checkpoint.config.get("quantization_config")
        method = declared.get("quant_method", "?") if isinstance(declared, dict) else "?"
        return None, f"{method} (Lamina cannot load it)"
    return scheme, None if scheme is None else scheme.describe()


def _stored_bytes(checkpoint: Checkpoint) -> int:
    from lamina.loading.gguf import GGUFCheckpoint

    if isinstance(checkpoint, GGUFCheckpoint):
        return checkpoint.path.stat().st_size
    return sum(f.stat().st_size for f in checkpoint.files())


def _tokenizer_kind(checkpoint: Checkpoint) -> str:
    from lamina.loading.gguf import GGUFCheckpoint

    if isinstance(checkpoint, GGUFCheckpoint):
        kind = checkpoint.metadata.get("tokenizer.ggml.model")
        return GGUF_TOKENIZERS.get(kind, f"unsupported ({kind})")
    file = checkpoint.path / "tokenizer.json"
    if not file.is_file():
        return "none (no tokenizer.json)"
    spec = json.loads(file.read_text(encoding="utf-8"))
    model_type = (spec.get("model") or {}).get("type", "?")
    byte_level = "ByteLevel" in json.dumps(spec.get("pre_tokenizer"))
    return f"{'byte-level ' if byte_level else ''}{model_type} (tokenizer.json)"


def _has_chat_template(checkpoint: Checkpoint) -> bool:
    from lamina.loading.gguf import GGUFCheckpoint

    if isinstance(checkpoint, GGUFCheckpoint):
        return bool(checkpoint.metadata.get("tokenizer.chat_template"))
    if (checkpoint.path / "chat_template.jinja").is_file():
        return True
    config_file = checkpoint.path / "tokenizer_config.json"
    return config_file.is_file() and bool(
        json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
    )
