"""Dedupe across the queue and the batches in flight: one downstream item, many callers.

With ``dedupe=True``, a call whose item equals (by ``key=``, or by the item itself) an item that
is queued or already in flight does not send it again: it joins that item and gets its result.
So ten requests that need user 42 within a batch's lifetime cost the downstream one lookup, and
``max_batch_size`` counts distinct items. DataLoader does the same within a tick and then from
its cache; mcs has no cross-request cache, but an item stays shared for as long as it is queued
or in flight.

How: the batcher keeps a table from key to a :class:`_Shared` record, and only that record goes
through the intake queue and into a batch. Its callers wait JOINED beside it. Delivery fans the
result (or error) out to every caller still there. A caller that leaves withdraws only itself;
when the last one leaves, the shared item is withdrawn from the queue (or dropped in flight,
where ``cancel_abandoned`` may cancel its batch), and forgotten, so a later call sends it anew.
"""

from __future__ import annotations

import contextvars
from collections.abc import Hashable
from types import TracebackType
from typing import Any

from ._requests import _FINISHED, _JOINED, _QUEUED, _Request

__all__ = ["_Shared", "extra_callers"]


class _Shared(_Request[Any, Any]):
    """One downstream item and the callers that wait for it."""

    __slots__ = (
        "batch",
        "callers",
        "dropped",
        "item",
        "joined",
        "key",
        "live",
        "served",
        "state",
        "t0",
        "table",
    )

    def __init__(
        self,
        key: Hashable,
        first: _Request[Any, Any],
        table: dict[Hashable, _Shared],
    ) -> None:
        self.key = key
        self.item = first.item
        self.t0 = first.t0
        self.state = _QUEUED
        self.batch: Any = None
        self.callers: list[_Request[Any, Any]] = []
        self.live = 0  # callers still waiting
        self.joined = 0  # callers ever joined
        self.dropped = 0  # callers that left while it was in flight
        self.served = 0  # callers it delivered to
        self.table = table
        table[key] = self
        self.join(first)

    def join(self, request: _Request[Any, Any]) -> None:
        request.state = _JOINED
        request.batch = self
        self.callers.append(request)
        self.live += 1
        self.joined += 1

    def forget(self) -> None:
        """No later call may join this item (it is finished, or every caller left)."""
        if self.table.get(self.key) is self:
            del self.table[self.key]

    def _deliver_value(self, value: Any, now: float) -> None:
        self._fan_out(False, value, None, now)

    def _deliver_error(self, error: BaseException, tb: TracebackType | None, now: float) -> None:
        self._fan_out(True, error, tb, now)

    def _request_contexts(self) -> list[contextvars.Context]:
        return [c for r in self.callers if r.state == _JOINED for c in r._request_contexts()]

    def _fan_out(self, failed: bool, outcome: Any, tb: TracebackType | None, now: float) -> None:
        """Give the item's value (or error) to every caller still waiting for it."""
        self.forget()
        callers, self.callers = self.callers, []
        served = 0
        for request in callers:
            if request.state == _JOINED:
                request.state = _FINISHED
                served += 1
                if failed:
                    request._deliver_error(outcome, tb, now)
                else:
                    request._deliver_value(outcome, now)
        self.served = served
        callers = request = outcome = tb = None  # type: ignore[assignment]


def extra_callers(records: list[_Request[Any, Any]]) -> int:
    """How many more callers than records a delivered batch served (shared items count each
    of their callers)."""
    return sum(r.served - 1 for r in records if type(r) is _Shared and r.served)
