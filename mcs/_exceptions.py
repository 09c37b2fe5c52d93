"""The exceptions mcs adds to trio's own.

mcs reuses trio's exceptions wherever they fit: a call to a closed batcher raises
:class:`trio.ClosedResourceError`, a caller whose batcher was shut down under it gets
:class:`trio.BrokenResourceError`, and a graph ``timeout`` raises :class:`trio.TooSlowError`.
What is left is specific to batching::

    Exception
    ├── MCSError
    │   ├── Overloaded          a full batcher refused an item (``overload="reject"``)
    │   └── BatchResultError    batch_fn returned a result that does not fit its items
    └── (trio.ClosedResourceError, trio.BrokenResourceError, trio.TooSlowError)
"""

from __future__ import annotations

__all__ = ["BatchResultError", "MCSError", "Overloaded"]


class MCSError(Exception):
    """Base class of the exceptions that mcs defines itself."""


class Overloaded(MCSError):
    """A batcher with ``overload="reject"`` had no room for the item; nothing was queued.

    Retrying at once is unlikely to help: shed the request or retry with back-off.
    """


class BatchResultError(MCSError):
    """A batch_fn returned a result that does not fit its items.

    Raised to the affected callers only: a sequence of the wrong length, a mapping without the
    caller's item as a key, or something that is neither a sequence nor a mapping.
    """
