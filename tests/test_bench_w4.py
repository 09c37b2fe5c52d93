"""The W4 latency sweep's machinery on tiny sweeps: structure, never speed."""

from __future__ import annotations

import gc
import itertools
import json
import os
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
import trio

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the bench package of the repo

from bench import __main__ as bench_main
from bench import w4_latency as w4
from bench._harness import Outcome, Params
from bench.w1_batcher import Call, Opener, open_channel, open_floor, open_mcs


def test_poisson_arrivals_are_seeded_increasing_and_inside_the_window() -> None:
    arrivals = w4.poisson_arrivals(10_000, 1.0)
    assert list(arrivals) == list(w4.poisson_arrivals(10_000, 1.0))
    assert list(arrivals) != list(w4.poisson_arrivals(10_000, 1.0, seed=1))
    assert all(0 < a < b < 1.0 for a, b in itertools.pairwise(arrivals))
    # a Poisson count at mean 10,000 has a standard deviation of 100
    assert 9_500 < len(arrivals) < 10_500
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert max(gaps) > 5 * min(gaps)  # exponential gaps, not a fixed schedule


@pytest.mark.parametrize("opener", [open_mcs, open_floor, open_channel])
def test_a_window_delivers_every_arrival_and_orders_its_percentiles(opener: Opener) -> None:
    window = w4.measure_window(opener, 2_000, 0.02)
    assert window.rate == 2_000
    assert window.offered == len(w4.poisson_arrivals(2_000, 0.02)) > 0
    assert window.issued == window.offered
    assert not window.overloaded
    latency = window.latency
    assert list(latency) == list(w4.STATS)
    assert 0 < latency["p50"] <= latency["p99"] <= latency["p99.9"] <= latency["max"]
    assert 0 <= window.lag_p99 <= window.lag_max
    assert window.achieved > 0
    assert window.cpu_share > 0


def test_collections_during_a_window_are_timed_by_generation() -> None:
    @asynccontextmanager
    async def open_collecting() -> AsyncIterator[Call]:
        async def call(item: int) -> int:
            if item == 0:
                gc.collect()
            await trio.lowlevel.checkpoint()
            return item

        yield call

    window = w4.measure_window(open_collecting, 2_000, 0.02)
    assert len(window.gc_full) >= 1
    assert all(pause > 0 for pause in window.gc_full)
    assert not any(isinstance(cb, w4._GcPauses) for cb in gc.callbacks)


@asynccontextmanager
async def open_slow() -> AsyncIterator[Call]:
    """Each call holds the loop for 1 ms: at 5,000 arrivals/s the backlog only grows."""

    async def call(item: int) -> int:
        until = time.perf_counter() + 1e-3
        while time.perf_counter() < until:
            pass
        await trio.lowlevel.checkpoint()
        return item

    yield call


def test_an_overloaded_window_stops_offering_and_the_sweep_stops_there() -> None:
    windows = w4.sweep(open_slow, (5_000, 10_000), 0.2, overload_seconds=0.002)
    assert [w.rate for w in windows] == [5_000]  # the higher rate is not offered at all
    (window,) = windows
    assert window.overloaded
    assert 0 < window.issued < window.offered
    assert w4.knee(windows, 1.0) == 0.0
    out = w4.results(windows, (5_000, 10_000))
    assert out["overloaded@5000"] == 1.0
    assert out["overloaded@10000"] == 1.0
    assert "p99@10000" not in out
    assert out["knee1"] == out["knee2"] == 0.0


def _window(rate: float, p99: float, overloaded: bool = False) -> w4.Window:
    return w4.Window(
        rate=rate,
        offered=1,
        issued=1,
        latency={"p50": p99 / 2, "p99": p99, "p99.9": p99, "max": p99},
        lag_p99=0.0,
        lag_max=0.0,
        achieved=rate,
        cpu_share=1.0,
        overloaded=overloaded,
        gc_full=[],
        gc_young_max=0.0,
    )


def test_the_knee_is_where_the_bound_first_fails_going_up() -> None:
    windows = [_window(10e3, 0.4e-3), _window(20e3, 1.5e-3), _window(40e3, 0.8e-3)]
    assert w4.knee(windows, 1e-3) == 10e3  # 40k met it again, but 20k did not
    assert w4.knee(windows, 2e-3) == 40e3
    assert w4.knee([*windows, _window(60e3, 0.1e-3, overloaded=True)], 2e-3) == 40e3
    assert w4.knee([_window(10e3, 1e-3)], 1e-3) == 0.0  # the bound is strict


def test_the_sweep_is_pinned_to_one_core_and_restores_the_affinity() -> None:
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no CPU affinity on this platform")
    before = os.sched_getaffinity(0)
    seen: list[set[int]] = []

    @asynccontextmanager
    async def open_watching() -> AsyncIterator[Call]:
        seen.append(os.sched_getaffinity(0))
        async with open_floor() as call:
            yield call

    windows = w4.sweep(open_watching, (2_000, 1_000), 0.01)
    assert [w.rate for w in windows] == [1_000, 2_000]
    assert len(seen) == 2
    assert all(len(cores) == 1 and cores <= before for cores in seen)
    assert os.sched_getaffinity(0) == before


def test_the_report_has_a_row_per_rate_and_a_chart(tmp_path: Path) -> None:
    params = Params(sweep_rates=(1_000.0, 2_000.0, 4_000.0), sweep_seconds=0.01)
    outcome = Outcome(w4.W4)
    for variant in w4.W4.variants:
        outcome.runs[variant.name] = [variant.measure(params)]
    outcome.runs["trio floor"][0].update(
        {"overloaded@4000": 1.0} | {k: 0.0 for k in ("p50@4000", "p99@4000")}
    )
    table = w4.markdown_table(outcome, params)
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 3
    assert rows[0].count("p50 / p99 / p99.9 / max") == 3
    assert rows[1].startswith("| 1k/s | ")
    assert rows[3].startswith("| 4k/s | ")
    assert "overloaded" in rows[3]
    assert "overloaded" not in rows[1]
    assert rows[0].endswith("| CPU share (mcs / trio floor / channel+Event) |")
    assert "Knee" in table
    written = w4.sweep_report([outcome], params, tmp_path, print)
    assert written == [tmp_path / f"w4_latency.{ext}" for ext in ("md", "json", "png")]
    saved = json.loads((tmp_path / "w4_latency.json").read_text())
    assert saved["params"]["sweep_rates"] == [1_000.0, 2_000.0, 4_000.0]
    assert saved["runs"]["mcs"][0]["p99@1000"] == outcome.runs["mcs"][0]["p99@1000"]
    assert (tmp_path / "w4_latency.png").read_bytes().startswith(b"\x89PNG")


def test_the_command_line_selects_w4() -> None:
    assert [w.key for w in bench_main.select("W4")] == ["W4"]
    assert w4.W4 in bench_main.ALL_WORKLOADS
    assert "W1-latency" not in [w.key for w in bench_main.ALL_WORKLOADS]
