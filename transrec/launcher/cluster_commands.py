"""`transrec cluster up|down|status`, `submit`, `jobs`, `logs`, `stop`: the cluster-facing commands."""
from __future__ import annotations

import argparse

COMMANDS: tuple[str, ...] = ()


def add_parsers(commands: argparse._SubParsersAction) -> None:
    """Adds this module's subcommands to the `transrec` parser."""


def run(args: argparse.Namespace) -> int:
    raise NotImplementedError(args.command)
