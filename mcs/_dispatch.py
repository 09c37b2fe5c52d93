"""When does the next batch leave? A plain function of a batcher's state and the time.

The dispatcher task of a batcher asks :func:`next_step` what to do, then does it: send a batch
now, or park until something it waits for happens (a slot frees, an item arrives, the
``max_wait`` fill deadline passes, the rate limit allows the next call). Keeping the decision
out of the task means it is tested without a scheduler, one state at a time.

Batching is opportunistic: when a slot is free, everything queued (up to the batch cap) leaves
at once, so a lone call leaves within a scheduler pass and batches grow by themselves while all
slots are busy. A batch split after an error (``on_batch_error="split"``) sends its parts
first: their callers have waited longest. ``max_wait`` trades latency for fuller batches; the
rate limit, counting items, waits until the whole queued batch fits, so that under load the
downstream sees full batches at the limited rate rather than single items.
"""

from __future__ import annotations

import enum
import math
from typing import Final

from ._intake import _Intake
from ._rate import _Gcra

__all__ = ["Step", "next_step"]


class Step(enum.IntEnum):
    """What the dispatcher does next: send, stop, or wait for one kind of event."""

    SEND = 0  # take a batch now
    STOP = 1  # closed and drained: the dispatcher ends
    FOR_SLOT = 2  # every in-flight slot is busy
    FOR_ITEMS = 3  # nothing queued
    FOR_FILL = 4  # max_wait: wait for the batch to fill, until a deadline
    FOR_RATE = 5  # the rate limit allows the next call at a time


_SEND: Final = Step.SEND


def next_step(
    intake: _Intake[object, object],
    *,
    in_flight: int,
    max_in_flight: int,
    closed: bool,
    batch_cap: int,
    max_wait: float,
    gcra: _Gcra | None,
    rate_counts_items: bool,
    now: float,
    split_units: int = 0,
) -> tuple[Step, float]:
    """The next step, and until when to wait for it (``math.inf``: until woken).

    ``split_units`` is the size of the next part of a split batch (``on_batch_error="split"``),
    0 if none waits: such a part leaves before anything queued, as soon as limits allow.
    """
    if in_flight >= max_in_flight:
        return Step.FOR_SLOT, math.inf
    if split_units:
        if gcra is not None:
            ready = gcra.ready_at(split_units if rate_counts_items else 1, now)
            if ready > now:
                return Step.FOR_RATE, ready
        return _SEND, now
    queued = intake.queued
    if not queued:
        return (Step.STOP, now) if closed else (Step.FOR_ITEMS, math.inf)
    if max_wait and queued < batch_cap and not closed:
        deadline = intake.oldest_t0() + max_wait
        if now < deadline:
            return Step.FOR_FILL, deadline
    if gcra is not None:
        ready = gcra.ready_at(min(queued, batch_cap) if rate_counts_items else 1, now)
        if ready > now:
            return Step.FOR_RATE, ready
    return _SEND, now
