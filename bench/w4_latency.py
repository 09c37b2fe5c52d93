"""W4: latency under an open-loop Poisson load sweep, on one core.

Requests arrive at Poisson times (exponential gaps, one seed, so every variant is offered the very
same arrivals) at each offered rate of ``Params.sweep_rates`` for ``Params.sweep_seconds``. Each
request is a task that makes one call, as in W1 (batch_fn = checkpoint + list comprehension).
What keeps the measurement honest:

- **open loop, no coordinated omission**: a request's latency runs from its *scheduled* arrival
  to its result, so when the loop (or the generator, which shares it) falls behind, the lateness
  counts against the system, as it would for a real client;
- **the generator stays off the measured path** as far as one process allows: arrival times are
  precomputed into an ``array`` (untracked by the collector, so it adds nothing to a GC pass);
  the generator task only compares the clock with the next arrival and starts what is due. It
  never sleeps through an arrival (``trio.sleep`` wakes on the loop's millisecond timer, which
  would turn arrivals into 1 ms bursts): when the next arrival is near it yields with one
  checkpoint per scheduler pass. Its own lag (when it calls ``start_soon`` minus the scheduled
  arrival) is reported separately;
- **no collection before a window** (the harness collects once before a variant's whole sweep):
  the cyclic collector runs when it runs; every collection is timed through ``gc.callbacks``,
  and the longest full (generation 2) pause is reported per rate;
- **one core**: the process is pinned to one CPU (``os.sched_setaffinity``, the allowed CPU
  idle longest just before) while it measures, and each window reports the CPU share it got
  (process time / wall time: on a shared machine, the share other processes left it);
- **overload is reported, not averaged away**: once the backlog exceeds 0.5 s of arrivals the
  window stops offering load and the rate is marked overloaded; higher rates are then skipped.

The knee is the highest offered rate up to which every rate of the sweep kept p99 below 1 ms
(or 2 ms).
"""

from __future__ import annotations

import gc
import json
import math
import os
import random
import statistics
import time
from array import array
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

from mcs._util import nearest_rank

from ._harness import Metric, Outcome, Params, Results, Target, Variant, Workload
from .w1_batcher import Call, Opener, open_channel, open_floor, open_mcs

__all__ = [
    "WORKLOADS",
    "Window",
    "knee",
    "markdown_table",
    "measure_window",
    "plot",
    "poisson_arrivals",
    "quietest_core",
    "results",
    "sweep",
    "sweep_report",
]

SEED = 20261130
OVERLOAD_SECONDS = 0.5  # a backlog (or generator lag) of this much arrival time is overload
SPIN_BEFORE = 0.003  # below this gap to the next arrival the generator checkpoints, not sleeps
STATS = ("p50", "p99", "p99.9", "max")


def poisson_arrivals(rate: float, seconds: float, seed: int = SEED) -> array[float]:
    """Arrival offsets (seconds from the window's start) of a Poisson process at ``rate``/s."""
    rng = random.Random(seed)
    arrivals = array("d")
    t = rng.expovariate(rate)
    while t < seconds:
        arrivals.append(t)
        t += rng.expovariate(rate)
    return arrivals


class _GcPauses:
    """Times every collection through ``gc.callbacks``: (generation, seconds) per pause."""

    def __init__(self) -> None:
        self.pauses: list[tuple[int, float]] = []
        self._started = 0.0

    def __call__(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._started = time.perf_counter()
        else:
            self.pauses.append((info["generation"], time.perf_counter() - self._started))

    def __enter__(self) -> _GcPauses:
        gc.callbacks.append(self)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self)


@dataclass(frozen=True)
class Window:
    """What one offered rate measured (times in seconds).

    Only summaries are kept: a list of every latency would stay on the heap and lengthen the
    next windows' collections.
    """

    rate: float  # offered arrivals per second
    offered: int  # arrivals scheduled in the window
    issued: int  # arrivals started (fewer when the window stopped on overload)
    latency: dict[str, float]  # STATS -> scheduled arrival to result
    lag_p99: float  # scheduled arrival to the generator starting the request
    lag_max: float
    achieved: float  # results per second over the window
    cpu_share: float  # CPU time the process got / wall time: below 1, other processes took the core
    overloaded: bool
    gc_full: list[float]  # pauses of full (generation 2) collections
    gc_young_max: float  # the longest generation 0/1 pause (0.0 if none)


def _summary(ordered: Sequence[float]) -> dict[str, float]:
    return {
        "p50": nearest_rank(ordered, 0.50),
        "p99": nearest_rank(ordered, 0.99),
        "p99.9": nearest_rank(ordered, 0.999),
        "max": ordered[-1] if ordered else 0.0,
    }


def measure_window(
    opener: Opener, rate: float, seconds: float, overload_seconds: float = OVERLOAD_SECONDS
) -> Window:
    """Offer Poisson arrivals at ``rate`` for ``seconds`` to one fresh ``trio.run``; stop early
    once the backlog or the generator's lag exceeds ``overload_seconds`` of arrivals."""
    arrivals = poisson_arrivals(rate, seconds)
    n = len(arrivals)
    done = array("d", bytes(8 * n))  # result times, written by each request
    lag = array("d", bytes(8 * n))  # generator start minus scheduled arrival
    finished = [0]
    backlog = max(1, int(rate * overload_seconds))

    async def request(call: Call, i: int) -> None:
        await call(i)
        done[i] = trio.current_time()
        finished[0] += 1

    async def generate(nursery: trio.Nursery, call: Call, start: float) -> tuple[int, bool]:
        clock = trio.current_time
        checkpoint = trio.lowlevel.checkpoint
        i = 0
        while i < n:
            now = clock() - start
            while i < n and arrivals[i] <= now:
                nursery.start_soon(request, call, i)
                lag[i] = now - arrivals[i]
                i += 1
            if i - finished[0] > backlog or (i and lag[i - 1] > overload_seconds):
                return i, True
            if i < n:
                if arrivals[i] - now > SPIN_BEFORE:
                    await trio.sleep_until(start + arrivals[i] - SPIN_BEFORE)
                else:
                    await checkpoint()
        return i, False

    async def main() -> tuple[int, bool, float, float]:
        async with opener() as call, trio.open_nursery() as nursery:
            start = trio.current_time()
            issued, overloaded = await generate(nursery, call, start)
        return issued, overloaded, start, trio.current_time()

    cpu_before, wall_before = time.process_time(), time.perf_counter()
    with _GcPauses() as gc_pauses:
        issued, overloaded, start, end = trio.run(main)
    cpu_share = (time.process_time() - cpu_before) / (time.perf_counter() - wall_before)
    if finished[0] != issued:
        raise AssertionError(f"{issued} requests started, {finished[0]} finished")
    lags = sorted(lag[:issued])
    young = [s for g, s in gc_pauses.pauses if g < 2]
    return Window(
        rate=rate,
        offered=n,
        issued=issued,
        latency=_summary(sorted(done[i] - start - arrivals[i] for i in range(issued))),
        lag_p99=nearest_rank(lags, 0.99),
        lag_max=lags[-1] if lags else 0.0,
        achieved=issued / (end - start) if end > start else 0.0,
        cpu_share=cpu_share,
        overloaded=overloaded,
        gc_full=[s for g, s in gc_pauses.pauses if g == 2],
        gc_young_max=max(young, default=0.0),
    )


def _cpu_idle() -> dict[int, int]:
    """Idle ticks per CPU so far (Linux ``/proc/stat``; empty elsewhere)."""
    idle = {}
    try:
        with open("/proc/stat", encoding="ascii") as f:
            for line in f:
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit():
                    idle[int(name[3:])] = int(fields[3])
    except OSError:
        pass
    return idle


def quietest_core(allowed: set[int]) -> int:
    """The allowed CPU that was idle longest over the last 0.2 s: other processes share it least."""
    before = _cpu_idle()
    time.sleep(0.2)
    after = _cpu_idle()
    return max(sorted(allowed), key=lambda cpu: after.get(cpu, 0) - before.get(cpu, 0))


def sweep(
    opener: Opener,
    rates: Sequence[float],
    seconds: float,
    overload_seconds: float = OVERLOAD_SECONDS,
) -> list[Window]:
    """One window per rate, in increasing order, pinned to one core; stops after an overload."""
    pinnable = hasattr(os, "sched_setaffinity")
    if pinnable:
        allowed = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {quietest_core(allowed)})
    try:
        windows = []
        for rate in sorted(rates):
            window = measure_window(opener, rate, seconds, overload_seconds)
            windows.append(window)
            if window.overloaded:
                break
        return windows
    finally:
        if pinnable:
            os.sched_setaffinity(0, allowed)


def knee(windows: Sequence[Window], bound: float) -> float:
    """The highest rate up to which every window kept p99 below ``bound`` seconds (0 if none)."""
    best = 0.0
    for window in sorted(windows, key=lambda w: w.rate):
        if window.overloaded or window.latency["p99"] >= bound:
            break
        best = window.rate
    return best


def _key(rate: float, what: str) -> str:
    return f"{what}@{rate:g}"


def results(windows: Sequence[Window], rates: Sequence[float]) -> Results:
    """The harness's numbers: the knees and headline values, then every window's (ms)."""
    full = [p for w in windows for p in w.gc_full]
    at_80k = [w for w in windows if w.rate == 80_000 and not w.overloaded]
    out: Results = {
        "knee1": knee(windows, 1e-3),
        "knee2": knee(windows, 2e-3),
        "p99_80k": at_80k[0].latency["p99"] * 1e3 if at_80k else math.inf,
        "gc_full_max": max(full, default=0.0) * 1e3,
        "lag_max": max((w.lag_max for w in windows), default=0.0) * 1e3,
    }
    for rate in rates:
        measured = [w for w in windows if w.rate == rate]
        if not measured:  # skipped: a lower rate was already overloaded
            out[_key(rate, "overloaded")] = 1.0
            continue
        w = measured[0]
        for name in STATS:
            out[_key(rate, name)] = w.latency[name] * 1e3
        out[_key(rate, "achieved")] = w.achieved
        out[_key(rate, "cpu_share")] = w.cpu_share
        out[_key(rate, "overloaded")] = float(w.overloaded)
        out[_key(rate, "lag_p99")] = w.lag_p99 * 1e3
        out[_key(rate, "lag_max")] = w.lag_max * 1e3
        out[_key(rate, "gc_full_n")] = float(len(w.gc_full))
        out[_key(rate, "gc_full_max")] = max(w.gc_full, default=0.0) * 1e3
        out[_key(rate, "gc_young_max")] = w.gc_young_max * 1e3
    return out


def _measure(opener: Opener) -> Callable[[Params], Results]:
    def measure(params: Params) -> Results:
        windows = sweep(opener, params.sweep_rates, params.sweep_seconds)
        return results(windows, params.sweep_rates)

    return measure


W4 = Workload(
    key="W4",
    title="latency sweep",
    description=(
        "open-loop Poisson arrivals at 10k..150k req/s offered, 10 s per rate, one core, no "
        "collection before a window; latency = result time - scheduled arrival; one call per "
        "request task through one batcher (batch_fn = checkpoint + list comprehension); knee = "
        "highest rate up to which p99 stayed below 1 ms (and 2 ms)."
    ),
    metrics=(
        Metric("knee1", "knee p99<1ms", "req/s", higher_is_better=True),
        Metric("knee2", "knee p99<2ms", "req/s", higher_is_better=True),
        Metric("p99_80k", "p99 at 80k", "ms", higher_is_better=False),
        Metric("gc_full_max", "full GC max", "ms", higher_is_better=False),
        Metric("lag_max", "generator lag max", "ms", higher_is_better=False),
    ),
    variants=(
        Variant("mcs", _measure(open_mcs)),
        Variant("trio floor", _measure(open_floor)),
        Variant("channel+Event", _measure(open_channel)),
    ),
    targets=(
        Target("mcs", "knee1", ">=", 100_000),
        Target("mcs", "p99_80k", "<", 1.0),
    ),
    compare="excess",  # knees differ by req/s; a ratio of two zero knees says nothing
    max_runs=3,  # a sweep takes minutes per variant; three runs give a median
)

WORKLOADS = (W4,)


# ---------------------------------------------------------------------------------- reports


def _median(outcome: Outcome, variant: str, key: str) -> float | None:
    values = [r[key] for r in outcome.runs.get(variant, []) if key in r]
    return statistics.median(values) if values else None


def _measured(outcome: Outcome, variant: str, rate: float) -> bool:
    """Whether the median run measured ``rate`` without overload."""
    overloaded = _median(outcome, variant, _key(rate, "overloaded"))
    return overloaded is not None and overloaded < 0.5


def _cell(outcome: Outcome, variant: str, rate: float) -> str:
    if _median(outcome, variant, _key(rate, "p99")) is None:
        return "skipped (overloaded below)"
    values = [_median(outcome, variant, _key(rate, s)) or 0.0 for s in STATS]
    cell = " / ".join(f"{v:.2f}" if v < 10 else f"{v:,.0f}" for v in values)
    if not _measured(outcome, variant, rate):
        cell += " overloaded"
    return cell


def _variants(outcome: Outcome) -> list[str]:
    return [v.name for v in outcome.workload.variants if outcome.runs.get(v.name)]


def _rates(outcome: Outcome, params: Params) -> list[float]:
    return sorted(params.sweep_rates)


def _gc_cell(outcome: Outcome, variant: str, rate: float) -> str:
    n = _median(outcome, variant, _key(rate, "gc_full_n"))
    longest = _median(outcome, variant, _key(rate, "gc_full_max"))
    if n is None or longest is None:
        return "-"
    return f"{n:.0f} / {longest:.1f}"


def markdown_table(outcome: Outcome, params: Params) -> str:
    """Rows per offered rate; per variant p50 / p99 / p99.9 / max in ms (medians over runs)."""
    names = _variants(outcome)
    subject = outcome.workload.subject
    header = [
        "offered",
        *(f"{n} p50 / p99 / p99.9 / max (ms)" for n in names),
        f"{subject} achieved",
        f"{subject} full GCs / longest (ms)",
        f"{subject} generator lag p99 / max (ms)",
        "CPU share (" + " / ".join(names) + ")",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for rate in _rates(outcome, params):
        achieved = _median(outcome, subject, _key(rate, "achieved"))
        lag99 = _median(outcome, subject, _key(rate, "lag_p99"))
        lagmax = _median(outcome, subject, _key(rate, "lag_max"))
        shares = [_median(outcome, n, _key(rate, "cpu_share")) for n in names]
        cells = [
            f"{rate / 1000:g}k/s",
            *(_cell(outcome, n, rate) for n in names),
            "-" if achieved is None else f"{achieved / 1000:.1f}k/s",
            _gc_cell(outcome, subject, rate),
            "-" if lag99 is None or lagmax is None else f"{lag99:.2f} / {lagmax:.2f}",
            " / ".join("-" if x is None else f"{x:.0%}" for x in shares),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    knees = [
        f"{n}: p99 < 1 ms up to {(_median(outcome, n, 'knee1') or 0) / 1000:g}k/s, "
        f"< 2 ms up to {(_median(outcome, n, 'knee2') or 0) / 1000:g}k/s"
        for n in names
    ]
    return "\n".join([*lines, "", "Knee (every rate up to it met the bound): " + "; ".join(knees)])


def plot(outcome: Outcome, params: Params, path: Path) -> str | None:
    """Latency against offered rate, the variants side by side: p99 and p50 in one panel,
    p99.9 and max in the other; a ringed point is an overloaded window (it stopped early).
    Returns None, or why nothing was drawn."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed; no W4 chart written"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = _variants(outcome)
    if not names:
        return "W4 measured nothing; no chart written"
    colors = ["tab:blue", "tab:gray", "tab:orange", "tab:green"]
    panels = ((("p99", "-"), ("p50", ":")), (("p99.9", "-"), ("max", ":")))
    fig, axes = plt.subplots(1, 2, figsize=(11.0, 4.4), sharey=True)
    for ax, stats in zip(axes, panels, strict=True):
        for name, color in zip(names, colors, strict=False):
            rates = [
                r
                for r in _rates(outcome, params)
                if _median(outcome, name, _key(r, "p99")) is not None
            ]
            xs = [r / 1000 for r in rates]
            for stat, style in stats:
                ys = [_median(outcome, name, _key(r, stat)) or math.nan for r in rates]
                ax.plot(xs, ys, style, color=color, marker="o", markersize=3.5)
                hot = [i for i, r in enumerate(rates) if not _measured(outcome, name, r)]
                ax.scatter(
                    [xs[i] for i in hot],
                    [ys[i] for i in hot],
                    s=70,
                    facecolors="none",
                    edgecolors="black",
                    linewidths=0.8,
                )
            ax.plot([], [], "-", color=color, label=name)
        for bound in (1.0, 2.0):
            ax.axhline(bound, linestyle="--", linewidth=0.8, color="tab:red")
        ax.set_yscale("log")
        ax.set_xlim(0, max(params.sweep_rates) / 1000 * 1.03)
        ax.set_title(f"{stats[0][0]} (solid) and {stats[1][0]} (dotted)", fontsize=10)
        ax.set_xlabel("offered rate (k req/s, Poisson arrivals)")
        ax.grid(True, which="both", linewidth=0.3)
    axes[0].set_ylabel("latency from scheduled arrival (ms)")
    axes[0].plot(
        [],
        [],
        "o",
        markersize=8,
        markerfacecolor="none",
        color="black",
        label="overloaded (stopped)",
    )
    axes[0].legend(fontsize=8, loc="lower right")
    runs = max(len(outcome.runs.get(n, [])) for n in names)
    fig.suptitle(
        f"W4: open-loop latency vs offered rate on one core, {params.sweep_seconds:g} s per rate, "
        f"medians of {runs} run(s); dashed red: 1 and 2 ms",
        fontsize=10,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def sweep_report(
    outcomes: Sequence[Outcome], params: Params, out: Path, log: Callable[[str], None]
) -> list[Path]:
    """If W4 ran: print its sweep table, write w4_latency.{md,json,png} under ``out`` (the JSON
    holds every run's numbers per rate)."""
    written: list[Path] = []
    for outcome in outcomes:
        if outcome.workload.key != W4.key or not _variants(outcome):
            continue
        table = markdown_table(outcome, params)
        print("\nW4 sweep (medians over runs)\n\n" + table)
        out.mkdir(parents=True, exist_ok=True)
        md = out / "w4_latency.md"
        md.write_text(table + "\n", encoding="utf-8")
        written.append(md)
        js = out / "w4_latency.json"
        runs = {name: outcome.runs[name] for name in _variants(outcome)}
        js.write_text(
            json.dumps({"params": params.__dict__, "runs": runs}, indent=1) + "\n", encoding="utf-8"
        )
        written.append(js)
        png = out / "w4_latency.png"
        problem = plot(outcome, params, png)
        if problem is None:
            written.append(png)
        else:
            log(problem)
    return written
