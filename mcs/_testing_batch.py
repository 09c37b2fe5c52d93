"""A recording batch_fn for mcs.testing: logs every batch, fails or sleeps on demand."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Generic, Literal, TypeVar

import attrs
import trio

__all__ = ["BatchRecord", "RecordingBatchFn"]

K = TypeVar("K")
V = TypeVar("V")


@attrs.define
class BatchRecord(Generic[K]):
    """One batch a :class:`RecordingBatchFn` ran.

    Attributes:
        items: the items of the batch, in the order batch_fn got them.
        start: when the batch started, on trio's clock.
        concurrent: how many batches were running when it started, itself included.
        end: when it finished (``nan`` while it runs).
        outcome: ``"running"``, ``"returned"``, ``"raised"`` or ``"cancelled"``.
    """

    items: tuple[K, ...]
    start: float
    concurrent: int
    end: float = math.nan
    outcome: Literal["running", "returned", "raised", "cancelled"] = "running"


class RecordingBatchFn(Generic[K, V]):
    """A batch_fn that logs every batch, for :func:`mcs.open_batcher`.

    Each call sleeps for ``delay`` on trio's clock, then raises what ``raise_for`` returns for the
    batch (if anything), else returns ``[fn(item) for item in items]``; ``fn`` may return an
    exception instance to fail that item alone. All three are attributes, and can be changed at
    any time to make later batches slower or fail.

    Attributes:
        fn: the result of one item.
        delay: seconds each batch takes, or a function of the batch's items giving them.
        raise_for: a function of the batch's items giving an exception to raise, or None.
        batches: a :class:`BatchRecord` per batch, in the order they started.
        running: how many batches are running now.
        peak_concurrency: the most batches that ever ran at once.

    Raises:
        TypeError: if ``fn`` or ``raise_for`` is not callable, or ``delay`` is neither a number
            nor callable.
        ValueError: if ``delay`` is a negative number or nan.
    """

    def __init__(
        self,
        fn: Callable[[K], V | BaseException],
        *,
        delay: float | Callable[[list[K]], float] = 0.0,
        raise_for: Callable[[list[K]], BaseException | None] | None = None,
    ) -> None:
        if not callable(fn):
            raise TypeError(f"fn must be callable, got {fn!r}")
        if not callable(delay):
            if isinstance(delay, bool) or not isinstance(delay, int | float):
                raise TypeError(f"delay must be a number of seconds or callable, got {delay!r}")
            if not delay >= 0:
                raise ValueError(f"delay must be >= 0, got {delay!r}")
        if raise_for is not None and not callable(raise_for):
            raise TypeError(f"raise_for must be callable or None, got {raise_for!r}")
        self.fn = fn
        self.delay = delay
        self.raise_for = raise_for
        self.batches: list[BatchRecord[K]] = []
        self.running = 0
        self.peak_concurrency = 0

    def __repr__(self) -> str:
        return (
            f"<mcs.testing.RecordingBatchFn: {len(self.batches)} batches, "
            f"{self.running} running, peak {self.peak_concurrency}>"
        )

    @property
    def items(self) -> list[K]:
        """Every item of every batch so far, in order."""
        return [item for batch in self.batches for item in batch.items]

    async def __call__(self, items: list[K]) -> list[V | BaseException]:
        """Run one batch: sleep, maybe raise, else return each item's result.

        Raises:
            Exception: what ``raise_for`` returned for the batch, or what ``fn`` raised.
        """
        self.running += 1
        self.peak_concurrency = max(self.peak_concurrency, self.running)
        record = BatchRecord(tuple(items), trio.current_time(), self.running)
        self.batches.append(record)
        try:
            delay = self.delay
            await trio.sleep(delay(items) if callable(delay) else delay)
            error = self.raise_for(items) if self.raise_for is not None else None
            if error is not None:
                raise error
            results = [self.fn(item) for item in items]
        except trio.Cancelled:
            record.outcome = "cancelled"
            raise
        except BaseException:
            record.outcome = "raised"
            raise
        else:
            record.outcome = "returned"
            return results
        finally:
            self.running -= 1
            record.end = trio.current_time()
