"""Property: whatever batch_fn does with each batch, every caller gets exactly one outcome of its
own, in bounded time, and the batcher keeps its bounds and leaves nothing behind.

The oracle knows which items each batch carried and how batch_fn treated that batch, so it
checks each caller's outcome against its own batch: a value must be its own item's value, an
error must be the one its batch's behaviour produces, and a raised exception's traceback holds
the frames of no other caller.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, cast

import trio
import trio.testing
from hypothesis import given, settings
from strategies import MisbehavingScenario, Misbehaviour, misbehaving_scenarios

import mcs
from mcs.testing import run_virtual

TaskLister = Callable[[], list[str]]


class FailingLookup(Mapping[int, int]):
    """A mapping whose lookup raises for one key: a bug in a user's result type."""

    def __init__(self, items: list[int], poisoned: int) -> None:
        self._items = list(items)
        self._poisoned = poisoned

    def __getitem__(self, key: int) -> int:
        if key == self._poisoned:
            raise RuntimeError("lookup exploded")
        return key * 10

    def __iter__(self) -> Iterator[int]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


@dataclass
class Run:
    batches: list[tuple[Misbehaviour, list[int]]] = field(default_factory=list)
    running: int = 0
    peak_running: int = 0
    outcomes: dict[int, object] = field(default_factory=dict)
    foreign_frames: list[int] = field(default_factory=list)
    sentinel: LookupError = field(default_factory=lambda: LookupError("not found"))
    circuit_open: OSError = field(default_factory=lambda: OSError("circuit open"))


def caller_ids(tb: TracebackType | None) -> list[object]:
    ids = []
    while tb is not None:
        if "caller_id" in tb.tb_frame.f_locals:
            ids.append(tb.tb_frame.f_locals["caller_id"])
        tb = tb.tb_next
    return ids


def replay(scenario: MisbehavingScenario, mcs_tasks: TaskLister) -> tuple[Run, Any]:
    run = Run()

    async def batch_fn(items: list[int]) -> object:
        number = len(run.batches)
        behaviour = scenario.behaviours[number % len(scenario.behaviours)]
        run.batches.append((behaviour, list(items)))
        run.running += 1
        run.peak_running = max(run.peak_running, run.running)
        try:
            await trio.sleep(0.125)
            if behaviour == "hang":
                await trio.sleep_forever()
            if behaviour == "raise":
                raise ValueError(f"batch {number} failed")
            if behaviour == "raise_same":
                raise run.circuit_open  # one object for the whole run, raised again and again
            if behaviour == "short":
                return [item * 10 for item in items][:-1]
            if behaviour == "garbage":
                return 42
            if behaviour == "mutate":
                answer = [item * 10 for item in items]
                items.reverse()
                return answer
            if behaviour == "sentinel":
                return [run.sentinel for _ in items]  # one object for the whole run
            if behaviour == "lookup":
                return FailingLookup(items, poisoned=items[0])
            return [item * 10 for item in items]
        finally:
            run.running -= 1

    async def caller(
        batcher: mcs.Batcher[int, int], me: int, item: int, at: float, cancel_at: float | None
    ) -> None:
        caller_id = me
        await trio.sleep_until(at)
        with trio.CancelScope(deadline=float("inf") if cancel_at is None else cancel_at):
            try:
                run.outcomes[caller_id] = await batcher(item)
            except Exception as error:
                run.outcomes[caller_id] = error
                if any(other != caller_id for other in caller_ids(error.__traceback__)):
                    run.foreign_frames.append(caller_id)
                del error
            return
        run.outcomes[caller_id] = "cancelled"

    async def main() -> Any:
        with trio.fail_after(1000):
            async with mcs.open_batcher(
                cast(mcs.BatchFn[int, int], batch_fn),
                max_batch_size=scenario.max_batch_size,
                max_in_flight=scenario.max_in_flight,
                dedupe=scenario.dedupe,
                batch_timeout=scenario.batch_timeout,
                cancel_abandoned=scenario.cancel_abandoned,
                name="down",
            ) as batcher:
                async with trio.open_nursery() as nursery:
                    for me, call in enumerate(scenario.calls):
                        nursery.start_soon(caller, batcher, me, call.item, call.at, call.cancel_at)
            assert mcs_tasks() == []
            return batcher.statistics()

    statistics = run_virtual(main)
    return run, statistics


def allowed(behaviour: Misbehaviour, items: list[int], item: int, error: object) -> bool:
    """Whether ``error`` (or a value) is what a caller of ``item`` in such a batch may get."""
    if not isinstance(error, BaseException):
        return error == item * 10 and behaviour in ("ok", "mutate", "lookup")
    if isinstance(error, mcs.BatchResultError):
        message = str(error)
        if behaviour == "lookup":
            return item == items[0] and "lookup exploded" in message
        return behaviour in ("short", "garbage") or "dedupe could not compare" in message
    if isinstance(error, LookupError):
        return behaviour == "sentinel"
    if isinstance(error, ValueError):
        return behaviour == "raise"
    if isinstance(error, OSError):
        return behaviour == "raise_same"
    return False


@settings(max_examples=150, deadline=None)
@given(misbehaving_scenarios())
def test_every_caller_gets_its_own_outcome_whatever_batch_fn_does(
    mcs_tasks: TaskLister, scenario: MisbehavingScenario
) -> None:
    run, statistics = replay(scenario, mcs_tasks)
    assert sorted(run.outcomes) == list(range(len(scenario.calls)))  # nothing lost
    assert run.foreign_frames == []
    assert run.peak_running <= scenario.max_in_flight
    cancelled = 0
    for me, call in enumerate(scenario.calls):
        outcome = run.outcomes[me]
        if outcome == "cancelled":
            assert call.cancel_at is not None
            cancelled += 1
            continue
        carriers = [(b, items) for b, items in run.batches if call.item in items]
        assert carriers, f"caller {me} got {outcome!r} but its item was never sent"
        if isinstance(outcome, trio.TooSlowError):
            assert scenario.batch_timeout is not None
            assert str(outcome) == (
                f"batcher 'down': batch_fn did not return within "
                f"batch_timeout={float(scenario.batch_timeout)} s"
            )
            continue
        assert any(allowed(b, items, call.item, outcome) for b, items in carriers), (
            f"caller {me} (item {call.item}) got {outcome!r} from batches {carriers}"
        )
    if not scenario.dedupe:  # each caller's item is sent at most once
        sent = [item for _, items in run.batches for item in items]
        assert len(sent) == len(set(sent))
    assert statistics.callers_served + statistics.withdrawn + statistics.dropped == len(
        scenario.calls
    )
    assert statistics.withdrawn + statistics.dropped >= cancelled
    assert (statistics.queued, statistics.in_flight, statistics.waiting_for_room) == (0, 0, 0)
