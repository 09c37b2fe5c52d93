"""The dispatcher's side of shared limits and of split batches.

Shared limits (``_limits.py``: a ``trio.CapacityLimiter``, or a limit on Redis) are the one
place where the dispatcher awaits something other than its own park: once it may send a batch
by its own rules, it takes a slot and a rate reservation from them ("passes the gates"), at most
one await of each per batch, while the queue keeps filling (none at all for a
``trio.CapacityLimiter`` with a token to spare: ``acquire_on_behalf_of_nowait`` takes it).
Anything that would wake a parked dispatcher (a caller leaving, a batch to cancel) cancels the
wait for a slot or for the reserved time instead; what was obtained is kept for the next batch,
and a slot held while there is nothing to send is given back at once.

``on_batch_error="split"``: when batch_fn raises for a batch of several items, the batch is cut
in two halves that queue ahead of everything else and go out like any batch (within every
limit); a half that fails again is cut again, down to single items, each of which fails alone
with its own error. k poison items in n cost at most ``2 k ceil(log2 n)`` extra calls.

The dispatcher (``_dispatcher.py``) inherits these methods; they only read and write its state.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Final, Generic, TypeVar

import trio

from ._counters import _Counters
from ._intake import _Intake
from ._limits import SharedInFlight, SharedRate
from ._requests import _Request
from ._shared import extra_callers
from ._split import deliver_error

__all__ = ["_IN_GATE", "_RUNNING", "_Gates"]

K = TypeVar("K")
V = TypeVar("V")

_RUNNING: Final = -1  # the dispatcher is not parked
_IN_GATE: Final = -2  # waiting for a shared limit: a wake-up cancels the wait


class _Gates(Generic[K, V]):
    """Shared slots, shared rate bookings and split parts, for :class:`_Dispatcher`."""

    # The state of shared limits and split parts (set in _Dispatcher.__init__).
    __slots__ = (
        "_gate_scope",
        "_reserved",
        "_splits",
        "_token",
        "shared_rate",
        "slots",
        "waiting_for",
    )

    # The rest of the dispatcher's state these methods read (_Dispatcher's __slots__).
    name: str
    intake: _Intake[K, V]
    counts: _Counters
    batch_cap: int
    rate_counts_items: bool
    shares: bool
    slots: SharedInFlight | None
    shared_rate: SharedRate | None
    waiting_for: int
    _clock: trio.abc.Clock | None
    _gate_scope: trio.CancelScope | None
    _token: object
    _reserved: tuple[float, int] | None
    _splits: deque[list[_Request[K, V]]]

    def _fail_splits(self) -> None:
        assert self._clock is not None
        broken = trio.BrokenResourceError(
            f"batcher {self.name!r} was shut down while this item was in flight"
        )
        while self._splits:
            records = self._splits.popleft()
            served = deliver_error(records, broken, None, self._clock.current_time())
            self.counts.callers_served += served + (extra_callers(records) if self.shares else 0)

    def _gates_open(self) -> bool:
        """The shared gates passed without awaiting: a free slot taken at once (a
        CapacityLimiter with a token to spare), and no shared rate to book."""
        if self._token is None and self.slots is not None:
            token = self.slots.acquire_nowait()
            if token is None:
                return False
            self._token = token
        return self.shared_rate is None

    async def _pass_gates(self) -> bool:
        """Take a shared slot and a shared rate reservation for the next batch.

        True when both are held; False when a wake-up cut a wait short, or a shared limit
        was unavailable (the next batch's callers then got the error).
        """
        clock = self._clock
        assert clock is not None
        try:
            if self.slots is not None and self._token is None:
                saturation = self.counts.saturation
                assert saturation is not None
                saturation.update(True, clock.current_time())  # until a slot is ours
                try:
                    with self._gate() as scope:
                        self._token = await self.slots.acquire()
                finally:
                    saturation.update(False, clock.current_time())
                if scope.cancelled_caught:
                    return False
            rate = self.shared_rate
            if rate is not None:
                if self._reserved is None:
                    units = 1
                    if self.rate_counts_items:
                        splits = self._splits
                        units = (
                            len(splits[0]) if splits else min(self.intake.queued, self.batch_cap)
                        )
                    delay = await rate.reserve(units)  # never cut short: a booking is kept
                    now = clock.current_time()
                    self._reserved = (now + delay, units)
                    if delay > 0:
                        self.counts.rate_waits += 1
                        self.counts.rate_wait_time += delay
                ready_at = self._reserved[0]
                if clock.current_time() < ready_at:
                    with self._gate() as scope:
                        await trio.sleep_until(ready_at)
                    if scope.cancelled_caught:
                        return False
        except trio.BrokenResourceError as exc:
            self._fail_next_batch(exc)
            return False
        return True

    @contextmanager
    def _gate(self) -> Iterator[trio.CancelScope]:
        """A wait in a shared limit, which :meth:`wake` cuts short."""
        with trio.CancelScope() as scope:
            self._gate_scope = scope
            self.waiting_for = _IN_GATE
            try:
                yield scope
            finally:
                self._gate_scope = None
                self.waiting_for = _RUNNING

    def _fail_next_batch(self, cause: trio.BrokenResourceError) -> None:
        """A shared limit is unavailable: the batch that would have left fails, with an error
        that names the batcher and the limit."""
        assert self._clock is not None
        records = self._splits.popleft() if self._splits else self.intake.take(self.batch_cap)
        if not records:
            return
        error = trio.BrokenResourceError(f"batcher {self.name!r}: {cause}")
        error.__cause__ = cause
        self.counts.limit_errors += 1
        served = deliver_error(records, error, None, self._clock.current_time())
        self.counts.callers_served += served + (extra_callers(records) if self.shares else 0)
