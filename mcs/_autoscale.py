"""Adaptive concurrency: scale a batcher's ``max_in_flight`` with measured saturation.

The problem: the right number of concurrent downstream calls is a property of the downstream
(its cores, its locks, its other clients), and it moves. Too few and batches queue behind idle
capacity; too many and every call gets slower while throughput stays flat.

The approach is Netflix's concurrency-limits "gradient" idea, reduced to what a batcher can
measure for free: every ``interval`` it reads the batcher's counters and compares the mean
batch_fn time over the interval with a slowly re-probed no-load baseline.

- Grow (by ``sqrt(limit)``, at least 1) only while the slots are saturated (time spent in
  batch_fn over the interval, divided by ``interval * limit``) and latency is within
  ``tolerance`` of the baseline: a limit that is not being used says nothing about the
  downstream, so it is never grown on that evidence.
- Shrink in proportion (``limit * tolerance * baseline / rtt``, at most halving) when latency
  inflates beyond the tolerance: the downstream is queueing internally.
- Shrink by 10% when batch_fn calls fail: errors and timeouts are the "dropped" signal.
- The baseline is the lowest recent mean time, allowed to drift up by 0.5% per interval so that a
  downstream that became slower for good is re-learnt rather than fought.

It runs as an ordinary task in the user's nursery and touches only the public
``statistics()`` and ``max_in_flight`` of the batcher; lowering the limit never cancels a
running call.
"""

from __future__ import annotations

import math
from typing import Any, NoReturn

import trio

from ._batcher import Batcher
from ._util import check_int, check_number, check_seconds

__all__ = ["autoscale"]

_BASELINE_DRIFT = 1.005
_FAILURE_BACKOFF = 0.9


async def autoscale(
    batcher: Batcher[Any, Any],
    *,
    min_in_flight: int = 1,
    max_in_flight: int = 64,
    interval: float = 0.1,
    tolerance: float = 1.5,
    saturated_at: float = 0.9,
) -> NoReturn:
    """Adjust ``batcher.max_in_flight`` forever, within ``[min_in_flight, max_in_flight]``.

    Run it next to the batcher and cancel it with the nursery::

        async with mcs.open_batcher(fetch) as users, trio.open_nursery() as nursery:
            nursery.start_soon(partial(mcs.autoscale, users, max_in_flight=32))
            ...
            nursery.cancel_scope.cancel()

    Args:
        batcher: the batcher to steer.
        min_in_flight: the lowest limit it sets.
        max_in_flight: the highest limit it sets.
        interval: seconds between adjustments.
        tolerance: how much slower than the no-load baseline a call may get before the limit
            shrinks (1.5 = 50% slower).
        saturated_at: how busy the slots must have been over the interval (time in batch_fn
            divided by ``interval * max_in_flight``) for the limit to grow.

    Raises:
        TypeError, ValueError: at once, for a bad argument; the message names it.
    """
    if not isinstance(batcher, Batcher):
        raise TypeError(f"batcher must be a mcs.Batcher, got {batcher!r}")
    check_int("min_in_flight", min_in_flight, 1)
    check_int("max_in_flight", max_in_flight, min_in_flight)
    interval = check_seconds("interval", interval, positive=True)
    tolerance = check_number("tolerance", tolerance, minimum=1.0)
    saturated_at = check_number("saturated_at", saturated_at, minimum=0.0, maximum=1)

    limit = float(min(max(batcher.max_in_flight, min_in_flight), max_in_flight))
    batcher.max_in_flight = round(limit)
    baseline = math.inf
    before = batcher.statistics()
    while True:
        await trio.sleep(interval)
        now = batcher.statistics()
        batches = now.batches - before.batches
        finished = batches - (now.in_flight - before.in_flight)
        failures = now.failed_batches - before.failed_batches
        busy = now.busy_time - before.busy_time
        before = now
        if failures:
            limit *= _FAILURE_BACKOFF
        elif finished > 0 and busy > 0:
            rtt = busy / finished
            baseline = min(rtt, baseline * _BASELINE_DRIFT)
            gradient = tolerance * baseline / rtt
            if gradient < 1:
                limit *= max(0.5, gradient)
            elif busy / (interval * batcher.max_in_flight) >= saturated_at:
                limit += max(1.0, math.sqrt(limit))
        limit = min(max(limit, min_in_flight), max_in_flight)
        batcher.max_in_flight = round(limit)
