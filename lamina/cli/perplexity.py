"""`lamina perplexity [MODEL]`: perplexity over a text (default: CPython's English docs).

Windows of --context tokens advance by --stride; each token is scored once. With --quantize the
model is quantized while loading, so the number measures that scheme. --json prints
{"perplexity": ..., "tokens": ...} on stdout and nothing else.
"""

from __future__ import annotations

import argparse
import json
import sys

from lamina.errors import InvalidArgumentError


def register(subparsers: argparse._SubParsersAction) -> None:
    from lamina.cli.common import add_model_args
    from lamina.engine.perplexity import DEFAULT_CONTEXT, DEFAULT_STRIDE

    parser = subparsers.add_parser(
        "perplexity", help="perplexity of a model over a text", description=__doc__
    )
    parser.add_argument(
        "model_path", nargs="?", metavar="MODEL", help="HF directory or .gguf (same as --model)"
    )
    parser.add_argument("--text", metavar="FILE", help="UTF-8 text file (default: CPython's bundled docs)")
    parser.add_argument(
        "--max-tokens", type=int, default=4096, metavar="N", help="score the first N tokens (default 4096)"
    )
    parser.add_argument(
        "--context",
        type=int,
        metavar="T",
        help=f"window length in tokens (default: {DEFAULT_CONTEXT}, or the model's context window if shorter)",
    )
    parser.add_argument(
        "--stride",
        type=int,
        metavar="S",
        help=f"window step in tokens (default: half the window, {DEFAULT_STRIDE})",
    )
    parser.add_argument("--json", action="store_true", help='print {"perplexity": ..., "tokens": ...}')
    add_model_args(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from lamina.cli.common import load_model_from_args
    from lamina.engine.perplexity import default_text, perplexity, read_text

    if args.max_tokens < 2:
        raise InvalidArgumentError(f"--max-tokens must be >= 2, got {args.max_tokens}")
    if args.context is not None and args.context < 2:
        raise InvalidArgumentError(f"--context must be >= 2 (tokens a window sees), got {args.context}")
    if args.stride is not None and args.stride < 1:
        raise InvalidArgumentError(f"--stride must be >= 1, got {args.stride}")
    if args.model_path is not None:
        if args.model is not None and args.model != args.model_path:
            raise InvalidArgumentError("give the model either as MODEL or as --model, not both")
        args.model = args.model_path
    text = read_text(args.text) if args.text else default_text()
    llm = load_model_from_args(args)
    context, stride = _window(args.context, args.stride, llm.config.max_position_embeddings)
    ids = llm.tokenizer.encode(text, add_special_tokens=False)[: args.max_tokens]

    def show(done: int, total: int) -> None:
        if not args.json:
            print(f"\rscored {done}/{total} tokens", end="", file=sys.stderr, flush=True)

    result = perplexity(llm.model, ids, context=context, stride=stride, progress=show)
    if args.json:
        print(json.dumps({"perplexity": result.perplexity, "tokens": result.tokens}))
    else:
        print(file=sys.stderr)
        print(f"perplexity: {result.perplexity:.4f} over {result.tokens} tokens")
    return 0


def _window(context: int | None, stride: int | None, model_window: int) -> tuple[int, int]:
    """(context, stride): the defaults fitted to the model's context window, given values checked."""
    from lamina.engine.perplexity import DEFAULT_CONTEXT

    if context is not None and context > model_window:
        raise InvalidArgumentError(
            f"--context {context} exceeds the model's context window ({model_window}); pass at most that"
        )
    context = context if context is not None else min(DEFAULT_CONTEXT, model_window)
    stride = stride if stride is not None else context // 2
    if stride > context:
        raise InvalidArgumentError(f"--stride must be in 1..--context ({context}), got {stride}")
    return context, stride
