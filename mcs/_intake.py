"""A batcher's intake: the queue of accepted items and the room queue of callers waiting for
space in it, with no awaiting and no clock (the batcher's async shell drives it).

Withdrawal must be O(1) whatever the queue length, because a cancelled request may sit anywhere
in it: a withdrawn record is only marked, and skipped (then dropped) when the dispatcher reaches
it. Marked records are counted, and the queue is compacted by the dispatcher's upkeep once they
outnumber the live ones, so a storm of cancellations cannot make the queue grow without bound.
"""

from __future__ import annotations

from collections import deque
from typing import Generic, TypeVar

from ._requests import _IN_FLIGHT, _QUEUED, _ROOM, _WITHDRAWN, _Request

__all__ = ["_Intake"]

K = TypeVar("K")
V = TypeVar("V")

# Compact a queue once this many withdrawn records sit in it (and they outnumber live ones).
_COMPACT_AFTER = 64


class _Intake(Generic[K, V]):
    """The queue and the room queue of one batcher.

    Attributes:
        closed: no more items are accepted (the batcher closed, or was never opened).
        queued: live records in ``queue`` (withdrawn ones are removed lazily).
        waiting_for_room: live records in ``room``.
        needs_upkeep: set when a withdrawal left work for :meth:`upkeep` (room to hand out, a
            queue to compact); the batcher's dispatcher does it, not the cancelled caller.
    """

    __slots__ = (
        "_dead",
        "_room_dead",
        "closed",
        "needs_upkeep",
        "queue",
        "queue_size",
        "queued",
        "room",
        "waiting_for_room",
    )

    def __init__(self, queue_size: int | float) -> None:
        self.queue_size = queue_size
        self.closed = True  # until the batcher is opened
        self.queue: deque[_Request[K, V]] = deque()
        self.queued = 0
        self._dead = 0
        self.room: deque[_Request[K, V]] = deque()
        self.waiting_for_room = 0
        self._room_dead = 0
        self.needs_upkeep = False

    def accept(self, request: _Request[K, V]) -> bool:
        """Queue ``request``, or put it in the room queue if the queue is full (or others are
        already waiting for room, so that nobody overtakes them). True if it was queued."""
        if self.queued < self.queue_size and not self.waiting_for_room:
            request.state = _QUEUED
            self.queue.append(request)
            self.queued += 1
            return True
        request.state = _ROOM
        self.room.append(request)
        self.waiting_for_room += 1
        return False

    def withdraw(self, request: _Request[K, V]) -> None:
        """Mark a queued or room-waiting record withdrawn; O(1)."""
        if request.state == _QUEUED:
            request.state = _WITHDRAWN
            self.queued -= 1
            self._dead += 1
            if self.waiting_for_room or (self._dead > _COMPACT_AFTER and self._dead > self.queued):
                self.needs_upkeep = True
        else:
            assert request.state == _ROOM
            request.state = _WITHDRAWN
            self.waiting_for_room -= 1
            self._room_dead += 1
            if self._room_dead > _COMPACT_AFTER and self._room_dead > self.waiting_for_room:
                self.needs_upkeep = True

    def upkeep(self) -> None:
        """Compact the queues if withdrawn records dominate, then admit callers to free room."""
        self.needs_upkeep = False
        if self._dead > _COMPACT_AFTER and self._dead > self.queued:
            self.queue = deque(r for r in self.queue if r.state == _QUEUED)
            self._dead = 0
        if self._room_dead > _COMPACT_AFTER and self._room_dead > self.waiting_for_room:
            self.room = deque(r for r in self.room if r.state == _ROOM)
            self._room_dead = 0
        if self.waiting_for_room:
            self.admit_from_room()

    def take(self, limit: int) -> list[_Request[K, V]]:
        """Move up to ``limit`` live records from the queue into a new batch, oldest first."""
        batch: list[_Request[K, V]] = []
        queue = self.queue
        while queue and len(batch) < limit:
            request = queue.popleft()
            if request.state == _QUEUED:
                request.state = _IN_FLIGHT
                batch.append(request)
            else:
                self._dead -= 1
        self.queued -= len(batch)
        if self.waiting_for_room:
            self.admit_from_room()
        return batch

    def admit_from_room(self) -> None:
        """Room freed up: admit callers blocked on a full queue, oldest first."""
        room = self.room
        while room and self.queued < self.queue_size:
            request = room.popleft()
            if request.state == _ROOM:
                request.state = _QUEUED
                self.queue.append(request)
                self.queued += 1
                self.waiting_for_room -= 1
            else:
                self._room_dead -= 1

    def oldest_t0(self) -> float:
        """When the oldest live queued record was accepted (the queue must not be empty)."""
        queue = self.queue
        while queue[0].state != _QUEUED:
            queue.popleft()
            self._dead -= 1
        return queue[0].t0

    def clear_room(self) -> list[_Request[K, V]]:
        """Empty the room queue; returns its live records."""
        room, self.room = self.room, deque()
        self.waiting_for_room = self._room_dead = 0
        return [r for r in room if r.state == _ROOM]

    def clear(self) -> list[_Request[K, V]]:
        """Empty the queue (not the room queue); returns its live records."""
        queue, self.queue = self.queue, deque()
        self.queued = self._dead = 0
        return [r for r in queue if r.state == _QUEUED]
