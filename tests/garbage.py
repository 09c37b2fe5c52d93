"""What a piece of code leaves to the cyclic garbage collector, for the no-cycles tests."""

from __future__ import annotations

import gc
from collections.abc import Awaitable, Callable


async def cyclic_garbage(
    run: Callable[[], Awaitable[None]], is_ours: Callable[[object], bool]
) -> list[str]:
    """What running ``run`` leaves to the cyclic collector that ``is_ours``, described."""
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        await run()
        gc.collect()
        return [repr(obj)[:120] for obj in gc.garbage if is_ours(obj)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
