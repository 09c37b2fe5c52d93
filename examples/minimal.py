"""The smallest mcs program: many concurrent callers, one batched downstream.

Two hundred tasks each ask for one value. The downstream (here a fake one that takes 10 ms per
call, whatever the number of items) is called once per *batch*, not once per caller: the items
queued while a call is in flight leave together, up to ``max_batch_size`` at a time, so 200
callers cost 4 downstream calls instead of 200.

Run it with ``python examples/minimal.py``.
"""

from __future__ import annotations

import trio

import mcs

CALLERS = 200


async def fetch_squares(numbers: list[int]) -> list[int]:
    """The downstream: one round trip for a whole batch, results aligned with the items."""
    await trio.sleep(0.01)
    return [n * n for n in numbers]


async def main() -> None:
    results: dict[int, int] = {}

    async with mcs.open_batcher(fetch_squares, max_batch_size=50, name="squares") as squares:

        async def caller(n: int) -> None:
            results[n] = await squares(n)  # reads like a plain call, is served in a batch

        async with trio.open_nursery() as nursery:
            for n in range(CALLERS):
                nursery.start_soon(caller, n)

        stats = squares.statistics()

    assert all(results[n] == n * n for n in range(CALLERS))
    print(f"{len(results)} results, e.g. 7 -> {results[7]}, 199 -> {results[199]}")
    print(
        f"batcher {stats.name!r}: {stats.callers_served} callers served by {stats.batches} "
        f"downstream calls; mean batch size {stats.mean_batch_size:.1f}, "
        f"peak {stats.peak_batch_size}"
    )
    print(
        f"queue wait p50 {stats.queue_wait.p50 * 1e3:.1f} ms, p99 {stats.queue_wait.p99 * 1e3:.1f} "
        f"ms; batch time p50 {stats.batch_time.p50 * 1e3:.1f} ms"
    )


if __name__ == "__main__":
    trio.run(main)
