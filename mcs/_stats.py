"""Statistics records and the small accumulators behind them.

The problem: the batcher records a duration per caller and per batch on its dispatch path, and
``statistics()`` may be called from anywhere, including a metrics exporter's own thread while the
trio run keeps recording. Recording must stay O(1), and reading must never walk a container that
another thread is changing ("deque mutated during iteration") nor cost milliseconds.

Percentiles come from a bounded window of the 1,024 most recent samples. Reading takes one copy
of the window in C (``list(deque)``, atomic under the GIL), sorts it (1,024 floats: tens of
microseconds) and caches the result with the count of samples it saw; until another sample
arrives, a summary is the cached record. The alternatives cost more where it matters: a sorted
container kept up to date pays O(log n) per sample on the dispatch path, and a larger window
(this used 10,000) costs milliseconds per summary for no better p99 of *recent* behaviour.

Saturation comes from the intervals during which every in-flight slot was busy, each stored with
the busy time before it, so the share of a window is two lookups in one snapshot rather than a sum
over every interval. A stretch still open is stored with ``end = inf`` and replaced in one deque
operation when it closes, so a reader sees it either open or closed, never both or neither.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections import deque
from collections.abc import Sequence
from operator import itemgetter

import attrs

from ._util import nearest_rank

__all__ = ["BatcherStatistics", "Percentiles"]

_WINDOW_SAMPLES = 1024


@attrs.frozen
class Percentiles:
    """A summary of recent durations, in seconds of trio's clock.

    The window is the 1,024 most recent samples; percentiles are nearest-rank (each is one of
    the samples: the smallest with at least that share of the window at or below it).

    Attributes:
        count: how many samples the summary is drawn from (the most recent, at most 1,024).
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


_NO_SAMPLES = Percentiles(0, 0.0, 0.0, 0.0, 0.0)


def _summarise(values: list[float]) -> Percentiles:
    """Sort ``values`` (a private copy) in place and summarise them."""
    if not values:
        return _NO_SAMPLES
    values.sort()
    return Percentiles(
        len(values),
        nearest_rank(values, 0.50),
        nearest_rank(values, 0.90),
        nearest_rank(values, 0.99),
        values[-1],
    )


class _Samples:
    """The most recent durations, summarised on demand and safe to summarise from any thread.

    Only one thread records (the trio run's); any thread may call :meth:`summary`.
    """

    __slots__ = ("_recorded", "_summary", "_values")

    def __init__(self) -> None:
        self._values: deque[float] = deque(maxlen=_WINDOW_SAMPLES)
        self._recorded = 0  # samples ever recorded; counted *after* they are in the window
        self._summary = (0, _NO_SAMPLES)  # (samples recorded when computed, the summary)

    def add(self, value: float) -> None:
        self._values.append(value)
        self._recorded += 1

    def extend(self, values: Sequence[float]) -> None:
        self._values.extend(values)
        self._recorded += len(values)

    def summary(self) -> Percentiles:
        # Read the count before copying: the copy then holds at least the samples counted, so a
        # cached summary is never older than its key (at worst a later call recomputes needlessly).
        recorded = self._recorded
        cached_at, cached = self._summary
        if cached_at == recorded:
            return cached
        result = _summarise(list(self._values))  # one copy in C: atomic under the GIL
        self._summary = (recorded, result)
        return result


_START = itemgetter(0)


class _Saturation:
    """Share of the last ``window`` seconds during which all in-flight slots were busy.

    Only one thread calls :meth:`update`; :meth:`share` may be called from any thread, with
    ``now`` read from the same clock.
    """

    __slots__ = ("_busy", "_created", "_open", "_total", "_window")

    def __init__(self, now: float, window: float = 1.0) -> None:
        self._window = window
        self._created = now
        self._open = False
        self._total = 0.0  # busy seconds in closed stretches, ever
        # Saturated stretches (start, end, busy seconds before start), oldest first; the
        # last one may be open, with end = inf.
        self._busy: deque[tuple[float, float, float]] = deque()

    def update(self, saturated: bool, now: float) -> None:
        if saturated and not self._open:
            self._open = True
            self._busy.append((now, math.inf, self._total))
        elif not saturated and self._open:
            self._open = False
            start, _, before = self._busy[-1]
            if now > start:
                self._busy[-1] = (start, now, before)  # one store: a reader sees open or closed
                self._total = before + (now - start)
            else:
                self._busy.pop()
            horizon = now - self._window
            busy = self._busy
            while busy and busy[0][1] <= horizon:
                busy.popleft()

    def share(self, now: float) -> float:
        span = min(self._window, now - self._created)
        if span <= 0:
            return 0.0
        stretches = tuple(self._busy)  # one copy in C: atomic under the GIL
        if not stretches:
            return 0.0
        busy = _busy_until(stretches, now) - _busy_until(stretches, now - span)
        return min(1.0, max(0.0, busy / span))


def _busy_until(stretches: tuple[tuple[float, float, float], ...], when: float) -> float:
    """Busy seconds from before the first stretch up to ``when``."""
    index = bisect_right(stretches, when, key=_START) - 1
    if index < 0:
        return stretches[0][2]
    start, end, before = stretches[index]
    return before + (min(when, end) - start)


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
        failed_batches: batch_fn calls that raised or were cut by ``batch_timeout``.
        timed_out_batches: batch_fn calls cut by ``batch_timeout`` (also counted as failed).
        cancelled_batches: batch_fn calls cancelled because every caller had left
            (``cancel_abandoned=True``); not failures.
        rejected: calls refused with :exc:`mcs.Overloaded`.
        withdrawn: callers cancelled before their item was sent (their items never reached
            batch_fn).
        dropped: callers cancelled while their batch was in flight (their results were dropped).
        rate_limit_waits: batches that had to wait for the rate limit.
        rate_limit_wait_time: total seconds batches waited for the rate limit.
        saturation: share of the last second during which every in-flight slot was busy, from
            0.0 to 1.0; near 1.0 the downstream, not the callers, sets the pace.
        split_batches: failed batch_fn calls that were cut in two and sent again
            (``on_batch_error="split"``).
        failed_alone: items that failed in a batch_fn call of their own, after splits or not
            (``on_batch_error="split"``).
        limit_errors: batches whose callers got an error because a shared limit (on Redis)
            was unavailable, with ``on_unavailable="fail"``.
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
    timed_out_batches: int
    cancelled_batches: int
    rejected: int
    withdrawn: int
    dropped: int
    rate_limit_waits: int
    rate_limit_wait_time: float
    saturation: float
    split_batches: int = 0
    failed_alone: int = 0
    limit_errors: int = 0
