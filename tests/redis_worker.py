"""One worker process of the multi-process Redis tests (run as a script, not collected).

``python redis_worker.py URL KIND DURATION``: once connected, it prints ``"ready"`` and reads
a wall-clock start time from stdin; from then on, for ``DURATION`` seconds, 20 callers keep a
batcher busy. The batcher shares, through Redis, a rate limit (``KIND=rate``:
``RateLimit(100, per=1, burst=5)``) or an in-flight budget of 3 (``KIND=in_flight``: calls of
20 ms, leases of 2 s; ``KIND=hold``: calls that never end). It prints the ``[start, end]``
wall-clock times of its batch_fn calls and the worst lateness of a 5 ms timer in the process
(``{"calls": [...], "stall": seconds}``) or, for ``hold``, ``"held"`` once it holds the whole
budget.
"""

from __future__ import annotations

import json
import sys
import time

import trio

import mcs
import mcs.redis

RATE = mcs.RateLimit(100, per=1, burst=5)
IN_FLIGHT = 3


async def main(url: str, kind: str, duration: float) -> None:
    calls: list[list[float]] = []
    stalls: list[float] = [0.0]

    async def batch_fn(items: list[int]) -> list[int]:
        call = [time.time(), 0.0]
        calls.append(call)
        if kind == "hold":
            if len(calls) == IN_FLIGHT:
                print(json.dumps("held"), flush=True)
            await trio.sleep_forever()
        await trio.sleep(0.02 if kind == "in_flight" else 0.001)
        call[1] = time.time()
        return items

    async def caller(batcher: mcs.Batcher[int, int], deadline: float) -> None:
        while time.time() < deadline:
            await batcher(1)

    async def probe(deadline: float) -> None:
        """How late this process wakes from a timer: its scheduling delay, for the test's
        allowance."""
        while time.time() < deadline:
            due = time.time() + 0.005
            await trio.sleep(0.005)
            stalls.append(time.time() - due)

    async def run(**limits: object) -> None:
        size = 1 if kind == "hold" else 10
        async with mcs.open_batcher(batch_fn, max_batch_size=size, **limits) as batcher:  # type: ignore[arg-type]
            print(json.dumps("ready"), flush=True)
            start_at = float(await trio.to_thread.run_sync(sys.stdin.readline))
            await trio.sleep(max(0.0, start_at - time.time()))
            async with trio.open_nursery() as nursery:
                for _ in range(20):
                    nursery.start_soon(caller, batcher, start_at + duration)
                nursery.start_soon(probe, start_at + duration)

    if kind == "rate":
        async with mcs.redis.open_shared_rate(url, "workers", RATE) as rate:
            await run(rate=rate, max_in_flight=4)
    else:
        lease = 2.0
        async with mcs.redis.open_shared_in_flight(url, "workers", IN_FLIGHT, lease=lease) as slots:
            await run(max_in_flight=slots)
    print(json.dumps({"calls": calls, "stall": max(stalls)}), flush=True)


if __name__ == "__main__":
    url, kind, duration = sys.argv[1:4]
    trio.run(main, url, kind, float(duration))
