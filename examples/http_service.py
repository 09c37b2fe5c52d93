"""An HTTP service on hypercorn's Trio worker: each request is an mcs graph over SQLite.

The app is a plain ASGI callable. ``GET /users/<id>`` serves the profile page of the demo
(``python -m mcs demo``): the handler opens a graph that loads the user, their recent posts and
their follower count in parallel, then the authors of those posts, then renders; every lookup
goes through a batcher shared by all requests, which sends one ``SELECT ... IN (...)`` per batch
to an SQLite data set generated at start-up in a temporary folder.

Routes:
    GET /users/<id>   the profile page, JSON (404 for an unknown user)
    GET /stats        the batchers' statistics, JSON
    GET /             what is served: ``{"users": ..., "batching": ...}``

Run it, then drive it from another process with ``examples/load.py`` (loopback only)::

    python examples/http_service.py --port 8000
    python examples/load.py --url http://127.0.0.1:8000 --requests 5000 --concurrency 100

``--port 0`` picks a free port; either way the first line printed is
``listening on http://127.0.0.1:<port>``. SIGINT or SIGTERM shut it down gracefully.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import tempfile
from functools import partial
from typing import TYPE_CHECKING, Any

import trio
from hypercorn.config import Config
from hypercorn.trio import serve

import mcs
from mcs._demo import Dataset, Service, create_dataset, open_service

if TYPE_CHECKING:
    from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope

HOST = "127.0.0.1"
JSON_HEADERS = [(b"content-type", b"application/json")]


class ProfileApp:
    """The ASGI application."""

    def __init__(self, service: Service, dataset: Dataset, *, batching: bool) -> None:
        self.service = service
        self.info = json.dumps({"users": dataset.users, "batching": batching}).encode()

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        elif scope["type"] == "http":
            status, body = await self.route(scope["method"], scope["path"])
            headers = [*JSON_HEADERS, (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})

    async def route(self, method: str, path: str) -> tuple[int, bytes]:
        if method != "GET":
            return 405, b'{"error": "method not allowed"}'
        if path.startswith("/users/"):
            try:
                user_id = int(path.removeprefix("/users/"))
            except ValueError:
                return 400, b'{"error": "the user id must be an integer"}'
            page = await self.service.profile(user_id)  # the request's graph
            return page["status"], json.dumps(page).encode()
        if path == "/stats":
            return 200, json.dumps([_stats(s) for s in self.service.statistics()]).encode()
        if path == "/":
            return 200, self.info
        return 404, b'{"error": "not found"}'


def _stats(stats: mcs.BatcherStatistics) -> dict[str, Any]:
    return {
        "name": stats.name,
        "batches": stats.batches,
        "items": stats.items,
        "mean_batch_size": stats.mean_batch_size,
        "peak_batch_size": stats.peak_batch_size,
        "queue_wait_p99_ms": stats.queue_wait.p99 * 1e3,
        "rate_limit_waits": stats.rate_limit_waits,
    }


async def run(port: int, dataset: Dataset, *, batching: bool) -> None:
    stop = trio.Event()
    # Listen for signals before the server starts, so that none is missed.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

        async def watch_signals() -> None:
            async for _ in signals:
                stop.set()
                return

        async with (
            open_service(str(dataset.directory), batching=batching) as service,
            trio.open_nursery() as nursery,
        ):
            nursery.start_soon(watch_signals)
            config = Config()
            config.bind = [f"{HOST}:{port}"]
            config.graceful_timeout = 2.0
            app = ProfileApp(service, dataset, batching=batching)
            binds = await nursery.start(partial(serve, app, config, shutdown_trigger=stop.wait))
            print(f"listening on {binds[0]}", flush=True)
            await stop.wait()
            # serve() returns once its connections are closed; then the nursery cancels the
            # signal watcher and the batchers close.
        print("stopped", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (0: any free)")
    parser.add_argument("--users", type=int, default=10_000, help="users in the data set")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data set")
    parser.add_argument("--no-batching", action="store_true", help="one query per lookup")
    args = parser.parse_args(argv)
    if args.users < 1:
        parser.error(f"--users must be >= 1, got {args.users}")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be between 0 and 65535, got {args.port}")

    with tempfile.TemporaryDirectory(prefix="mcs-http-") as folder:
        dataset = create_dataset(folder, users=args.users, seed=args.seed)
        trio.run(partial(run, args.port, dataset, batching=not args.no_batching))
    return 0


if __name__ == "__main__":
    sys.exit(main())
