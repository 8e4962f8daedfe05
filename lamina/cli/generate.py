"""`lamina generate`: continue a prompt; the text goes to stdout, a timing summary to stderr."""

from __future__ import annotations

import argparse
import sys

from lamina.cli.common import (
    add_draft_args,
    add_model_args,
    add_sampling_args,
    load_model_from_args,
    read_stdin,
    sampling_kwargs,
)


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("generate", help="continue a prompt", description=__doc__)
    parser.add_argument("--prompt", "-p", help="text to continue (default: read standard input)")
    parser.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    parser.add_argument(
        "--stream", action=argparse.BooleanOptionalAction, default=True, help="print text as it is generated"
    )
    add_model_args(parser)
    add_draft_args(parser)
    add_sampling_args(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    options = sampling_kwargs(args)
    prompt = args.prompt if args.prompt is not None else read_stdin("pass the prompt with --prompt")
    llm = load_model_from_args(args)
    if args.chat:
        pieces = llm.chat_stream([{"role": "user", "content": prompt}], **options)
    else:
        pieces = llm.stream(prompt, **options)
    if args.stream:
        for piece in pieces:
            sys.stdout.write(piece)
            sys.stdout.flush()
    else:
        sys.stdout.write("".join(pieces))
    sys.stdout.write("\n")
    sys.stdout.flush()
    print(f"load: {llm.load_seconds:.2f} s, {llm.last_stats.summary()}", file=sys.stderr)
    return 0
