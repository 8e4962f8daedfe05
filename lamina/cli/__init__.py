"""The `lamina` command: one module per subcommand, each exposing `register(subparsers)`.

A `LaminaError` (bad input the user can fix) is printed as one line and exits with status 2;
Ctrl-C exits with 130. Neither prints a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys

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
    args = build_parser().parse_args(argv)
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


def _version() -> str:
    from lamina import __version__

    return __version__
