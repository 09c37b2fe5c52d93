"""Observability for an ASGI app built on mcs: ``/metrics`` for Prometheus, a request id in logs.

``observe(app)`` wraps any ASGI application (``examples/http_service.py`` wraps its own)::

    app = observe(App())

- ``GET /metrics`` answers in Prometheus's text format with every batcher open in the process
  (:mod:`mcs.prometheus`). The scrape is rendered on a worker thread, which
  ``Batcher.statistics()`` and ``Batcher.histograms()`` allow.
- Under ``hypercorn --workers N`` with ``PROMETHEUS_MULTIPROC_DIR`` set, each worker mirrors its
  batchers into that folder every ``MCS_METRICS_INTERVAL`` seconds (default 1) and once more at
  shutdown, and ``/metrics`` merges the folder with prometheus-client's ``MultiProcessCollector``
  (after mirroring the answering worker itself). Any worker may answer a scrape: counters are
  exact for it and at most one interval old for the others.
- Each HTTP request runs with a ``request_id`` bound in structlog's context variables (taken
  from the ``x-request-id`` header, or made up), so every line logged on its behalf carries it:
  its apply functions and spawned tasks run in its context (:func:`configure_logging` routes the
  ``mcs`` logger and the app's own through structlog).

Tracing needs no code here: wrap the app in OpenTelemetry's ASGI middleware
(``OpenTelemetryMiddleware(observe(App()))``) and set a tracer provider; each batch then runs in
a ``mcs.batch <name>`` span linked to the request spans of its callers.
"""

from __future__ import annotations

import itertools
import logging
import os
from typing import TYPE_CHECKING, Any, TextIO

import structlog
import trio
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client import multiprocess as prometheus_multiprocess

import mcs.prometheus

if TYPE_CHECKING:
    from hypercorn.typing import ASGIFramework, ASGIReceiveCallable, ASGISendCallable, Scope

__all__ = ["Observed", "configure_logging", "observe"]

_request_ids = itertools.count(1)


class Observed:
    """An ASGI app that serves ``/metrics`` and gives each request a ``request_id``."""

    def __init__(self, app: ASGIFramework, *, metrics_path: str = "/metrics") -> None:
        self.app = app
        self.metrics_path = metrics_path
        self.multiprocess = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
        self.interval = float(os.environ.get("MCS_METRICS_INTERVAL", "1.0"))
        self.registry = CollectorRegistry()
        if self.multiprocess:
            prometheus_multiprocess.MultiProcessCollector(self.registry)  # type: ignore[no-untyped-call]
        else:
            self.registry.register(mcs.prometheus.BatcherCollector())

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "lifespan" and self.multiprocess:
            await self.lifespan(scope, receive, send)
        elif scope["type"] == "http" and scope["path"] == self.metrics_path:
            await self.metrics(send)
        elif scope["type"] == "http":
            headers = dict(scope["headers"])
            request_id = headers.get(b"x-request-id", b"").decode() or f"r{next(_request_ids)}"
            # This task is the request's (hypercorn starts one per request, with a copy of the
            # context), so what is bound here is seen by everything done on its behalf.
            structlog.contextvars.bind_contextvars(request_id=request_id)
            await self.app(scope, receive, send)
        else:
            await self.app(scope, receive, send)

    async def metrics(self, send: ASGISendCallable) -> None:
        if self.multiprocess:
            mcs.prometheus.mirror()  # this worker's numbers are current; the others' recent
        body = await trio.to_thread.run_sync(generate_latest, self.registry)
        headers = [
            (b"content-type", CONTENT_TYPE_LATEST.encode()),
            (b"content-length", str(len(body)).encode()),
        ]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": body, "more_body": False})

    async def lifespan(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        """The app's lifespan, with this worker mirroring its batchers meanwhile."""
        mirroring = trio.CancelScope()
        mirrored = trio.Event()

        async def mirror_until_shutdown() -> None:
            with mirroring:
                await mcs.prometheus.run_mirror(self.interval)  # mirrors once more when cancelled
            mirrored.set()

        async def send_then_mirror(message: Any) -> None:
            if message["type"] == "lifespan.shutdown.complete":
                # The drained batchers' final counts are mirrored first, then this worker's live
                # gauges removed: in that order, or a last periodic mirror would write them again.
                mirroring.cancel()
                await mirrored.wait()
                prometheus_multiprocess.mark_process_dead(os.getpid())  # type: ignore[no-untyped-call]
            await send(message)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(mirror_until_shutdown)
            await self.app(scope, receive, send_then_mirror)
            mirroring.cancel()


def observe(app: ASGIFramework) -> Observed:
    """``app`` with ``/metrics`` and a request id per request; see the module's docstring."""
    return Observed(app)


def configure_logging(level: int = logging.INFO, stream: TextIO | None = None) -> logging.Handler:
    """Log through structlog, with each request's bound context on every line: key=value
    lines on ``stream`` (stderr), for the ``mcs`` logger and everything else logged with
    stdlib logging. Returns the handler added to the root logger."""
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[
                structlog.contextvars.merge_contextvars,
                structlog.stdlib.add_log_level,
                structlog.stdlib.add_logger_name,
            ],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.KeyValueRenderer(key_order=["event", "request_id"]),
            ],
        )
    )
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(level)
    return handler
