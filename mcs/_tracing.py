"""OpenTelemetry spans for batches: one span per batch_fn call, linked to every caller's span.

The problem: a batch serves many requests at once, so it cannot be a child of any one of them,
and a span opened inside batch_fn is a child of whatever was current when the batcher's tasks
started: the app's lifespan, which then holds every batch of the process. The standard answer
for batched work is links: the batch gets a span of its own, ``mcs.batch <name>``, a new root
(no parent), with one link to the current span of each request waiting for it, and attributes
that say what it was (``mcs.batcher``, ``mcs.batch.size``, ``mcs.batch.callers``,
``mcs.queue_wait.max``, ``mcs.outcome``). The span is current while batch_fn runs, so spans that
batch_fn's own code opens (a database client's) are its children.

When it is on: opentelemetry-api is already imported by the application (mcs never imports it)
and a tracer provider has been set. Otherwise every batch pays one dictionary lookup (and, once
OpenTelemetry is imported, one call to ``get_tracer_provider``); nothing at all is done per item.
When it is on, each caller's span is read at batch start from the request's context
(``_Request._request_contexts``): a parked caller's context is the one it called in; a graph
node's is its request task's, whose current span is the request's own while it waits for its
graph. A caller that joins an item already in flight (``dedupe``) is not linked: its batch span
had started.

Graph nodes: a spawned node of a traced request runs in a span ``mcs.spawn <node name>``, a
child of the request's current span (its task runs in a copy of the request's context); a
spawned node of a request with no recording span gets none. That is one lookup per spawned
task, which costs a task anyway. Call nodes are the batch spans' links; apply nodes, quick sync
functions that cost no task, get no span of their own (a span each would cost more than the
node).
"""

from __future__ import annotations

import sys
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

    from ._requests import _Request

__all__ = ["active_tracer", "traced", "traced_spawn"]

_provider: object = None
_tracer: Tracer | None = None


def active_tracer() -> Tracer | None:
    """The tracer for the next batch or spawned node, or None when tracing is off."""
    trace = sys.modules.get("opentelemetry.trace")
    if trace is None:
        return None
    return _tracer_of(trace)


def _tracer_of(trace: Any) -> Tracer | None:
    global _provider, _tracer
    provider = trace.get_tracer_provider()
    if provider is not _provider:
        if isinstance(provider, trace.ProxyTracerProvider | trace.NoOpTracerProvider):
            return None
        from . import __version__

        _provider, _tracer = provider, provider.get_tracer("mcs", __version__)
    return _tracer


def traced(
    tracer: Tracer,
    batch_fn: Callable[[list[Any]], Awaitable[Any]],
    name: str,
    records: Sequence[_Request[Any, Any]],
    started: float,
) -> Callable[[list[Any]], Awaitable[Any]]:
    """``batch_fn`` run in a span of its own, linked to the callers of ``records``.

    The links and attributes are taken now, at batch start; the function returned holds them,
    not the records.
    """
    from opentelemetry import context, trace

    get_current_span = trace.get_current_span
    links: list[trace.Link] = []
    seen: set[tuple[int, int]] = set()
    callers = 0
    for request in records:
        for request_context in request._request_contexts():
            callers += 1
            span_context = request_context.run(get_current_span).get_span_context()
            key = (span_context.trace_id, span_context.span_id)
            if span_context.is_valid and key not in seen:
                seen.add(key)
                links.append(trace.Link(span_context))
    attributes: dict[str, str | int | float] = {
        "mcs.batcher": name,
        "mcs.batch.size": len(records),
        "mcs.batch.callers": callers,
        "mcs.queue_wait.max": max((started - request.t0 for request in records), default=0.0),
    }

    async def call(items: list[Any]) -> Any:
        span = tracer.start_span(
            f"mcs.batch {name}",
            context=context.Context(),  # a new root, whatever the batcher's task inherited
            links=links,
            attributes=attributes,
        )
        with trace.use_span(span, end_on_exit=True):  # records an Exception, status ERROR
            try:
                results = await batch_fn(items)
            except Exception:
                span.set_attribute("mcs.outcome", "error")
                raise
            except BaseException:  # cancelled: batch_timeout, cancel_abandoned, shutdown
                span.set_attribute("mcs.outcome", "cancelled")
                raise
            span.set_attribute("mcs.outcome", "value")
            return results

    return call


def traced_spawn(tracer: Tracer, fn: Callable[..., Awaitable[Any]], name: str) -> Any:
    """``fn`` run in a span ``mcs.spawn <name>``, a child of the current span; ``fn`` itself
    when the current span does not record (a request that is not traced, or not sampled):
    a root span per spawned node would cost the SDK's ~50 µs each and say nothing."""
    from opentelemetry import trace

    if not trace.get_current_span().is_recording():
        return fn

    async def call(*args: Any, **kwargs: Any) -> Any:
        with tracer.start_as_current_span(f"mcs.spawn {name}", attributes={"mcs.node": name}):
            return await fn(*args, **kwargs)

    return call
