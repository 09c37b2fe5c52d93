"""The demo's output: a progress display, a summary table, a plot and JSON.

rich and matplotlib (the ``demo`` extra) are imported here only, and only when called, so
that the rest of ``mcs._demo`` (which the benchmarks use) needs neither.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from ._db import Dataset
from ._run import DemoSummary, ModeSummary, Progress

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["missing_extras", "print_summary", "progress_display", "save_plot", "to_json"]

_MODES = ("batched", "unbatched")
_COLORS = {"batched": "tab:green", "unbatched": "tab:red"}


def missing_extras(*, need_rich: bool, need_matplotlib: bool) -> list[str]:
    """The names of the needed packages that cannot be imported."""
    missing = []
    for name, needed in (("rich", need_rich), ("matplotlib", need_matplotlib)):
        if needed:
            try:
                __import__(name)
            except ImportError:
                missing.append(name)
    return missing


def to_json(summary: DemoSummary, plot: Path | None) -> str:
    """The summary as a JSON document (``plot`` is where the plot was saved, if it was)."""
    data = summary.to_dict()
    data["plot"] = str(plot) if plot is not None else None
    return json.dumps(data, indent=2, allow_nan=False)


# ---------------------------------------------------------------------------- progress


class _Display:
    """Callbacks for :func:`mcs._demo.run_comparison` that drive a rich progress display."""

    def __init__(self, console: Console, requests: int) -> None:
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            SpinnerColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        self.requests = requests
        self.progress = Progress(
            SpinnerColumn(finished_text="[green]✓"),
            TextColumn("{task.description:<26}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]:>12}"),
            TimeElapsedColumn(),
            console=console,
            refresh_per_second=5,
        )
        self._build = self.progress.add_task("generating the data set", total=None, rate="")

    def on_dataset(self, dataset: Dataset) -> None:
        self.progress.update(
            self._build,
            description=f"data set: {dataset.users:,} users",
            total=1,
            completed=1,
            rate=f"{dataset.build_seconds:.1f} s",
        )
        self.progress.stop_task(self._build)

    def for_mode(self, mode: str) -> Progress:
        label = "batched (mcs)" if mode == "batched" else "unbatched (1 query/lookup)"
        task = self.progress.add_task(label, total=self.requests, rate="")
        progress = self.progress
        started: list[float] = []

        def update(done: int) -> None:
            now = time.perf_counter()
            if not started:
                started.append(now)
            elapsed = now - started[0]
            rate = f"{done / elapsed:,.0f} req/s" if elapsed > 0 and done else ""
            progress.update(task, completed=done, rate=rate)
            if done >= self.requests:
                progress.stop_task(task)

        return update


@contextmanager
def progress_display(
    console: Console, requests: int
) -> Iterator[tuple[Callable[[Dataset], None], Callable[[str], Progress]]]:
    """A live progress display; yields the ``on_dataset`` and ``progress`` callbacks."""
    display = _Display(console, requests)
    with display.progress:
        yield display.on_dataset, display.for_mode


# ---------------------------------------------------------------------------- table


def _gain(batched: float, unbatched: float, *, lower_is_better: bool) -> str:
    if lower_is_better:
        batched, unbatched = unbatched, batched
    if unbatched <= 0 or math.isinf(batched):
        return ""
    ratio = batched / unbatched
    return f"{ratio:,.1f}x" if ratio >= 1 else f"{ratio:,.2f}x"


def print_summary(console: Console, summary: DemoSummary, plot: Path | None) -> None:
    """Print the side-by-side comparison, the per-stage detail and where the plot is."""
    from rich import box
    from rich.table import Table

    b, u = summary.batched, summary.unbatched
    rate = summary.rate
    limits = f"{summary.max_in_flight} queries in flight per table"
    if rate is not None:
        per = "s" if rate.per == 1 else f"{rate.per:g} s"
        limits += f", rate limit {rate.count:,.0f} queries/{per} per table"
    table = Table(
        title=f"{b.requests:,} profile requests from {b.concurrency:,} concurrent clients",
        caption=f"SQLite in worker threads; {limits}",
        box=box.SIMPLE_HEAVY,
    )
    table.add_column("")
    table.add_column("batched (mcs)", justify="right", style="green")
    table.add_column("unbatched", justify="right", style="red")
    table.add_column("gain", justify="right", style="bold")

    def row(name: str, bv: float, uv: float, fmt: str, *, lower_is_better: bool) -> None:
        table.add_row(
            name, format(bv, fmt), format(uv, fmt), _gain(bv, uv, lower_is_better=lower_is_better)
        )

    row("requests/s", b.requests_per_second, u.requests_per_second, ",.0f", lower_is_better=False)
    row("latency p50 (ms)", b.latency_p50_ms, u.latency_p50_ms, ",.1f", lower_is_better=True)
    row("latency p99 (ms)", b.latency_p99_ms, u.latency_p99_ms, ",.1f", lower_is_better=True)
    table.add_row("ids asked for by requests", f"{b.lookups:,}", f"{u.lookups:,}", "")
    table.add_row("  answered by the request's memo", f"{b.memo_hits:,}", f"{u.memo_hits:,}", "")
    table.add_row("  joined a pending lookup (dedupe)", f"{b.deduped:,}", f"{u.deduped:,}", "")
    row("ids sent to the database", b.ids_sent, u.ids_sent, ",d", lower_is_better=True)
    row("database queries", b.queries, u.queries, ",d", lower_is_better=True)
    row(
        "queries per request",
        b.queries_per_request,
        u.queries_per_request,
        ",.2f",
        lower_is_better=True,
    )
    table.add_row(
        "mean batch size (ids/query)", f"{b.mean_batch_size:,.1f}", f"{u.mean_batch_size:,.1f}", ""
    )
    table.add_row("wall time (s)", f"{b.seconds:,.2f}", f"{u.seconds:,.2f}", "")
    table.add_row("served: 200 / 404 / errors", _served(b), _served(u), "")
    table.add_row("rate-limit waits", _waits(b), _waits(u), "")

    stages = Table(title="per table", box=box.SIMPLE)
    stages.add_column("table")
    stages.add_column("lookups", justify="right")
    stages.add_column("memo", justify="right", style="green")
    stages.add_column("deduped", justify="right", style="green")
    stages.add_column("ids sent", justify="right", style="green")
    stages.add_column("queries batched", justify="right", style="green")
    stages.add_column("mean batch", justify="right", style="green")
    stages.add_column("peak batch", justify="right", style="green")
    stages.add_column("queries unbatched", justify="right", style="red")
    for bs, us in zip(b.stages, u.stages, strict=True):
        stages.add_row(
            bs.name,
            f"{bs.lookups:,}",
            f"{bs.memo_hits:,}",
            f"{bs.deduped:,}",
            f"{bs.ids_sent:,}",
            f"{bs.queries:,}",
            f"{bs.mean_batch_size:,.1f}",
            f"{bs.peak_batch_size:,}",
            f"{us.queries:,}",
        )

    dataset = summary.dataset
    console.print()
    console.print(
        f"data set: {dataset.users:,} users, {dataset.posts:,} posts, {dataset.follows:,} "
        f"follows ({dataset.size_bytes / 1e6:,.0f} MB, generated in {dataset.build_seconds:.1f} s)"
    )
    console.print(table)
    console.print(stages)
    console.print(
        f"[bold]batching served {summary.speedup:,.1f}x the requests/s with "
        f"{summary.query_reduction:,.0f}x fewer queries[/bold]"
    )
    if plot is not None:
        console.print(f"plot saved to {plot}")


def _served(mode: ModeSummary) -> str:
    return f"{mode.ok:,} / {mode.not_found:,} / {mode.errors:,}"


def _waits(mode: ModeSummary) -> str:
    return f"{sum(stage.rate_limit_waits for stage in mode.stages):,}"


# ---------------------------------------------------------------------------- plot


def save_plot(summary: DemoSummary, path: Path) -> Path:
    """Draw the latency distributions and batch-size histograms of both modes into ``path``
    (a PNG); returns its absolute path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    modes = {"batched": summary.batched, "unbatched": summary.unbatched}
    figure, (latency_ax, batch_ax) = plt.subplots(1, 2, figsize=(13, 5), layout="constrained")
    try:
        # Latency: histograms on a log scale, so both modes show their shape.
        samples = [v * 1e3 for m in modes.values() for v in m.latencies if v > 0]
        low = max(min(samples, default=0.01), 0.01)
        high = max(max(samples, default=1.0), low * 10)
        edges = [low * (high / low) ** (i / 60) for i in range(61)]
        for name, mode in modes.items():
            latency_ax.hist(
                [max(v * 1e3, low) for v in mode.latencies],
                bins=edges,
                alpha=0.6,
                color=_COLORS[name],
                label=(
                    f"{name}: p50 {mode.latency_p50_ms:,.0f} ms, p99 {mode.latency_p99_ms:,.0f} ms"
                ),
            )
            latency_ax.axvline(mode.latency_p99_ms, color=_COLORS[name], linestyle="--", lw=1)
        latency_ax.set_xscale("log")
        latency_ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        latency_ax.xaxis.set_minor_formatter(NullFormatter())
        latency_ax.set_xlabel("request latency (ms, log scale)")
        latency_ax.set_ylabel("requests")
        latency_ax.set_title("latency distribution (dashed: p99)")
        latency_ax.legend()

        # Batch sizes: how many queries carried each number of ids.
        for name, mode in modes.items():
            sizes = sorted(mode.batch_sizes)
            batch_ax.bar(
                sizes,
                [mode.batch_sizes[s] for s in sizes],
                width=1.0,
                alpha=0.6,
                color=_COLORS[name],
                label=f"{name}: {mode.queries:,} queries, mean {mode.mean_batch_size:,.1f} ids",
            )
        batch_ax.set_yscale("log")
        batch_ax.set_xlabel("ids per query (batch size)")
        batch_ax.set_ylabel("queries (log scale)")
        batch_ax.set_title("batch sizes")
        batch_ax.legend()

        b = summary.batched
        figure.suptitle(
            f"mcs demo: {b.requests:,} requests, {b.concurrency:,} concurrent clients — "
            f"batched {summary.batched.requests_per_second:,.0f} req/s vs unbatched "
            f"{summary.unbatched.requests_per_second:,.0f} req/s"
        )
        target = path.resolve()
        figure.savefig(target, dpi=100)
    finally:
        plt.close(figure)
    return target
