"""Display names of the people who write to the bot, as the channels look them up."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

from loguru import logger


class NameCache:
    """Display names by user id: each kept for `ttl` seconds; at most one lookup in flight per id,
    so a burst of messages from someone new costs one platform call, not one per message; bounded
    to `limit` entries. A failed lookup yields the id itself (and is cached like a name)."""

    def __init__(self, lookup: Callable[[str], Awaitable[str]], *, channel: str, ttl: float = 3600.0,
                 limit: int = 50_000) -> None:
        self._lookup = lookup
        self._channel = channel
        self._ttl = ttl
        self._limit = limit
        self._names: dict[str, tuple[str, float]] = {}
        self._inflight: dict[str, asyncio.Task[str]] = {}

    async def get(self, user_id: str) -> str:
        cached = self._names.get(user_id)
        if cached is not None and cached[1] > time.monotonic():
            return cached[0]
        task = self._inflight.get(user_id)
        if task is None:
            task = self._inflight[user_id] = asyncio.ensure_future(self._fetch(user_id))
        return await asyncio.shield(task)  # one caller's cancellation leaves the others their answer

    async def _fetch(self, user_id: str) -> str:
        try:
            name = await self._lookup(user_id) or user_id
        except Exception as exc:  # noqa: BLE001 - a name is a nicety: fall back to the id
            logger.debug("{}: no name for {}: {}", self._channel, user_id, exc)
            name = user_id
        finally:
            self._inflight.pop(user_id, None)
        if len(self._names) >= self._limit:
            self._names.clear()
        self._names[user_id] = (name, time.monotonic() + self._ttl)
        return name
