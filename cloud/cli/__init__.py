"""``edgefleet-cloud``: run the service, build and publish releases, deploy them.

Commands that change the repository (``init``, ``release``) work on the data
directory directly (the repository takes a file lock, so they are safe next
to a running server); commands that talk to devices (``deploy``, ``devices``)
go through the running service's HTTP API, which owns the broker connection.

Each area registers its subcommands from its own module (``COMMAND_MODULES``).
"""

from __future__ import annotations

import argparse
import logging
import sys

from cloud.cli import fleet, models, observability, releases, rollouts, security, service
from shared.errors import EdgefleetError

__all__ = ["build_parser", "main"]

COMMAND_MODULES = [service, releases, fleet, rollouts, security, models, observability]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="edgefleet-cloud", description=(__doc__ or "").splitlines()[0])
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    sub = p.add_subparsers(dest="command", required=True)
    for module in COMMAND_MODULES:
        module.register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        return int(args.func(args))
    except EdgefleetError as e:
        print(f"edgefleet-cloud: error: {e}", file=sys.stderr)
        return 2
