"""Feishu's long connection (`FEISHU_CONNECTION=websocket`): events without a public URL.

lark-oapi's `ws.Client` runs its own event loop forever (it takes a module-level loop at import
and `start()` never returns), so it gets a thread of its own with a loop of its own. Each event
frame is handed to the channel's `handle` on the service's loop, and the frame is acknowledged
only after that returns (the event is persisted by then); a card click's toast goes back in the
ack. The SDK reconnects a dropped connection itself; the `websockets` keepalive closes a silent
(zombie) one, which the SDK then replaces; and if the SDK's loop gives up, or its reconnection
dies (a watchdog sees the connection down for DOWN_LIMIT), this supervisor starts a new client
after a jittered backoff. `/readyz` shows whether the connection is up.
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
# The SDK's own reconnection can die for good (a client error while it fetches a new endpoint,
# such as "exceed conn limit", ends its task while start() waits forever): a connection down
# this long gets a new client from the supervisor.
DOWN_LIMIT = 60.0
WATCHDOG_EVERY = 1.0


class _Handler:
    """What `ws.Client` calls for each event frame (in place of the SDK's dispatcher)."""

    def __init__(self, connection: "LongConnection") -> None:
        self.connection = connection

    def _do_without_validation(self, payload: bytes) -> Any:
        return self.connection.deliver(payload)


class LongConnection:
    def __init__(self, config, *, down_limit: float = DOWN_LIMIT) -> None:
        self.config = config
        self.down_limit = down_limit
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

    @staticmethod
    def _is_up(client) -> bool:
        conn = getattr(client, "_conn", None) if client is not None else None
        return conn is not None and getattr(getattr(conn, "state", None), "name", "OPEN") == "OPEN"

    def health(self) -> dict[str, Any]:
        connected = self._is_up(self._client)
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
            watch = _Watchdog(self, client, loop)
            loop.call_soon(watch.check)
            try:
                self._connected()
                client.start()  # returns only when the loop is stopped (stop(), the watchdog) or it raises
            except Exception as exc:  # noqa: BLE001 - auth failures, an unreachable endpoint
                if not self._stopping.is_set():
                    self.last_error = watch.gave_up or f"{type(exc).__name__}: {exc}"
                    logger.error("feishu: long connection failed: {}", self.last_error)
            finally:
                _close_loop(loop)
            if self._stopping.is_set():
                break
            failures = 1 if watch.was_up else failures + 1
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


class _Watchdog:
    """On the client's loop, once a second: a connection that has stayed down for `down_limit`
    stops the loop, so that start() returns and the supervisor starts a new client."""

    def __init__(self, connection: LongConnection, client, loop: asyncio.AbstractEventLoop) -> None:
        self.connection = connection
        self.client = client
        self.loop = loop
        self.down_since = time.monotonic()
        self.was_up = False
        self.gave_up = ""

    def check(self) -> None:
        if self.connection._stopping.is_set():
            return
        now = time.monotonic()
        if LongConnection._is_up(self.client):
            self.was_up, self.down_since = True, now
        elif now - self.down_since > self.connection.down_limit:
            self.gave_up = f"down for {now - self.down_since:.0f}s; a new client is started"
            self.client._auto_reconnect = False
            self.loop.stop()
            return
        self.loop.call_later(WATCHDOG_EVERY, self.check)


def _close_loop(loop: asyncio.AbstractEventLoop) -> None:
    """Close a client's loop, its tasks (the SDK's pings and caches) cancelled and finished first."""
    try:
        pending = [task for task in asyncio.all_tasks(loop) if not task.done()]
        for task in pending:
            task.cancel()
        if pending and not loop.is_running():
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.close()
    except RuntimeError:
        pass
