"""`wanstream <command>`: each command lives in its own module exposing `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from wanstream import __version__

# Subcommand modules, in the order `--help` lists them.
COMMANDS = ("download", "models", "generate", "extend", "serve", "replay", "bench", "lora")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="wanstream",
        description="Real-time video diffusion (StreamDiffusionV2 on Wan2.1).",
    )
    parser.add_argument("--version", action="version", version=f"wanstream {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"wanstream.cli.{name}_cmd").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "handler", None):
            parser.print_help()
            return 2
        return int(args.handler(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`wanstream models --json | head -c 10`): stop quietly, as `cat` does.
        # Later writes (and the interpreter's final flush) go to /dev/null instead of raising again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
