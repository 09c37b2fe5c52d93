"""mcs.autoscale: max_in_flight follows what the downstream can serve (virtual time).

The downstream is the W8 simulator (``mcs._testing_downstream``) at a small size: C workers,
10 ms + 1 ms per item, batches of at most 10, so a full batch takes 20 ms and C workers serve
``C * 500`` items/s. Arrivals are Poisson from a fixed seed.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from functools import partial

import pytest
import trio
import trio.testing
from hypothesis import given, settings
from hypothesis import strategies as st

import mcs
from mcs._autoscale import _Controller, _Envelope, _Interval
from mcs._testing_downstream import Arrival, SimulatedDownstream, offer_load

BASE, PER_ITEM, BATCH = 0.010, 0.001, 10
FULL_BATCH = BASE + PER_ITEM * BATCH  # 20 ms


def capacity(workers: int) -> float:
    return workers * BATCH / FULL_BATCH


async def run_load(
    downstream: SimulatedDownstream,
    phases: Sequence[tuple[float, float]],
    *,
    start_at: int = 1,
    **options: object,
) -> tuple[list[mcs.AutoscaleDecision], list[Arrival], mcs.BatcherStatistics]:
    """Offer ``phases`` of (seconds, share of capacity) with autoscale running."""
    decisions: list[mcs.AutoscaleDecision] = []
    rate = capacity(downstream.workers)
    async with mcs.open_batcher(
        downstream, max_batch_size=BATCH, max_in_flight=start_at, queue_size=500, overload="reject"
    ) as batcher:
        async with trio.open_nursery() as nursery:
            await nursery.start(
                partial(mcs.autoscale, batcher, on_decision=decisions.append, **options)  # type: ignore[arg-type]
            )
            arrivals = await offer_load(
                batcher, [(seconds, share * rate) for seconds, share in phases], seed=1
            )
            nursery.cancel_scope.cancel()
        stats = batcher.statistics()
    return decisions, arrivals, stats


def limits(decisions: Sequence[mcs.AutoscaleDecision]) -> list[int]:
    return [d.limit for d in decisions]


def served_latencies(arrivals: Sequence[Arrival], since: float) -> list[float]:
    return sorted(a.latency for a in arrivals if a.at >= since and a.outcome == "ok")


async def test_settles_within_twice_the_workers(autojump_clock: trio.testing.MockClock) -> None:
    downstream = SimulatedDownstream(4, BASE, PER_ITEM)
    decisions, arrivals, _ = await run_load(downstream, [(4.0, 0.8)])
    settled = limits(decisions)[10:]
    assert settled, decisions
    assert all(4 <= limit <= 8 for limit in settled), settled
    # the model learnt the downstream: 10 ms per call, 1 ms per item
    assert decisions[-1].base == pytest.approx(BASE, rel=0.05)
    assert decisions[-1].per_item == pytest.approx(PER_ITEM, rel=0.05)
    assert all(a.outcome == "ok" for a in arrivals)


async def test_does_not_climb_under_sustained_overload(
    autojump_clock: trio.testing.MockClock,
) -> None:
    downstream = SimulatedDownstream(4, BASE, PER_ITEM)
    decisions, arrivals, stats = await run_load(downstream, [(10.0, 2.5)], max_in_flight=64)
    assert max(limits(decisions)) <= 8, limits(decisions)
    assert all(4 <= limit <= 8 for limit in limits(decisions)[10:]), limits(decisions)
    # downstream calls stay within 3x their no-load time, though callers are turned away
    assert stats.batch_time.max <= 3 * FULL_BATCH
    assert downstream.peak_waiting <= 8
    assert any(a.outcome == "rejected" for a in arrivals)


async def test_recovers_when_the_load_drops(autojump_clock: trio.testing.MockClock) -> None:
    downstream = SimulatedDownstream(4, BASE, PER_ITEM)
    decisions, arrivals, _ = await run_load(downstream, [(2.0, 2.5), (3.0, 0.5)])
    after = [d for d in decisions if d.at >= 3.0]
    assert all(4 <= d.limit <= 8 for d in after), limits(after)
    # the backlog of the overload is gone: calls are as fast as at no load, plus one call
    assert served_latencies(arrivals, since=3.0)[-1] <= 2 * FULL_BATCH + 0.001


async def test_slow_start_doubles_until_calls_queue(
    autojump_clock: trio.testing.MockClock,
) -> None:
    downstream = SimulatedDownstream(10, BASE, PER_ITEM)
    decisions, _, _ = await run_load(downstream, [(1.0, 2.5)], max_in_flight=64)
    actions = ["slow start"] * 4 + ["hold", "shrink"]
    assert [d.action for d in decisions[:6]] == actions
    assert limits(decisions)[:6] == [2, 4, 8, 16, 16, 10]
    assert [d.at for d in decisions[:6]] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])


async def test_each_limit_change_is_logged_once(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="mcs")
    downstream = SimulatedDownstream(10, BASE, PER_ITEM)
    decisions, _, _ = await run_load(downstream, [(1.0, 2.5)], max_in_flight=64)
    changes = [d for d in decisions if d.limit != d.limit_before]
    assert len(changes) >= 5  # slow start, then a shrink
    lines = [r.getMessage() for r in caplog.records if r.name == "mcs" and "->" in r.getMessage()]
    assert [line.split(": ", 1)[1] for line in lines] == [
        f"max_in_flight {d.limit_before} -> {d.limit} ({d.action})" for d in changes
    ]


async def test_grows_to_the_maximum_while_calls_do_not_queue(
    autojump_clock: trio.testing.MockClock,
) -> None:
    downstream = SimulatedDownstream(1_000, BASE, PER_ITEM)
    decisions, _, _ = await run_load(downstream, [(1.0, 0.02)], max_in_flight=32)
    assert limits(decisions)[:5] == [2, 4, 8, 16, 32]
    assert set(limits(decisions)[5:]) == {32}
    assert downstream.peak_waiting == 0


async def test_does_not_grow_while_slots_idle(autojump_clock: trio.testing.MockClock) -> None:
    downstream = SimulatedDownstream(8, BASE, PER_ITEM)
    # about 20 calls a second, each taking a slot for 11 ms: a fifth of the time
    decisions, _, _ = await run_load(downstream, [(2.0, 0.005)], max_in_flight=32)
    assert set(limits(decisions)) == {1}
    assert {d.action for d in decisions} <= {"hold", "idle"}


async def test_relearns_a_downstream_that_got_slower_for_good(
    autojump_clock: trio.testing.MockClock,
) -> None:
    downstream = SimulatedDownstream(4, BASE, PER_ITEM)
    decisions: list[mcs.AutoscaleDecision] = []
    async with mcs.open_batcher(
        downstream, max_batch_size=BATCH, queue_size=500, overload="reject"
    ) as batcher:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(mcs.autoscale, batcher, on_decision=decisions.append))

            async def slow_down() -> None:
                await trio.sleep(2.0)
                downstream.base, downstream.per_item = 3 * BASE, 3 * PER_ITEM

            nursery.start_soon(slow_down)
            await offer_load(batcher, [(6.0, 0.5 * capacity(4))], seed=2)
            nursery.cancel_scope.cancel()
    actions = [d.action for d in decisions if d.at > 2.0]
    assert "relearn" in actions
    full = [d for d in decisions[-20:] if d.mean_size == BATCH]
    assert full
    assert all(d.expected_time == pytest.approx(3 * FULL_BATCH) for d in full)
    assert all(4 <= d.limit <= 8 for d in decisions[-10:]), limits(decisions)


async def test_failures_back_off_to_the_minimum(autojump_clock: trio.testing.MockClock) -> None:
    downstream = SimulatedDownstream(100, BASE, PER_ITEM)
    downstream.failure = OSError("downstream unavailable")
    decisions, arrivals, _ = await run_load(downstream, [(4.0, 0.1)], start_at=20, min_in_flight=2)
    assert limits(decisions)[:3] == [18, 16, 15]  # 20 * 0.9 ** k, rounded
    assert {d.action for d in decisions} <= {"back off", "idle"}
    assert limits(decisions) == sorted(limits(decisions), reverse=True)
    assert limits(decisions)[-1] == 2
    assert "ok" not in {a.outcome for a in arrivals}


async def test_timeouts_back_off(autojump_clock: trio.testing.MockClock) -> None:
    async def hangs(items: list[int]) -> list[int]:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    decisions: list[mcs.AutoscaleDecision] = []
    async with mcs.open_batcher(hangs, max_in_flight=10, batch_timeout=0.05) as batcher:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(mcs.autoscale, batcher, on_decision=decisions.append))

            async def client() -> None:
                while True:
                    with pytest.raises(trio.TooSlowError):
                        await batcher(1)

            for _ in range(20):
                nursery.start_soon(client)
            await trio.sleep(1.05)
            nursery.cancel_scope.cancel()
    assert [d.action for d in decisions] == ["back off"] * 10
    assert limits(decisions) == [9, 8, 7, 7, 6, 5, 5, 4, 4, 3]


async def test_a_hung_downstream_holds_the_limit(autojump_clock: trio.testing.MockClock) -> None:
    async def hangs(items: list[int]) -> list[int]:
        await trio.sleep_forever()
        raise AssertionError("unreachable")

    decisions: list[mcs.AutoscaleDecision] = []
    with trio.move_on_after(1.05) as scope:  # cancels the hung calls with the batcher
        async with mcs.open_batcher(hangs, max_in_flight=6) as batcher:
            async with trio.open_nursery() as nursery:
                await nursery.start(partial(mcs.autoscale, batcher, on_decision=decisions.append))
                for n in range(20):
                    nursery.start_soon(batcher, n)
    assert scope.cancelled_caught
    # nothing ended, so nothing was learnt: no growth into a downstream that does not answer
    assert [d.action for d in decisions] == ["idle"] * 10
    assert set(limits(decisions)) == {6}


async def test_recovers_after_failures_stop(autojump_clock: trio.testing.MockClock) -> None:
    downstream = SimulatedDownstream(4, BASE, PER_ITEM)
    downstream.failure = OSError("downstream unavailable")
    decisions: list[mcs.AutoscaleDecision] = []
    async with mcs.open_batcher(
        downstream, max_batch_size=BATCH, max_in_flight=4, queue_size=500, overload="reject"
    ) as batcher:
        async with trio.open_nursery() as nursery:
            await nursery.start(partial(mcs.autoscale, batcher, on_decision=decisions.append))

            async def heal() -> None:
                await trio.sleep(1.0)
                downstream.failure = None

            nursery.start_soon(heal)
            await offer_load(batcher, [(4.0, 0.8 * capacity(4))], seed=3)
            nursery.cancel_scope.cancel()
    assert decisions[9].limit == 1  # ten intervals of failures
    assert all(4 <= d.limit <= 8 for d in decisions[-10:]), limits(decisions)


async def test_bounds_are_respected(autojump_clock: trio.testing.MockClock) -> None:
    downstream = SimulatedDownstream(4, BASE, PER_ITEM)
    decisions, _, _ = await run_load(
        downstream, [(2.0, 2.5)], start_at=1, min_in_flight=3, max_in_flight=5
    )
    assert limits(decisions)[0] == 5
    assert all(3 <= d.limit <= 5 and 3 <= d.limit_before <= 5 for d in decisions)


async def test_started_once_the_initial_limit_is_set(
    autojump_clock: trio.testing.MockClock,
) -> None:
    downstream = SimulatedDownstream(4, BASE, PER_ITEM)
    async with mcs.open_batcher(downstream, max_in_flight=100) as batcher:
        async with trio.open_nursery() as nursery:
            initial = await nursery.start(partial(mcs.autoscale, batcher, max_in_flight=16))
            assert initial == batcher.max_in_flight == 16
            assert trio.current_time() == 0
            nursery.cancel_scope.cancel()


async def test_cancelling_leaves_the_limit_where_it_was(
    autojump_clock: trio.testing.MockClock,
) -> None:
    downstream = SimulatedDownstream(100, BASE, PER_ITEM)
    decisions: list[mcs.AutoscaleDecision] = []
    async with mcs.open_batcher(downstream, max_batch_size=BATCH) as batcher:
        async with trio.open_nursery() as load:
            load.start_soon(partial(offer_load, batcher, [(1.0, 2_000.0)], seed=4))
            with trio.move_on_after(0.35):
                await mcs.autoscale(batcher, on_decision=decisions.append)
            assert trio.current_time() == 0.35
            assert limits(decisions) == [2, 4, 8]
            assert batcher.max_in_flight == 8
            await trio.sleep(0.5)
            assert batcher.max_in_flight == 8


async def test_interval_is_exact(autojump_clock: trio.testing.MockClock) -> None:
    decisions: list[mcs.AutoscaleDecision] = []
    async with mcs.open_batcher(SimulatedDownstream(1, BASE, PER_ITEM)) as batcher:
        with trio.move_on_after(0.35):
            await mcs.autoscale(batcher, interval=0.1, on_decision=decisions.append)
        assert trio.current_time() == pytest.approx(0.35, abs=0)
    assert [d.at for d in decisions] == pytest.approx([0.1, 0.2, 0.3], abs=1e-12)
    assert [d.action for d in decisions] == ["idle"] * 3


def test_the_envelope_is_the_no_load_line() -> None:
    envelope = _Envelope()
    assert all(math.isnan(x) for x in envelope.line(5))
    envelope.observe(10, 0.020)
    assert envelope.line(5) == (0.020, 0.0)  # one size: no slope yet
    envelope.observe(5, 0.025)  # a smaller call that took longer was queued
    assert envelope.line(5) == (0.020, 0.0)
    envelope.observe(2, 0.012)
    assert envelope.line(5) == pytest.approx((0.010, 0.001))
    envelope.observe(5, 0.0151)  # above the model: queued, changes nothing
    envelope.observe(20, 0.040)  # above the model extended: changes nothing
    assert envelope.line(5) == envelope.line(20) == pytest.approx((0.010, 0.001))
    envelope.observe(6, 0.0155)  # below it: the hull bends at 6
    assert envelope.line(4) == pytest.approx((0.01025, 0.000875))
    assert envelope.line(8) == pytest.approx((0.00875, 0.001125))
    envelope.observe(20, 0.029)  # below the model extended: 10 is no longer on the hull
    per_item = (0.029 - 0.0155) / 14
    assert envelope.line(15) == pytest.approx((0.0155 - 6 * per_item, per_item))
    assert envelope.line(40) == envelope.line(15)
    assert envelope.line(1) == pytest.approx((0.01025, 0.000875))
    envelope.reset(10, 0.060)
    assert envelope.line(3) == (0.060, 0.0)


@pytest.mark.parametrize(
    ("options", "error", "message"),
    [
        ({"min_in_flight": 0}, ValueError, r"^min_in_flight must be >= 1, got 0$"),
        ({"min_in_flight": 1.5}, TypeError, r"^min_in_flight must be an int, got 1\.5$"),
        (
            {"min_in_flight": 4, "max_in_flight": 2},
            ValueError,
            r"^max_in_flight must be >= 4, got 2$",
        ),
        ({"interval": 0}, ValueError, r"^interval must be > 0 and finite, got 0$"),
        ({"interval": -0.1}, ValueError, r"^interval must be > 0 and finite, got -0\.1$"),
        ({"interval": math.inf}, ValueError, r"^interval must be > 0 and finite, got inf$"),
        ({"interval": 10**400}, ValueError, r"^interval must be > 0 and finite, got 10{400}$"),
        ({"interval": "1"}, TypeError, r"^interval must be a number of seconds, got '1'$"),
        ({"tolerance": 0.5}, ValueError, r"^tolerance must be >= 1\.0, got 0\.5$"),
        ({"tolerance": math.nan}, ValueError, r"^tolerance must be a finite number, got nan$"),
        ({"tolerance": 10**400}, ValueError, r"^tolerance must be a finite number, got 10{400}$"),
        ({"tolerance": "2"}, TypeError, r"^tolerance must be a finite number, got '2'$"),
        ({"tolerance": True}, TypeError, r"^tolerance must be a finite number, got True$"),
        ({"saturated_at": 2}, ValueError, r"^saturated_at must be <= 1, got 2$"),
        ({"saturated_at": -0.5}, ValueError, r"^saturated_at must be >= 0\.0, got -0\.5$"),
        (
            {"saturated_at": math.inf},
            ValueError,
            r"^saturated_at must be a finite number, got inf$",
        ),
        (
            {"on_decision": "print"},
            TypeError,
            r"^on_decision must be callable or None, got 'print'$",
        ),
    ],
)
async def test_bad_arguments(
    options: dict[str, object], error: type[Exception], message: str
) -> None:
    async with mcs.open_batcher(SimulatedDownstream(1, BASE, PER_ITEM), max_in_flight=3) as batcher:
        with pytest.raises(error, match=message):
            await mcs.autoscale(batcher, **options)  # type: ignore[arg-type]
        assert batcher.max_in_flight == 3  # rejected before touching the batcher


async def test_rejects_a_non_batcher() -> None:
    with pytest.raises(TypeError, match=r"^batcher must be a mcs\.Batcher, got 3$"):
        await mcs.autoscale(3)  # type: ignore[arg-type]


async def test_rejects_a_batcher_with_a_shared_in_flight_limit() -> None:
    pool = trio.CapacityLimiter(4)
    async with mcs.open_batcher(SimulatedDownstream(1, BASE, PER_ITEM), max_in_flight=pool) as b:
        with pytest.raises(ValueError, match=r"has a shared in-flight limit .*CapacityLimiter"):
            await mcs.autoscale(b)
        assert pool.total_tokens == 4  # untouched


# ---------------------------------------------------------------- decisions, without a scheduler


def controller(limit: float = 8.0, **options: float) -> _Controller:
    settings = {"min_in_flight": 1, "max_in_flight": 64, "tolerance": 1.5, "saturated_at": 0.9}
    return _Controller(**(settings | options), limit=limit)  # type: ignore[arg-type]


def interval(
    calls: int, size: float, time: float, *, failures: int = 0, saturated: float = 0.1
) -> _Interval:
    """0.1 s in which ``calls`` calls of ``size`` items took ``time`` each."""
    return _Interval(0.1, calls, round(calls * size), calls * time, failures, saturated)


def test_queued_calls_shrink_the_limit_to_the_concurrency_served() -> None:
    c = controller(slow_start=False)
    c.envelope.reset(10, 0.020)
    # 8 slots busy with 20 ms calls that took 40 ms: 4 served, 4 waited
    decision = c.decide(interval(20, 10, 0.040), now=1.0)
    assert (decision.action, decision.limit_before, decision.limit) == ("shrink", 8, 4)
    assert decision.queueing == pytest.approx(4.0)
    c = controller(limit=16, slow_start=False)
    c.envelope.reset(10, 0.020)
    decision = c.decide(interval(40, 10, 0.040), now=1.0)
    assert (decision.action, decision.limit) == ("shrink", 8)
    assert decision.queueing == pytest.approx(8.0)
    assert decision.expected_time == pytest.approx(0.020)
    # the next interval's calls mostly started under 16: they do not shrink it again
    assert c.decide(interval(40, 10, 0.040), now=1.1).action == "hold"
    assert c.decide(interval(40, 10, 0.040), now=1.2).action == "shrink"


def test_a_shrink_is_at_most_a_halving() -> None:
    c = controller(limit=40, slow_start=False)
    c.envelope.reset(10, 0.020)
    decision = c.decide(interval(10, 10, 0.100), now=1.0)  # 2 served, 8 waited
    assert (decision.action, decision.limit) == ("shrink", 20)


def test_growth_needs_saturated_slots_and_no_queue() -> None:
    c = controller(slow_start=False)
    c.envelope.reset(10, 0.020)
    assert c.decide(interval(40, 10, 0.020, saturated=0.08), now=1.0).action == "hold"
    assert c.decide(interval(40, 10, 0.026, saturated=0.1), now=1.1).action == "hold"
    decision = c.decide(interval(40, 10, 0.020, saturated=0.1), now=1.2)
    assert (decision.action, decision.limit) == ("grow", 9)


def test_failures_back_off_whatever_the_latency() -> None:
    c = controller(limit=10)
    decision = c.decide(interval(40, 10, 0.001, failures=1), now=1.0)
    assert (decision.action, decision.limit) == ("back off", 9)
    assert c.slow_start is False
    assert all(math.isnan(x) for x in c.envelope.line(10))  # a fast failure teaches nothing


def test_slow_calls_at_the_minimum_relearn_the_model() -> None:
    c = controller(limit=1, slow_start=False)
    c.envelope.reset(10, 0.020)
    decision = c.decide(interval(2, 10, 0.060, saturated=0.1), now=1.0)
    assert (decision.action, decision.limit) == ("relearn", 1)
    assert c.envelope.line(10) == (0.060, 0.0)


@settings(max_examples=200, deadline=None)
@given(
    bounds=st.tuples(st.integers(1, 20), st.integers(0, 50)),
    start=st.integers(1, 100),
    steps=st.lists(
        st.tuples(
            st.integers(0, 200),
            st.floats(1, 100),
            st.floats(0.001, 1.0),
            st.integers(0, 3),
            st.floats(0, 0.1),
        ),
        max_size=60,
    ),
)
def test_decisions_respect_the_bounds_and_their_signals(
    bounds: tuple[int, int], start: int, steps: list[tuple[int, float, float, int, float]]
) -> None:
    low, extra = bounds
    c = controller(limit=float(min(max(start, low), low + extra)), min_in_flight=low)
    c.max_in_flight = low + extra
    for k, (calls, size, time, failures, saturated) in enumerate(steps):
        decision = c.decide(
            interval(calls, size, time, failures=failures, saturated=saturated), now=k
        )
        assert low <= decision.limit <= low + extra
        if failures:
            assert decision.action == "back off"
            assert decision.limit <= decision.limit_before
        if decision.limit > decision.limit_before:
            assert decision.action in {"slow start", "grow"}
            assert saturated >= 0.9 * 0.1
        if decision.action == "shrink":
            assert decision.mean_time > 1.5 * decision.expected_time
            assert decision.limit <= decision.limit_before
            assert decision.limit == low or 2 * decision.limit + 1 >= decision.limit_before
