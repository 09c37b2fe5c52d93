"""Splitting a batch_fn result back to its callers, whatever batch_fn returned.

batch_fn is user code and may return anything: a sequence aligned with the items, a mapping
keyed by item, an exception instance as one item's result, or garbage. Whatever it returns, and
whatever the items do when hashed or compared, every caller of the batch gets exactly one
outcome, its own: a malformed result is a :exc:`mcs.BatchResultError` for the callers concerned,
never a crash of the batcher's task, a hang, or someone else's result.

Delivery runs user code (a graph's apply functions run when their call node's result arrives),
and a traceback raised there keeps every frame below it alive, with the locals each frame had
when it returned. So these functions clear their references to records before returning: a
frame left holding a record would make a cycle record -> error -> traceback -> frame -> record.

Nothing here reads the list that was passed to batch_fn (batch_fn may have sorted or filtered it
in place): records keep their own items, and the count and dedupe positions are taken before the
call.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

from trio.lowlevel import enable_ki_protection

from ._exceptions import BatchResultError
from ._log import malformed_result
from ._park import original_traceback
from ._requests import _FINISHED, _IN_FLIGHT, _Request
from ._shared import _Shared
from ._util import safe_repr

__all__ = ["deliver_error", "deliver_results"]

K = TypeVar("K")
V = TypeVar("V")


@enable_ki_protection  # wakes many tasks: no KeyboardInterrupt halfway
def deliver_error(batch: list[_Request[K, V]], error: BaseException, tb: Any, now: float) -> int:
    """Give ``error`` to every record of ``batch`` still waiting; returns how many."""
    served = 0
    for request in batch:
        if request.state == _IN_FLIGHT:
            request.state = _FINISHED
            served += 1
            request._deliver_error(error, tb, now)
    batch = request = error = tb = None  # type: ignore[assignment]
    return served


@enable_ki_protection  # wakes many tasks: no KeyboardInterrupt halfway
def deliver_results(
    name: str,
    batch: list[_Request[K, V]],
    size: int,
    results: object,
    now: float,
) -> int:
    """Give each waiting record of ``batch`` its own result; returns how many were served.

    ``size`` is how many items batch_fn was given. Never raises for anything batch_fn
    returned.
    """
    served = 0
    request: _Request[K, V] | None = None
    value: Any = None
    try:
        if isinstance(results, Mapping):
            served = _from_mapping(name, batch, results, now)
            batch = None  # type: ignore[assignment]
            return served
        if not isinstance(results, Sequence) or isinstance(results, str | bytes):
            problem = f"must return a sequence or a mapping, got {type(results).__name__}"
        else:
            if type(results) is not list and type(results) is not tuple:
                results = list(results)  # a user type's __getitem__/__iter__ may misbehave
            assert isinstance(results, list | tuple)
            if len(results) != size:
                problem = f"returned {len(results)} results for {size} items"
            else:
                for request, value in zip(batch, results, strict=True):
                    if request.state == _IN_FLIGHT:
                        request.state = _FINISHED
                        served += 1
                        if isinstance(value, BaseException):
                            request._deliver_error(value, original_traceback(value), now)
                        else:
                            request._deliver_value(value, now)
                batch = None  # type: ignore[assignment]
                return served
        error = BatchResultError(f"batcher {name!r}: batch_fn {problem}")
    except Exception as exc:
        error = BatchResultError(f"batcher {name!r}: could not split batch_fn's result: {exc!r}")
        error.__cause__ = exc
    finally:
        request = value = results = None
    malformed_result(name, error)
    try:
        return served + deliver_error(batch, error, None, now)
    finally:
        batch = error = None  # type: ignore[assignment]


def _from_mapping(
    name: str, batch: list[_Request[K, V]], results: Mapping[Any, Any], now: float
) -> int:
    served = 0
    for request in batch:
        if request.state != _IN_FLIGHT:
            continue
        try:
            # A shared item (dedupe) is looked up by its key, which key= may have computed.
            value = results[request.key if type(request) is _Shared else request.item]
        except Exception as exc:
            value = BatchResultError(
                f"batcher {name!r}: batch_fn's result has no entry for item "
                f"{safe_repr(request.item)}"
                + ("" if isinstance(exc, KeyError | TypeError) else f" ({exc!r})")
            )
            value.__cause__ = None if isinstance(exc, KeyError | TypeError) else exc
        served += _settle(request, value, now)
    batch = request = value = results = None  # type: ignore[assignment]
    return served


def _settle(request: _Request[K, V], value: Any, now: float) -> int:
    request.state = _FINISHED
    if isinstance(value, BaseException):
        request._deliver_error(value, original_traceback(value), now)
    else:
        request._deliver_value(value, now)
    request = value = None  # type: ignore[assignment]
    return 1
