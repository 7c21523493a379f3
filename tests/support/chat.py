"""A client of the web chat's JSON API, as the tests (and the benchmark) use it."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp


class ChatClient:
    def __init__(self, session: aiohttp.ClientSession, base_url: str) -> None:
        self.http = session
        self.base = base_url

    async def post(self, conversation_id: str, user_id: str, text: str, client_msg_id: str | None = None
                   ) -> tuple[int, dict[str, Any]]:
        body = {"conversation_id": conversation_id, "user_id": user_id, "text": text,
                "client_msg_id": client_msg_id or uuid.uuid4().hex}
        return await self._retrying("post", "/chat/api/messages", json=body)

    async def _retrying(self, method: str, path: str, **kw: Any) -> tuple[int, Any]:
        """Retry on a dropped connection (a restarted service); safe since every call is idempotent."""
        for attempt in range(3):
            try:
                async with self.http.request(method, f"{self.base}{path}", **kw) as resp:
                    return resp.status, await resp.json()
            except (aiohttp.ServerDisconnectedError, aiohttp.ClientOSError):
                if attempt == 2:
                    raise
                await asyncio.sleep(0.1)
        raise AssertionError("unreachable")

    async def messages(self, conversation_id: str, after: int = 0) -> list[dict[str, Any]]:
        status, body = await self._retrying("get", "/chat/api/messages",
                                            params={"conversation_id": conversation_id, "after": str(after)})
        assert status == 200, body
        return body["messages"]

    async def act(self, conversation_id: str, message_id: str, action_id: str, user_id: str
                  ) -> tuple[int, dict[str, Any]]:
        body = {"conversation_id": conversation_id, "message_id": message_id, "action_id": action_id,
                "user_id": user_id}
        return await self._retrying("post", "/chat/api/actions", json=body)

    async def bot_messages(self, conversation_id: str) -> list[dict[str, Any]]:
        return [m for m in await self.messages(conversation_id) if m["role"] == "bot"]

    async def wait_for(self, conversation_id: str, predicate: Callable[[list[dict[str, Any]]], Any],
                       timeout: float = 15.0, poll: float = 0.05) -> Any:
        """Poll the transcript until `predicate(bot_messages)` is truthy; return its value."""
        deadline = time.monotonic() + timeout
        last: list[dict[str, Any]] = []
        while time.monotonic() < deadline:
            last = await self.bot_messages(conversation_id)
            result = predicate(last)
            if result:
                return result
            await asyncio.sleep(poll)
        raise AssertionError(f"timed out waiting in {conversation_id}; bot messages: {last}")

    async def wait_card(self, conversation_id: str, status: str = "pending", timeout: float = 15.0) -> dict[str, Any]:
        def find(msgs):
            cards = [m for m in msgs if m["card"] and m["card"]["kind"] == "approval" and m["card"]["status"] == status]
            return cards[-1] if cards else None

        return await self.wait_for(conversation_id, find, timeout)


def final_texts(messages: list[dict[str, Any]]) -> list[str]:
    """Bot texts that are final replies (not progress, queue or approval-wait notices)."""
    out = []
    for m in messages:
        text = m["text"]
        if m["card"] or not text or text.startswith(("⏳", "⚙️", "⏸", "▶️")) or "_running…_" in text:
            continue
        out.append(text)
    return out


def finals(count: int) -> Callable[[list[dict[str, Any]]], list[str] | None]:
    """A wait_for predicate: the final replies once there are at least `count`."""

    def check(messages: list[dict[str, Any]]) -> list[str] | None:
        texts = final_texts(messages)
        return texts if len(texts) >= count else None

    return check
