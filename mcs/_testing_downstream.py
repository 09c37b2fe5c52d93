"""A simulated downstream and a seeded open-loop load, on virtual time (W8 and the autoscale tests).

The downstream has ``workers`` parallel workers; a call of ``n`` items takes
``base + per_item * n`` seconds once a worker takes it, and calls beyond ``workers`` wait in
FIFO order (a ``trio.CapacityLimiter`` is first come, first served). That is the shape that
matters for an in-flight limit: more concurrent calls than workers buy nothing but queueing, and
a batch's time grows with its size without any queueing at all.

The load is open-loop (arrivals do not wait for earlier calls, as users of a service do not):
Poisson arrivals drawn from a seed, in phases of (seconds, arrivals per second), each arrival a
task that calls the batcher once and records when it arrived and how long it took. Arrivals are
released per 1 ms tick, which spares the virtual clock a jump per arrival.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import attrs
import trio

from ._batcher import Batcher
from ._exceptions import Overloaded

__all__ = ["Arrival", "SimulatedDownstream", "offer_load"]

_TICK = 0.001
"""Arrivals are released on a grid of this many seconds: far below the latencies measured, and
it spares the virtual clock a jump per arrival, which is most of the cost of a simulation."""


class SimulatedDownstream:
    """A batch_fn backed by ``workers`` parallel workers: ``base + per_item * n`` per call.

    Attributes:
        base: seconds every call costs, whatever its size (settable: a downstream that slows).
        per_item: seconds each item adds to a call.
        failure: an exception every call raises after its service time, or None.
        peak_waiting: the most calls that ever waited for a worker at once.
    """

    def __init__(self, workers: int, base: float, per_item: float) -> None:
        self.workers = workers
        self.base = base
        self.per_item = per_item
        self.failure: Exception | None = None
        self.peak_waiting = 0
        self._workers = trio.CapacityLimiter(workers)

    def service_time(self, size: int) -> float:
        """Seconds a call of ``size`` items takes once a worker has it."""
        return self.base + self.per_item * size

    def capacity(self, max_batch_size: int) -> float:
        """Items per second with every worker busy on full batches."""
        return self.workers * max_batch_size / self.service_time(max_batch_size)

    async def __call__(self, items: list[int]) -> list[int]:
        if self._workers.available_tokens == 0:
            waiting = self._workers.statistics().tasks_waiting + 1
            self.peak_waiting = max(self.peak_waiting, waiting)
        async with self._workers:
            await trio.sleep(self.service_time(len(items)))
        if self.failure is not None:
            raise self.failure
        return items


@attrs.frozen
class Arrival:
    """One call of the offered load: when it arrived, how long it took, whether it was served.

    ``outcome`` is ``"ok"``, ``"rejected"`` (:exc:`mcs.Overloaded`) or ``"failed"`` (any other
    exception from the call).
    """

    at: float
    latency: float
    outcome: str


async def offer_load(
    batcher: Batcher[int, int],
    phases: Sequence[tuple[float, float]],
    *,
    seed: int,
) -> list[Arrival]:
    """Offer Poisson arrivals to ``batcher``, phase by phase; return every call's record.

    ``phases`` is a sequence of (seconds, arrivals per second). Arrivals are drawn from
    ``seed`` alone, so two runs with the same seed and phases offer exactly the same calls at
    exactly the same virtual times, whatever the batcher does with them. Each call starts at
    the beginning of the 1 ms tick its arrival falls in, and its latency counts from there.
    Returns once every call has ended.
    """
    rng = random.Random(seed)
    arrivals: list[Arrival] = []

    async def call(at: float, item: int) -> None:
        try:
            await batcher(item)
        except Overloaded:
            outcome = "rejected"
        except Exception:
            outcome = "failed"
        else:
            outcome = "ok"
        arrivals.append(Arrival(at, trio.current_time() - at, outcome))

    start = trio.current_time()
    async with trio.open_nursery() as nursery:
        phase_start, item, tick = start, 0, start
        due: list[float] = []
        for seconds, rate in phases:
            phase_end = phase_start + seconds
            at = phase_start
            while rate > 0:
                at += rng.expovariate(rate)
                if at >= phase_end:
                    break
                if at >= tick + _TICK:  # release what arrived during the tick, all at once
                    await trio.sleep_until(tick)
                    for _ in due:
                        nursery.start_soon(call, tick, item)
                        item += 1
                    tick += _TICK * ((at - tick) // _TICK)
                    due.clear()
                due.append(at)
            phase_start = phase_end
        await trio.sleep_until(tick)
        for _ in due:
            nursery.start_soon(call, tick, item)
            item += 1
        await trio.sleep_until(phase_start)
    arrivals.sort(key=lambda a: a.at)
    return arrivals
