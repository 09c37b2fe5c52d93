"""Rate limits on a downstream: GCRA, exact on trio's clock.

Why GCRA: a token bucket stated as one number, the *theoretical arrival time* (TAT) of the next
unit, needs no refill timer and no per-token state. Taking ``n`` units advances the TAT by
``n * T`` (``T = per / count``); a take is allowed when the TAT, after advancing, is at most
``burst * T`` ahead of now. Over any window of length W this admits at most
``burst + count * W / per`` units, which is the bound the tests check.

Why fractions: the bound must hold exactly on trio's virtual clock, and float TATs drift by an ulp
per take, which over thousands of takes lets a call in a hair early. The arithmetic runs once per
*batch* (not per item), so exact :class:`fractions.Fraction` arithmetic costs nothing that shows;
deadlines handed to trio are rounded *up* to the next float, so a wake-up is never early.

The limiter is consulted by the batcher's single dispatcher, which serves callers in arrival
order, so waiting is first come, first served with no retry storm.
"""

from __future__ import annotations

import math
from fractions import Fraction
from numbers import Real
from typing import Literal

import attrs

__all__ = ["RateLimit"]


def _check_positive(name: str, value: object) -> None:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")


@attrs.frozen
class RateLimit:
    """A limit of ``count`` downstream units per ``per`` seconds, with bursts of ``burst``.

    Pass it as ``rate=`` to :func:`mcs.open_batcher`. ``unit="call"`` (the default) counts calls
    of batch_fn; ``unit="item"`` counts the items in them, and caps each batch at ``burst`` items
    so that a single call can never break the bound.

    Over any window of length ``W`` on trio's clock, at most ``burst + count * W / per`` units
    start. Callers wait for their turn in arrival order; the limit never drops an item.

    Raises:
        TypeError: if ``count`` or ``per`` is not a number, or ``burst`` is not an int.
        ValueError: if one is not positive or not finite, or ``unit`` is neither ``"call"``
            nor ``"item"``.
    """

    count: float
    per: float = 1.0
    burst: int = 1
    unit: Literal["call", "item"] = "call"

    def __attrs_post_init__(self) -> None:
        _check_positive("count", self.count)
        _check_positive("per", self.per)
        if isinstance(self.burst, bool) or not isinstance(self.burst, int):
            raise TypeError(f"burst must be an int, got {self.burst!r}")
        if self.burst < 1:
            raise ValueError(f"burst must be >= 1, got {self.burst!r}")
        if self.unit not in ("call", "item"):
            raise ValueError(f"unit must be 'call' or 'item', got {self.unit!r}")


RateLimit.__module__ = "mcs"


class _Gcra:
    """The mutable state of one :class:`RateLimit`: the theoretical arrival time."""

    __slots__ = ("_burst", "_interval", "_tat")

    def __init__(self, limit: RateLimit) -> None:
        self._interval = Fraction(limit.per) / Fraction(limit.count)
        self._burst = limit.burst
        self._tat: Fraction | None = None

    def ready_at(self, units: int, now: float) -> float:
        """The earliest time (rounded up to a float) at which ``units`` may be taken."""
        exact_now = Fraction(now)
        if self._tat is None or self._tat <= exact_now:
            return now
        ready = self._tat + (units - self._burst) * self._interval
        if ready <= exact_now:
            return now
        as_float = float(ready)
        if Fraction(as_float) < ready:
            as_float = math.nextafter(as_float, math.inf)
        return as_float

    def take(self, units: int, now: float) -> None:
        """Account for ``units`` started at ``now`` (the caller checked :meth:`ready_at`)."""
        exact_now = Fraction(now)
        start = exact_now if self._tat is None or self._tat < exact_now else self._tat
        self._tat = start + units * self._interval
