"""A real SIGINT delivered while mcs holds its KeyboardInterrupt guard.

The guard rails test asserts ``currently_ki_protected()`` where delivery runs; this sends the
signal itself at that moment (from user code that mcs runs inside a protected region), so it also
catches a build of mcs whose functions trio can no longer see as protected (trio marks code
objects and walks Python frames; a function without either is invisible to it).
"""

from __future__ import annotations

import signal
import traceback

import pytest
import trio

import mcs

REQUESTS = 5


class Interrupter:
    """Sends SIGINT once, from inside whatever mcs calls it from, noting the protection."""

    def __init__(self) -> None:
        self.protected: bool | None = None

    def __call__(self) -> None:
        if self.protected is None:
            self.protected = trio.lowlevel.currently_ki_protected()
            signal.raise_signal(signal.SIGINT)  # trio's handler runs before the next bytecode


def test_sigint_during_delivery_is_deferred_until_it_is_safe() -> None:
    """SIGINT from an apply that delivery runs: trio must defer it (mcs is waking callers) and
    raise it into the main task afterwards, not inside the apply halfway through delivery."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        pytest.skip("trio installs its SIGINT handler only over Python's default one")
    interrupter = Interrupter()
    results: list[int] = []

    async def batch_fn(items: list[int]) -> list[int]:
        return [item * 10 for item in items]

    def plus_one(value: int) -> int:
        interrupter()
        return value + 1

    async def request(batcher: mcs.Batcher[int, int], i: int) -> None:
        async with mcs.open_graph() as g:
            node = g.apply(plus_one, g.call(batcher, i))
        results.append(node.result)

    async def main() -> None:
        with trio.fail_after(5):
            async with mcs.open_batcher(batch_fn) as batcher, trio.open_nursery() as nursery:
                for i in range(REQUESTS):
                    nursery.start_soon(request, batcher, i)

    with pytest.raises(BaseException) as caught:  # noqa: PT011 - checked just below
        trio.run(main)
    error = caught.value
    errors = error.exceptions if isinstance(error, BaseExceptionGroup) else (error,)
    assert [type(e) for e in errors] == [KeyboardInterrupt]
    assert interrupter.protected is True
    raised_in = [frame.name for frame in traceback.extract_tb(errors[0].__traceback__)]
    assert "plus_one" not in raised_in  # deferred, not raised where the signal arrived
    assert all(result % 10 == 1 for result in results)  # nobody got a half-made result


def test_the_probe_is_not_protected_in_plain_user_code() -> None:
    seen: list[bool] = []

    async def main() -> None:
        seen.append(trio.lowlevel.currently_ki_protected())

    trio.run(main)
    assert seen == [False]
