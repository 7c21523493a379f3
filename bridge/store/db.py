"""Database access: a read pool and one group-committing writer.

SQLite allows one writer at a time, and a transaction per request through SQLAlchemy async costs
several thread round-trips. So every write in the service goes through the writer: one task
owns one connection, drains whatever write units are queued, runs them in a single transaction,
commits once and only then resolves each caller's future. Units that share a `batch` function
(`write_batched`) are coalesced into one call, and equal statements queued through `execute()`
into one executemany, so a busy cycle costs a handful of statements however many messages it
carries: that is what lets the inbox acknowledge thousands of messages a second while still
persisting each one before the ack.

If a batch fails, it is rolled back and retried in halves (recursively), so one bad unit fails
alone, costs O(log n) extra commits, and never takes its neighbours with it.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from loguru import logger
from sqlalchemy import Executable, event, text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

T = TypeVar("T")

SingleFn = Callable[[AsyncConnection], Awaitable[Any]]
BatchFn = Callable[[AsyncConnection, Sequence[Any]], Awaitable[Sequence[Any]]]
Statements = Sequence[tuple[Executable, dict[str, Any]]]

MAX_BATCH = 1000
BACKGROUND_BATCH = 256  # bounds how long an urgent unit can wait behind background work


class StoreClosed(RuntimeError):
    """A write was queued after the store closed."""


@dataclass(slots=True)
class _Unit:
    future: asyncio.Future[Any]
    single: SingleFn | None = None
    batch: BatchFn | None = None
    item: Any = None
    statements: Statements | None = None


@dataclass
class WriterStats:
    commits: int = 0
    units: int = 0
    failed_batches: int = 0
    extra: dict[str, int] = field(default_factory=dict)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def make_engine(url: str, *, pool_size: int) -> AsyncEngine:
    if url.startswith("sqlite"):
        engine = create_async_engine(url, pool_size=pool_size, max_overflow=0)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    else:
        engine = create_async_engine(url, pool_size=pool_size, max_overflow=0, pool_pre_ping=True)
    return engine


class Database:
    """The store's connections: `read()` on a small pool, `write()` through the group committer."""

    def __init__(self, url: str, *, read_pool: int = 4) -> None:
        self.url = url
        self.is_sqlite = url.startswith("sqlite")
        self.dialect = "sqlite" if self.is_sqlite else "postgresql"
        self.reader = make_engine(url, pool_size=read_pool)
        self.writer_engine = make_engine(url, pool_size=1)
        self._urgent: deque[_Unit] = deque()
        self._background: deque[_Unit] = deque()
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._conn: AsyncConnection | None = None
        self.stats = WriterStats()

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._conn = await self.writer_engine.connect()
            self._task = asyncio.create_task(self._run(), name="store-writer")

    async def close(self) -> None:
        self._closed = True  # later writes fail at once instead of waiting for a writer that is gone
        if self._task is not None:
            # Everything already queued is written before the writer stops.
            await self._drained.wait()
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._conn is not None:
            await self._conn.close()
            self._conn = None
        await self.writer_engine.dispose()
        await self.reader.dispose()

    # -- API -------------------------------------------------------------------------------

    def write(self, fn: SingleFn, *, urgent: bool = False) -> Awaitable[Any]:
        """Run `fn(conn)` inside the next group transaction; resolves after COMMIT."""
        return self._put(_Unit(asyncio.get_running_loop().create_future(), single=fn), urgent)

    def write_batched(self, batch: BatchFn, item: Any, *, urgent: bool = False) -> Awaitable[Any]:
        """Queue `item`; all queued items with the same `batch` function run as one call.

        `batch(conn, items)` must return one result per item, in order.
        """
        return self._put(_Unit(asyncio.get_running_loop().create_future(), batch=batch, item=item), urgent)

    def execute(self, statements: Statements, *, urgent: bool = False) -> Awaitable[None]:
        """Run parameterized statements in the next group transaction; resolves after COMMIT.

        Equal statement objects queued by different callers run as one executemany, in the order
        each statement first appears in the group, so callers use module-level statements.
        """
        return self._put(_Unit(asyncio.get_running_loop().create_future(), statements=statements), urgent)

    def _put(self, unit: _Unit, urgent: bool) -> asyncio.Future[Any]:
        """Urgent units (what a person or a platform waits on: acks, clicks) get their own cycles;
        when both kinds wait, cycles alternate, so background work is slowed, never starved."""
        if self._closed and self._task is None:
            unit.future.set_exception(StoreClosed("the store is closed"))
            return unit.future
        (self._urgent if urgent else self._background).append(unit)
        self._drained.clear()
        self._wake.set()
        return unit.future

    async def read(self, fn: Callable[[AsyncConnection], Awaitable[T]]) -> T:
        async with self.reader.connect() as conn:
            return await fn(conn)

    async def ping(self) -> None:
        async with self.reader.connect() as conn:
            await conn.execute(text("SELECT 1"))

    # -- the writer ------------------------------------------------------------------------

    async def _run(self) -> None:
        urgent_turn = True
        while True:
            if not self._urgent and not self._background:
                self._drained.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            take_urgent = bool(self._urgent) and (urgent_turn or not self._background)
            source, limit = (self._urgent, MAX_BATCH) if take_urgent else (self._background, BACKGROUND_BATCH)
            units = [source.popleft() for _ in range(min(limit, len(source)))]
            urgent_turn = not take_urgent
            await self._commit_group(units)

    async def _commit_group(self, units: list[_Unit]) -> None:
        conn = self._conn
        assert conn is not None
        if conn.closed or conn.invalidated:
            await self._rollback(conn)
            conn = self._conn
            assert conn is not None
        try:
            results = await self._execute(conn, units)
            await conn.commit()
        except Exception as exc:  # noqa: BLE001 - isolate the failing unit below
            await self._rollback(conn)
            if len(units) == 1:
                self._fail(units[0], exc)
                return
            self.stats.failed_batches += 1
            logger.warning("store: batch of {} failed ({}); retrying it in halves", len(units), _brief(exc))
            half = len(units) // 2
            await self._commit_group(units[:half])
            await self._commit_group(units[half:])
            return
        self.stats.commits += 1
        self.stats.units += len(units)
        for unit, result in zip(units, results):
            if not unit.future.done():
                unit.future.set_result(result)

    async def _execute(self, conn: AsyncConnection, units: list[_Unit]) -> list[Any]:
        results: list[Any] = [None] * len(units)
        # Group work by what can share one call: a batch function's items, a statement's parameter
        # sets. Groups run in the order they first appear; single units run in place.
        batches: dict[BatchFn, list[int]] = {}
        params: dict[Executable, list[dict[str, Any]]] = {}
        order: list[tuple[str, Any]] = []
        for index, unit in enumerate(units):
            if unit.batch is not None:
                if unit.batch not in batches:
                    batches[unit.batch] = []
                    order.append(("batch", unit.batch))
                batches[unit.batch].append(index)
            elif unit.statements is not None:
                for stmt, values in unit.statements:
                    if stmt not in params:
                        params[stmt] = []
                        order.append(("stmt", stmt))
                    params[stmt].append(values)
            else:
                order.append(("single", index))
        for kind, ref in order:
            if kind == "single":
                unit = units[ref]
                assert unit.single is not None
                results[ref] = await unit.single(conn)
            elif kind == "stmt":
                values = params[ref]
                await conn.execute(ref, values if len(values) > 1 else values[0])
            else:
                indexes = batches[ref]
                out = await ref(conn, [units[i].item for i in indexes])
                for i, value in zip(indexes, out, strict=True):
                    results[i] = value
        return results

    async def _rollback(self, conn: AsyncConnection) -> None:
        try:
            await conn.rollback()
            if not conn.invalidated:
                return
        except Exception as exc:  # noqa: BLE001
            logger.error("store: rollback failed: {}", exc)
        # The connection is gone (database restarted, network cut): take a fresh one.
        try:
            await conn.close()
        except Exception:  # noqa: BLE001
            pass
        try:
            self._conn = await self.writer_engine.connect()
            logger.warning("store: writer reconnected")
        except Exception as exc:  # noqa: BLE001 - the next batch tries again
            logger.error("store: writer cannot reconnect: {}", exc)

    @staticmethod
    def _fail(unit: _Unit, exc: BaseException) -> None:
        if not unit.future.done():
            unit.future.set_exception(exc)


def _brief(exc: BaseException) -> str:
    """The error's type and first line: never the statement's parameters (they carry user data)."""
    first = str(getattr(exc, "orig", None) or exc).splitlines()
    return f"{type(exc).__name__}: {first[0] if first else ''}"[:300]
