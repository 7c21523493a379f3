"""The web chat's live stream (SSE), served by the channel's own routes on 127.0.0.1 over a real
SQLite store: a page that falls behind loses nothing, and stopping the channel ends the streams."""

from __future__ import annotations

import asyncio
import json

import aiohttp
from aiohttp import web

from bridge.store import migrate
from bridge.store.db import Database
from channels.base import ConversationKey, Reply
from channels.files import FileKeeper
from channels.webchat import adapter
from channels.webchat.adapter import WebChatChannel
from channels.webchat.uploads import Uploads


class _Served:
    def __init__(self, channel: WebChatChannel) -> None:
        self.channel = channel
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> "_Served":
        app = web.Application()
        app.add_routes(self.channel.routes())
        self.runner = web.AppRunner(app, handler_cancellation=False)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        return self

    async def __aexit__(self, *exc) -> None:
        assert self.runner is not None
        await self.runner.cleanup()


async def _channel(tmp_path) -> tuple[Database, WebChatChannel]:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 's.db'}")
    await migrate.upgrade(db.writer_engine)
    await db.start()
    channel = WebChatChannel(db, Uploads(FileKeeper(tmp_path / "files")))
    await channel.start(object())  # type: ignore[arg-type]  # the stream takes no messages
    return db, channel


async def _events(resp: aiohttp.ClientResponse, wanted: int, timeout: float = 20.0) -> list[dict]:
    seen: list[dict] = []
    async with asyncio.timeout(timeout):
        async for line in resp.content:
            if line.startswith(b"data: "):
                seen.append(json.loads(line[6:]))
                if len(seen) >= wanted:
                    break
    return seen


async def test_a_page_that_falls_behind_gets_every_row_from_the_store(tmp_path, monkeypatch):
    monkeypatch.setattr(adapter, "SSE_QUEUE", 20)
    db, channel = await _channel(tmp_path)
    try:
        async with _Served(channel) as served, aiohttp.ClientSession() as http:
            async with http.get(f"{served.url}/chat/api/stream", params={"conversation_id": "c-slow"}) as resp:
                assert resp.status == 200
                while not channel.hub.count:
                    await asyncio.sleep(0.01)
                # 150 replies committed in one cycle and published before the stream's task runs
                # again: its queue of 20 overflows
                key = ConversationKey("webchat", "c-slow")
                sent = await asyncio.gather(*(channel.send(key, Reply(f"reply {n}"), idempotency_key=f"k{n}")
                                              for n in range(150)))
                # and it goes on live afterwards
                await channel.send(key, Reply("after"), idempotency_key="after")
                seen: dict[str, dict] = {}
                async with asyncio.timeout(20):
                    while "after" not in {m["text"] for m in seen.values()}:
                        for m in await _events(resp, 1):
                            seen[m["id"]] = m  # the page keeps a message by id (a repeat is dropped)
                assert set(seen) == set(sent) | {m["id"] for m in seen.values() if m["text"] == "after"}
                assert {m["text"] for m in seen.values()} == {f"reply {n}" for n in range(150)} | {"after"}
    finally:
        await channel.stop()
        await db.close()


async def test_stopping_the_channel_ends_the_open_streams(tmp_path):
    db, channel = await _channel(tmp_path)
    try:
        async with _Served(channel) as served, aiohttp.ClientSession() as http:
            async with http.get(f"{served.url}/chat/api/stream", params={"conversation_id": "c-open"}) as resp:
                while not channel.hub.count:
                    await asyncio.sleep(0.01)
                await asyncio.wait_for(channel.stop(), 10)
                async with asyncio.timeout(10):
                    assert await resp.content.read() == b""  # the stream ended
                assert channel.hub.count == 0
    finally:
        await channel.stop()
        await db.close()
