"""The ``dilaserve`` command line. Each subcommand lives in its own module and registers
itself with ``add_parser(subparsers)``; ``main`` turns user errors into a message and exit 2."""

from __future__ import annotations

import argparse
import logging
import sys

from dilaserve.errors import DiLaServeError

SUBCOMMANDS = ("demo", "generate", "init-model", "serve", "replay", "simulate", "plan", "control", "eval", "profile")


def build_parser() -> argparse.ArgumentParser:
    import importlib

    parser = argparse.ArgumentParser(prog="dilaserve", description="Serve diffusion language models under SLOs.")
    parser.add_argument("--log-level", default="WARNING", help="logging level (DEBUG, INFO, WARNING)")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"dilaserve.cli.{name.replace('-', '_')}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args) or 0)
    except DiLaServeError as exc:
        print(f"dilaserve {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
