"""An HTTP service on hypercorn's Trio worker: each request is an mcs graph over SQLite.

``app`` is a plain ASGI application. At start-up (the ASGI lifespan) it writes a small SQLite
data set to a temporary folder and opens two batchers, one per table; at shutdown it closes
them and removes the folder. ``GET /users/<id>`` is a graph per request::

    user(id) ──> friend(user.best_friend) ──┐
    posts(id) ──────────────────────────────┴─> the JSON page

``user`` and ``posts`` start at once; ``friend`` starts when ``user`` has arrived; every lookup
goes through a batcher shared by all live requests, whose batch_fn sends one
``SELECT ... WHERE id IN (...)`` per batch from a worker thread.

Routes:
    GET /users/<id>   the profile, JSON (404 for an unknown user)
    GET /stats        the batchers' statistics, JSON
    GET /metrics      every batcher's metrics for Prometheus (``examples/observability.py``)
    GET /             what is served: ``{"users": ...}``

Run it with hypercorn (``pip install 'hypercorn[trio]'``), from the repository's root::

    hypercorn -k trio --bind 127.0.0.1:8000 examples.http_service:app
    hypercorn -k trio --workers 2 --bind 127.0.0.1:8000 examples.http_service:app

or on its own, with a graceful stop on SIGINT or SIGTERM::

    python examples/http_service.py --port 8000     # --port 0 picks a free port

Either way the first line it prints is ``listening on http://127.0.0.1:<port>``; a port that is
already in use is one line on stderr and exit status 1. ``MCS_EXAMPLE_USERS`` sets the size of
the data set (default 10,000 users). Drive it from another process with ``examples/load.py``.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import random
import signal
import sqlite3
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass
from functools import partial
from importlib import import_module
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

import mcs

if TYPE_CHECKING:
    from observability import observe
else:  # imported as examples.http_service (hypercorn), or run as a script
    observe = import_module(
        f"{__package__}.observability" if __package__ else "observability"
    ).observe

if TYPE_CHECKING:
    from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, Scope

HOST = "127.0.0.1"
JSON_HEADERS = [(b"content-type", b"application/json")]
POSTS_PER_PAGE = 5

# ---------------------------------------------------------------------- the data


@dataclass(frozen=True)
class User:
    id: int
    name: str
    best_friend: int


def create_dataset(path: Path, users: int, seed: int = 0) -> None:
    """Write ``users`` users (ids 1..users) and 0-9 posts each to a new SQLite file."""
    rng = random.Random(seed)
    with sqlite3.connect(path) as db:
        db.execute("CREATE TABLE users (id INTEGER PRIMARY KEY, name TEXT, best_friend INTEGER)")
        db.execute("CREATE TABLE posts (id INTEGER PRIMARY KEY, author INTEGER, body TEXT)")
        db.execute("CREATE INDEX posts_by_author ON posts (author, id)")
        db.executemany(
            "INSERT INTO users VALUES (?, ?, ?)",
            ((i, f"user{i}", rng.randint(1, users)) for i in range(1, users + 1)),
        )
        db.executemany(
            "INSERT INTO posts (author, body) VALUES (?, ?)",
            (
                (i, f"post {k} by user{i}")
                for i in range(1, users + 1)
                for k in range(rng.randrange(10))
            ),
        )
    db.close()


class Database:
    """One SQLite connection per worker thread, opened read-only on first use."""

    def __init__(self, path: Path) -> None:
        self.uri = f"{path.as_uri()}?mode=ro"
        self.local = threading.local()

    def connection(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self.local, "db", None)
        if db is None:
            db = self.local.db = sqlite3.connect(self.uri, uri=True, check_same_thread=False)
        return db

    def users(self, ids: Sequence[int]) -> dict[int, User | None]:
        marks = ",".join("?" * len(ids))
        rows = self.connection().execute(f"SELECT * FROM users WHERE id IN ({marks})", ids)
        found = {row[0]: User(*row) for row in rows}
        return {i: found.get(i) for i in ids}

    def posts(self, authors: Sequence[int]) -> dict[int, list[str]]:
        marks = ",".join("?" * len(authors))
        rows = self.connection().execute(
            f"SELECT author, body FROM posts WHERE author IN ({marks}) ORDER BY author, id DESC",
            authors,
        )
        found: dict[int, list[str]] = {a: [] for a in authors}
        for author, body in rows:
            if len(found[author]) < POSTS_PER_PAGE:
                found[author].append(body)
        return found


# ---------------------------------------------------------------------- the service


class Service:
    """The two batchers and the graph of a request."""

    def __init__(
        self,
        users: mcs.Batcher[int, User | None],
        posts: mcs.Batcher[int, list[str]],
        size: int,
    ) -> None:
        self.users = users
        self.posts = posts
        self.size = size

    async def profile(self, user_id: int) -> tuple[int, dict[str, Any]]:
        async with mcs.open_graph(timeout=10.0) as g:
            user = g.call(self.users, user_id, name="user")
            posts = g.call(self.posts, user_id, name="posts")
            found = await user
            if found is None:
                return 404, {"error": f"no user {user_id}"}
            friend = g.call(self.users, found.best_friend, name="friend")
            page = _render(found, await posts, await friend)
        return 200, page

    def statistics(self) -> list[mcs.BatcherStatistics]:
        return [self.users.statistics(), self.posts.statistics()]


def _render(user: User, posts: list[str], friend: User | None) -> dict[str, Any]:
    return {
        "user": asdict(user),
        "posts": posts,
        "best_friend": friend.name if friend else None,
    }


@asynccontextmanager
async def open_service(users: int, seed: int = 0) -> AsyncIterator[Service]:
    """Create the data set in a temporary folder and open the batchers over it."""
    with tempfile.TemporaryDirectory(prefix="mcs-http-") as folder:
        path = Path(folder) / "data.sqlite3"
        await trio.to_thread.run_sync(create_dataset, path, users, seed)
        db = Database(path)

        async def load_users(ids: list[int]) -> dict[int, User | None]:
            return await trio.to_thread.run_sync(db.users, ids)

        async def load_posts(ids: list[int]) -> dict[int, list[str]]:
            return await trio.to_thread.run_sync(db.posts, ids)

        async with (
            mcs.open_batcher(
                load_users, name="users", max_batch_size=200, max_in_flight=2, dedupe=True
            ) as user_batcher,
            mcs.open_batcher(
                load_posts, name="posts", max_batch_size=200, max_in_flight=2, dedupe=True
            ) as post_batcher,
        ):
            yield Service(user_batcher, post_batcher, users)


# ---------------------------------------------------------------------- the ASGI app


class App:
    """The ASGI application: the service lives as long as the ASGI lifespan."""

    def __init__(self, users: int | None = None, seed: int = 0) -> None:
        self.size = users
        self.seed = seed
        self.service: Service | None = None

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] == "lifespan":
            await self.lifespan(receive, send)
        elif scope["type"] == "http":
            status, body = await self.route(scope["method"], scope["path"])
            headers = [*JSON_HEADERS, (b"content-length", str(len(body)).encode())]
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body, "more_body": False})

    async def lifespan(self, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        message = await receive()
        assert message["type"] == "lifespan.startup"
        size = self.size or int(os.environ.get("MCS_EXAMPLE_USERS", "10000"))
        async with open_service(size, self.seed) as self.service:
            await send({"type": "lifespan.startup.complete"})
            message = await receive()
            assert message["type"] == "lifespan.shutdown"
            self.service = None
        await send({"type": "lifespan.shutdown.complete"})

    async def route(self, method: str, path: str) -> tuple[int, bytes]:
        service = self.service
        if service is None:
            return 503, b'{"error": "starting or stopping"}'
        if method != "GET":
            return 405, b'{"error": "method not allowed"}'
        if path.startswith("/users/"):
            try:
                user_id = int(path.removeprefix("/users/"))
            except ValueError:
                return 400, b'{"error": "the user id must be an integer"}'
            status, page = await service.profile(user_id)  # the request's graph
            return status, json.dumps(page).encode()
        if path == "/stats":
            return 200, json.dumps([_stats(s) for s in service.statistics()]).encode()
        if path == "/":
            return 200, json.dumps({"users": service.size}).encode()
        return 404, b'{"error": "not found"}'


def _stats(stats: mcs.BatcherStatistics) -> dict[str, Any]:
    return {
        "name": stats.name,
        "batches": stats.batches,
        "items": stats.items,
        "mean_batch_size": stats.mean_batch_size,
        "peak_batch_size": stats.peak_batch_size,
        "queue_wait_p99_ms": stats.queue_wait.p99 * 1e3,
    }


app = observe(App())
"""The module-level app: ``hypercorn -k trio examples.http_service:app``, with ``/metrics``."""

# ---------------------------------------------------------------------- run it on its own


async def serve(port: int, application: Any) -> None:
    from hypercorn.config import Config
    from hypercorn.trio import serve as hypercorn_serve

    config = Config()
    config.bind = [f"{HOST}:{port}"]
    config.graceful_timeout = 2.0
    config.accesslog = None
    stop = trio.Event()
    # Listen for signals before the server starts, so that none is missed.
    with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:

        async def watch_signals() -> None:
            async for _ in signals:
                stop.set()
                return

        async with trio.open_nursery() as nursery:
            nursery.start_soon(watch_signals)
            binds = await nursery.start(
                partial(hypercorn_serve, application, config, shutdown_trigger=stop.wait)
            )
            print(f"listening on {binds[0]}", flush=True)
            await stop.wait()
    print("stopped", flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--port", type=int, default=8000, help="port on 127.0.0.1 (0: any free)")
    parser.add_argument("--users", type=int, default=10_000, help="users in the data set")
    parser.add_argument("--seed", type=int, default=0, help="seed of the data set")
    args = parser.parse_args(argv)
    if args.users < 1:
        parser.error(f"--users must be >= 1, got {args.users}")
    if not 0 <= args.port <= 65535:
        parser.error(f"--port must be between 0 and 65535, got {args.port}")
    try:
        trio.run(serve, args.port, observe(App(args.users, args.seed)))
    except (OSError, BaseExceptionGroup) as exc:
        # hypercorn fails to bind inside its nursery: the OSError comes wrapped in groups
        if any(_in_use(leaf) for leaf in _leaves(exc)):
            print(f"http_service: {HOST}:{args.port} is already in use", file=sys.stderr)
            return 1
        raise
    return 0


def _leaves(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, BaseExceptionGroup):
        return [leaf for inner in exc.exceptions for leaf in _leaves(inner)]
    return [exc]


def _in_use(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno == errno.EADDRINUSE


if __name__ == "__main__":
    sys.exit(main())
