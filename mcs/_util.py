"""Small helpers shared by the modules: argument checks, names, percentiles, public names.

Argument errors follow one style everywhere: short, lowercase, naming the parameter and the
value got (``max_batch_size must be >= 1, got 0``), raised at construction.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from numbers import Real
from typing import Any, TypeVar, cast

import trio

__all__ = [
    "check_int",
    "check_number",
    "check_seconds",
    "describe",
    "is_async_callable",
    "nearest_rank",
    "needs_trio",
    "public",
    "require_trio",
    "safe_repr",
]

_T = TypeVar("_T")


def check_int(name: str, value: object, minimum: int) -> int:
    """``value`` if it is an int (not a bool) of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {value!r}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value!r}")
    return value


def check_seconds(name: str, value: object, *, positive: bool = False) -> float:
    """``value`` as a float if it is a finite number of seconds, >= 0 (or > 0)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TypeError(f"{name} must be a number of seconds, got {value!r}")
    try:
        seconds = float(value)
    except OverflowError:
        seconds = math.inf
    if not math.isfinite(seconds) or seconds < 0 or (positive and seconds == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"{name} must be {bound} and finite, got {value!r}")
    return seconds


def check_number(
    name: str,
    value: object,
    *,
    above: float | None = None,
    minimum: float | None = None,
    maximum: float | None = None,
) -> float:
    """``value`` as a float if it is a real number (not a bool) that a float holds, finite, and
    ``> above``, ``>= minimum`` and ``<= maximum`` where given (compared exactly, before the
    conversion, so a tiny positive :class:`~fractions.Fraction` is still ``> 0``)."""
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a finite number, got {shown(value)}")
    try:
        number = float(value)
    except OverflowError:  # an int or Fraction beyond the largest float
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {shown(value)}")
    exact = cast(float, value)  # any Real orders exactly against a float
    if above is not None and not exact > above:
        raise ValueError(f"{name} must be > {above}, got {shown(value)}")
    if minimum is not None and not exact >= minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {shown(value)}")
    if maximum is not None and not exact <= maximum:
        raise ValueError(f"{name} must be <= {maximum}, got {shown(value)}")
    return number


def is_async_callable(fn: object) -> bool:
    """Whether calling ``fn`` gives a coroutine: an async function, or an object whose
    ``__call__`` is one."""
    return inspect.iscoroutinefunction(fn) or inspect.iscoroutinefunction(
        getattr(fn, "__call__", None)  # noqa: B004 - an object with an async __call__
    )


def describe(fn: object, default: str) -> str:
    """A readable name for a function or callable object."""
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    return name if isinstance(name, str) and name else default


def nearest_rank(ordered: Sequence[float], q: float) -> float:
    """The nearest-rank ``q``-quantile of sorted samples: the smallest sample with at least a
    share ``q`` of them at or below it (0.0 when there are none)."""
    if not ordered:
        return 0.0
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def public(*objects: Any) -> None:
    """Show ``objects`` as members of ``mcs`` in reprs, tracebacks and docs."""
    for obj in objects:
        obj.__module__ = "mcs"


def safe_repr(obj: object, limit: int = 200) -> str:
    """``repr(obj)``, shortened, and never raising (error messages must not fail)."""
    try:
        text = repr(obj)
    except Exception:
        return f"<{type(obj).__name__} object (its repr raised)>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def shown(value: object) -> str:
    """``repr(value)`` for an error message; an int too long for ``repr`` (beyond
    :func:`sys.get_int_max_str_digits`) is described by its size instead."""
    try:
        return repr(value)
    except ValueError:
        if isinstance(value, int):
            return f"an int of {value.bit_length()} bits"
        raise


def require_trio(what: str) -> None:
    """Raise a clear error when ``what`` is used outside a Trio run (under asyncio, say)."""
    try:
        trio.lowlevel.current_task()
    except (RuntimeError, AttributeError):
        raise needs_trio(what) from None


def needs_trio(what: str) -> RuntimeError:
    """The error for ``what`` used outside a Trio run."""
    return RuntimeError(
        f"mcs.{what} needs Trio (or anyio with the trio backend): it was used outside a trio run"
    )
