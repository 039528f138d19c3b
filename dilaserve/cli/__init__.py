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
        try:
            importlib.import_module(f"dilaserve.cli.{name.replace('-', '_')}").add_parser(sub)
        except ModuleNotFoundError as exc:
            if not exc.name or exc.name.split(".")[0] == "dilaserve":
                raise
            _add_unavailable(sub, name, exc.name)  # e.g. a GPU image without Ray or PuLP
    return parser


def _add_unavailable(sub, name: str, package: str) -> None:
    """A subcommand whose optional dependency is missing: it says so when run; the others work."""
    def run(args: argparse.Namespace) -> int:
        raise DiLaServeError(_missing(package))

    p = sub.choices.get(name)
    if p is None:
        p = sub.add_parser(name, help=f"(unavailable: needs {package})")
        p.add_argument("rest", nargs=argparse.REMAINDER)
    p.set_defaults(run=run)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return int(args.run(args) or 0)
    except DiLaServeError as exc:
        print(f"dilaserve {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except ModuleNotFoundError as exc:  # an optional package the command imports when it runs
        if not exc.name or exc.name.split(".")[0] == "dilaserve":
            raise
        print(f"dilaserve {args.command}: error: {_missing(exc.name)}", file=sys.stderr)
        return 2


def _missing(package: str) -> str:
    return f"this command needs the Python package {package!r}, which is not installed (see the README's set-up)"


if __name__ == "__main__":
    sys.exit(main())
