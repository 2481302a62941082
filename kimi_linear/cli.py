"""The ``kimi-linear`` command.

Each subcommand lives in its own module exposing ``register(subparsers)``; the module is imported
only when the command line is built, and its heavy imports happen inside its handler, so
``kimi-linear --version`` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from kimi_linear import __version__

# Modules that add subcommands. A module that fails to import is reported, not fatal for the others.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "kimi_linear.commands.info",
    "kimi_linear.commands.demo",
    "kimi_linear.commands.bench",
    "kimi_linear.commands.generate",
    "kimi_linear.commands.model",
    "kimi_linear.commands.train",
    "kimi_linear.commands.plot",
    "kimi_linear.commands.quickstart",
    "kimi_linear.commands.synthetic",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kimi-linear",
        description="Kimi Linear: KDA kernels, the hybrid KDA+MLA+MoE model, training and serving.",
    )
    parser.add_argument("--version", action="version", version=f"kimi-linear {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ImportError as exc:  # an optional feature whose dependency is missing
            print(f"warning: subcommands of {name} unavailable: {exc}", file=sys.stderr)
            continue
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "handler", None) is None:
        parser.print_help()
        return 0
    return int(args.handler(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
