"""Hypothesis strategies for the batcher's properties, kept in one place so they grow together.

Times are drawn on a grid of 1/8 s so that they are exact binary fractions: arrivals, waits and
batch durations then add up without rounding, and "at the same instant" means the same float.
Rate limits deliberately include non-binary rates (``per=0.3``) to exercise the limiter's exact
arithmetic.

A :class:`Scenario` is plain data: what the batcher is configured with, how the fake downstream
behaves, who calls when with which item, when callers give up, when ``max_in_flight`` changes
and how the batcher's block ends. The property tests replay it on trio's virtual clock.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from hypothesis import strategies as st

import mcs

__all__ = [
    "TICK",
    "Call",
    "Config",
    "Downstream",
    "MisbehavingScenario",
    "Misbehaviour",
    "Scenario",
    "arrival_patterns",
    "batch_durations",
    "cancellations",
    "configs",
    "downstreams",
    "loaded_rate_scenarios",
    "max_batch_sizes",
    "max_in_flights",
    "max_waits",
    "misbehaving_scenarios",
    "misbehaviours",
    "off_grid",
    "rate_limits",
    "result_shapes",
    "scenarios",
    "ticks",
]

TICK = 1 / 8
"""The time grid of drawn scenarios, in virtual seconds."""

ResultShape = Literal["list", "dict", "dict-missing"]
"""How the fake batch_fn answers: an aligned list, a mapping, or a mapping that leaves out the
error items (their callers must get :exc:`mcs.BatchResultError`)."""


@dataclass(frozen=True)
class Call:
    """One caller: it calls at ``at`` with ``item``; its own scope is cancelled at ``cancel_at``."""

    item: int
    at: float
    cancel_at: float | None


@dataclass(frozen=True)
class Config:
    """The arguments given to :func:`mcs.open_batcher`."""

    max_batch_size: int
    max_wait: float
    max_in_flight: int
    rate: mcs.RateLimit | None
    queue_size: int | float
    overload: Literal["block", "reject"]
    dedupe: bool


@dataclass(frozen=True)
class Downstream:
    """How the fake batch_fn behaves.

    Batches are numbered in the order batch_fn is entered. Batch ``n`` sleeps
    ``durations[n % len(durations)]``, then raises if ``n`` is in ``failing_batches``; otherwise
    items in ``error_items`` get an exception instance as their result.
    """

    shape: ResultShape
    durations: tuple[float, ...]
    failing_batches: frozenset[int]
    error_items: frozenset[int]


@dataclass(frozen=True)
class Scenario:
    """Everything one property run replays.

    ``close_at`` is when the batcher's block ends: normally, or by raising if ``abort``. It and
    the times of ``limit_changes`` are off the 1/32 grid that arrivals, cancellations, batch
    ends and binary rate intervals live on, so they never tie with those events.
    """

    config: Config
    downstream: Downstream
    calls: tuple[Call, ...]
    limit_changes: tuple[tuple[float, int], ...]
    close_at: float
    abort: bool


def ticks(max_ticks: int, min_ticks: int = 0) -> st.SearchStrategy[float]:
    """A time or duration on the 1/8 s grid, from ``min_ticks`` to ``max_ticks`` ticks."""
    return st.integers(min_ticks, max_ticks).map(lambda n: n * TICK)


def off_grid(at: float) -> float:
    """A time just after ``at`` that no grid event can share (an odd multiple of 1/64)."""
    return at + TICK / 8


max_batch_sizes = st.integers(1, 6)
max_in_flights = st.integers(1, 4)
max_waits = st.one_of(st.just(0.0), ticks(8, min_ticks=1))
result_shapes: st.SearchStrategy[ResultShape] = st.sampled_from(["list", "dict", "dict-missing"])
batch_durations = st.lists(ticks(8), min_size=1, max_size=4).map(tuple)


@st.composite
def arrival_patterns(
    draw: st.DrawFn, *, max_calls: int = 16, max_ticks: int = 24
) -> tuple[float, ...]:
    """Sorted arrival times: all at once, a steady trickle, a few bursts, or anything."""
    count = draw(st.integers(0, max_calls))
    kind = draw(st.sampled_from(["at-once", "steady", "bursts", "random"]))
    if kind == "at-once":
        start = draw(ticks(max_ticks))
        times = [start] * count
    elif kind == "steady":
        gap = draw(st.integers(1, 4))
        start = draw(st.integers(0, max_ticks))
        times = [(start + i * gap) * TICK for i in range(count)]
    elif kind == "bursts":
        starts = draw(st.lists(ticks(max_ticks), min_size=1, max_size=4))
        times = [draw(st.sampled_from(starts)) for _ in range(count)]
    else:
        times = draw(st.lists(ticks(max_ticks), min_size=count, max_size=count))
    return tuple(sorted(times))


def cancellations(at: float) -> st.SearchStrategy[float | None]:
    """When a caller who called at ``at`` gives up, if ever (always strictly after calling)."""
    return st.one_of(st.none(), ticks(16, min_ticks=1).map(lambda delay: at + delay))


@st.composite
def rate_limits(draw: st.DrawFn, *, units: bool = True) -> mcs.RateLimit:
    """Rate limits with binary and non-binary intervals, small bursts, either unit."""
    count = draw(st.one_of(st.integers(1, 10), st.sampled_from([0.5, 2.5, 7.3])))
    per = draw(st.sampled_from([0.1, 0.25, 0.3, 1.0, 2.0]))
    burst = draw(st.integers(1, 4))
    unit: Literal["call", "item"] = draw(st.sampled_from(["call", "item"])) if units else "call"
    return mcs.RateLimit(count, per=per, burst=burst, unit=unit)


@st.composite
def configs(draw: st.DrawFn) -> Config:
    """Batcher arguments: any batch size, wait, concurrency, rate, queue bound and dedupe."""
    overload: Literal["block", "reject"] = draw(st.sampled_from(["block", "reject"]))
    return Config(
        max_batch_size=draw(max_batch_sizes),
        max_wait=draw(max_waits),
        max_in_flight=draw(max_in_flights),
        rate=draw(st.one_of(st.none(), rate_limits())),
        queue_size=draw(st.one_of(st.just(math.inf), st.integers(1, 6))),
        overload=overload,
        dedupe=draw(st.booleans()),
    )


@st.composite
def downstreams(draw: st.DrawFn, items: frozenset[int]) -> Downstream:
    """A fake batch_fn's behaviour; ``error_items`` is drawn from the items actually used."""
    return Downstream(
        shape=draw(result_shapes),
        durations=draw(batch_durations),
        failing_batches=draw(st.frozensets(st.integers(0, 8), max_size=3)),
        error_items=draw(st.frozensets(st.sampled_from(sorted(items)))) if items else frozenset(),
    )


@st.composite
def scenarios(draw: st.DrawFn, *, abort: bool | None = None) -> Scenario:
    """A whole run. Items are unique per caller unless ``dedupe``, where they collide often."""
    config = draw(configs())
    times = draw(arrival_patterns())
    if config.dedupe:
        items = [draw(st.integers(0, 4)) for _ in times]
    else:
        items = list(range(len(times)))
    calls = tuple(
        Call(item=item, at=at, cancel_at=draw(cancellations(at)))
        for item, at in zip(items, times, strict=True)
    )
    changes = draw(st.lists(st.tuples(ticks(32).map(off_grid), max_in_flights), max_size=3))
    close_at = off_grid(draw(ticks(40)))
    return Scenario(
        config=config,
        downstream=draw(downstreams(frozenset(items))),
        calls=calls,
        limit_changes=tuple(sorted(changes)),
        close_at=close_at,
        abort=draw(st.booleans()) if abort is None else abort,
    )


@st.composite
def loaded_rate_scenarios(draw: st.DrawFn) -> Scenario:
    """Many callers against a rate limit: nobody cancels, nothing fails, the block drains."""
    times = draw(arrival_patterns(max_calls=40, max_ticks=16))
    config = Config(
        max_batch_size=draw(max_batch_sizes),
        max_wait=0.0,
        max_in_flight=draw(max_in_flights),
        rate=draw(rate_limits()),
        queue_size=math.inf,
        overload="block",
        dedupe=False,
    )
    downstream = Downstream("list", draw(batch_durations), frozenset(), frozenset())
    calls = tuple(Call(item=i, at=at, cancel_at=None) for i, at in enumerate(times))
    close_at = off_grid(max(times, default=0.0))
    return Scenario(config, downstream, calls, (), close_at=close_at, abort=False)


Misbehaviour = Literal[
    "ok", "raise", "raise_same", "hang", "short", "garbage", "mutate", "sentinel", "lookup"
]
"""What a misbehaving batch_fn does with one batch: answer properly, raise, raise the one exception
object it raises every time, never return, return
one result too few, return something that is not a result, reorder its ``items`` in place (and
answer for the original order), answer every item with one shared exception object, or return
a mapping whose lookup raises for the batch's first item."""

misbehaviours: st.SearchStrategy[Misbehaviour] = st.sampled_from(
    ["ok", "raise", "raise_same", "hang", "short", "garbage", "mutate", "sentinel", "lookup"]
)


@dataclass(frozen=True)
class MisbehavingScenario:
    """Callers against a batch_fn that misbehaves batch by batch (``behaviours[n % len]``)."""

    max_batch_size: int
    max_in_flight: int
    dedupe: bool
    batch_timeout: float | None
    cancel_abandoned: bool
    behaviours: tuple[Misbehaviour, ...]
    calls: tuple[Call, ...]


@st.composite
def misbehaving_scenarios(draw: st.DrawFn) -> MisbehavingScenario:
    """A run against a misbehaving batch_fn. A batch_fn that hangs comes with a batch_timeout,
    so that every caller has an outcome in bounded virtual time."""
    behaviours = tuple(draw(st.lists(misbehaviours, min_size=1, max_size=5)))
    timeout = draw(ticks(16, min_ticks=1)) if "hang" in behaviours else None
    if timeout is None and draw(st.booleans()):
        timeout = draw(ticks(16, min_ticks=1))
    dedupe = draw(st.booleans())
    times = draw(arrival_patterns(max_calls=12, max_ticks=16))
    items = [draw(st.integers(0, 3)) for _ in times] if dedupe else list(range(len(times)))
    return MisbehavingScenario(
        max_batch_size=draw(max_batch_sizes),
        max_in_flight=draw(max_in_flights),
        dedupe=dedupe,
        batch_timeout=timeout,
        cancel_abandoned=draw(st.booleans()),
        behaviours=behaviours,
        calls=tuple(
            Call(item=item, at=at, cancel_at=draw(cancellations(at)))
            for item, at in zip(items, times, strict=True)
        ),
    )
