"""`lamina info`: what a checkpoint is and what memory running it takes, without loading its weights."""

from __future__ import annotations

import argparse

from lamina.model_info import RUN_FORMATS, ModelInfo, describe


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("info", help="describe a model without loading it", description=__doc__)
    parser.add_argument("model", nargs="?", metavar="MODEL", help="HF model directory or .gguf file")
    parser.add_argument("--model", dest="model_option", metavar="PATH", help=argparse.SUPPRESS)
    parser.add_argument(
        "--context", type=int, default=None, metavar="N", help="tokens of context to size the KV cache for"
    )
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from lamina.default_model import model_path
    from lamina.errors import InvalidArgumentError

    if args.context is not None and args.context < 1:
        raise InvalidArgumentError(f"--context must be >= 1, got {args.context}")
    if args.model is not None and args.model_option is not None:
        raise InvalidArgumentError("give the model either as MODEL or as --model, not both")
    info = describe(model_path(args.model if args.model is not None else args.model_option))
    print(render(info, args.context or info.context_length))
    return 0


def render(info: ModelInfo, context: int) -> str:
    """The report `lamina info` prints."""
    total_stored = sum(info.stored_types.values()) or 1
    stored = ", ".join(f"{kind} {count / total_stored:.0%}" for kind, count in info.stored_types.items())
    lines = [
        f"model:          {info.source}",
        f"architecture:   {info.architecture} (Lamina {info.family}), {info.layers} layers",
        f"parameters:     {_count(info.parameters)}",
        f"stored as:      {stored} ({_size(info.stored_bytes)} on disk)",
    ]
    if info.quantization:
        lines.append(f"quantization:   {info.quantization} (declared in config.json)")
    lines += [
        f"context length: {info.context_length}",
        f"tokenizer:      {info.tokenizer}",
        f"chat template:  {'yes' if info.chat_template else 'no'}",
        "",
        f"estimated memory for a {context}-token context (KV cache in the run dtype; int8/int4 keep it 16-bit):",
        f"  {'run as':<10}{'weights':>12}{'KV cache':>12}{'all on one tier':>18}{'GPU, streaming':>17}",
    ]
    kept = info.kept_bytes()
    if kept is not None:  # the default on a CPU with the native kernel; streaming expands to float
        kv = info.kv_bytes_per_token["float32"] * context
        lines.append(f"  {'as stored':<10}{_size(kept):>12}{_size(kv):>12}{_size(kept + kv):>18}{'-':>17}")
    # a checkpoint another tool quantized runs as stored only: its float weights are gone
    for run_format in RUN_FORMATS if info.prequantized_bits is None else ():
        kv_dtype = "float32" if run_format == "float32" else "bfloat16"
        weights = info.weight_bytes(run_format)
        kv = info.kv_bytes_per_token[kv_dtype] * context
        # streaming layers from CPU/disk, the GPU holds the KV cache, the non-layer weights and two layers
        layer = info.layer_bytes(run_format)
        resident = weights - layer * info.layers
        lines.append(
            f"  {run_format:<10}{_size(weights):>12}{_size(kv):>12}{_size(weights + kv):>18}"
            f"{_size(resident + 2 * layer + kv):>17}"
        )
    return "\n".join(lines)


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f} {unit} ({n:,})"
    return str(n)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"
