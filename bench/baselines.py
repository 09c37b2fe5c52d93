"""The obvious implementations mcs is measured against.

These are what a careful Trio programmer would write first, without tricks:

- :class:`ChannelBatcher`: a memory channel in (callers ``await send``, the checkpointing call
  trio's docs teach), one :class:`trio.Event` per caller out, and one dispatcher task that takes
  the first queued item, drains up to ``max_batch_size - 1`` more with ``receive_nowait`` and
  runs ``batch_fn`` on them (one batch at a time, like an mcs batcher with
  ``max_in_flight=1``);
- :class:`EventNode`: the plain dependency tree, a task per node that waits on its children's
  events, does its work and sets its own event.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Generic, TypeVar

import trio

__all__ = ["ChannelBatcher", "EventNode", "open_channel_batcher"]

K = TypeVar("K")
V = TypeVar("V")


class _Slot(Generic[K, V]):
    __slots__ = ("done", "error", "item", "value")

    def __init__(self, item: K) -> None:
        self.item = item
        self.done = trio.Event()
        self.value: V | None = None
        self.error: BaseException | None = None


class ChannelBatcher(Generic[K, V]):
    """A batcher built from a memory channel and one event per caller."""

    def __init__(
        self,
        batch_fn: Callable[[list[K]], Awaitable[Sequence[V]]],
        max_batch_size: int,
        send: trio.MemorySendChannel[_Slot[K, V]],
    ) -> None:
        self._batch_fn = batch_fn
        self._max_batch_size = max_batch_size
        self._send = send

    async def __call__(self, item: K) -> V:
        slot: _Slot[K, V] = _Slot(item)
        await self._send.send(slot)
        await slot.done.wait()
        if slot.error is not None:
            raise slot.error
        return slot.value  # type: ignore[return-value]

    async def _dispatch(self, receive: trio.MemoryReceiveChannel[_Slot[K, V]]) -> None:
        async for first in receive:
            batch = [first]
            while len(batch) < self._max_batch_size:
                try:
                    batch.append(receive.receive_nowait())
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            try:
                results = await self._batch_fn([slot.item for slot in batch])
                if len(results) != len(batch):
                    raise ValueError(f"batch_fn returned {len(results)} results for {len(batch)}")
            except Exception as exc:
                for slot in batch:
                    slot.error = exc
                    slot.done.set()
            else:
                for slot, value in zip(batch, results, strict=True):
                    slot.value = value
                    slot.done.set()


@asynccontextmanager
async def open_channel_batcher(
    batch_fn: Callable[[list[K]], Awaitable[Sequence[V]]], *, max_batch_size: int = 100
) -> AsyncIterator[ChannelBatcher[K, V]]:
    """Run a :class:`ChannelBatcher` for the duration of the block; drain it on exit."""
    send, receive = trio.open_memory_channel[_Slot[K, V]](math.inf)
    batcher = ChannelBatcher(batch_fn, max_batch_size, send)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(batcher._dispatch, receive)
        try:
            yield batcher
        finally:
            await send.aclose()


class EventNode:
    """One node of a plain dependency tree: a value and an event set once it is there."""

    __slots__ = ("done", "value")

    def __init__(self) -> None:
        self.done = trio.Event()
        self.value = 0

    async def run(self, work: Callable[[], Awaitable[None]], children: Sequence[EventNode]) -> None:
        """Wait for every child, do ``work``; the value is 1 + the children's values."""
        total = 1
        for child in children:
            await child.done.wait()
            total += child.value
        await work()
        self.value = total
        self.done.set()
