"""Notifications between replicas on PostgreSQL: LISTEN on one connection of its own, NOTIFY in
the writer's transactions (so a notification goes out only if, and when, its change commits).

A notification says "look again", never what changed: a listener reads the store for that. So a
notification lost while the connection was down costs nothing more than `on_gap`, which is called
each time the connection is (re)established, for the listener to look at everything it watches.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg
from loguru import logger
from sqlalchemy import make_url, text

RETRY_FIRST = 0.5
RETRY_MAX = 30.0
PROBE_INTERVAL = 10.0  # a connection cut without a word (a partition) shows at the next probe

_NOTIFY = text("SELECT pg_notify(:channel, p) FROM unnest(CAST(:payloads AS text[])) AS p")


def notify_statement(channel: str, payloads: Sequence[str]) -> tuple[Any, dict[str, Any]]:
    """The statement and parameters that NOTIFY `channel` once per distinct payload."""
    return _NOTIFY, {"channel": channel, "payloads": list(dict.fromkeys(payloads))}


def asyncpg_dsn(url: str) -> str:
    """The store's SQLAlchemy URL (postgresql+asyncpg://...) as a DSN asyncpg takes itself."""
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


class Listener:
    """LISTEN `channel` and call `on_notify(payload)` for each notification; `on_gap()` after
    each (re)connection. A lost connection is opened again with backoff, visibly in the log."""

    def __init__(self, url: str, channel: str, *, on_notify: Callable[[str], None], on_gap: Callable[[], None],
                 application_name: str) -> None:
        self._dsn = asyncpg_dsn(url)
        self.channel = channel
        self._on_notify = on_notify
        self._on_gap = on_gap
        self._application_name = application_name
        self._task: asyncio.Task[None] | None = None
        self._conn: asyncpg.Connection | None = None
        self.connects = 0
        self.last_error: str | None = None
        self.retry_in: float | None = None  # not listening: the pause before the next attempt
        self._tried = asyncio.Event()

    @property
    def listening(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def start(self, *, wait: float = 5.0) -> None:
        """Start listening; returns once the first attempt has succeeded or failed (then it goes
        on trying in the background), or after `wait` seconds."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"listen:{self.channel}")
            try:
                async with asyncio.timeout(wait):
                    await self._tried.wait()
            except TimeoutError:
                pass

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def health(self) -> dict[str, Any]:
        """Reported, never failing readiness: without it only live updates across replicas
        degrade (pages still get what this replica writes, and catch up when they reconnect), and
        a pooler that does not pass LISTEN through (PgBouncer in transaction mode) must not keep
        every replica out of its load balancer."""
        return {"ok": True, "listening": self.listening, "channel": self.channel, "connects": self.connects,
                "last_error": self.last_error}

    async def _run(self) -> None:
        delay = RETRY_FIRST
        while True:
            connects = self.connects
            try:
                await self._listen()  # returns only by raising: the connection was lost or refused
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure: listen again later, said in the log
                if self.connects > connects:
                    delay = RETRY_FIRST  # it was up: this loss starts the backoff over
                self.last_error = f"{type(exc).__name__}: {exc}"
                self._tried.set()
                logger.warning("store: LISTEN {} lost or refused ({}); again in {:.1f}s",
                               self.channel, self.last_error, delay)
            self.retry_in = delay
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))
            delay = min(delay * 2, RETRY_MAX)

    async def _listen(self) -> None:
        lost = asyncio.Event()
        conn = await asyncpg.connect(self._dsn, server_settings={"application_name": self._application_name})
        self._conn = conn
        try:
            conn.add_termination_listener(lambda _conn: lost.set())
            await conn.add_listener(self.channel, self._notified)
            self.connects += 1
            self.retry_in = None
            self._tried.set()
            if self.connects > 1:
                logger.info("store: LISTEN {} again", self.channel)
            self._on_gap()  # whatever was notified while not listening
            while not lost.is_set():
                try:
                    async with asyncio.timeout(PROBE_INTERVAL):
                        await lost.wait()
                except TimeoutError:
                    async with asyncio.timeout(PROBE_INTERVAL):
                        await conn.fetchval("SELECT 1")
            raise ConnectionError("the listening connection was closed")
        finally:
            self._conn = None
            if not conn.is_closed():
                conn.terminate()

    def _notified(self, _conn: Any, _pid: int, _channel: str, payload: str) -> None:
        try:
            self._on_notify(payload)
        except Exception:  # noqa: BLE001 - one bad callback must not stop the listening
            logger.exception("store: a notification on {} failed", self.channel)
