"""``dilaserve serve`` argument handling; bad input fails before Ray starts."""

from __future__ import annotations

import argparse

import pytest

from dilaserve.cli import serve as serve_cli
from dilaserve.errors import CheckpointError, DiLaServeError


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="dilaserve")
    serve_cli.add_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(["serve", *argv])


def test_flags():
    args = parse("--config", "x.yaml", "--host", "0.0.0.0", "--port", "9000")
    assert (args.config, args.host, args.port, args.run) == ("x.yaml", "0.0.0.0", 9000, serve_cli.run)


@pytest.mark.parametrize("argv, error, message", [
    (("--config", "/no/such/file.yaml"), DiLaServeError, "cannot read"),
    (("--port", "0"), DiLaServeError, "--port"),
    (("--model", "/no/such/model"), CheckpointError, "not a model directory"),
])
def test_bad_input_fails_before_starting_ray(argv, error, message):
    import ray

    was_initialized = ray.is_initialized()
    with pytest.raises(error, match=message):
        parse(*argv).run(parse(*argv))
    assert ray.is_initialized() == was_initialized
