"""Options shared by the subcommands that load a model and generate text."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from lamina.errors import InvalidArgumentError


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument(
        "--model",
        metavar="PATH",
        help="HF model directory or .gguf file (default: the bundled SmolLM2-135M-Instruct)",
    )
    group.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    group.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: auto)")
    group.add_argument(
        "--threads",
        type=int,
        default=None,
        metavar="N",
        help="CPU threads (default: cores not busy with other processes)",
    )
    group.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="compile the decode step with torch.compile (default: on CUDA only)",
    )
    group.add_argument(
        "--max-memory",
        metavar="SPEC",
        help="memory budget per tier, e.g. cpu=300MB,cuda:0=4GB; layers beyond it are streamed from disk",
    )
    group.add_argument(
        "--offload-dir", metavar="DIR", help="folder for converted disk-tier layers (with --max-memory)"
    )
    add_quantize_args(parser)


def add_quantize_args(parser: argparse.ArgumentParser) -> None:
    from lamina.quant.apply import DEFAULT_GROUP_SIZE, GROUPED_METHODS, METHODS
    from lamina.quant.int4 import GROUP_SIZES

    group = parser.add_argument_group("quantization")
    group.add_argument(
        "--quantize",
        choices=[*METHODS, "none"],
        help="quantize while loading; a GGUF keeps its Q4_0/Q4_1/Q8_0 blocks unless set (none = float)",
    )
    group.add_argument(
        "--group-size",
        type=int,
        default=None,
        metavar="G",
        help=f"{'/'.join(GROUPED_METHODS)} group size: {', '.join(map(str, GROUP_SIZES))} "
        f"(default: {DEFAULT_GROUP_SIZE})",
    )


def add_draft_args(parser: argparse.ArgumentParser) -> None:
    from lamina.engine.prompt_lookup import DEFAULT_LOOKUP_K
    from lamina.engine.speculative import DEFAULT_K
    from lamina.quant.apply import METHODS

    group = parser.add_argument_group("speculative decoding")
    group.add_argument(
        "--draft",
        metavar="MODEL",
        help="a small model with the same tokenizer that drafts tokens for the model to verify "
        "(a path, or 'default' for the bundled model), or 'prompt-lookup' to draft what followed "
        "earlier occurrences of the last tokens (no model)",
    )
    group.add_argument(
        "--speculative-k",
        type=int,
        default=None,
        metavar="K",
        help=f"tokens the draft proposes per step (default: {DEFAULT_K}; {DEFAULT_LOOKUP_K} for prompt-lookup)",
    )
    group.add_argument(
        "--draft-quantize",
        choices=[*METHODS, "none"],
        help="quantize the draft while loading; a GGUF draft keeps its blocks unless set (none = float)",
    )


def add_sampling_args(parser: argparse.ArgumentParser, max_new_tokens: int = 256) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N")
    group.add_argument("--temperature", type=float, default=0.8, help="0 = greedy (default: 0.8)")
    group.add_argument("--top-k", type=int, default=0, metavar="K", help="0 = no limit (default)")
    group.add_argument(
        "--top-p", type=float, default=1.0, metavar="P", help="nucleus mass in (0, 1] (default: 1)"
    )
    group.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R", help="1 = off (default)")
    group.add_argument("--seed", type=int, default=None, help="make sampling reproducible")
    group.add_argument(
        "--stop", action="append", default=[], metavar="TEXT", help="stop before this text (repeatable)"
    )


def read_stdin(hint: str) -> str:
    """All of standard input as text; a one-line error when it is closed (ending in `hint`, what to do
    instead) or not UTF-8."""
    if sys.stdin is None:
        raise InvalidArgumentError(f"standard input is closed; {hint}")
    try:
        return sys.stdin.read()
    except UnicodeDecodeError as exc:
        raise InvalidArgumentError(
            f"standard input is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None


def load_model_from_args(args: argparse.Namespace) -> Any:
    """The LLM the model options describe."""
    from lamina.api import LLM
    from lamina.engine.threads import configure_threads
    from lamina.quant.apply import DEFAULT_GROUP_SIZE, GROUPED_METHODS

    methods = (args.quantize, getattr(args, "draft_quantize", None))  # --group-size serves both
    check_group_size(next((m for m in methods if m in GROUPED_METHODS), args.quantize), args.group_size)
    configure_threads(args.threads)
    return LLM.load(
        args.model,
        dtype=args.dtype,
        device=args.device,
        quantize=args.quantize,
        group_size=DEFAULT_GROUP_SIZE if args.group_size is None else args.group_size,
        max_memory=args.max_memory,
        offload_dir=args.offload_dir,
        **_draft_kwargs(args),
    )


def check_group_size(method: str | None, group_size: int | None, flag: str = "--quantize") -> None:
    """--group-size only means something to the grouped methods (`flag` names the method option);
    refuse it elsewhere rather than ignore it."""
    from lamina.quant.apply import GROUPED_METHODS

    if group_size is not None and method not in GROUPED_METHODS:
        methods = "|".join(GROUPED_METHODS)
        reason = f"{flag} {method} has no groups" if method else "nothing is quantized"
        raise InvalidArgumentError(
            f"--group-size applies to {flag} {methods}, but {reason}; drop --group-size"
        )


def _draft_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """`LLM.load` keywords for --compile and the draft options, which --draft changes."""
    draft = getattr(args, "draft", None)
    k, quantize = getattr(args, "speculative_k", None), getattr(args, "draft_quantize", None)
    if draft is None:
        for flag, value in (("--speculative-k", k), ("--draft-quantize", quantize)):
            if value is not None:
                raise InvalidArgumentError(f"{flag} needs --draft MODEL; add a draft model or drop {flag}")
        return {"compile": args.compile}
    if args.compile:
        print(
            "lamina: warning: --compile is ignored with --draft: the model and its draft decode eagerly",
            file=sys.stderr,
        )
    return {"draft": draft, "draft_quantize": quantize, "speculative_k": k}


def sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """Keyword arguments for `LLM.stream`, validated before any model is loaded."""
    from lamina.engine.sampling import SamplingParams, check_seed

    if args.max_new_tokens < 1:
        raise InvalidArgumentError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    SamplingParams(args.temperature, args.top_k, args.top_p, args.repetition_penalty)  # raises on bad values
    check_seed(args.seed)
    return {
        "max_new_tokens": args.max_new_tokens,
        "temperature": args.temperature,
        "top_k": args.top_k,
        "top_p": args.top_p,
        "repetition_penalty": args.repetition_penalty,
        "seed": args.seed,
        "stop": args.stop,
    }
