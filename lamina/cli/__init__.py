"""The `lamina` command: one module per subcommand, each exposing `register(subparsers)`.

A `LaminaError` (bad input the user can fix) is printed as one line and exits with status 2; an
`OSError` the command did not handle (standard output closed or full, a device error) as one line
with status 1; Ctrl-C exits with 130. None prints a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import warnings

from lamina.errors import LaminaError

SUBCOMMANDS = ("generate", "chat", "info", "plan", "quantize", "perplexity", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lamina", description="Run transformer language models on whatever memory this machine has."
    )
    parser.add_argument("--version", action="version", version=f"lamina {_version()}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMANDS:
        importlib.import_module(f"lamina.cli.{name}").register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)  # imports torch: Ctrl-C can land here
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    plain_format, warnings.formatwarning = warnings.formatwarning, _one_line_warning
    try:
        return _run(args)
    finally:
        warnings.formatwarning = plain_format


def _run(args: argparse.Namespace) -> int:
    if sys.stdout is None:  # started with `>&-`
        print("lamina: error: standard output is closed; lamina writes its results there", file=sys.stderr)
        return 2
    try:
        return args.run(args) or 0
    except LaminaError as exc:
        print(f"lamina: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lamina generate ... | head` closed the pipe: not an error
        sys.stderr.close()
        return 0
    except OSError as exc:
        _discard_stdout()  # what is still buffered would fail again at exit
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"lamina: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 1


def _one_line_warning(message: Warning | str, *_: object, **__: object) -> str:
    return f"lamina: warning: {message}\n"


def _discard_stdout() -> None:
    """Point standard output at /dev/null, so the interpreter's final flush cannot fail again."""
    try:
        null = os.open(os.devnull, os.O_WRONLY)
        os.dup2(null, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


def _version() -> str:
    from lamina import __version__

    return __version__
