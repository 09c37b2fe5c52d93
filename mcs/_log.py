"""What mcs tells the ``mcs`` logger (stdlib :mod:`logging`), and when.

Only events an operator acts on, each once: a batch_fn call that failed (once per batch, not
once per caller), a batch_fn result that could not be split, a batcher's summary when its block
ends, a limit that changed, a shared resource that became unavailable or came back. Nothing is
logged per item, and every call here is behind ``isEnabledFor`` so that a disabled level costs
one check. There is one logger, ``mcs``; the batcher is named in the message and in
``extra={"mcs_batcher": name}``.

Lines about a request carry its context: apply functions, spawned tasks and callers run in the
request's :mod:`contextvars` context, so structlog's ``merge_contextvars`` (or any filter that
reads context variables) sees the request's bound values there.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._batcher import Batcher

__all__ = [
    "batch_failed",
    "batcher_closed",
    "limit_changed",
    "logger",
    "malformed_result",
    "resource_available",
    "resource_unavailable",
]

logger = logging.getLogger("mcs")
# A library's loggers stay silent until the application configures logging (the logging
# HOWTO's advice): without this, Python's last-resort handler would print warnings to stderr.
logger.addHandler(logging.NullHandler())


def batch_failed(name: str, error: BaseException, size: int, tb: TracebackType | None) -> None:
    """``tb``: the traceback the callers get (see ``raised_traceback``)."""
    if logger.isEnabledFor(logging.WARNING):
        logger.warning(
            "batcher %r: batch_fn failed for a batch of %d items: %r",
            name,
            size,
            error,
            exc_info=(type(error), error, tb),
            extra={"mcs_batcher": name},
        )


def malformed_result(name: str, error: BaseException) -> None:
    if logger.isEnabledFor(logging.ERROR):
        logger.error("%s", error, extra={"mcs_batcher": name})


def batcher_closed(batcher: Batcher[Any, Any], drained: bool) -> None:
    level = logging.INFO if drained else logging.WARNING
    if not logger.isEnabledFor(level):
        return
    s = batcher.statistics()
    how = "drained and closed" if drained else "shut down (failed or cancelled)"
    logger.log(
        level,
        "batcher %r %s: %d batches, %d items, %d callers served, %d failed batches, "
        "%d rejected, %d withdrawn, %d dropped",
        s.name,
        how,
        s.batches,
        s.items,
        s.callers_served,
        s.failed_batches,
        s.rejected,
        s.withdrawn,
        s.dropped,
        extra={"mcs_batcher": s.name},
    )


def limit_changed(name: str, limit: str, old: float, new: float, why: str) -> None:
    """A limit of batcher ``name`` changed (autoscale, an operator): ``max_in_flight 4 -> 6
    (latency stable)``. INFO: it is how an operator follows an adaptive limit."""
    if logger.isEnabledFor(logging.INFO):
        logger.info(
            "batcher %r: %s %s -> %s (%s)", name, limit, old, new, why, extra={"mcs_batcher": name}
        )


def resource_unavailable(what: str, problem: str, fallback: str) -> None:
    """A shared resource (the Redis server behind a shared limit) failed with ``problem``;
    ``fallback`` says what mcs does meanwhile. Called on the transition, not on every failed
    attempt."""
    if logger.isEnabledFor(logging.WARNING):
        logger.warning("%s is unavailable: %s; %s", what, problem, fallback)


def resource_available(what: str) -> None:
    """The resource of :func:`resource_unavailable` answers again."""
    if logger.isEnabledFor(logging.INFO):
        logger.info("%s is available again", what)
