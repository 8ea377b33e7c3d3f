"""``litefleet convert`` (filled in by the converter)."""

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    pass
