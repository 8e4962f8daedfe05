"""Quantization while loading: the hooks `LLM.load` hands to the loader, one layer at a time.

The ways a model ends up quantized at load time:
- `quantize=METHOD` (int8, int4, nf4, ...): each float linear is quantized as soon as the loader has
  filled its parameters, so at most one float layer exists at a time (peak ~ quantized size + one
  layer). gptq needs calibration activations of the whole model, so it quantizes after loading,
  with act-order (SmolLM2, g128: +5.85% perplexity vs float).
- a GGUF file with `quantize=None` (the default): on the native CPU kernel, linears and the token
  embedding stored in a `KEPT_TYPES` type (Q4_0/Q4_1/Q8_0, Q5_x, K-quants, IQ types) become blocks
  (`blockq`, `gguf_convert`); elsewhere Q4_0/Q4_1/Q8_0 linears are rebuilt in the int4/int8 layouts
  (`gguf_formats`) and a Q8_0 token embedding becomes an int8 embedding shared with a tied output
  head. On a CPU in float32, F16 / BF16 matrices and token embeddings stay 16-bit (`half`). Other
  GGML types stay float. `quantize="none"` expands everything to float; a method re-quantizes the
  linears from float but leaves the token embedding and output head as stored (a Q8_0 table is
  30 MB of the default model where float32 is 113 MB).
- a directory written by `lamina quantize` (it has a quant_config.json): `load_saved_quantized`,
  no re-quantization.
- a checkpoint whose linears are stored in 16 bits, loaded on a CPU in float32 with `quantize=None`:
  `default_quantize` picks `bf16` / `fp16`, keeping them 16-bit (exact; `quantize="none"` widens them).
  A 16-bit token embedding and output head stay 16-bit (`_half_embedding_claim`) with any method.
- an HF checkpoint another tool quantized (4- or 8-bit GPTQ or compressed-tensors, AWQ, NVFP4 / MXFP4,
  FP8, or bitsandbytes; `quantization_config`): its layers are built from their stored codes by the
  loader's claim (`hub_formats`, `fp4_format`, `fp8_format`, `bnb_format`), never expanded to float.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from lamina.engine.perplexity import default_text
from lamina.errors import CheckpointError, InvalidArgumentError
from lamina.loading.checkpoint import Checkpoint
from lamina.loading.gguf import GGUFCheckpoint, RawTensor
from lamina.loading.loader import ModuleClaim, ModuleHook
from lamina.quant.apply import (
    float_linear_names,
    quantizable_linears,
    quantize_linear,
    quantize_model,
    set_submodule,
    validate_method,
)
from lamina.quant.blockq import (
    KEPT_TYPES,
    BlockQuantEmbedding,
    blockq_linear_from_gguf,
    runs_natively,
)
from lamina.quant.bnb_format import bnb_linear, bnb_parts
from lamina.quant.checkpoint import load_quantized_into, read_scheme
from lamina.quant.fp4_format import fp4_linear, fp4_parts
from lamina.quant.fp8_format import fp8_linear, fp8_parts
from lamina.quant.gguf_formats import BLOCK_BYTES, linear_from_gguf, tied_int8_from_gguf
from lamina.quant.half import GGML_HALF_DTYPES, HALF_DTYPES, HalfEmbedding, HalfLinear, half_linear_from_gguf
from lamina.quant.hub_formats import build_linear, packed_parts, unpack_layer
from lamina.quant.hub_scheme import BITSANDBYTES, HubScheme, hub_scheme

if TYPE_CHECKING:
    from lamina.placement.plan import Placement

#: `quantize=` values besides the methods: keep GGUF blocks (default for GGUF) or expand to float.
NO_QUANTIZATION = "none"
GPTQ_CALIBRATION_TOKENS = 4096  # default-text tokens used when gptq runs at load time
CALIBRATION_WINDOW = 512


#: Stored dtypes (safetensors' names, and torch's for .bin files) -> the method that keeps them.
HALF_STORED = {"BF16": "bf16", "F16": "fp16", "BFLOAT16": "bf16", "FLOAT16": "fp16"}


def default_quantize(
    model: nn.Module, checkpoint: Checkpoint, device: torch.device, dtype: torch.dtype
) -> str | None:
    """What `quantize=None` means for a checkpoint that is not a GGUF: on a CPU computing in float32,
    linear weights stored in 16 bits stay so (`bf16` / `fp16`, `quant/half.py`: exact, half the
    memory of widening them to float32, and a faster decode); None otherwise (float, as stored or
    in `dtype`). Decided from the first quantizable linear's stored dtype."""
    if isinstance(checkpoint, GGUFCheckpoint) or device.type != "cpu" or dtype != torch.float32:
        return None
    stored = set(checkpoint.tensor_names())
    weight = next(
        (f"{name}.weight" for name in quantizable_linears(model) if f"{name}.weight" in stored), None
    )
    return None if weight is None else HALF_STORED.get(checkpoint.stored_type(weight))


def check_quantize_arg(quantize: str | None, group_size: int | None) -> None:
    """Validate `quantize=` / `group_size=` before anything is loaded."""
    if quantize not in (None, NO_QUANTIZATION):
        validate_method(quantize, group_size)


def loading_hook(
    model: nn.Module, checkpoint: Checkpoint, quantize: str | None, group_size: int
) -> ModuleHook | None:
    """The per-module hook for `load_weights`, or None when nothing is quantized from float while loading."""
    if quantize in (None, NO_QUANTIZATION, "gptq"):
        return None

    keep = float_linear_names(model)

    def quantize_filled(name: str, module: nn.Module) -> bool:
        if type(module) is nn.Linear and name not in keep and _filled(module):
            set_submodule(model, name, quantize_linear(module, quantize, name, group_size))
            return True
        return False

    return quantize_filled


def loading_claim(
    model: nn.Module,
    checkpoint: Checkpoint,
    quantize: str | None,
    device: torch.device,
    dtype: torch.dtype,
    *,
    prequantized: HubScheme | None = None,
) -> ModuleClaim | None:
    """The `claim` for `load_weights`: a GGUF's quantized linears (and, on the native kernel, its
    embedding) built straight from their blocks, never expanded to float, unless `quantize` asks for
    something else; or the layers of a checkpoint another tool quantized, whose scheme
    (`prequantized_scheme`) the caller read. `dtype` is the model's activation dtype."""
    if isinstance(checkpoint, GGUFCheckpoint) and quantize != NO_QUANTIZATION:
        # with a method, the linears it quantizes load as float; the embedding and head stay as stored
        return _gguf_claim(model, checkpoint, device, dtype, linears=quantize is None)
    claims = [
        _hub_claim(model, checkpoint, prequantized, device, dtype) if prequantized is not None else None,
        _half_embedding_claim(model, checkpoint)
        if _keeps_16_bits(checkpoint, quantize, device, dtype)
        else None,
    ]
    claims = [claim for claim in claims if claim is not None]
    if not claims:
        return None
    return lambda name, module: any(claim(name, module) for claim in claims)


def _half_embedding(model: nn.Module, name: str, tied_head_name: str | None, weight16: torch.Tensor) -> bool:
    """Make module `name` a `HalfEmbedding` over `weight16`, and the tied head (when named) a
    `HalfLinear` over the same table."""
    new_embed = HalfEmbedding(weight16)
    set_submodule(model, name, new_embed)
    if tied_head_name is not None:  # one 16-bit table for both
        set_submodule(model, tied_head_name, HalfLinear(new_embed.weight16))
    return True


def _keeps_16_bits(
    checkpoint: Checkpoint, quantize: str | None, device: torch.device, dtype: torch.dtype
) -> bool:
    """Whether a 16-bit token embedding and output head stay 16-bit: HF checkpoints loaded on a CPU
    in float32, unless `quantize="none"` widens everything (the methods leave both alone)."""
    return (
        not isinstance(checkpoint, GGUFCheckpoint)
        and device.type == "cpu"
        and dtype == torch.float32
        and quantize != NO_QUANTIZATION
    )


def embeddings_can_stay_16_bit(model: nn.Module) -> bool:
    """Whether `_half_embedding_claim` can keep this model's token embedding and output head 16-bit:
    a plain `nn.Embedding` and `nn.Linear`, in a decoder-only model."""
    embed = model.input_embeddings() if hasattr(model, "input_embeddings") else None
    head = model.output_embeddings() if hasattr(model, "output_embeddings") else None
    return type(embed) is nn.Embedding and type(head) is nn.Linear and not hasattr(model, "encode")


def _half_embedding_claim(model: nn.Module, checkpoint: Checkpoint) -> ModuleClaim | None:
    """A token embedding stored in bfloat16 / float16 as a `HalfEmbedding` (rows widened per lookup:
    exact, half the memory of widening the table), and the output head with it: a tied head as a
    `HalfLinear` over the same tensor, an untied bias-free one stored in 16 bits as its own. Decode
    reads the head every token, so it also halves those bytes. Not for encoder-decoder models (their
    generation loop reads the embedding's weight)."""
    if not embeddings_can_stay_16_bit(model):
        return None
    embed, head = model.input_embeddings(), model.output_embeddings()
    tied = head.weight is embed.weight
    head_name = _module_name(model, head)
    stored = set(checkpoint.tensor_names())

    def stored_16_bit(name: str) -> torch.dtype | None:
        weight = f"{name}.weight"
        method = HALF_STORED.get(checkpoint.stored_type(weight)) if weight in stored else None
        return None if method is None else HALF_DTYPES[method]

    def build(name: str, module: nn.Module) -> bool:
        if module is not embed and (module is not head or tied or head.bias is not None):
            return False
        dtype16 = stored_16_bit(name)
        if dtype16 is None:
            return False
        weight16 = checkpoint.read(f"{name}.weight").to(dtype16)
        if module is embed:
            return _half_embedding(model, name, head_name if tied else None, weight16)
        set_submodule(model, name, HalfLinear(weight16))  # an untied, bias-free head
        return True

    return build


def prequantized_scheme(checkpoint: Checkpoint) -> HubScheme | None:
    """The scheme of an HF checkpoint another tool quantized (`hub_scheme.py`), or None. A scheme
    Lamina cannot load is a CheckpointError naming what it can."""
    if isinstance(checkpoint, GGUFCheckpoint):
        return None
    return hub_scheme(checkpoint.config, checkpoint.path if checkpoint.path.is_dir() else None)


def check_prequantized(scheme: HubScheme, quantize: str | None, max_memory: object) -> None:
    """Options a checkpoint another tool quantized cannot take: its float weights are gone."""
    if quantize is not None:
        raise InvalidArgumentError(
            f"the checkpoint is already quantized as {scheme.describe()}; load it without --quantize, "
            "or quantize the float model it was made from"
        )
    if max_memory is not None:
        raise InvalidArgumentError(
            f"the checkpoint is quantized as {scheme.describe()}, and --max-memory streams float weights "
            "only yet; drop --max-memory"
        )


def _hub_claim(
    model: nn.Module, checkpoint: Checkpoint, scheme: HubScheme, device: torch.device, dtype: torch.dtype
) -> ModuleClaim:
    """Build each linear stored as GPTQ / AWQ / compressed-tensors codes (`NAME.qweight`, ...,
    `NAME.weight_packed`, ...) or by bitsandbytes (`NAME.weight` with `NAME.weight.absmax` or
    `NAME.SCB`) from them; others load as usual."""
    stored = set(checkpoint.tensor_names())

    def build(name: str, module: nn.Module) -> bool:
        bnb = bnb_parts(name, stored) if scheme.method == BITSANDBYTES else None
        if bnb is not None:
            parts = required = bnb
        else:
            required, optional = (
                fp8_parts(scheme)
                if scheme.is_fp8
                else fp4_parts(scheme)
                if scheme.is_fp4
                else packed_parts(scheme)
            )
            if f"{name}.{required[0]}" not in stored:
                return False  # a float layer
            parts = [*required, *optional]
        if type(module) is not nn.Linear:
            raise CheckpointError(
                f"{checkpoint.path.name} stores {name} {scheme.method}-quantized, but the model's "
                f"{name} is a {type(module).__name__}, not a linear layer; is it the architecture its config names?"
            )
        missing = [part for part in required if f"{name}.{part}" not in stored]
        if missing:
            raise CheckpointError(
                f"{checkpoint.path.name} lacks {', '.join(f'{name}.{part}' for part in missing)} of a "
                f"{scheme.method} layer; the checkpoint is incomplete, download it again"
            )
        tensors = {part: checkpoint.read(f"{name}.{part}") for part in parts if f"{name}.{part}" in stored}
        bias = checkpoint.read(f"{name}.bias").to(dtype) if f"{name}.bias" in stored else None
        if bias is not None and module.bias is None and not bias.any():
            bias = None  # AutoGPTQ gives every quantized layer a bias buffer: zeros where it had none
        if (bias is None) != (module.bias is None):
            stored_bias, model_bias = ("no", "one") if bias is None else ("a", "none")
            raise CheckpointError(
                f"{checkpoint.path.name} has {stored_bias} {name}.bias but the model built from its config "
                f"has {model_bias}; the config and the weights disagree"
            )
        shape = tuple(module.weight.shape)
        if bnb is not None:
            built = bnb_linear(tensors, shape, name, bias, scheme.threshold)
        elif scheme.is_fp8:
            built = fp8_linear(scheme, tensors, shape, name, bias, device.type == "cpu")
        elif scheme.is_fp4:
            built = fp4_linear(scheme, tensors, shape, name, bias, runs_natively(device, shape))
        else:
            built = build_linear(
                unpack_layer(scheme, tensors, shape, name), bias, runs_natively(device, shape)
            )
        set_submodule(model, name, built.to(device))
        return True

    return build


def finish_loading(
    model: nn.Module,
    checkpoint: Checkpoint,
    tokenizer_encode: Callable[[str], list[int]],
    quantize: str | None,
    group_size: int,
) -> None:
    """What can only happen once every weight is in: GGUF embeddings/tied head, or gptq."""
    if isinstance(checkpoint, GGUFCheckpoint) and quantize != NO_QUANTIZATION:
        _gguf_embedding(model, checkpoint)
    if quantize == "gptq":
        device = next(model.parameters()).device
        ids = calibration_ids(tokenizer_encode(default_text()), GPTQ_CALIBRATION_TOKENS)
        batches = [chunk[None].to(device) for chunk in ids.split(CALIBRATION_WINDOW)]  # [1, <=512] each
        quantize_model(model, "gptq", group_size=group_size, calibration=batches, act_order=True)


def calibration_ids(token_ids: list[int], n: int) -> torch.Tensor:
    """The last `n` tokens of a text: disjoint from the first tokens `lamina perplexity` scores by
    default, so gptq is not calibrated on the text it is measured on (the default text has ~113k)."""
    return torch.tensor(token_ids[-n:], dtype=torch.long)


def _filled(module: nn.Module) -> bool:
    return not any(p.is_meta for p in module.parameters())


def _module_name(model: nn.Module, target: nn.Module) -> str | None:
    return next((name for name, mod in model.named_modules() if mod is target), None)


def _gguf_claim(
    model: nn.Module,
    checkpoint: GGUFCheckpoint,
    device: torch.device,
    dtype: torch.dtype,
    linears: bool = True,
) -> ModuleClaim:
    """Build linears from their blocks: on the native kernel every `KEPT_TYPES` type, elsewhere
    Q4_0/Q4_1/Q8_0; F16 / BF16 matrices as `HalfLinear`s on a CPU in float32, an F16 / BF16 token
    embedding as a `HalfEmbedding` (other types load as float). Linears whose stored layout differs from the
    module's (transposed, renamed, another shape) stay float, as does an output head tied to the
    embedding: an embedding of a `KEPT_TYPES` type and its tied head become blocks here on the
    native kernel (never loaded as float: 113 MB less peak for the default model), else (Q8_0) in
    `_gguf_embedding`. `linears=False` (a `--quantize` method re-quantizes them) builds only what the
    method leaves alone: the embedding and an untied output head."""
    spec, config = checkpoint.spec, checkpoint.config
    source = StoredWeights(model, checkpoint)
    sixteen_bit = device.type == "cpu" and dtype == torch.float32  # 16-bit weights stay so

    def keep_blocks(name: str, module: nn.Module) -> bool:
        raw = source.raw(name, module)
        if raw is None:
            return False
        if module is source.embed:
            if raw.ggml_type in GGML_HALF_DTYPES and sixteen_bit and embeddings_can_stay_16_bit(model):
                return _half_embedding(
                    model,
                    name,
                    source.tied_head_name(),
                    half_linear_from_gguf(raw.data, raw.ggml_type, raw.shape).weight16,
                )
            if raw.ggml_type not in KEPT_TYPES or not runs_natively(device, raw.shape):
                return False
            return _embedding_blocks(model, name, source.tied_head_name(), raw, dtype)
        if not linears and module is not source.head:
            return False
        if runs_natively(device, raw.shape) and raw.ggml_type in KEPT_TYPES:
            build = blockq_linear_from_gguf
        elif raw.ggml_type in BLOCK_BYTES:
            build = linear_from_gguf
        elif raw.ggml_type in GGML_HALF_DTYPES and sixteen_bit:
            build = half_linear_from_gguf  # 16 bits as stored, float32 arithmetic (as for HF checkpoints)
        else:
            return False
        layer = build(raw.data, raw.ggml_type, raw.shape, spec.row_order(f"{name}.weight", config))
        if layer is None:  # scales beyond the blocks' fp16
            return False
        set_submodule(model, name, layer.to(device))
        return True

    return keep_blocks


class StoredWeights:
    """Which modules of `model` a GGUF's stored blocks can build: the token embedding, and bias-free
    linears other than a head tied to the embedding, whose stored tensor is in the module's layout
    (not transposed, the same shape)."""

    def __init__(self, model: nn.Module, checkpoint: GGUFCheckpoint) -> None:
        self.model, self.checkpoint = model, checkpoint
        self.stored = set(checkpoint.tensor_names())
        self.head = model.output_embeddings() if hasattr(model, "output_embeddings") else None
        self.embed = model.input_embeddings() if hasattr(model, "input_embeddings") else None
        self.tied = self.head is not None and self.head.weight is self.embed.weight

    def raw(self, name: str, module: nn.Module) -> RawTensor | None:
        """The stored tensor module `name` can be built from, or None."""
        weight = f"{name}.weight"
        if weight not in self.stored:
            return None
        if module is self.embed:
            buildable = isinstance(module, nn.Embedding)
        else:  # a bias-free linear, not the tied head, stored in the module's orientation
            buildable = type(module) is nn.Linear and module.bias is None
            buildable = buildable and not (self.tied and module is self.head)
            buildable = buildable and not weight.endswith(self.checkpoint.spec.transposed)
        if not buildable:
            return None
        raw = self.checkpoint.read_raw(weight)
        return raw if tuple(raw.shape) == tuple(module.weight.shape) else None

    def tied_head_name(self) -> str | None:
        """The output head's module name when it is tied to the embedding."""
        return _module_name(self.model, self.head) if self.tied else None


def _gguf_embedding(model: nn.Module, checkpoint: GGUFCheckpoint) -> None:
    """A Q8_0 token embedding the claim left float (no native kernel here) -> int8 embedding (+ the
    tied head on the same int8 tensors)."""
    embed = model.input_embeddings() if hasattr(model, "input_embeddings") else None
    embed_name = _module_name(model, embed) if isinstance(embed, nn.Embedding) else None
    weight = f"{embed_name}.weight"
    if embed_name is None or weight not in set(checkpoint.tensor_names()):
        return
    raw = checkpoint.read_raw(weight)
    if raw.ggml_type != "Q8_0" or tuple(raw.shape) != tuple(embed.weight.shape):
        return
    head = model.output_embeddings()
    head_name = _module_name(model, head) if head.weight is embed.weight else None
    device = embed.weight.device
    new_embed, new_head = tied_int8_from_gguf(raw.data, raw.shape)
    new_embed.output_dtype = embed.weight.dtype
    set_submodule(model, embed_name, new_embed.to(device))
    if head_name is not None:
        new_head = new_head.to(device)
        new_head.weight_q, new_head.scales = new_embed.weight_q, new_embed.scales  # one copy for both
        set_submodule(model, head_name, new_head)


def _embedding_blocks(
    model: nn.Module, embed_name: str, head_name: str | None, raw: RawTensor, dtype: torch.dtype
) -> bool:
    """A `KEPT_TYPES` embedding as `BlockQuantEmbedding` over the tiles of a `BlockQuantLinear`,
    which also becomes the output head when `head_name` (the tied head) is given. False (nothing
    changed) where its scales do not fit the blocks."""
    new_head = blockq_linear_from_gguf(raw.data, raw.ggml_type, raw.shape)
    if new_head is None:
        return False
    new_embed = BlockQuantEmbedding(new_head)
    new_embed.output_dtype = dtype
    set_submodule(model, embed_name, new_embed)
    if head_name is not None:
        set_submodule(model, head_name, new_head)
    return True


def weight_footprint(model: nn.Module) -> dict[str, int]:
    """Bytes of parameters and buffers per device ({"cpu": ..., "cuda:0": ...}), shared tensors once.
    Under a placement plan (`max_memory`) the disk tier's are reported as "disk": their files are
    mapped and read each step through the page cache, not held by the process."""
    plan = getattr(model, "lamina_plan", None)
    disk = [p for p in plan.placements if p.tier == "disk"] if plan is not None else []
    seen: set[tuple[str, int]] = set()
    totals: dict[str, int] = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        if t.is_meta:
            continue
        key = (str(t.device), t.untyped_storage().data_ptr())
        if key in seen:
            continue
        seen.add(key)
        tier = "disk" if any(_placed_in(name, p) for p in disk) else str(t.device)
        totals[tier] = totals.get(tier, 0) + t.untyped_storage().nbytes()
    return totals


def _placed_in(tensor_name: str, placement: Placement) -> bool:
    """Whether a tensor (qualified name) belongs to a placement's unit: the module's own tensors, and
    its children's when the unit is whole."""
    prefix = f"{placement.prefix}." if placement.prefix else ""
    if not tensor_name.startswith(prefix):
        return False
    return placement.whole or "." not in tensor_name[len(prefix) :]


def load_saved_quantized(
    model: nn.Module, directory: Path, quantize: str | None, dtype: torch.dtype, device: torch.device
) -> None:
    """Fill `model` (on meta) from a `lamina quantize` directory, float tensors in `dtype` on `device`."""
    if quantize is not None:  # "none" cannot expand it either: the float weights are gone
        method = read_scheme(directory)["method"]
        raise InvalidArgumentError(
            f"{directory} is already quantized ({method}); load it without --quantize, or load the "
            "float checkpoint it was made from"
        )
    load_quantized_into(model, directory)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    missing = [name for name, p in model.named_parameters() if p.is_meta]
    if missing:
        raise CheckpointError(
            f"{directory} lacks {len(missing)} weight(s) the model needs, e.g. {missing[:3]}; "
            "the quantized checkpoint is incomplete, re-run `lamina quantize`"
        )
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if p.is_floating_point() and p.dtype != dtype:
                module._parameters[name] = nn.Parameter(p.detach().to(dtype), requires_grad=False)
    model.to(device)
