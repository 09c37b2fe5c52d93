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

Why a bound on ``per / count``: ``T`` must be a positive number of seconds within the range of a
float, or no deadline could be handed to trio; a ``RateLimit`` whose ``T`` is not (``count=1e308,
per=1e-308``) is refused at construction. A theoretical arrival time beyond the largest float (a
huge ``T`` times many units) means "never on this clock", and the deadline is then ``inf``.

The limiter is consulted by the batcher's single dispatcher, which serves callers in arrival
order, so waiting is first come, first served with no retry storm.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Literal

import attrs

from ._util import check_int, check_number, shown

__all__ = ["RateLimit"]


def _interval(per: float, count: float) -> Fraction:
    """``per / count`` exactly, if a positive finite float can stand for it."""
    interval = Fraction(per) / Fraction(count)
    try:
        representable = float(interval) > 0
    except OverflowError:
        representable = False
    if not representable:
        raise ValueError(
            f"per / count must be within the range of a float, got {shown(per)} / {shown(count)}"
        )
    return interval


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
        ValueError: if one is not positive or not finite (an int or Fraction beyond the
            largest float counts as not finite), if ``per / count`` is too large or too small
            for a float, or if ``unit`` is neither ``"call"`` nor ``"item"``.
    """

    count: float
    per: float = 1.0
    burst: int = 1
    unit: Literal["call", "item"] = "call"

    def __attrs_post_init__(self) -> None:
        check_number("count", self.count, above=0)
        check_number("per", self.per, above=0)
        check_int("burst", self.burst, 1)
        if self.unit not in ("call", "item"):
            raise ValueError(f"unit must be 'call' or 'item', got {self.unit!r}")
        _interval(self.per, self.count)


class _Gcra:
    """The mutable state of one :class:`RateLimit`: the theoretical arrival time."""

    __slots__ = ("_burst", "_interval", "_tat")

    def __init__(self, limit: RateLimit) -> None:
        self._interval = _interval(limit.per, limit.count)
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
        try:
            as_float = float(ready)
        except OverflowError:  # later than the largest float: never, on this clock
            return math.inf
        if Fraction(as_float) < ready:
            as_float = math.nextafter(as_float, math.inf)
        return as_float

    def take(self, units: int, now: float) -> None:
        """Account for ``units`` started at ``now`` (the caller checked :meth:`ready_at`)."""
        exact_now = Fraction(now)
        start = exact_now if self._tat is None or self._tat < exact_now else self._tat
        self._tat = start + units * self._interval
