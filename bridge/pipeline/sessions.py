"""The session resolver: conversation key -> conversation row -> active session.

A conversation's lane is the only writer of its session binding, so the resolution is cached in
memory (bounded, least recently used first out) and a turn on a known conversation costs no
store round-trip to find its session.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

from bridge.store import conversations
from bridge.store.conversations import SessionRef
from bridge.store.db import Database
from channels.base import ConversationKey

CACHE_SIZE = 10_000


class SessionResolver:
    def __init__(self, db: Database, *, runtime: str, workspace: str) -> None:
        self.db = db
        self.runtime = runtime
        self.workspace = workspace
        self._cache: OrderedDict[str, SessionRef] = OrderedDict()

    async def resolve(self, key: str, *, is_group: bool) -> SessionRef:
        session = self._cache.get(key)
        if session is not None:
            self._cache.move_to_end(key)
            return session
        conv = ConversationKey.parse(key)

        async def _resolve(conn) -> SessionRef:
            conversation_id = await conversations.ensure_conversation(
                conn, key, channel=conv.channel, chat_id=conv.chat_id, thread_id=conv.thread_id, is_group=is_group
            )
            return await conversations.active_session(
                conn, conversation_id, runtime=self.runtime, workspace=self.workspace
            )

        session = await self.db.write(_resolve)
        self._cache[key] = session
        if len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)
        return session

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
        if cached is not None and cached.session_id == session_id:
            self._cache[key] = dataclasses.replace(cached, runtime_thread_id=thread_id)
