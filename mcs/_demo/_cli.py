"""``python -m mcs demo``: the command line of the demo."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import mcs

from ._db import Dataset
from ._run import DEFAULT_RATE, DemoSummary, Progress, run_comparison

__all__ = ["add_arguments", "main", "run"]

DEFAULT_REQUESTS = 10_000
DEFAULT_CONCURRENCY = 1_000
DEFAULT_USERS = 100_000
DEFAULT_PLOT = "mcs-demo.png"
EXIT_MISSING_EXTRAS = 2

DESCRIPTION = """\
Serve profile pages from an SQLite social network generated on the fly (default 100,000
users, ~1M posts, ~1M follows), first with every lookup batched through mcs, then with one
query per lookup, and compare requests/s, latency and queries issued."""


def _int_in(minimum: int, maximum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text.replace("_", ""))
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        if value > maximum:
            raise argparse.ArgumentTypeError(f"must be <= {maximum:_}, got {value:_}")
        return value

    parse.__name__ = "int"
    return parse


def _rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be >= 0 and finite, got {text}")
    return value


def _plot_path_problem(path: Path) -> str | None:
    """Why the plot cannot be saved at ``path``, checked before a run rather than after it."""
    if path.suffix.lower() != ".png":
        return f"the plot is a PNG file: the name must end in .png, got {str(path)!r}"
    if path.is_dir():
        return f"{path} is a folder"
    if not path.resolve().parent.is_dir():
        return f"no such folder: {path.resolve().parent}"
    return None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Add the demo's options to ``parser``."""
    parser.add_argument(
        "--requests",
        type=_int_in(1, 10_000_000),
        default=DEFAULT_REQUESTS,
        metavar="N",
        help=f"profile requests to serve in each mode (default {DEFAULT_REQUESTS:,})",
    )
    parser.add_argument(
        "--concurrency",
        type=_int_in(1, 100_000),
        default=DEFAULT_CONCURRENCY,
        metavar="N",
        help=f"concurrent clients; each sends its next request when answered "
        f"(default {DEFAULT_CONCURRENCY:,})",
    )
    parser.add_argument(
        "--users",
        type=_int_in(1, 1_000_000),
        default=DEFAULT_USERS,
        metavar="N",
        help=f"users in the generated data set; ~10 posts and ~10 follows each "
        f"(default {DEFAULT_USERS:,})",
    )
    parser.add_argument(
        "--seed",
        type=_int_in(0, 2**31 - 1),
        default=0,
        metavar="N",
        help="seed of the data set and of the request mix (default 0)",
    )
    parser.add_argument(
        "--max-batch-size",
        type=_int_in(1, 10_000),
        default=100,
        metavar="N",
        help="the most ids in one batched query (default 100)",
    )
    parser.add_argument(
        "--db-in-flight",
        type=_int_in(1, 64),
        default=2,
        metavar="N",
        help="queries in flight per table, in both modes (default 2)",
    )
    parser.add_argument(
        "--db-rate",
        type=_rate,
        default=DEFAULT_RATE.count,
        metavar="QPS",
        help=f"rate limit on each table's queries per second, in both modes; 0 for none "
        f"(default {DEFAULT_RATE.count:,.0f}, bursts of {DEFAULT_RATE.burst})",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(DEFAULT_PLOT),
        metavar="PNG",
        help=f"where to save the plot (default ./{DEFAULT_PLOT})",
    )
    parser.add_argument("--no-plot", action="store_true", help="do not draw the plot")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print a machine-readable summary to stdout instead of the progress and the table",
    )


def run(args: argparse.Namespace) -> int:
    """Run the demo with parsed options; returns the exit status."""
    from ._report import missing_extras

    missing = missing_extras(need_rich=not args.json, need_matplotlib=not args.no_plot)
    if missing:
        print(
            f"the demo needs {' and '.join(missing)}: install the 'demo' extra, "
            "e.g. pip install 'trio-mcs[demo]' (or pass --json --no-plot to run without them)",
            file=sys.stderr,
        )
        return EXIT_MISSING_EXTRAS
    plot_path: Path | None = None if args.no_plot else args.out
    if plot_path is not None:
        problem = _plot_path_problem(plot_path)
        if problem:
            print(f"python -m mcs demo: error: argument --out: {problem}", file=sys.stderr)
            return 2
    if args.db_rate:
        rate: mcs.RateLimit | None = mcs.RateLimit(
            count=args.db_rate, per=1.0, burst=DEFAULT_RATE.burst
        )
    else:
        rate = None
    from ._report import print_summary, progress_display, save_plot, to_json

    def compare(
        on_dataset: Callable[[Dataset], None] | None = None,
        progress: Callable[[str], Progress] | None = None,
    ) -> DemoSummary:
        return run_comparison(
            requests=args.requests,
            concurrency=args.concurrency,
            users=args.users,
            seed=args.seed,
            max_batch_size=args.max_batch_size,
            max_in_flight=args.db_in_flight,
            rate=rate,
            on_dataset=on_dataset,
            progress=progress,
        )

    if args.json:
        summary = compare()
        saved = save_plot(summary, plot_path) if plot_path is not None else None
        print(to_json(summary, saved))
        return 0

    from rich.console import Console

    with progress_display(Console(stderr=True), args.requests) as (on_dataset, progress):
        summary = compare(on_dataset, progress)
    saved = save_plot(summary, plot_path) if plot_path is not None else None
    print_summary(Console(), summary, saved)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m mcs demo [options]``; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m mcs demo", description=DESCRIPTION)
    add_arguments(parser)
    return run(parser.parse_args(argv))
