"""Argument types shared by subcommands."""

from __future__ import annotations

import argparse


def positive(kind):
    """An argparse type: a number of ``kind`` that must be > 0."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    return parse
