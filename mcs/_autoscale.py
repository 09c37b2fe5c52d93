"""Adaptive concurrency: move a batcher's ``max_in_flight`` to what the downstream can serve.

The problem: the right number of concurrent downstream calls is a property of the downstream
(its workers, its locks, its other clients), and it moves. Too few and batches queue behind idle
capacity; too many and calls wait inside the downstream: every call gets slower while throughput
stays flat, or drops, as smaller batches pay the per-call cost more often.

The signal is the one TCP Vegas and Netflix's concurrency-limits use: the time of a call against
its time at no load. Three things make that hard with a batcher; the first version of this
module met all three (it settled at 4-6x the right limit, and climbed to its ceiling under
overload while calls got 16x slower):

- **A batch's time grows with its size**, which is not queueing. So the no-load time is a model
  of the size: the lower convex hull of (mean size, mean time) over the intervals seen, which at
  a size is a line ``base + per_item * n`` (see :class:`_Envelope`). Queueing only ever adds
  time, so the hull of what was seen runs at or above the no-load curve and touches it wherever
  calls of that size once ran unqueued, as they do while the limit is below the downstream's
  parallelism (slow start begins there).
- **A baseline that drifts up re-learns queueing as normal.** The first version let its baseline
  rise 0.5% per interval, and under modest overload the limit ratcheted up, as Gradient2's does
  when its queue allowance is added on every update (concurrency-limits PR #134). Here the model
  never rises on its own. It is re-learnt only where slowness cannot be self-inflicted: at
  ``min_in_flight``, calls still slower than ``tolerance`` times the model mean the downstream
  itself got slower, and the model restarts from what is seen there.
- **Failures are overload too.** A limiter that only watches latency keeps growing while every
  call fails fast or times out alike (concurrency-limits #137, #176). Here an interval with
  failed or timed-out calls backs off, whatever their latency.

Every ``interval`` it reads a few of the batcher's counters (calls ended, their items and time,
failures, and the time every slot was taken: O(1), whatever the load) and compares the mean time
of the calls that ended with the model's time for their mean size. The excess, over the
interval, is by Little's law the mean number of calls that waited inside the downstream
(``queueing``); the rest is the concurrency the downstream actually served.

- **Back off** to 90% in an interval with failed or timed-out calls.
- **Shrink** when calls take more than ``tolerance`` times the model: to the concurrency that was
  served, where the downstream stops queueing (or by the ratio of ``tolerance`` times the model
  to the time taken, if that is lower, as with calls longer than the interval), at most
  halving. The next interval does not shrink again: its calls mostly started under the old
  limit.
- **Grow** only while every slot was taken for at least ``saturated_at`` of the interval (a
  limit nobody uses says nothing about the downstream) and less than about one call waited
  inside the downstream (one per ten served, for large limits). Until the first shrink or
  back-off it doubles: a slow start, as a limit far below the right one costs as much as one far
  above (concurrency-limits #35). After that it adds 1 per interval.
- Otherwise it holds.

So at a steady load it settles between the downstream's parallelism and ``tolerance`` times it,
where a call or two wait inside the downstream; W8 in ``bench/`` measures it against every fixed
limit on the same arrivals. It runs as an ordinary task in the user's nursery and sets only the
batcher's public ``max_in_flight``: lowering the limit never cancels a running call, and
cancelling the task leaves the limit where it was. Each interval's reading and decision is an
:class:`mcs.AutoscaleDecision`, handed to ``on_decision`` if given.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal, NoReturn

import attrs
import trio

from ._batcher import Batcher
from ._counters import _Counters
from ._log import limit_changed
from ._util import check_int, check_number, check_seconds

__all__ = ["AutoscaleDecision", "autoscale"]

_FAILURE_BACKOFF = 0.9
_MAX_SHRINK = 0.5
_SIZE_BIN = math.log(1.1)  # call sizes within 10% of each other share a point of the model

Action = Literal["slow start", "grow", "hold", "shrink", "back off", "relearn", "idle"]


@attrs.frozen
class AutoscaleDecision:
    """One interval of :func:`mcs.autoscale`: what it read and what it did.

    Attributes:
        at: when, on trio's clock.
        action: ``"slow start"`` (doubled), ``"grow"`` (added 1), ``"hold"``, ``"shrink"``
            (calls queued inside the downstream), ``"back off"`` (calls failed or timed out),
            ``"relearn"`` (at ``min_in_flight`` calls were still slow: the no-load model was
            reset to what was seen) or ``"idle"`` (no call ended: nothing to learn).
        limit_before: ``max_in_flight`` before the decision.
        limit: ``max_in_flight`` after it.
        calls: batch_fn calls that ended in the interval.
        mean_size: their mean number of items.
        mean_time: their mean duration, in seconds.
        expected_time: the no-load model's duration for ``mean_size`` items (nan before the
            first call ended).
        queueing: mean number of calls that waited inside the downstream over the interval
            (their excess time over the model, divided by the interval).
        base: the model's seconds per call.
        per_item: the model's seconds per item.
    """

    at: float
    action: Action
    limit_before: int
    limit: int
    calls: int
    mean_size: float
    mean_time: float
    expected_time: float
    queueing: float
    base: float
    per_item: float


@attrs.frozen
class _Interval:
    """What the counters say about one interval."""

    seconds: float
    calls: int  # batch_fn calls that ended
    items: int  # items of the calls that ended
    busy: float  # seconds spent in the calls that ended
    failures: int  # calls that failed or timed out
    saturated: float  # seconds during which every in-flight slot was taken


@attrs.frozen
class _Reading:
    """The batcher's counters at one moment (a handful of attribute reads)."""

    calls: int  # batch_fn calls that ended (started, less those still running)
    items: int
    busy: float
    failures: int
    saturated: float

    @classmethod
    def take(cls, counts: _Counters, in_flight: int, now: float) -> _Reading:
        saturation = counts.saturation
        return cls(
            counts.batches - in_flight,
            counts.ended_items,
            counts.busy_time,
            counts.failed_batches,
            0.0 if saturation is None else saturation.total(now),
        )

    def since(self, before: _Reading, seconds: float) -> _Interval:
        return _Interval(
            seconds,
            self.calls - before.calls,
            self.items - before.items,
            self.busy - before.busy,
            self.failures - before.failures,
            self.saturated - before.saturated,
        )


class _Envelope:
    """The no-load time of a call by its size: the lower convex hull of what was seen.

    Each interval gives one point, (mean size, mean time) of the calls that ended. Queueing only
    ever adds time, so the no-load curve runs under every point: the model is the lower hull of
    the points kept, extended beyond them by its end edges, and at a size it is the hull's edge
    there, ``base + per_item * n``. A point is kept only if it lies below the model (or while
    the model is a single point, with no slope yet): a point above it says nothing about the
    no-load time, and keeping it would bend the hull up where no clean point was seen. Points
    are kept per size bin (sizes within 10% of each other share one, the fastest), so the hull
    has a few dozen points at most, whatever the load.
    """

    __slots__ = ("_fastest", "_hull")

    def __init__(self) -> None:
        self._fastest: dict[int, tuple[float, float]] = {}  # size bin -> (size, time)
        self._hull: list[tuple[float, float]] = []

    def observe(self, size: float, time: float) -> None:
        if len(self._hull) > 1:
            base, per_item = self.line(size)
            if time >= base + per_item * size:
                return
        key = round(math.log(size) / _SIZE_BIN)
        seen = self._fastest.get(key)
        if seen is None or time < seen[1]:
            self._fastest[key] = (size, time)
            self._hull = _lower_hull(sorted(self._fastest.values()))

    def reset(self, size: float, time: float) -> None:
        self._fastest = {round(math.log(size) / _SIZE_BIN): (size, time)}
        self._hull = [(size, time)]

    def line(self, size: float) -> tuple[float, float]:
        """(base, per_item) of the model at ``size``; (nan, nan) before anything was seen."""
        hull = self._hull
        if not hull:
            return math.nan, math.nan
        if len(hull) == 1:  # one size seen so far: no slope to tell
            return hull[0][1], 0.0
        edge = next((i for i in range(len(hull) - 2) if size <= hull[i + 1][0]), len(hull) - 2)
        (n1, t1), (n2, t2) = hull[edge], hull[edge + 1]
        per_item = (t2 - t1) / (n2 - n1)
        base = t1 - per_item * n1
        if base < 0:  # extrapolating to smaller calls than ever seen: never below zero
            return 0.0, t1 / n1
        return base, per_item


def _lower_hull(points: list[tuple[float, float]]) -> list[tuple[float, float]]:
    """The lower convex hull of ``points`` (sorted by size), from its fastest point on."""
    hull: list[tuple[float, float]] = []
    for n, t in points:
        while len(hull) >= 2:
            (n0, t0), (n1, t1) = hull[-2], hull[-1]
            if (n1 - n0) * (t - t0) - (t1 - t0) * (n - n0) > 0:
                break
            hull.pop()
        hull.append((n, t))
    fastest = min(range(len(hull)), key=lambda i: hull[i][1])
    return hull[fastest:]


@attrs.define
class _Controller:
    """The decisions, as a plain function of the counters: testable without a scheduler."""

    min_in_flight: int
    max_in_flight: int
    tolerance: float
    saturated_at: float
    limit: float
    slow_start: bool = True
    envelope: _Envelope = attrs.Factory(_Envelope)
    shrank: bool = False  # the last interval shrank the limit

    def decide(self, interval: _Interval, now: float) -> AutoscaleDecision:
        before = round(self.limit)
        calls = interval.calls
        size = interval.items / calls if calls > 0 else math.nan
        time = interval.busy / calls if calls > 0 else math.nan
        expected = queueing = math.nan
        action: Action
        if interval.failures:
            action = "back off"
            self.slow_start = False
            self.limit *= _FAILURE_BACKOFF
        elif calls <= 0 or interval.busy <= 0 or size <= 0:
            action = "idle"
        else:
            self.envelope.observe(size, time)
            base, per_item = self.envelope.line(size)
            expected = base + per_item * size
            queueing = max(0.0, interval.busy - calls * expected) / interval.seconds
            served = calls * expected / interval.seconds
            used = interval.saturated / interval.seconds
            if time > self.tolerance * expected:
                if before <= self.min_in_flight:
                    action = "relearn"
                    self.envelope.reset(size, time)
                    expected, queueing = time, 0.0
                elif self.shrank:
                    # The calls that ended had mostly started before the last shrink: wait for
                    # calls made under the new limit before judging it.
                    action = "hold"
                else:
                    action = "shrink"
                    self.slow_start = False
                    gradient = self.tolerance * expected / time  # < 1 here
                    self.limit = max(self.limit * _MAX_SHRINK, min(served, self.limit * gradient))
            elif used >= self.saturated_at and queueing < max(1.0, 0.1 * served):
                if self.slow_start:
                    action = "slow start"
                    self.limit *= 2
                else:
                    action = "grow"
                    self.limit += 1
            else:
                action = "hold"
        self.limit = min(max(self.limit, self.min_in_flight), self.max_in_flight)
        after = round(self.limit)
        self.shrank = action == "shrink"
        base, per_item = self.envelope.line(size)
        return AutoscaleDecision(
            at=now,
            action=action,
            limit_before=before,
            limit=after,
            calls=calls,
            mean_size=size,
            mean_time=time,
            expected_time=expected,
            queueing=queueing,
            base=base,
            per_item=per_item,
        )


async def autoscale(
    batcher: Batcher[Any, Any],
    *,
    min_in_flight: int = 1,
    max_in_flight: int = 64,
    interval: float = 0.1,
    tolerance: float = 1.5,
    saturated_at: float = 0.9,
    on_decision: Callable[[AutoscaleDecision], object] | None = None,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
) -> NoReturn:
    """Adjust ``batcher.max_in_flight`` forever, within ``[min_in_flight, max_in_flight]``.

    Start it next to the batcher and cancel it with the nursery::

        async with mcs.open_batcher(fetch) as users, trio.open_nursery() as nursery:
            await nursery.start(partial(mcs.autoscale, users, max_in_flight=32))
            ...
            nursery.cancel_scope.cancel()

    It starts from the batcher's current ``max_in_flight`` (moved into the bounds), which
    ``nursery.start`` returns once it is set; ``nursery.start_soon`` works too. While it runs
    it owns the limit (a value set on the batcher meanwhile is overwritten at the next
    interval); cancelling it leaves the limit where it was.

    Args:
        batcher: the batcher to steer.
        min_in_flight: the lowest limit it sets.
        max_in_flight: the highest limit it sets.
        interval: seconds between adjustments; several batch_fn calls should end in each.
        tolerance: how much slower than its no-load time (for its size) a call may get before
            the limit shrinks (1.5 = 50% slower).
        saturated_at: the share of the interval during which every slot must have been taken
            for the limit to grow (a limit nobody uses says nothing about the downstream).
        on_decision: called with an :class:`mcs.AutoscaleDecision` after every interval (for
            logs and metrics); it must not block.

    Raises:
        TypeError, ValueError: at once, for a bad argument (the message names it), or a
            batcher whose in-flight limit is shared (a ``trio.CapacityLimiter`` or one on
            Redis), which is not the batcher's to steer.
    """
    if not isinstance(batcher, Batcher):
        raise TypeError(f"batcher must be a mcs.Batcher, got {batcher!r}")
    if batcher._dispatcher.slots is not None:
        raise ValueError(
            f"batcher {batcher.name!r} has a shared in-flight limit "
            f"({batcher._dispatcher.slots!r}); autoscale steers only a batcher's own int limit"
        )
    check_int("min_in_flight", min_in_flight, 1)
    check_int("max_in_flight", max_in_flight, min_in_flight)
    interval = check_seconds("interval", interval, positive=True)
    tolerance = check_number("tolerance", tolerance, minimum=1.0)
    saturated_at = check_number("saturated_at", saturated_at, minimum=0.0, maximum=1)
    if on_decision is not None and not callable(on_decision):
        raise TypeError(f"on_decision must be callable or None, got {on_decision!r}")

    controller = _Controller(
        min_in_flight=min_in_flight,
        max_in_flight=max_in_flight,
        tolerance=tolerance,
        saturated_at=saturated_at,
        limit=float(min(max(batcher.max_in_flight, min_in_flight), max_in_flight)),
    )
    batcher.max_in_flight = round(controller.limit)
    task_status.started(batcher.max_in_flight)
    counts, dispatcher = batcher._counts, batcher._dispatcher
    before = _Reading.take(counts, dispatcher.in_flight, trio.current_time())
    while True:
        await trio.sleep(interval)
        at = trio.current_time()
        now = _Reading.take(counts, dispatcher.in_flight, at)
        decision = controller.decide(now.since(before, interval), at)
        before = now
        batcher.max_in_flight = decision.limit
        if decision.limit != decision.limit_before:
            limit_changed(
                batcher.name,
                "max_in_flight",
                decision.limit_before,
                decision.limit,
                decision.action,
            )
        if on_decision is not None:
            on_decision(decision)
