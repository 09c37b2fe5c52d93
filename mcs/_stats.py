"""Statistics records and the small accumulators behind them.

Percentiles come from a bounded window of recent samples (sorted only when someone asks), and
saturation from the intervals during which every in-flight slot was busy, so that recording stays
O(1) on the batcher's dispatch path.
"""

from __future__ import annotations

import math
from collections import deque

import attrs

__all__ = ["BatcherStatistics", "Percentiles"]

_WINDOW_SAMPLES = 10_000


@attrs.frozen
class Percentiles:
    """A summary of recent durations, in seconds of trio's clock.

    Attributes:
        count: how many samples the summary is drawn from (at most the last 10,000).
        p50: the median.
        p90: the 90th percentile.
        p99: the 99th percentile.
        max: the largest sample.
    """

    count: int
    p50: float
    p90: float
    p99: float
    max: float


Percentiles.__module__ = "mcs"


class _Samples:
    """The most recent durations, summarised on demand."""

    __slots__ = ("_values",)

    def __init__(self) -> None:
        self._values: deque[float] = deque(maxlen=_WINDOW_SAMPLES)

    def add(self, value: float) -> None:
        self._values.append(value)

    def extend(self, values: list[float]) -> None:
        self._values.extend(values)

    def summary(self) -> Percentiles:
        ordered = sorted(self._values)
        if not ordered:
            return Percentiles(0, 0.0, 0.0, 0.0, 0.0)

        def rank(q: float) -> float:
            # nearest-rank percentile: the smallest sample with at least q of them at or below it
            return ordered[max(0, math.ceil(q * len(ordered)) - 1)]

        return Percentiles(len(ordered), rank(0.50), rank(0.90), rank(0.99), ordered[-1])


class _Saturation:
    """Share of the last ``window`` seconds during which all in-flight slots were busy."""

    __slots__ = ("_busy", "_created", "_since", "_window")

    def __init__(self, now: float, window: float = 1.0) -> None:
        self._window = window
        self._created = now
        self._since: float | None = None  # start of the current saturated stretch
        self._busy: deque[tuple[float, float]] = deque()  # closed saturated stretches

    def update(self, saturated: bool, now: float) -> None:
        if saturated and self._since is None:
            self._since = now
        elif not saturated and self._since is not None:
            if now > self._since:
                self._busy.append((self._since, now))
            self._since = None
            horizon = now - self._window
            while self._busy and self._busy[0][1] <= horizon:
                self._busy.popleft()

    def share(self, now: float) -> float:
        span = min(self._window, now - self._created)
        if span <= 0:
            return 0.0
        horizon = now - span
        busy = sum(max(0.0, end - max(start, horizon)) for start, end in self._busy)
        if self._since is not None:
            busy += now - max(self._since, horizon)
        return min(1.0, busy / span)


@attrs.frozen
class BatcherStatistics:
    """A snapshot of a batcher, from :meth:`mcs.Batcher.statistics`.

    Attributes:
        name: the batcher's name.
        queued: items accepted and waiting for a batch.
        waiting_for_room: callers blocked because the queue was full (``overload="block"``).
        in_flight: batch_fn calls running now.
        max_in_flight: the current limit on concurrent batch_fn calls.
        batches: batch_fn calls started so far.
        items: items sent to batch_fn so far (after ``dedupe``).
        callers_served: callers who got a result or an error from a batch.
        mean_batch_size: ``items / batches`` (0.0 before the first batch).
        peak_batch_size: the largest batch so far.
        queue_wait: time from a call to its batch starting (recent callers).
        batch_time: duration of batch_fn calls (recent batches).
        busy_time: total seconds spent in batch_fn calls, summed over calls (so two concurrent
            calls of one second add two); with ``batches``, the mean call time over any period.
        failed_batches: batch_fn calls that raised.
        rejected: calls refused with :exc:`mcs.Overloaded`.
        withdrawn: callers cancelled before their item was sent (their items never reached
            batch_fn).
        dropped: callers cancelled while their batch was in flight (their results were dropped).
        rate_limit_waits: batches that had to wait for the rate limit.
        rate_limit_wait_time: total seconds batches waited for the rate limit.
        saturation: share of the last second during which every in-flight slot was busy, from
            0.0 to 1.0; near 1.0 the downstream, not the callers, sets the pace.
    """

    name: str
    queued: int
    waiting_for_room: int
    in_flight: int
    max_in_flight: int
    batches: int
    items: int
    callers_served: int
    mean_batch_size: float
    peak_batch_size: int
    queue_wait: Percentiles
    batch_time: Percentiles
    busy_time: float
    failed_batches: int
    rejected: int
    withdrawn: int
    dropped: int
    rate_limit_waits: int
    rate_limit_wait_time: float
    saturation: float


BatcherStatistics.__module__ = "mcs"
