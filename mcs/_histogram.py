"""Cumulative histograms of queue waits, batch times and batch sizes, with fixed buckets.

The problem: the percentiles of :class:`mcs.Percentiles` come from a window of recent samples,
so they cannot be added up across worker processes or over a scrape interval, and the time they
cover depends on the load. A histogram with fixed buckets that only ever counts up can: a
Prometheus server sums the buckets of every worker and takes ``histogram_quantile`` over any
range it likes.

What it costs: the batcher records one batch at a time. Queue waits arrive as the list of one
batch's waits, which is already built for the percentile window; it is sorted in C (the waits of
a batch come almost in order: the oldest item first) and each bucket's share is one bisection,
stopping at the first bucket above the longest wait. Batch sizes and times are one bisection per
batch. Nothing is recorded per item beyond the list that exists.

Counts are kept per bucket (not cumulated) in a list of ints written by the trio thread only;
a reader on another thread copies the list in one C call, so each bucket is exact and the total
is their sum, never less than any bucket.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Sequence

import attrs

__all__ = [
    "BATCH_SIZE_BOUNDS",
    "SECONDS_BOUNDS",
    "BatcherHistograms",
    "Histogram",
    "_Buckets",
]

SECONDS_BOUNDS: tuple[float, ...] = (
    0.0001,
    0.00025,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
"""Upper bounds of the queue-wait and batch-time buckets, in seconds (100 µs to 10 s)."""

BATCH_SIZE_BOUNDS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
"""Upper bounds of the batch-size buckets, in items."""


@attrs.frozen
class Histogram:
    """Everything recorded since the batcher opened, counted in fixed buckets.

    Attributes:
        bounds: the upper bound of each bucket, inclusive, in increasing order; a last,
            unbounded bucket (Prometheus's ``+Inf``) is implied.
        counts: cumulative counts, one per bound: how many samples were at or below it.
        count: how many samples in all (the ``+Inf`` bucket).
        sum: the sum of all samples.
    """

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    count: int
    sum: float


@attrs.frozen
class BatcherHistograms:
    """The histograms of a batcher, from :meth:`mcs.Batcher.histograms`.

    Attributes:
        name: the batcher's name.
        queue_wait: seconds from each call to its batch starting (one sample per item sent).
        batch_time: seconds of each batch_fn call.
        batch_size: items in each batch_fn call.
    """

    name: str
    queue_wait: Histogram
    batch_time: Histogram
    batch_size: Histogram


class _Buckets:
    """Per-bucket counts of samples; one thread records, any thread may snapshot."""

    __slots__ = ("_bounds", "_counts", "_sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self._bounds = bounds
        self._counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self._sum = 0.0

    def add(self, value: float) -> None:
        self._counts[bisect_left(self._bounds, value)] += 1
        self._sum += value

    def extend(self, values: Sequence[float]) -> None:
        """Record one batch's samples: a bisection per bucket up to the largest, not per
        sample."""
        ordered = sorted(values)
        total = len(ordered)
        counts = self._counts
        below = 0
        for index, bound in enumerate(self._bounds):
            at = bisect_right(ordered, bound, below)
            if at != below:
                counts[index] += at - below
                below = at
            if below == total:
                break
        else:
            counts[-1] += total - below
        self._sum += sum(ordered)

    def snapshot(self) -> Histogram:
        counts = list(self._counts)  # one copy in C: atomic under the GIL
        total = self._sum
        cumulative: list[int] = []
        running = 0
        for count in counts[:-1]:
            running += count
            cumulative.append(running)
        return Histogram(self._bounds, tuple(cumulative), running + counts[-1], total)
