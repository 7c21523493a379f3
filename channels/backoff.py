"""Trying something again in the background until it works: a platform away at start-up."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

FIRST, MOST = 1.0, 60.0  # seconds before the next try: doubling from FIRST up to MOST


async def again_until(attempt: Callable[[], Awaitable[bool]], *, first: float = FIRST, most: float = MOST) -> None:
    """`attempt()` again after a pause (doubling) until it returns True. The first try is the
    caller's own; an attempt says True also to be tried no more (it logs why)."""
    delay = first
    while True:
        await asyncio.sleep(delay)
        delay = min(delay * 2, most)
        if await attempt():
            return
