"""The ``qalign`` command. Each sub-command lives in ``qalign/commands/<name>.py`` with a
``register(subparsers)`` function; heavy modules are imported inside the commands, so
``qalign --help`` answers at once."""

from __future__ import annotations

import argparse
import importlib
import sys

from . import __version__

COMMANDS = ("score", "models", "train", "data", "eval", "serve", "bench")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qalign", description="Q-Align quality / aesthetics scoring with LMMs")
    parser.add_argument("--version", action="version", version=f"qalign {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f".commands.{name}", __package__).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
