"""The batchers open in this process, for exporters that observe them all.

A batcher registers itself when its block starts and leaves when the block ends (in a
``finally``, so also when the block fails or is cancelled): two dict operations per batcher
lifetime, nothing per item. Exporters read it from any thread (a Prometheus scrape runs in its
own): a lock makes the copy consistent with the changes.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any

from . import _log

if TYPE_CHECKING:
    from ._batcher import Batcher

__all__ = ["batcher_closed", "batcher_opened", "open_batchers"]

_lock = threading.Lock()
_open: dict[int, Batcher[Any, Any]] = {}  # by id: batchers are slotted, not weakly referable


def batcher_opened(batcher: Batcher[Any, Any]) -> None:
    with _lock:
        _open[id(batcher)] = batcher


def batcher_closed(batcher: Batcher[Any, Any], drained: bool) -> None:
    """The batcher's block ended: ``drained`` if normally, every accepted item processed."""
    with _lock:
        _open.pop(id(batcher), None)
    _log.batcher_closed(batcher, drained)


def open_batchers() -> list[Batcher[Any, Any]]:
    """The batchers open now, in no particular order."""
    with _lock:
        return list(_open.values())
