"""Properties of the batcher over generated scenarios, replayed on trio's virtual clock.

Each example runs in its own ``trio.run`` with ``MockClock(autojump_threshold=0)``; trio seeds its
scheduler from Hypothesis, so a failing example shrinks and replays. A run that would hang fails
with ``trio.TooSlowError`` instead (the autojump clock reaches the guard deadline at once).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import trio
import trio.testing
from hypothesis import given, settings
from strategies import Call, Scenario, loaded_rate_scenarios, scenarios

import mcs

RateOracle = Callable[[Sequence[tuple[float, int]], mcs.RateLimit], list[str]]
TaskLister = Callable[[], list[str]]

NAME = "downstream"
HANG_GUARD = 10_000.0
QUEUED_BROKEN = f"batcher {NAME!r} was shut down before this item was processed"
IN_FLIGHT_BROKEN = f"batcher {NAME!r} was shut down while this item was in flight"
CLOSED = f"batcher {NAME!r} is closed"
CLOSED_WAITING = f"batcher {NAME!r} closed before this item was accepted"

PROPERTY_SETTINGS = settings(max_examples=150, deadline=None)


class ItemError(Exception):
    """The per-item error the fake downstream returns for an item."""

    def __init__(self, item: int) -> None:
        super().__init__(f"item {item} failed")
        self.item = item


class BatchFailed(Exception):
    """What the fake downstream raises for a whole batch."""

    def __init__(self, number: int) -> None:
        super().__init__(f"batch {number} failed")
        self.number = number


class BlockFailed(Exception):
    """Raised by the batcher's block to abort it."""


def value_of(item: int) -> int:
    return item * 10 + 7


@dataclass
class Batch:
    number: int
    items: list[int]
    started: float
    ended: float = math.nan  # when batch_fn returned, raised or was cancelled
    completed: bool = False  # False if batch_fn was cancelled


@dataclass(frozen=True)
class Outcome:
    kind: Literal["value", "error", "cancelled"]
    result: object
    at: float


@dataclass
class Replay:
    """Plays a scenario against a real batcher and records everything observable."""

    scenario: Scenario
    mcs_tasks: TaskLister
    inside: bool = False  # callers inside the block, which ends once they are all done
    batches: list[Batch] = field(default_factory=list)
    outcomes: dict[int, Outcome] = field(default_factory=dict)
    running: int = 0
    violations: list[str] = field(default_factory=list)
    batcher: mcs.Batcher[int, int] | None = None
    closed_at: float = math.nan
    final: mcs.BatcherStatistics | None = None
    tasks_after_block: list[str] = field(default_factory=list)
    settled: mcs.BatcherStatistics | None = None
    tasks_when_settled: list[str] = field(default_factory=list)

    async def batch_fn(
        self, items: list[int]
    ) -> Sequence[int | BaseException] | Mapping[int, int | BaseException]:
        assert self.batcher is not None
        down = self.scenario.downstream
        batch = Batch(len(self.batches), list(items), trio.current_time())
        self.batches.append(batch)
        self.running += 1
        if self.running > self.batcher.max_in_flight:
            self.violations.append(
                f"batch {batch.number} started with {self.running} running, "
                f"max_in_flight={self.batcher.max_in_flight}"
            )
        try:
            await trio.sleep(down.durations[batch.number % len(down.durations)])
            batch.completed = True
        finally:
            self.running -= 1
            batch.ended = trio.current_time()
        if batch.number in down.failing_batches:
            raise BatchFailed(batch.number)
        errors = down.error_items
        if down.shape == "list":
            return [ItemError(x) if x in errors else value_of(x) for x in items]
        if down.shape == "dict":
            return {x: ItemError(x) if x in errors else value_of(x) for x in items}
        return {x: value_of(x) for x in items if x not in errors}

    async def caller(self, key: int, call: Call) -> None:
        await trio.sleep_until(call.at)
        assert self.batcher is not None
        deadline = math.inf if call.cancel_at is None else call.cancel_at
        with trio.CancelScope(deadline=deadline) as scope:
            try:
                value = await self.batcher(call.item)
            except Exception as exc:
                self.outcomes[key] = Outcome("error", exc, trio.current_time())
            else:
                self.outcomes[key] = Outcome("value", value, trio.current_time())
        if scope.cancelled_caught:
            self.outcomes[key] = Outcome("cancelled", None, trio.current_time())

    async def change_limit(self, at: float, limit: int) -> None:
        await trio.sleep_until(at)
        assert self.batcher is not None
        self.batcher.max_in_flight = limit

    async def play(self) -> None:
        scenario, config = self.scenario, self.scenario.config
        with trio.fail_after(HANG_GUARD):
            async with trio.open_nursery() as outside:
                try:
                    async with mcs.open_batcher(
                        self.batch_fn,
                        max_batch_size=config.max_batch_size,
                        max_wait=config.max_wait,
                        max_in_flight=config.max_in_flight,
                        rate=config.rate,
                        queue_size=config.queue_size,
                        overload=config.overload,
                        dedupe=config.dedupe,
                        name=NAME,
                    ) as batcher:
                        self.batcher = batcher
                        for at, limit in scenario.limit_changes:
                            outside.start_soon(self.change_limit, at, limit)
                        if self.inside:
                            await self._callers_inside(batcher)
                        else:
                            for key, call in enumerate(scenario.calls):
                                outside.start_soon(self.caller, key, call)
                            await trio.sleep_until(scenario.close_at)
                            if scenario.abort:
                                raise BlockFailed
                except BlockFailed:
                    pass
                self.closed_at = trio.current_time()
            self.final = batcher.statistics()
            self.tasks_after_block = self.mcs_tasks()

    async def _callers_inside(self, batcher: mcs.Batcher[int, int]) -> None:
        async with trio.open_nursery() as nursery:
            for key, call in enumerate(self.scenario.calls):
                nursery.start_soon(self.caller, key, call)
        # Every caller is done, so nothing is queued any more; batches whose callers all left
        # may still be running, for at most the longest batch duration.
        await trio.sleep(max(self.scenario.downstream.durations))
        await trio.testing.wait_all_tasks_blocked()
        self.settled = batcher.statistics()
        self.tasks_when_settled = self.mcs_tasks()


def replay(scenario: Scenario, mcs_tasks: TaskLister, *, inside: bool = False) -> Replay:
    run = Replay(scenario, mcs_tasks, inside=inside)
    trio.run(run.play, clock=trio.testing.MockClock(autojump_threshold=0))
    return run


def check_batches(run: Replay, rate_bound_violations: RateOracle) -> None:
    """Batch sizes, in-flight bound, rate bound and first-come-first-served order."""
    config = run.scenario.config
    cap = config.max_batch_size
    if config.rate is not None and config.rate.unit == "item":
        cap = min(cap, config.rate.burst)
    for batch in run.batches:
        assert 1 <= len(batch.items) <= cap, batch
        if config.dedupe:
            assert len(set(batch.items)) == len(batch.items), batch
    assert run.violations == []
    if config.rate is not None:
        per_item = config.rate.unit == "item"
        starts = [(b.started, len(b.items) if per_item else 1) for b in run.batches]
        assert rate_bound_violations(starts, config.rate) == []
    if not config.dedupe:
        arrival = {call.item: call.at for call in run.scenario.calls}
        for batch in run.batches:
            times = [arrival[item] for item in batch.items]
            assert times == sorted(times), f"batch {batch} is not in arrival order"
        for a in run.batches:
            for b in run.batches:
                if a.started < b.started:
                    latest_a = max(arrival[item] for item in a.items)
                    earliest_b = min(arrival[item] for item in b.items)
                    assert latest_a <= earliest_b, f"{b} overtook {a}"


def check_outcomes(run: Replay, *, close_at: float, abort: bool) -> None:
    """Each caller got exactly its own result or error, consistent with what was sent."""
    scenario, config, down = run.scenario, run.scenario.config, run.scenario.downstream
    dedupe = config.dedupe
    sent: Counter[int] = Counter()
    for batch in run.batches:
        sent.update(batch.items)
    if not dedupe:
        assert max(sent.values(), default=0) <= 1, "an item was sent twice"

    counts: Counter[str] = Counter()
    for key, call in enumerate(scenario.calls):
        outcome = run.outcomes.get(key)
        assert outcome is not None, f"caller {key} ({call}) never finished"
        item = call.item
        # With dedupe a caller may also join its item while that item is in flight: any
        # batch carrying it that was still running when the call came counts.
        carried = [
            b
            for b in run.batches
            if item in b.items
            and (b.started >= call.at or (dedupe and (not b.completed or b.ended >= call.at)))
        ]

        def delivered_by(batch: Batch, outcome: Outcome = outcome) -> bool:
            return (
                batch.completed
                and batch.ended == outcome.at
                and batch.number not in down.failing_batches
            )

        where = f"caller {key} ({call}) got {outcome}"
        if outcome.kind == "value":
            assert outcome.result == value_of(item), where
            assert item not in down.error_items, where
            assert any(delivered_by(b) for b in carried), where
            counts["served"] += 1
            continue
        if outcome.kind == "cancelled":
            assert outcome.at == call.cancel_at, where
            counts["cancelled"] += 1
            if not dedupe:
                counts["dropped" if item in sent else "withdrawn"] += 1
            continue
        error = outcome.result
        assert isinstance(error, Exception), where
        if isinstance(error, ItemError):
            assert down.shape in ("list", "dict"), where
            assert item in down.error_items, where
            assert error.item == item, where
            assert any(delivered_by(b) for b in carried), where
            counts["served"] += 1
        elif isinstance(error, mcs.BatchResultError):
            assert down.shape == "dict-missing", where
            assert item in down.error_items, where
            assert str(error) == (
                f"batcher {NAME!r}: batch_fn's result has no entry for item {item!r}"
            ), where
            assert any(delivered_by(b) for b in carried), where
            counts["served"] += 1
        elif isinstance(error, BatchFailed):
            assert error.number in down.failing_batches, where
            failed = run.batches[error.number]
            assert item in failed.items, where
            assert failed in carried, where
            assert failed.completed, where
            assert failed.ended == outcome.at, where
            counts["served"] += 1
        elif isinstance(error, mcs.Overloaded):
            assert config.overload == "reject", where
            full = f"batcher {NAME!r} is full ({config.queue_size} items queued)"
            assert str(error) == full, where
            assert outcome.at == call.at, where
            assert dedupe or item not in sent, where
            counts["rejected"] += 1
        elif isinstance(error, trio.BrokenResourceError):
            assert abort, where
            assert outcome.at == close_at, where
            assert call.at < close_at, where
            assert str(error) in (QUEUED_BROKEN, IN_FLIGHT_BROKEN), where
            if str(error) == IN_FLIGHT_BROKEN:
                counts["served"] += 1
                assert dedupe or any(not b.completed for b in carried), where
            else:
                assert dedupe or item not in sent, where
        elif isinstance(error, trio.ClosedResourceError):
            if str(error) == CLOSED:
                assert call.at > close_at, where
                assert outcome.at == call.at, where
            else:
                # Only a normal exit turns away callers still waiting for room.
                assert str(error) == CLOSED_WAITING, where
                assert not abort, where
                assert config.overload == "block", where
                assert outcome.at == close_at, where
        else:
            raise AssertionError(f"unexpected error: {where}")

    final = run.final
    assert final is not None
    assert (final.queued, final.waiting_for_room, final.in_flight) == (0, 0, 0)
    assert final.batches == len(run.batches)
    assert final.items == sum(len(b.items) for b in run.batches)
    assert final.peak_batch_size == max((len(b.items) for b in run.batches), default=0)
    assert final.failed_batches == sum(
        b.completed and b.number in down.failing_batches for b in run.batches
    )
    assert math.isclose(
        final.busy_time, math.fsum(b.ended - b.started for b in run.batches), abs_tol=1e-9
    )
    assert final.callers_served == counts["served"]
    assert final.rejected == counts["rejected"]
    if dedupe:
        assert final.withdrawn + final.dropped == counts["cancelled"]
    else:
        assert (final.withdrawn, final.dropped) == (counts["withdrawn"], counts["dropped"])
    assert run.tasks_after_block == []


@PROPERTY_SETTINGS
@given(scenario=scenarios())
def test_every_caller_gets_exactly_its_own_outcome(
    scenario: Scenario, mcs_tasks: TaskLister, rate_bound_violations: RateOracle
) -> None:
    run = replay(scenario, mcs_tasks)
    check_batches(run, rate_bound_violations)
    check_outcomes(run, close_at=scenario.close_at, abort=scenario.abort)
    if scenario.abort:
        assert run.closed_at == scenario.close_at
    else:
        assert run.closed_at >= scenario.close_at


@PROPERTY_SETTINGS
@given(scenario=scenarios(abort=False))
def test_cancellations_leave_nothing_behind_while_open(
    scenario: Scenario, mcs_tasks: TaskLister, rate_bound_violations: RateOracle
) -> None:
    run = replay(scenario, mcs_tasks, inside=True)
    check_batches(run, rate_bound_violations)
    check_outcomes(run, close_at=math.inf, abort=False)
    settled = run.settled
    assert settled is not None
    assert (settled.queued, settled.waiting_for_room, settled.in_flight) == (0, 0, 0)
    assert run.tasks_when_settled == [f"mcs.Batcher({NAME}).dispatcher"]


@PROPERTY_SETTINGS
@given(scenario=loaded_rate_scenarios())
def test_rate_bound_holds_exactly_and_nobody_is_dropped(
    scenario: Scenario, mcs_tasks: TaskLister, rate_bound_violations: RateOracle
) -> None:
    run = replay(scenario, mcs_tasks)
    check_batches(run, rate_bound_violations)
    check_outcomes(run, close_at=scenario.close_at, abort=False)
    assert [run.outcomes[key].kind for key in range(len(scenario.calls))] == (
        ["value"] * len(scenario.calls)
    )
