"""`lamina quantize MODEL --method ... --out DIR`: write a quantized checkpoint `lamina generate --model DIR` loads.

The model is loaded in float32 on the CPU, its linears are quantized one by one (a progress bar over
layers on stderr), and DIR gets model.safetensors + quant_config.json + config.json + the tokenizer.
DIR must be new or empty; it appears only once complete (nothing is left behind on failure).
gptq calibrates on the last 4096 tokens of --calibration FILE (default: CPython's bundled English docs,
whose first tokens are what `lamina perplexity` scores by default).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from lamina.cli.common import check_group_size
from lamina.errors import InvalidArgumentError

if TYPE_CHECKING:
    from lamina.api import LLM
    from lamina.loading.tokenizer import Tokenizer


def register(subparsers: argparse._SubParsersAction) -> None:
    from lamina.quant.apply import DEFAULT_GROUP_SIZE, GROUPED_METHODS, METHODS
    from lamina.quant.int4 import GROUP_SIZES

    parser = subparsers.add_parser("quantize", help="quantize a model and save it", description=__doc__)
    parser.add_argument(
        "model", nargs="?", metavar="MODEL", help="HF directory or .gguf (default: bundled model)"
    )
    parser.add_argument("--method", required=True, choices=METHODS, help="quantization scheme")
    parser.add_argument(
        "--group-size",
        type=int,
        default=None,
        help=f"{'/'.join(GROUPED_METHODS)} group size: {', '.join(map(str, GROUP_SIZES))} (default: {DEFAULT_GROUP_SIZE})",
    )
    parser.add_argument("--calibration", metavar="FILE", help="gptq calibration text (default: CPython docs)")
    parser.add_argument(
        "--act-order",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="gptq: quantize columns by decreasing Hessian diagonal (default: on)",
    )
    parser.add_argument("--out", required=True, metavar="DIR", help="output directory")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from lamina.api import LLM
    from lamina.engine.perplexity import default_text, read_text
    from lamina.quant.apply import (
        DEFAULT_GROUP_SIZE,
        GROUPED_METHODS,
        quantizable_linears,
        quantize_model,
        validate_method,
    )
    from lamina.quant.checkpoint import check_output_dir, save_quantized, staged_output
    from lamina.quant.load import CALIBRATION_WINDOW, GPTQ_CALIBRATION_TOKENS, calibration_ids

    _check_method_options(args)
    args.group_size = DEFAULT_GROUP_SIZE if args.group_size is None else args.group_size
    args.act_order = True if args.act_order is None else args.act_order
    validate_method(args.method, args.group_size)
    out = check_output_dir(args.out)  # before minutes of quantizing, not after
    refuse_quantized_source(args.model)
    text = (
        read_text(args.calibration) if args.calibration else default_text() if args.method == "gptq" else ""
    )
    llm = LLM.load(args.model, dtype="float32", device="cpu", quantize="none", fuse=False)  # saves HF names
    calibration = None
    if args.method == "gptq":
        ids = calibration_ids(llm.tokenizer.encode(text, add_special_tokens=False), GPTQ_CALIBRATION_TOKENS)
        if ids.numel() < 2:
            raise InvalidArgumentError(
                f"calibration text {args.calibration} has fewer than 2 tokens; give more text"
            )
        calibration = [chunk[None] for chunk in ids.split(CALIBRATION_WINDOW)]  # [1, <=512] each
    bar = ProgressBar(len(quantizable_linears(llm.model)), f"quantizing ({args.method})")
    quantize_model(
        llm.model,
        args.method,
        group_size=args.group_size,
        calibration=calibration,
        act_order=args.act_order,
        progress=bar.step,
    )
    bar.close()
    options = {"group_size": args.group_size} if args.method in GROUPED_METHODS else {}
    if args.method == "gptq":
        options["act_order"] = args.act_order
    config = _hf_config(llm)
    with staged_output(out) as stage:
        save_quantized(llm.model, stage, args.method, config=config, **options)
        save_tokenizer(llm.tokenizer, stage)
    print(f"wrote {out}", file=sys.stderr)
    return 0


def _check_method_options(args: argparse.Namespace) -> None:
    """Options another method would ignore are refused, not silently dropped."""
    check_group_size(args.method, args.group_size, flag="--method")
    if args.method != "gptq":
        for flag, value in (
            ("--calibration", args.calibration),
            ("--act-order/--no-act-order", args.act_order),
        ):
            if value is not None:
                raise InvalidArgumentError(f"{flag} applies to --method gptq only; drop it")


def refuse_quantized_source(model: str | None) -> None:
    """Refuse a `lamina quantize` output as MODEL: its linears are no longer float, so nothing would
    be quantized and the new quant_config.json would misdescribe the layers."""
    from lamina.default_model import model_path
    from lamina.quant.checkpoint import is_quantized_dir, read_scheme

    source = model_path(model)
    if is_quantized_dir(source):
        method = read_scheme(source)["method"]
        raise InvalidArgumentError(
            f"{model} is already quantized with {method}; quantize the original float checkpoint instead"
        )


def _hf_config(llm: LLM) -> dict[str, Any]:
    from lamina.loading.checkpoint import open_checkpoint

    with open_checkpoint(llm.source) as checkpoint:
        return dict(checkpoint.config)


def save_tokenizer(tokenizer: Tokenizer, out: Path) -> None:
    """tokenizer.json + tokenizer_config.json (special tokens, chat template) as HF writes them.
    Written by Python, so a failed write is an OSError (the tokenizers library raises a bare Exception)."""
    (out / "tokenizer.json").write_text(tokenizer.backend.to_str(pretty=True), encoding="utf-8")
    config = {
        "bos_token": tokenizer.bos_token,
        "eos_token": tokenizer.eos_token,
        "chat_template": tokenizer.chat_template,
        "add_bos_token": tokenizer.add_bos,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=1), encoding="utf-8")


class ProgressBar:
    """A one-line text progress bar on stderr (no dependency)."""

    def __init__(self, total: int, label: str) -> None:
        self.total, self.label, self.done = max(total, 1), label, 0

    def step(self, name: str) -> None:
        self.done += 1
        filled = 30 * self.done // self.total
        sys.stderr.write(
            f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} {name[-40:]:<40}"
        )
        sys.stderr.flush()

    def close(self) -> None:
        sys.stderr.write("\n")
