"""A hypothesis property test of a small service built on mcs, using ``mcs.testing``.

The "service" renders a user's feed: it loads the user and their posts through two shared
batchers, then the user's best friend through the first one again, and renders a line. The
property: however many requests run at once, however the batchers are limited and however
slow the downstream is, every feed is right, a user that fails to load fails only the requests
that need it, the batchers stay within their limits, and nothing is left running.

Run it with ``python examples/property_test.py``, or under pytest: ``pip install
'trio-mcs[testing]' pytest``, then ``pytest examples/property_test.py`` (``examples/pytest.ini``
keeps the library's own pytest settings, which need pytest-trio, out of the way).
"""

from __future__ import annotations

from dataclasses import dataclass

import trio
from hypothesis import given, settings
from hypothesis import strategies as st

import mcs
from mcs.testing import (
    RecordingBatchFn,
    assert_batch_limits,
    assert_dependencies_respected,
    assert_finished,
    assert_idle,
    run_virtual,
)

# ---------------------------------------------------------------------- the code under test


@dataclass(frozen=True)
class User:
    id: int
    name: str
    best_friend: int


def feed(
    g: mcs.Graph, users: mcs.Batcher[int, User], posts: mcs.Batcher[int, list[str]], uid: int
) -> mcs.Node[str]:
    """Add the nodes that render user ``uid``'s feed to ``g``; returns the last one."""
    user = g.call(users, uid, name="user")
    their_posts = g.call(posts, uid, name="posts")
    friend = g.call(users, g.apply(_best_friend, user, name="friend_id"), name="friend")
    return g.apply(_render, user, their_posts, friend, name="render")


def _best_friend(user: User) -> int:
    return user.best_friend


def _render(user: User, posts: list[str], friend: User) -> str:
    return f"{user.name}: {len(posts)} posts; best friend {friend.name}"


# ---------------------------------------------------------------------- a fake downstream


def _user(uid: int) -> User:
    return User(uid, f"user{uid}", (uid * 7 + 3) % 50)


def _posts(uid: int) -> list[str]:
    return [f"post {uid}.{k}" for k in range(uid % 4)]


# ---------------------------------------------------------------------- the property


@settings(max_examples=60, deadline=None)
@given(
    uids=st.lists(st.integers(0, 49), min_size=1, max_size=20),
    broken=st.none() | st.integers(0, 49),
    max_batch_size=st.integers(1, 8),
    max_in_flight=st.integers(1, 3),
    delay=st.sampled_from([0.0, 0.25, 1.0]),
)
def test_feeds_are_right_and_leave_nothing_behind(
    uids: list[int], broken: int | None, max_batch_size: int, max_in_flight: int, delay: float
) -> None:
    def load_user(uid: int) -> User | BaseException:
        return LookupError(f"user {uid} is unavailable") if uid == broken else _user(uid)

    user_fn = RecordingBatchFn(load_user, delay=delay)
    posts_fn = RecordingBatchFn(_posts, delay=delay)
    pages: dict[int, str | None] = {}
    traces: list[mcs.GraphTrace] = []

    async def request(
        n: int, uid: int, users: mcs.Batcher[int, User], posts: mcs.Batcher[int, list[str]]
    ) -> None:
        try:
            async with mcs.open_graph() as g:
                page = feed(g, users, posts, uid)
            pages[n] = page.result
        except LookupError:
            pages[n] = None
        traces.append(g.trace())

    async def main() -> None:
        async with (
            mcs.open_batcher(
                user_fn, max_batch_size=max_batch_size, max_in_flight=max_in_flight
            ) as users,
            mcs.open_batcher(
                posts_fn, max_batch_size=max_batch_size, max_in_flight=max_in_flight
            ) as posts,
        ):
            async with trio.open_nursery() as nursery:
                for n, uid in enumerate(uids):
                    nursery.start_soon(request, n, uid, users, posts)
            await trio.sleep(1 + 10 * delay)  # batches whose callers all failed end too
            assert_idle(users, posts)

    run_virtual(main)  # trio.run on a virtual clock; a deadlock fails instead of hanging

    for n, uid in enumerate(uids):
        friend = _user(uid).best_friend
        fails = broken in (uid, friend)
        assert pages[n] == (None if fails else _render(_user(uid), _posts(uid), _user(friend)))
    for trace in traces:
        assert_finished(trace)
        assert_dependencies_respected(trace)
    for batch_fn in (user_fn, posts_fn):
        assert_batch_limits(batch_fn, max_batch_size=max_batch_size, max_in_flight=max_in_flight)


if __name__ == "__main__":
    test_feeds_are_right_and_leave_nothing_behind()
    print("ok")
