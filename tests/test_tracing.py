"""OpenTelemetry: a root span per batch_fn call, linked to its callers' spans, never parented to
the lifespan; under the real HTTP example with the ASGI instrumentation; off without a provider.
"""

from __future__ import annotations

import functools
import importlib
import json
import subprocess
import sys
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.lowlevel
from opentelemetry import trace
from opentelemetry.instrumentation.asgi import OpenTelemetryMiddleware
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind, StatusCode
from opentelemetry.util._once import Once

import mcs
from mcs._tracing import active_tracer

ROOT = Path(__file__).resolve().parent.parent


def _reset_provider() -> None:
    # opentelemetry lets a process set its provider once; its own tests reset it like this
    trace._TRACER_PROVIDER_SET_ONCE = Once()
    trace._TRACER_PROVIDER = None


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    _reset_provider()
    trace.set_tracer_provider(provider)
    try:
        yield exporter
    finally:
        _reset_provider()
        provider.shutdown()


def batch_spans(spans: InMemorySpanExporter | Sequence[ReadableSpan]) -> list[ReadableSpan]:
    if isinstance(spans, InMemorySpanExporter):
        spans = spans.get_finished_spans()
    return [s for s in spans if s.name.startswith("mcs.batch ")]


def span_id(span: ReadableSpan) -> int:
    assert span.context is not None
    return int(span.context.span_id)


def linked(span: ReadableSpan) -> set[int]:
    return {link.context.span_id for link in span.links}


def tracer() -> trace.Tracer:
    return trace.get_tracer("tests")  # of the provider set now (a ProxyTracer would stick)


async def test_off_without_a_tracer_provider() -> None:
    _reset_provider()
    assert active_tracer() is None

    async def echo(items: list[int]) -> list[int]:
        assert not trace.get_current_span().get_span_context().is_valid
        return items

    async with mcs.open_batcher(echo) as batcher:
        assert await batcher(1) == 1


def test_mcs_never_imports_opentelemetry() -> None:
    code = (
        "import sys, trio, mcs\n"
        "async def echo(items): return items\n"
        "async def main():\n"
        "    async with mcs.open_batcher(echo) as b:\n"
        "        await b(1)\n"
        "trio.run(main)\n"
        "print(sorted(m for m in sys.modules if m.startswith('opentelemetry')))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    assert result.stdout == "[]\n"


async def test_a_batch_is_a_root_span_linked_to_each_caller(
    spans: InMemorySpanExporter,
) -> None:
    async def echo(items: list[int]) -> list[int]:
        with tracer().start_as_current_span("query"):
            return items

    async def request(batcher: mcs.Batcher[int, int], n: int) -> None:
        with tracer().start_as_current_span(f"request {n}"):
            assert await batcher(n) == n

    with tracer().start_as_current_span("lifespan"):  # what the batcher's tasks inherit
        async with mcs.open_batcher(echo, name="echo") as batcher:
            async with trio.open_nursery() as nursery:
                for n in range(3):
                    nursery.start_soon(request, batcher, n)
            await request(batcher, 3)  # a batch of its own
    finished = {s.name: s for s in spans.get_finished_spans()}
    first, second = batch_spans(spans)
    assert first.name == second.name == "mcs.batch echo"
    assert first.parent is None
    assert second.parent is None
    assert linked(first) == {span_id(finished[f"request {n}"]) for n in range(3)}
    assert linked(second) == {span_id(finished["request 3"])}
    assert dict(first.attributes or {}) == {
        "mcs.batcher": "echo",
        "mcs.batch.size": 3,
        "mcs.batch.callers": 3,
        "mcs.queue_wait.max": pytest.approx(first.attributes["mcs.queue_wait.max"]),  # type: ignore[index]
        "mcs.outcome": "value",
    }
    assert first.attributes is not None
    assert first.attributes["mcs.queue_wait.max"] >= 0  # type: ignore[operator]
    # spans opened inside batch_fn are children of the batch
    query_parents = [
        s.parent.span_id if s.parent else None
        for s in spans.get_finished_spans()
        if s.name == "query"
    ]
    assert query_parents == [span_id(first), span_id(second)]


async def test_a_failed_batch_is_an_error_span(spans: InMemorySpanExporter) -> None:
    async def broken(items: list[int]) -> list[int]:
        raise ValueError("down")

    async with mcs.open_batcher(broken, name="broken") as batcher:
        with pytest.raises(ValueError, match=r"^down$"):
            await batcher(1)
    (span,) = batch_spans(spans)
    assert span.status.status_code == StatusCode.ERROR
    assert span.attributes is not None
    assert span.attributes["mcs.outcome"] == "error"
    assert [event.name for event in span.events] == ["exception"]


async def test_a_timed_out_batch_is_cancelled(
    spans: InMemorySpanExporter, autojump_clock: trio.abc.Clock
) -> None:
    async def hangs(items: list[int]) -> list[int]:
        await trio.sleep_forever()
        raise AssertionError

    async with mcs.open_batcher(hangs, batch_timeout=1.0) as batcher:
        with pytest.raises(trio.TooSlowError):
            await batcher(1)
    (span,) = batch_spans(spans)
    assert span.attributes is not None
    assert span.attributes["mcs.outcome"] == "cancelled"


async def test_graph_nodes_and_shared_items_link_every_request(
    spans: InMemorySpanExporter,
) -> None:
    async def echo(items: list[int]) -> list[int]:
        return items

    async def request(batcher: mcs.Batcher[int, int], n: int) -> None:
        with tracer().start_as_current_span(f"request {n}"):
            async with mcs.open_graph() as g:
                same = g.call(batcher, 7)  # every request: one shared item
                own = g.call(batcher, n)
                assert (await same, await own) == (7, n)

    async with mcs.open_batcher(echo, name="shared", dedupe=True) as batcher:
        async with trio.open_nursery() as nursery:
            for n in range(3):
                nursery.start_soon(request, batcher, n)
    (batch,) = batch_spans(spans)
    assert batch.attributes is not None
    assert batch.attributes["mcs.batch.size"] == 4  # 7, 0, 1, 2
    assert batch.attributes["mcs.batch.callers"] == 6
    by_name = {s.name: span_id(s) for s in spans.get_finished_spans()}
    assert linked(batch) == {by_name[f"request {n}"] for n in range(3)}


# ---------------------------------------------------------------------- the HTTP example


def path(span: ReadableSpan) -> object:
    attributes = span.attributes or {}
    return attributes.get("url.path", attributes.get("http.target"))


def get(port: int, path: str) -> tuple[int, Any]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=30) as answer:
            return answer.status, json.load(answer)
    except urllib.error.HTTPError as error:
        with error:
            return error.code, json.load(error)


def in_a_lifespan_span(app: Any) -> Any:
    """The app, with its lifespan (where the batchers open) in a span, as an app may do."""

    async def wrapped(scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            with tracer().start_as_current_span("lifespan"):
                await app(scope, receive, send)
        else:
            await app(scope, receive, send)

    return wrapped


async def test_the_http_example_links_batches_to_request_spans(
    spans: InMemorySpanExporter, monkeypatch: pytest.MonkeyPatch
) -> None:
    """hypercorn serves the example behind OpenTelemetry's ASGI middleware, which opens a server
    span per request; a posts batch links exactly the requests of its items (each user id is
    requested once), a users batch only requests of its items or of their best friends."""
    from hypercorn.config import Config
    from hypercorn.trio import serve

    monkeypatch.syspath_prepend(str(ROOT))
    example = importlib.import_module("examples.http_service")
    # which batch span carried which ids: batch_fn's worker thread runs in its context
    carried: dict[tuple[str, int], list[int]] = {}

    def recording(table: str, method: Any) -> Any:
        @functools.wraps(method)
        def record(db: Any, ids: list[int]) -> Any:
            key = (table, trace.get_current_span().get_span_context().span_id)
            carried.setdefault(key, []).extend(ids)
            return method(db, ids)

        return record

    monkeypatch.setattr(example.Database, "users", recording("users", example.Database.users))
    monkeypatch.setattr(example.Database, "posts", recording("posts", example.Database.posts))
    app: Any = OpenTelemetryMiddleware(in_a_lifespan_span(example.observe(example.App(users=150))))
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    stop = trio.Event()
    ids = list(range(1, 121))
    answers: dict[int, tuple[int, Any]] = {}
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            binds = await nursery.start(
                functools.partial(serve, app, config, shutdown_trigger=stop.wait)
            )
            port = int(binds[0].rsplit(":", 1)[1])
            limiter = trio.CapacityLimiter(16)

            async def one(i: int) -> None:
                path = f"/users/{i}"
                answers[i] = await trio.to_thread.run_sync(get, port, path, limiter=limiter)

            async with trio.open_nursery() as driver:
                for i in ids:
                    driver.start_soon(one, i)
            stop.set()
    assert all(status == 200 for status, _ in answers.values())
    finished = spans.get_finished_spans()
    servers = {
        span_id(s): int(str(path(s)).rsplit("/", 1)[1])
        for s in finished
        if s.kind == SpanKind.SERVER
    }
    assert sorted(servers.values()) == ids
    batches = batch_spans(finished)
    assert batches
    assert all(b.parent is None for b in batches)
    best_friend = {i: page["user"]["best_friend"] for i, (_, page) in answers.items()}
    posts_linked: set[int] = set()
    for batch in batches:
        table = batch.name.removeprefix("mcs.batch ")
        items = carried[(table, span_id(batch))]
        requests = {servers[s] for s in linked(batch)}
        assert len(batch.links) == len(requests)
        if table == "posts":
            assert requests == set(items)
            posts_linked |= requests
        else:
            assert all(r in items or best_friend[r] in items for r in requests)
    assert posts_linked == set(ids)


async def test_a_spawned_node_is_a_child_span_of_its_request(
    spans: InMemorySpanExporter,
) -> None:
    async def fetch(n: int) -> int:
        await trio.lowlevel.checkpoint()
        with tracer().start_as_current_span("inside"):
            return n + 1

    async def request(n: int) -> None:
        with tracer().start_as_current_span(f"request {n}"):
            async with mcs.open_graph() as g:
                node = g.spawn(fetch, n, name="fetch")
                assert await node == n + 1

    async with trio.open_nursery() as nursery:
        for n in range(2):
            nursery.start_soon(request, n)
    finished = spans.get_finished_spans()
    by_id = {span_id(s): s for s in finished}
    spawned = [s for s in finished if s.name == "mcs.spawn fetch"]
    assert len(spawned) == 2
    assert {by_id[s.parent.span_id].name for s in spawned if s.parent} == {"request 0", "request 1"}
    inside = [s for s in finished if s.name == "inside"]
    assert {s.parent.span_id for s in inside if s.parent} == {span_id(s) for s in spawned}


async def test_a_spawned_node_of_an_untraced_request_has_no_span(
    spans: InMemorySpanExporter,
) -> None:
    async def fetch(n: int) -> int:
        await trio.lowlevel.checkpoint()
        return n + 1

    async with mcs.open_graph() as g:  # no span is current
        assert await g.spawn(fetch, 1, name="fetch") == 2
    assert spans.get_finished_spans() == ()
