"""The ``mcs`` logger: a failed batch once per batch, malformed results, drain summaries, the
helpers for limit changes and unavailable resources; nothing on the success path but the
summary; and lines from apply and spawn code carry the request's bound context (structlog)."""

from __future__ import annotations

import importlib
import io
import logging
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog
import trio
import trio.lowlevel

import mcs
from mcs import _log

ROOT = Path(__file__).resolve().parent.parent


def records(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "mcs"]


async def echo(items: list[int]) -> list[int]:
    await trio.lowlevel.checkpoint()
    return items


async def test_the_success_path_logs_only_the_summary(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="mcs")
    async with mcs.open_batcher(echo, name="echo", max_batch_size=4) as batcher:
        async with trio.open_nursery() as nursery:
            for n in range(10):
                nursery.start_soon(batcher, n)
        assert records(caplog) == []
    assert records(caplog) == [
        (
            logging.INFO,
            "batcher 'echo' drained and closed: 3 batches, 10 items, 10 callers served, "
            "0 failed batches, 0 rejected, 0 withdrawn, 0 dropped",
        )
    ]


async def test_a_failed_batch_is_logged_once_not_once_per_caller(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def broken(items: list[int]) -> list[int]:
        raise ConnectionError("database down")

    async def call(batcher: mcs.Batcher[int, int], n: int) -> None:
        with pytest.raises(ConnectionError):
            await batcher(n)

    caplog.set_level(logging.WARNING, logger="mcs")
    async with mcs.open_batcher(broken, name="db") as batcher:
        async with trio.open_nursery() as nursery:
            for n in range(5):
                nursery.start_soon(call, batcher, n)
    (failure,) = [r for r in caplog.records if r.name == "mcs"]
    assert failure.levelno == logging.WARNING
    assert failure.getMessage() == (
        "batcher 'db': batch_fn failed for a batch of 5 items: ConnectionError('database down')"
    )
    assert failure.exc_info is not None
    assert failure.exc_info[0] is ConnectionError
    assert failure.mcs_batcher == "db"  # type: ignore[attr-defined]


async def test_a_timed_out_batch_is_logged_once(
    caplog: pytest.LogCaptureFixture, autojump_clock: trio.abc.Clock
) -> None:
    async def hangs(items: list[int]) -> list[int]:
        await trio.sleep_forever()
        raise AssertionError

    caplog.set_level(logging.WARNING, logger="mcs")
    async with mcs.open_batcher(hangs, name="slow", batch_timeout=2.0) as batcher:
        with pytest.raises(trio.TooSlowError):
            await batcher(1)
    assert records(caplog) == [
        (
            logging.WARNING,
            "batcher 'slow': batch_fn failed for a batch of 1 items: TooSlowError(\"batcher "
            "'slow': batch_fn did not return within batch_timeout=2.0 s\")",
        )
    ]


async def test_a_malformed_result_is_an_error_line(caplog: pytest.LogCaptureFixture) -> None:
    async def short(items: list[int]) -> list[int]:
        return items[:-1]

    caplog.set_level(logging.WARNING, logger="mcs")
    async with mcs.open_batcher(short, name="short") as batcher:
        with pytest.raises(mcs.BatchResultError):
            await batcher(1)
    assert records(caplog) == [
        (logging.ERROR, "batcher 'short': batch_fn returned 0 results for 1 items")
    ]


async def test_a_block_that_fails_logs_a_warning_summary(caplog: pytest.LogCaptureFixture) -> None:
    async def body() -> None:
        async with mcs.open_batcher(echo, name="aborted") as batcher:
            await batcher(1)
            raise KeyError("boom")

    caplog.set_level(logging.INFO, logger="mcs")
    with pytest.raises(KeyError):
        await body()
    assert records(caplog) == [
        (
            logging.WARNING,
            "batcher 'aborted' shut down (failed or cancelled): 1 batches, 1 items, "
            "1 callers served, 0 failed batches, 0 rejected, 0 withdrawn, 0 dropped",
        )
    ]


def test_the_limit_change_helper(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="mcs")
    _log.limit_changed("db", "max_in_flight", 4, 6, "latency stable")
    assert records(caplog) == [
        (logging.INFO, "batcher 'db': max_in_flight 4 -> 6 (latency stable)"),
    ]


async def test_redis_unavailable_and_back_is_logged_once_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A shared limit's Redis store logs the transitions, not every failed attempt."""
    from mcs.redis import _Store

    store = _Store(client=None, name="shared rate limit 'api' on Redis at redis://x", timeout=1.0)

    async def refused() -> None:
        raise ConnectionRefusedError("refused")

    async def answers() -> int:
        return 1

    caplog.set_level(logging.INFO, logger="mcs")
    for _ in range(3):
        with pytest.raises(trio.BrokenResourceError):
            await store.run(refused)
    assert await store.run(answers) == 1
    assert await store.run(answers) == 1
    assert records(caplog) == [
        (
            logging.WARNING,
            "shared rate limit 'api' on Redis at redis://x is unavailable: "
            "ConnectionRefusedError('refused'); batches follow on_unavailable meanwhile",
        ),
        (logging.INFO, "shared rate limit 'api' on Redis at redis://x is available again"),
    ]


def test_nothing_is_formatted_when_the_level_is_off(caplog: pytest.LogCaptureFixture) -> None:
    class Loud(Exception):
        def __repr__(self) -> str:
            raise AssertionError("formatted although nobody listens")

    caplog.set_level(logging.CRITICAL, logger="mcs")
    _log.batch_failed("db", Loud(), 3, None)
    _log.malformed_result("db", Loud())
    assert records(caplog) == []


# ---------------------------------------------------------------------- the request's context


@pytest.fixture
def structlog_lines(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], list[str]]]:
    """The ``app`` logger's lines as ``examples/observability.py``'s ``configure_logging``
    writes them (structlog's formatter with ``merge_contextvars``)."""
    monkeypatch.syspath_prepend(str(ROOT))
    observability = importlib.import_module("examples.observability")
    root = logging.getLogger()
    level = root.level
    stream = io.StringIO()
    handler = observability.configure_logging(logging.INFO, stream)

    def lines() -> list[str]:
        return [line for line in stream.getvalue().splitlines() if "logger='app'" in line]

    try:
        yield lines
    finally:
        root.removeHandler(handler)
        root.setLevel(level)


async def test_apply_and_spawn_lines_carry_the_request_id(
    structlog_lines: Callable[[], list[str]],
) -> None:
    """Apply functions run in a batch task when their call's result arrives, spawned nodes in
    the graph's tasks: both log with the bound context of the request they work for."""
    log = logging.getLogger("app")

    def render(user: int) -> int:
        log.info("render %d", user)
        return user

    async def audit(user: int) -> None:
        await trio.lowlevel.checkpoint()
        log.info("audit %d", user)

    async def request(batcher: mcs.Batcher[int, int], n: int) -> None:
        structlog.contextvars.bind_contextvars(request_id=f"req-{n}")
        async with mcs.open_graph() as g:
            user = g.call(batcher, n)
            g.apply(render, user)
            g.spawn(audit, user)

    async with mcs.open_batcher(echo, name="users") as batcher:
        async with trio.open_nursery() as nursery:
            for n in range(4):
                nursery.start_soon(request, batcher, n)
    suffix = " level='info' logger='app'"
    assert sorted(structlog_lines()) == sorted(
        [f"event='render {n}' request_id='req-{n}'{suffix}" for n in range(4)]
        + [f"event='audit {n}' request_id='req-{n}'{suffix}" for n in range(4)]
    )
