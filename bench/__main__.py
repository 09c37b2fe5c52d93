"""Command line: ``python -m bench [--runs N] [--quick] [--only W1,W2,...] [--out DIR]``."""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

from . import w1_batcher, w2_graph3, w3_deps_tree, w4_latency, w5_demo, w7_scale, w8_autoscale
from ._harness import Params, Workload, run_workloads, text_report, write_reports

ALL_WORKLOADS: tuple[Workload, ...] = (
    *w1_batcher.WORKLOADS,
    *w2_graph3.WORKLOADS,
    *w3_deps_tree.WORKLOADS,
    *w4_latency.WORKLOADS,
    *w5_demo.WORKLOADS,
    *w7_scale.WORKLOADS,
    *w8_autoscale.WORKLOADS,
)

DEFAULT_RUNS = 5
QUICK_RUNS = 3

_GO_ROWS = (
    (
        "stated goal (README)",
        "requests through deps + batched pools",
        "~50k requests/s and < 2 ms library latency per request, on < 20 cores",
    ),
    (
        "`deps` `BenchmarkWaitManyDepsWithDeps`",
        "L=4, N=10 tree (11,111 goroutines), each sleeps 10 ms *then* waits for its "
        "dependencies (ideal 10 ms)",
        "19.1-21.0 ms/op (waitgroups 19.1-19.9, chans 20.4-21.0)",
    ),
    (
        "`pool` `BenchmarkBatchDispatcher/lots_of_work`",
        "put 1,000 units through the dispatcher (batch size 100) and wait for all",
        "1.35-1.57 ms/op, i.e. ~0.64-0.74 M units/s",
    ),
)

GO_REFERENCE = "\n".join(
    [
        "## Go reference (static context, not measured here)",
        "",
        "The Go project this design follows (github.com/jamesjarvis/massivelyconcurrentsystems); "
        "its published benchmark results ran on GitHub Actions runners (2 procs), June 2022.",
        "",
        "| Go benchmark | what it does | result |",
        "|---|---|---|",
        *(f"| {name} | {what} | {result} |" for name, what, result in _GO_ROWS),
        "",
        "The Go tree sleeps concurrently with waiting for its dependencies, so its ideal is one "
        "sleep; W3 here does each node's 1 ms *after* its dependencies, so its ideal is 5 ms "
        "(one per layer).",
    ]
)


def select(only: str | None) -> list[Workload]:
    """The workloads named in ``--only`` (``W3`` selects ``W3a`` and ``W3b``), or all."""
    if not only:
        return list(ALL_WORKLOADS)
    chosen: list[Workload] = []
    for token in (t.strip() for t in only.split(",")):
        if not token:
            continue
        matches = [
            w
            for w in ALL_WORKLOADS
            if w.key.lower() == token.lower()
            or (w.key.lower().startswith(token.lower()) and w.key[len(token) :].isalpha())
        ]
        if not matches:
            keys = ", ".join(w.key for w in ALL_WORKLOADS)
            raise SystemExit(f"unknown workload {token!r}; choose from {keys}")
        chosen += matches
    return [w for w in ALL_WORKLOADS if w in chosen]


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=(
            "Run the mcs benchmarks: each workload several times, mcs interleaved with its "
            "baselines; print medians, ratios (mcs / baseline) and targets; write "
            "report.md, report.json and report.png."
        ),
    )
    parser.add_argument(
        "--runs",
        type=int,
        default=None,
        help=f"runs per variant (default {DEFAULT_RUNS}, or {QUICK_RUNS} with --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="fewer runs, shorter memory and demo workloads, W4 rates offered for 1 s each",
    )
    parser.add_argument(
        "--only",
        metavar="W1,W2,...",
        help="comma-separated workloads: " + ", ".join(w.key for w in ALL_WORKLOADS),
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(__file__).resolve().parent / "results",
        help="directory for the reports (default: bench/results)",
    )
    parser.add_argument("--list", action="store_true", help="list the workloads and exit")
    args = parser.parse_args(argv)
    if args.runs is not None and args.runs < 1:
        parser.error(f"--runs must be >= 1, got {args.runs}")
    return args


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    workloads = select(args.only)
    if args.list:
        for w in workloads:
            print(f"{w.key:<11} {w.title}: {w.description}")
        return 0
    runs = args.runs if args.runs is not None else (QUICK_RUNS if args.quick else DEFAULT_RUNS)
    params = Params()
    if args.quick:
        params = replace(params, latency_seconds=0.3, memory_callers=10_000, sweep_seconds=1.0)
    command = shlex.join(["python", "-m", "bench", *argv])

    started = time.perf_counter()
    outcomes = run_workloads(workloads, params, runs, _log)
    _log(f"all runs took {time.perf_counter() - started:.1f} s\n")
    print(text_report(outcomes, runs))
    written = write_reports(outcomes, params, runs, args.out, command, GO_REFERENCE, _log)
    written += w4_latency.sweep_report(outcomes, params, args.out, _log)
    print("\nwrote " + ", ".join(str(p) for p in written))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
