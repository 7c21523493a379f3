"""The session resolver: conversation key -> conversation row -> active session.

The resolution is cached in memory (bounded, least recently used first out, a few seconds each),
so a turn on a known conversation costs no store round-trip to find its session.
"""

from __future__ import annotations

import dataclasses
import time
from collections import OrderedDict

from bridge.store import conversations
from bridge.store.conversations import SessionRef
from bridge.store.db import Database
from channels.base import ConversationKey

CACHE_SIZE = 10_000
# Within the service only the conversation's lane and its commands change a binding (and they
# forget it); the TTL bounds how long a change made from outside (`agent-bridge handoff`) waits.
CACHE_TTL = 5.0


class SessionResolver:
    def __init__(self, db: Database, *, runtime: str, workspace: str) -> None:
        self.db = db
        self.runtime = runtime
        self.workspace = workspace
        self._cache: OrderedDict[str, tuple[SessionRef, float]] = OrderedDict()

    async def resolve(self, key: str, *, is_group: bool) -> SessionRef:
        cached = self._cache.get(key)
        if cached is not None and cached[1] > time.monotonic():
            self._cache.move_to_end(key)
            return cached[0]
        conv = ConversationKey.parse(key)

        async def _lookup(conn) -> SessionRef | None:
            row = await conversations.get_by_key(conn, key)
            if row is None or row.active_session_id is None:
                return None
            return await conversations.get_session(conn, row.active_session_id)

        known = await self.db.read(_lookup)  # a read: the usual case needs no writer cycle
        if known is not None:
            self._remember(key, known)
            return known

        async def _resolve(conn) -> SessionRef:
            conversation_id = await conversations.ensure_conversation(
                conn, key, channel=conv.channel, chat_id=conv.chat_id, thread_id=conv.thread_id, is_group=is_group
            )
            return await conversations.active_session(
                conn, conversation_id, runtime=self.runtime, workspace=self.workspace
            )

        session = await self.db.write(_resolve)
        self._remember(key, session)
        return session

    def _remember(self, key: str, session: SessionRef) -> None:
        self._cache[key] = (session, time.monotonic() + CACHE_TTL)
        self._cache.move_to_end(key)
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)

    def forget(self, key: str) -> None:
        """Drop a cached binding (the conversation's active session changed)."""
        self._cache.pop(key, None)

    async def bind_thread(self, key: str, session_id: int, *, thread_id: str, lost: str | None,
                          reason: str | None) -> None:
        """Persist a new runtime thread for the session and keep the cached binding in step."""

        async def _bind(conn) -> None:
            await conversations.bind_thread(conn, session_id, runtime=self.runtime, thread_id=thread_id,
                                            lost=lost, reason=reason)

        await self.db.write(_bind)
        cached = self._cache.get(key)
        if cached is not None and cached[0].session_id == session_id:
            self._remember(key, dataclasses.replace(cached[0], runtime_thread_id=thread_id))
