"""Feishu's long connection (`FEISHU_CONNECTION=websocket`): events without a public URL.

lark-oapi's `ws.Client` runs its own event loop forever (it takes a module-level loop at import
and `start()` never returns), so it gets a thread of its own with a loop of its own. Each event
frame is handed to the channel's `handle` on the service's loop, and the frame is acknowledged
only after that returns (the event is persisted by then); a card click's toast goes back in the
ack. The SDK reconnects a dropped connection itself; the `websockets` keepalive closes a silent
(zombie) one, which the SDK then replaces; and if the SDK's loop gives up, this supervisor starts
a new client after a jittered backoff. `/readyz` shows whether the connection is up.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from concurrent.futures import TimeoutError as FutureTimeout
from typing import Any

import orjson
from loguru import logger

HANDLE_TIMEOUT = 2.5  # Feishu waits 3 s for the ack


class _Handler:
    """What `ws.Client` calls for each event frame (in place of the SDK's dispatcher)."""

    def __init__(self, connection: "LongConnection") -> None:
        self.connection = connection

    def _do_without_validation(self, payload: bytes) -> Any:
        return self.connection.deliver(payload)


class LongConnection:
    def __init__(self, config) -> None:
        self.config = config
        self.channel = None
        self.main_loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._client = None
        self._ws_loop: asyncio.AbstractEventLoop | None = None
        self.connects = 0
        self.last_event_at: float | None = None
        self.last_error = ""

    async def start(self, channel) -> None:
        self.channel = channel
        self.main_loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._run, name="feishu-ws", daemon=True)
        self._thread.start()

    async def stop(self) -> None:
        self._stopping.set()
        loop, client = self._ws_loop, self._client
        if loop is not None and client is not None and not loop.is_closed():
            client._auto_reconnect = False

            async def _close() -> None:
                await client._disconnect()
                asyncio.get_running_loop().stop()

            try:
                asyncio.run_coroutine_threadsafe(_close(), loop)
            except RuntimeError:
                pass
        if self._thread is not None:
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 5.0)

    def health(self) -> dict[str, Any]:
        conn = getattr(self._client, "_conn", None) if self._client is not None else None
        connected = conn is not None and getattr(getattr(conn, "state", None), "name", "OPEN") == "OPEN"
        out: dict[str, Any] = {"connected": connected, "connects": self.connects}
        if self.last_event_at is not None:
            out["last_event_age_s"] = round(time.time() - self.last_event_at, 1)
        if self.last_error and not connected:
            out["error"] = self.last_error
        return out

    # -- the ws thread

    def _run(self) -> None:
        from channels.feishu.sdk import LogLevel  # first: then the next line loads the ws client alone
        import lark_oapi.ws.client as ws_module  # noqa: I001

        failures = 0
        while not self._stopping.is_set():
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            ws_module.loop = loop  # the SDK's module-level loop: this thread's
            self._ws_loop = loop
            client = ws_module.Client(self.config.app_id, self.config.app_secret, event_handler=_Handler(self),
                                    domain=self.config.domain, auto_reconnect=True, log_level=LogLevel.WARNING)
            client.on_reconnected = self._connected
            self._client = client
            try:
                self._connected()
                client.start()  # returns only when the loop is stopped (stop()) or it raises
            except Exception as exc:  # noqa: BLE001 - auth failures, an unreachable endpoint
                self.last_error = f"{type(exc).__name__}: {exc}"
                logger.error("feishu: long connection failed: {}", self.last_error)
            finally:
                try:
                    loop.close()
                except RuntimeError:
                    pass
            if self._stopping.is_set():
                break
            failures += 1
            ceiling = min(60.0, 0.5 * 2 ** min(failures, 7))
            self._stopping.wait(random.uniform(ceiling / 2, ceiling))

    def _connected(self) -> None:
        self.connects += 1
        self.last_error = ""

    def deliver(self, payload: bytes) -> Any:
        """One event frame: handled on the service's loop; the result (a card's toast) is the ack."""
        assert self.main_loop is not None and self.channel is not None
        self.last_event_at = time.time()
        try:
            event = orjson.loads(payload)
        except ValueError:
            logger.warning("feishu: long connection sent a frame that is not JSON")
            return None
        future = asyncio.run_coroutine_threadsafe(self.channel.handle(event), self.main_loop)
        try:
            status, body = future.result(timeout=HANDLE_TIMEOUT)
        except FutureTimeout:
            future.cancel()
            raise RuntimeError("the event was not handled in time") from None
        if status >= 400:
            raise RuntimeError(f"the event was refused ({status}): {body}")
        return body or None
