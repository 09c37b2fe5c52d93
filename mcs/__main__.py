"""``python -m mcs``: the command line.

Commands:
    demo    a service over an SQLite data set, batched with mcs and not, side by side
            (``python -m mcs demo --help``)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

import mcs

EXIT_INTERRUPTED = 130


def main(argv: Sequence[str] | None = None) -> int:
    """Parse ``argv`` (default: the process's arguments), run the command, return the status."""
    from mcs._demo import _cli

    parser = argparse.ArgumentParser(
        prog="python -m mcs",
        description="mcs: massively concurrent services on Trio.",
    )
    parser.add_argument("--version", action="version", version=f"mcs {mcs.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    demo = commands.add_parser(
        "demo",
        help="run the demo service, batched and unbatched, and compare",
        description=_cli.DESCRIPTION,
    )
    _cli.add_arguments(demo)
    args = parser.parse_args(argv)
    try:
        return _cli.run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
