"""The pipeline's handle on outbound messages: queue sends and edits inside a store transaction
(or as statements for the writer to coalesce), then kick the delivery worker after the commit."""

from __future__ import annotations

from collections.abc import Callable

from bridge.store import outbox as repo
from channels.base import Reply


class Outbox:
    def __init__(self, dialect: str) -> None:
        self.dialect = dialect
        self._kick: Callable[[str], None] = lambda _key: None

    def bind(self, kick: Callable[[str], None]) -> None:
        self._kick = kick

    @staticmethod
    def new_ref() -> str:
        return repo.new_ref()

    def send_ops(self, channel: str, conversation_key: str, reply: Reply, *, ref: str) -> repo.Ops:
        return repo.send_ops(self.dialect, channel=channel, conversation_key=conversation_key,
                             payload=reply.to_payload(), ref=ref)

    def update_ops(self, channel: str, conversation_key: str, reply: Reply, *, ref: str) -> repo.Ops:
        return repo.update_ops(self.dialect, channel=channel, conversation_key=conversation_key,
                               payload=reply.to_payload(), ref=ref)

    def react_ops(self, channel: str, conversation_key: str, *, platform_message_id: str | None, state: str,
                  key: str) -> repo.Ops:
        """The turn's end shown on the person's message; nothing when there is no such message
        (the web chat's messages, a routine's run)."""
        if not platform_message_id:
            return []
        return repo.react_ops(self.dialect, channel=channel, conversation_key=conversation_key,
                              platform_message_id=platform_message_id, state=state, key=key)

    async def send_in(self, conn, channel: str, conversation_key: str, reply: Reply, *, ref: str) -> None:
        await repo.run(conn, self.send_ops(channel, conversation_key, reply, ref=ref))

    async def update_in(self, conn, channel: str, conversation_key: str, reply: Reply, *, ref: str) -> None:
        await repo.run(conn, self.update_ops(channel, conversation_key, reply, ref=ref))

    def kick(self, conversation_key: str) -> None:
        self._kick(conversation_key)
