"""W8: ``mcs.autoscale`` against every fixed ``max_in_flight``, on a simulated downstream.

The downstream (:class:`mcs._testing_downstream.SimulatedDownstream`) has C parallel workers, a
call of n items takes ``10 ms + 0.2 ms * n`` once a worker has it, and calls beyond C wait in
FIFO order. Batches hold up to 50 items, so the downstream's capacity (every worker busy on full
batches) is ``C * 50 / 20 ms``: 20k items/s for C = 8. Arrivals are Poisson, drawn from one seed,
so autoscale and each fixed limit see exactly the same calls at the same virtual times. The
batcher's queue holds 2,000 items and rejects beyond (``overload="reject"``), as a service under
overload should run. Everything runs on ``trio.testing.MockClock(autojump_threshold=0)``, so
every run gives the same numbers to about 1% (trio shuffles the order of ready tasks), and the
harness runs each variant once; the cost is the Python work of the calls, seconds per variant.

Scenarios (each a workload of the harness, W8a to W8d; ``--only W8`` selects them all):

- **0.5x** (W8a), **0.8x** (W8b): C = 8, half and 80% of capacity for 6 s. Feasible load: the
  limit should settle near C and calls be as fast as with the best fixed limit.
- **2.5x** (W8c): C = 4, 2.5 times capacity for 6 s. Sustained overload, where a limit that
  climbs only makes each downstream call slower.
- **step** (W8d): C = 8, 2.5 times capacity for 3 s, then half of it for 5 s: does it come back?

Per variant: p50 and p99 of the calls served and the throughput (items served per second), over
a window after the limit had time to settle (from 2 s of the feasible scenarios, from 4 s of the
step, the whole overload scenario); the downstream call's p99 over its no-load time for a full
batch (over the last 1,024 calls); and the final and highest limit, sampled
every 0.1 s. ``python -m bench.w8_autoscale`` prints every scenario with the ratios to the best
fixed limit.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from typing import Literal, cast

import trio
import trio.testing

import mcs
from mcs._testing_downstream import Arrival, SimulatedDownstream, offer_load
from mcs._util import nearest_rank

from ._harness import Metric, Params, Results, Target, Variant, Workload

__all__ = ["SCENARIOS", "WORKLOADS", "Scenario", "simulate"]

BASE = 0.010
PER_ITEM = 0.0002
MAX_BATCH_SIZE = 50
CEILING = 64  # autoscale's max_in_flight
FIXED_LIMITS = (2, 4, 6, 8, 12, 16, 32, 64)
SEED = 8
QUEUE_SIZE = 2_000  # a bounded queue that rejects, as a service under overload should run

_SLOTS = cast(Literal["req/s", "ms", "B"], "slots")
_PERCENT = cast(Literal["req/s", "ms", "B"], "% of no-load")


@dataclass(frozen=True)
class Scenario:
    """One load pattern against one downstream."""

    key: str
    letter: str  # the workload is W8 and this letter: ``--only W8`` selects them all
    title: str
    workers: int
    phases: tuple[tuple[float, float], ...]  # (seconds, share of capacity)
    measured_from: float  # seconds after the start: what came before is the warm-up

    def capacity(self) -> float:
        return self.workers * MAX_BATCH_SIZE / (BASE + PER_ITEM * MAX_BATCH_SIZE)


SCENARIOS = (
    Scenario("0.5x", "a", "half of capacity", workers=8, phases=((6.0, 0.5),), measured_from=2.0),
    Scenario("0.8x", "b", "80% of capacity", workers=8, phases=((6.0, 0.8),), measured_from=2.0),
    Scenario("2.5x", "c", "sustained overload", workers=4, phases=((6.0, 2.5),), measured_from=0.0),
    Scenario(
        "step",
        "d",
        "overload, then half of capacity",
        workers=8,
        phases=((3.0, 2.5), (5.0, 0.5)),
        measured_from=4.0,
    ),
)


async def _run(scenario: Scenario, fixed: int | None, scale: float) -> Results:
    downstream = SimulatedDownstream(scenario.workers, BASE, PER_ITEM)
    capacity = scenario.capacity()
    phases = [(seconds * scale, share * capacity) for seconds, share in scenario.phases]
    limits: list[int] = []
    async with mcs.open_batcher(
        downstream,
        max_batch_size=MAX_BATCH_SIZE,
        max_in_flight=fixed or 1,
        queue_size=QUEUE_SIZE,
        overload="reject",
    ) as batcher:
        async with trio.open_nursery() as nursery:
            if fixed is None:
                await nursery.start(partial(mcs.autoscale, batcher, max_in_flight=CEILING))

            async def sample() -> None:
                while True:
                    limits.append(batcher.max_in_flight)
                    await trio.sleep(0.1)

            nursery.start_soon(sample)
            arrivals = await offer_load(batcher, phases, seed=SEED)
            nursery.cancel_scope.cancel()
        stats = batcher.statistics()
    return _results(arrivals, scenario.measured_from * scale, sum(s for s, _ in phases)) | {
        "call_p99": 100 * stats.batch_time.p99 / (BASE + PER_ITEM * MAX_BATCH_SIZE),
        "final_limit": float(limits[-1]),
        "max_limit": float(max(limits)),
    }


def _results(arrivals: Sequence[Arrival], start: float, end: float) -> Results:
    window = [a for a in arrivals if a.at >= start]
    served = sorted(a.latency for a in window if a.outcome == "ok")
    done = sum(start <= a.at + a.latency <= end for a in arrivals if a.outcome == "ok")
    return {
        "p99": nearest_rank(served, 0.99) * 1e3,
        "p50": nearest_rank(served, 0.50) * 1e3,
        "throughput": done / (end - start),
        "rejected": float(sum(a.outcome == "rejected" for a in window)),
    }


def simulate(scenario: Scenario, fixed: int | None, scale: float = 1.0) -> Results:
    """One variant of one scenario on virtual time: autoscale (``fixed=None``) or a fixed limit.

    ``scale`` shortens every phase (the harness's warm-up uses a small one).
    """
    clock = trio.testing.MockClock(autojump_threshold=0)
    return trio.run(_run, scenario, fixed, scale, clock=clock)


def _measure(scenario: Scenario, fixed: int | None, params: Params) -> Results:
    warmup = params.requests < Params().requests
    return simulate(scenario, fixed, scale=0.1 if warmup else 1.0)


def _workload(scenario: Scenario) -> Workload:
    best = f"fixed {scenario.workers}"
    overloaded = any(share > 1 for _, share in scenario.phases)
    targets: tuple[Target, ...] = ()
    if scenario.measured_from > 0:  # a window of feasible load, after the limit settled
        targets += (
            Target("autoscale", "p99", "<=", 1.5, baseline=best),
            Target("autoscale", "throughput", ">=", 0.95, baseline=best),
            Target("autoscale", "final_limit", "<=", 2 * scenario.workers),
        )
    if overloaded:
        targets += (Target("autoscale", "max_limit", "<", CEILING),)
    if scenario.measured_from == 0:
        targets += (Target("autoscale", "call_p99", "<=", 300),)
    return Workload(
        key=f"W8{scenario.letter}",
        title=f"autoscale, {scenario.title}",
        description=(
            f"C = {scenario.workers} workers, {BASE * 1e3:g} ms + {PER_ITEM * 1e3:g} ms/item, "
            f"batches of <= {MAX_BATCH_SIZE}, Poisson arrivals at "
            + " then ".join(f"{share:g}x capacity for {s:g} s" for s, share in scenario.phases)
            + f", measured from {scenario.measured_from:g} s, on virtual time; autoscale "
            "against fixed max_in_flight"
        ),
        metrics=(
            Metric("p99", "p99", "ms", higher_is_better=False),
            Metric("p50", "p50", "ms", higher_is_better=False),
            Metric("throughput", "throughput", "req/s", higher_is_better=True),
            Metric("call_p99", "downstream call p99", _PERCENT, higher_is_better=False),
            Metric("final_limit", "final limit", _SLOTS, higher_is_better=False),
            Metric("max_limit", "max limit", _SLOTS, higher_is_better=False),
        ),
        variants=(
            Variant("autoscale", partial(_measure, scenario, None)),
            *(
                Variant(f"fixed {limit}", partial(_measure, scenario, limit))
                for limit in FIXED_LIMITS
            ),
        ),
        targets=targets,
        max_runs=1,  # virtual time: runs differ only by trio's shuffling of ready tasks
    )


WORKLOADS = tuple(_workload(s) for s in SCENARIOS)


def main() -> int:
    """Print every scenario: each variant and its ratios to the best fixed limit."""
    for scenario in SCENARIOS:
        rows = {"autoscale": simulate(scenario, None)}
        for limit in FIXED_LIMITS:
            rows[f"fixed {limit}"] = simulate(scenario, limit)
        fixed = [name for name in rows if name != "autoscale"]
        best = min(fixed, key=lambda name: (rows[name]["p99"], -rows[name]["throughput"]))
        print(f"\n{scenario.key}: C = {scenario.workers}, best fixed limit: {best}")
        print(
            f"{'variant':<10} {'p50 ms':>8} {'p99 ms':>8} {'items/s':>8} {'call/nl':>8} "
            f"{'final':>5} {'max':>4} {'p99/best':>8} {'tput/best':>9} {'rejected':>8}"
        )
        for name, r in rows.items():
            print(
                f"{name:<10} {r['p50']:8.1f} {r['p99']:8.1f} {r['throughput']:8.0f} "
                f"{r['call_p99'] / 100:8.2f} {r['final_limit']:5.0f} {r['max_limit']:4.0f} "
                f"{r['p99'] / rows[best]['p99']:8.2f} "
                f"{r['throughput'] / rows[best]['throughput']:9.2f} {r['rejected']:8.0f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
