"""Feishu's long connection against the platform emulator on 127.0.0.1, in process: when the
SDK's own reconnection dies, a new client is started."""

from __future__ import annotations

import asyncio
import types

from channels.feishu.longconn import LongConnection
from tests.support.feishu_emulator import FeishuEmulator


class Channel:
    """The channel's side of the connection: every event handled."""

    def __init__(self) -> None:
        self.events: list[dict] = []

    async def handle(self, event: dict) -> tuple[int, dict]:
        self.events.append(event)
        return 200, {}


async def test_a_reconnection_the_sdk_gave_up_on_is_started_again():
    emu = FeishuEmulator().start()
    emu.configure(ws_client_config={"ReconnectCount": -1, "ReconnectInterval": 1, "ReconnectNonce": 0,
                                    "PingInterval": 5})
    connection = LongConnection(types.SimpleNamespace(app_id=emu.app_id, app_secret=emu.app_secret, domain=emu.url),
                                down_limit=3.0)
    channel = Channel()
    await connection.start(channel)
    try:
        assert await asyncio.to_thread(emu.wait_ws, 1, 15.0)
        # the endpoint refuses the SDK's next reconnection with a client error, once: that ends
        # the SDK's reconnect task for good
        emu.fault("POST", "/callback/ws/endpoint", status=200, code=1000040350, msg="exceed conn limit", times=1)
        emu.drop_ws()
        assert await asyncio.to_thread(emu.wait_ws, 2, 30.0)
        ack = await asyncio.to_thread(emu.push_ws, {"schema": "2.0", "header": {"event_type": "x", "event_id": "e1"},
                                                    "event": {}})
        assert ack["acked"] and [e["header"]["event_id"] for e in channel.events] == ["e1"]
        assert connection.health()["connected"]
    finally:
        await connection.stop()
        emu.stop()
