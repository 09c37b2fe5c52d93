"""Limits a batcher shares: with other batchers of its process, or with other processes.

A batcher's own limits (an int ``max_in_flight``, a :class:`mcs.RateLimit`) are decided by its
dispatcher in a plain function, with no awaiting. A limit shared with others cannot be: another
batcher may hold the last slot, another process may have spent the rate budget. Such a limit is
an object the dispatcher *awaits*, once per batch (never per item), while the queue keeps
filling:

- :class:`SharedInFlight` hands out one slot per batch (:meth:`~SharedInFlight.acquire`) and
  takes it back when the batch ends (:meth:`~SharedInFlight.release`, synchronous: a batch task
  never waits to give a slot back). A ``trio.CapacityLimiter`` passed as ``max_in_flight`` is
  wrapped in one (:class:`_CapacitySlots`: one token per batch, taken without a task or a cancel
  scope through ``acquire_on_behalf_of_nowait``).
- :class:`SharedRate` reserves units for one batch and says how long to wait before starting it
  (reserve-then-wait: the budget is booked first, so waiters are served in booking order and
  nobody retries in a storm).

``mcs.redis`` implements both on a Redis server, for limits shared across processes and hosts.
The core never imports it.
"""

from __future__ import annotations

import abc

import trio

from ._rate import RateLimit

__all__ = ["SharedInFlight", "SharedRate", "_CapacitySlots"]


class SharedRate(abc.ABC):
    """A rate limit drawn from by several batchers, possibly in several processes.

    Pass one as ``rate=`` to :func:`mcs.open_batcher`; :func:`mcs.redis.open_shared_rate`
    makes one. The batcher reserves once per batch: ``1`` unit for ``unit="call"``, the
    batch's item count for ``unit="item"`` (and caps its batches at ``limit.burst`` items).
    """

    @property
    @abc.abstractmethod
    def limit(self) -> RateLimit:
        """The shared budget."""

    @property
    def available(self) -> bool:
        """False while the store behind the budget does not answer (metrics show it). The
        default, for a budget with no store to lose, is True."""
        return True

    @abc.abstractmethod
    async def reserve(self, units: int) -> float:
        """Book ``units`` of the budget; return how many seconds to wait before using them.

        Once called, it completes (a reservation is never half made); it is bounded in time.

        Raises:
            trio.BrokenResourceError: if the budget cannot be consulted (its store is down),
                with a message that says which store.
        """


class SharedInFlight(abc.ABC):
    """A budget of concurrent batch_fn calls drawn from by several batchers.

    Pass one as ``max_in_flight=`` to :func:`mcs.open_batcher`;
    :func:`mcs.redis.open_shared_in_flight` makes one. Each batch holds one slot while it runs.
    """

    @property
    @abc.abstractmethod
    def total(self) -> int:
        """How many slots the budget has, summed over everyone who shares it."""

    @property
    def available(self) -> bool:
        """False while the store behind the budget does not answer (metrics show it). The
        default, for a budget with no store to lose, is True."""
        return True

    def acquire_nowait(self) -> object:
        """A slot at once if one is free and that can be known without waiting, else None
        (then the batcher awaits :meth:`acquire`). The default returns None."""
        return None

    @abc.abstractmethod
    async def acquire(self) -> object:
        """Wait for a slot and return a token for :meth:`release`.

        Cancellation-safe: if cancelled, no slot is held.

        Raises:
            trio.BrokenResourceError: if the budget cannot be consulted (its store is down).
        """

    @abc.abstractmethod
    def release(self, token: object) -> None:
        """Give back the slot of ``token``; never blocks."""


class _CapacitySlots(SharedInFlight):
    """A ``trio.CapacityLimiter`` as an in-flight budget: one token per batch."""

    __slots__ = ("limiter",)

    def __init__(self, limiter: trio.CapacityLimiter) -> None:
        self.limiter = limiter

    @property
    def total(self) -> int:
        total = self.limiter.total_tokens
        return total if isinstance(total, int) else 2**62  # math.inf: no bound

    def acquire_nowait(self) -> object:
        token = object()  # the borrower: one per batch, so the limiter counts batches
        try:
            self.limiter.acquire_on_behalf_of_nowait(token)
        except trio.WouldBlock:
            return None
        return token

    async def acquire(self) -> object:
        token = object()
        await self.limiter.acquire_on_behalf_of(token)
        return token

    def release(self, token: object) -> None:
        self.limiter.release_on_behalf_of(token)

    def __repr__(self) -> str:
        return f"<in-flight slots of {self.limiter!r}>"
