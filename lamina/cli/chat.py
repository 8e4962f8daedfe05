"""`lamina chat`: talk with a model in the terminal, in the model's own chat format.

Commands: /reset forgets the conversation, /exit (or Ctrl-D) leaves. Ctrl-C stops the current reply
and keeps the chat going; at the prompt it leaves. A message that cannot be answered (longer than
the context window, not UTF-8) is reported and dropped, and the chat goes on; with piped input the
exit status is then 2.
"""

from __future__ import annotations

import argparse
import sys

from lamina.cli.common import (
    add_draft_args,
    add_model_args,
    add_sampling_args,
    load_model_from_args,
    sampling_kwargs,
)
from lamina.errors import InvalidArgumentError, LaminaError
from lamina.loading.chat_template import Message


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("chat", help="interactive chat", description=__doc__)
    parser.add_argument("--system", help="system message that starts the conversation")
    parser.add_argument(
        "--multiline", action="store_true", help="a message ends with a blank line or Ctrl-D, not at Enter"
    )
    add_model_args(parser)
    add_draft_args(parser)
    add_sampling_args(parser, max_new_tokens=512)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    options = sampling_kwargs(args)
    if sys.stdin is None:
        raise InvalidArgumentError("standard input is closed; chat reads your messages from it")
    llm = load_model_from_args(args)
    llm.chat_prompt([{"role": "user", "content": "hi"}])  # no template or a broken one: say so now, once
    interactive = sys.stdin.isatty()
    if interactive:
        print("Chatting; /reset to start over, /exit or Ctrl-D to leave.", file=sys.stderr)
    start: list[Message] = [{"role": "system", "content": args.system}] if args.system else []
    history = list(start)
    failed = False
    while True:
        try:
            message = _read_message(args.multiline, interactive)
        except UnicodeDecodeError as exc:
            _report(f"that message is not UTF-8 text ({exc.reason}); it was dropped")
            failed = True
            continue
        if message is None or message.strip() == "/exit":
            return 2 if failed and not interactive else 0
        if message.strip() == "/reset":
            history = list(start)
            print("(conversation cleared)", file=sys.stderr)
            continue
        if not message.strip():
            continue
        try:
            turn = _fit_context(
                llm, [*history, {"role": "user", "content": message}], options["max_new_tokens"]
            )
            reply = _stream_reply(llm, turn, options)
        except LaminaError as exc:  # the history stays as it was before the message
            _report(f"{exc} (the message was dropped; the chat goes on)")
            failed = True
            continue
        history = [*turn, {"role": "assistant", "content": reply}]


def _report(problem: str) -> None:
    print(f"lamina: error: {problem}", file=sys.stderr)


def _read_message(multiline: bool, interactive: bool) -> str | None:
    """One user message, or None at end of input."""
    prompt = "> " if interactive else ""
    try:
        if not multiline:
            return input(prompt)
        lines = []
        while True:
            line = input(prompt if not lines else ". " if interactive else "")
            if not line:
                return "\n".join(lines) if lines else ""
            lines.append(line)
    except EOFError:
        if multiline and lines:
            return "\n".join(lines)
        return None


def _stream_reply(llm, history: list[Message], options: dict) -> str:
    """Print the reply as it comes; Ctrl-C cuts it short and keeps what was shown."""
    pieces = []
    stream = llm.chat_stream(history, **options)
    try:
        for piece in stream:
            pieces.append(piece)
            sys.stdout.write(piece)
            sys.stdout.flush()
    except KeyboardInterrupt:
        stream.close()
        sys.stdout.write(" [stopped]")
    sys.stdout.write("\n")
    sys.stdout.flush()
    return "".join(pieces)


def _fit_context(llm, history: list[Message], reply_tokens: int) -> list[Message]:
    """Drop the oldest exchanges (never the system message or the new question) until the reply fits."""
    context = llm.config.max_position_embeddings
    while True:
        prompt_len = len(llm.tokenizer.encode(llm.chat_prompt(history), add_special_tokens=False))
        if prompt_len + min(reply_tokens, 64) <= context:
            return history
        first = 1 if history[0]["role"] == "system" else 0
        if len(history) - first <= 1:
            return history  # only the new question is left; generation reports if it is too long
        del history[first : first + 2]
