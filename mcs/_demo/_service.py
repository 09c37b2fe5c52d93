"""The demo service: one profile page per request, over three batched SQLite lookups.

A request for user ``u`` is a graph::

    user(u) ───────────────┐
    timeline(u) ─> authors ├─> render
    followers(u) ──────────┘

``user``, ``timeline`` and ``followers`` start at once; when the timeline arrives, one ``user``
lookup per post loads its author; ``render`` runs when everything has resolved. Each lookup
goes through a batcher (one per table) whose batch_fn runs one ``SELECT ... IN (...)`` in a
worker thread, under an in-flight limit and a rate limit. Two things cut queries besides
batching: the graph's memo (an author who is the user, or who appears twice on a page, is
looked up once per request) and the batchers' ``dedupe`` (an id already queued or in flight for
another request is joined, not sent again).

With ``batching=False`` the very same graph and limits run with ``max_batch_size=1``, no memo
and no dedupe: one query per lookup, each in its own worker-thread hop, which is what the
service would do without mcs (``await trio.to_thread.run_sync(query, id)`` under a
``CapacityLimiter``).
"""

from __future__ import annotations

import os
import sqlite3
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

import trio

import mcs

from ._db import (
    ConnectionPool,
    Post,
    User,
    fetch_follower_counts,
    fetch_timelines,
    fetch_users,
)

__all__ = ["Profile", "Service", "StageCounters", "open_service", "render"]

V = TypeVar("V")

Profile = dict[str, Any]
"""The response: a JSON-ready dict with ``status`` 200 or 404."""


@dataclass
class StageCounters:
    """What one stage sent downstream.

    Attributes:
        name: the stage (``users``, ``timelines`` or ``followers``).
        asked: ids the requests' code asked for (``g.call`` nodes), before the memo.
        queries: ``SELECT`` statements issued.
        items: ids looked up (after de-duplication).
        batch_sizes: how many queries carried each number of ids.
    """

    name: str
    asked: int = 0
    queries: int = 0
    items: int = 0
    batch_sizes: Counter[int] = field(default_factory=Counter)

    def record(self, size: int) -> None:
        self.queries += 1
        self.items += size
        self.batch_sizes[size] += 1


def render(
    user_id: int,
    user: User | None,
    timeline: list[Post],
    followers: int,
    *authors: User | None,
) -> Profile:
    """Assemble the profile page of ``user_id`` (a pure function: a graph ``apply`` node)."""
    if user is None:
        return {"status": 404, "user_id": user_id}
    posts = [
        {
            "id": post.id,
            "created": post.created,
            "body": post.body,
            "author": None if author is None else {"handle": author.handle, "name": author.name},
        }
        for post, author in zip(timeline, authors, strict=True)
    ]
    return {
        "status": 200,
        "user": {"id": user.id, "handle": user.handle, "name": user.name, "bio": user.bio},
        "followers": followers,
        "posts": posts,
    }


class Service:
    """The shared stages of the demo service; one per process, used by every request.

    Attributes:
        users, timelines, followers: the batchers in front of the three tables.
        counters: what each stage was asked for and sent to the database.
        memo: whether each request's graph answers a repeated lookup from its memo.
    """

    def __init__(
        self,
        users: mcs.Batcher[int, User | None],
        timelines: mcs.Batcher[int, list[Post]],
        followers: mcs.Batcher[int, int],
        counters: list[StageCounters],
        *,
        memo: bool = True,
    ) -> None:
        self.users = users
        self.timelines = timelines
        self.followers = followers
        self.counters = counters
        self.memo = memo

    async def profile(self, user_id: int) -> Profile:
        """Handle one request: the profile page of ``user_id``."""
        users, timelines, followers = self.counters
        async with mcs.open_graph(name="profile", memo=self.memo) as g:
            user = g.call(self.users, user_id, name="user")
            timeline = g.call(self.timelines, user_id, name="timeline")
            followers_ = g.call(self.followers, user_id, name="followers")
            # with the memo, an author who is the user or appears twice is one node, not a lookup
            authors = [g.call(self.users, post.author_id, name="author") for post in await timeline]
            page = g.apply(render, user_id, user, timeline, followers_, *authors, name="render")
        users.asked += 1 + len(authors)
        timelines.asked += 1
        followers.asked += 1
        return page.result

    def statistics(self) -> list[mcs.BatcherStatistics]:
        """The statistics of the three batchers."""
        return [b.statistics() for b in (self.users, self.timelines, self.followers)]


def _batch_fn(
    pool: ConnectionPool,
    limiter: trio.CapacityLimiter,
    query: Callable[[sqlite3.Connection, Sequence[int]], Mapping[int, V]],
    counters: StageCounters,
) -> Callable[[list[int]], Awaitable[Mapping[int, V]]]:
    async def batch_fn(ids: list[int]) -> Mapping[int, V]:
        result = await trio.to_thread.run_sync(pool.run, query, ids, limiter=limiter)
        counters.record(len(ids))
        return result

    batch_fn.__name__ = batch_fn.__qualname__ = counters.name
    return batch_fn


@asynccontextmanager
async def open_service(
    database: str | os.PathLike[str],
    *,
    batching: bool = True,
    max_batch_size: int = 100,
    max_in_flight: int = 2,
    rate: mcs.RateLimit | None = None,
) -> AsyncIterator[Service]:
    """Open the three stages over the data set in ``database`` for the duration of the block.

    Each stage may run ``max_in_flight`` queries at once (so the pool has three times as many
    connections and worker threads), and ``rate`` limits each stage's queries. With
    ``batching=False`` every stage sends one id per query, with no dedupe and no memo: one query
    per lookup the code asks for.
    """
    size = max_batch_size if batching else 1
    stages = 3
    counters = [StageCounters(name) for name in ("users", "timelines", "followers")]
    limiter = trio.CapacityLimiter(stages * max_in_flight)
    with ConnectionPool(database, stages * max_in_flight) as pool:
        async with AsyncExitStack() as stack:
            queries: list[Callable[[sqlite3.Connection, Sequence[int]], Mapping[int, Any]]] = [
                fetch_users,
                fetch_timelines,
                fetch_follower_counts,
            ]
            batchers: list[mcs.Batcher[int, Any]] = [
                await stack.enter_async_context(
                    mcs.open_batcher(
                        _batch_fn(pool, limiter, query, counter),
                        max_batch_size=size,
                        max_in_flight=max_in_flight,
                        rate=rate,
                        dedupe=batching,
                        name=counter.name,
                    )
                )
                for query, counter in zip(queries, counters, strict=True)
            ]
            yield Service(batchers[0], batchers[1], batchers[2], counters, memo=batching)
