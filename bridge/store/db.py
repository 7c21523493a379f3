"""Database access: reads, and one group-committing writer.

SQLite allows one writer at a time, and a transaction per request through SQLAlchemy async costs
several thread round-trips. So every write in the service goes through the writer: one task
owns one connection, drains whatever write units are queued, runs them in a single transaction,
commits once and only then resolves each caller's future. Units that share a `batch` function
(`write_batched`) are coalesced into one call, and equal statements queued through `execute()`
into one executemany, so a busy cycle costs a handful of statements however many messages it
carries: that is what lets the inbox acknowledge thousands of messages a second while still
persisting each one before the ack.

On SQLite, the writer cycle and the point reads run on the event loop's own thread, over plain
`sqlite3` connections, with no thread hop at all. aiosqlite pays one round trip between the loop
and its worker thread per statement; on a VM whose cores wake each other slowly, those hand-offs,
not SQLite, were the cost of a message (see docs/benchmarks.md). That is safe because nothing in
the cycle can wait on the outside world:

- store functions stay `async def` taking a connection, and on SQLite they are driven to
  completion synchronously (`_drive`); one that awaits anything but its connection is an error;
- WAL with `synchronous=NORMAL` commits without fsync; the fsync happens at checkpoints, which
  the writer never runs itself (`wal_autocheckpoint=0`): a checkpointer task runs them on the
  aiosqlite pool's thread, and holds the writer between two cycles only when the WAL outgrew
  WAL_LIMIT under writes that never paused;
- the writer takes SQLite's write lock with `BEGIN IMMEDIATE` and no busy wait: when another
  process (the CLI) holds it, the cycle is retried after an async pause instead of blocking;
- reads that may be large (`read(fn, offload=True)`) still go through the aiosqlite pool.

PostgreSQL (several replicas) keeps everything on asyncpg, which is natively asynchronous.

If a batch fails, it is rolled back and retried in halves (recursively), so one bad unit fails
alone, costs O(log n) extra commits, and never takes its neighbours with it.
"""

from __future__ import annotations

import asyncio
import os
import sqlite3
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from loguru import logger
from sqlalchemy import Connection, Engine, Executable, create_engine, event, make_url, text
from sqlalchemy.exc import DisconnectionError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from bridge import jsoncodec
from bridge.errors import Unavailable
from bridge.store.dialect import plain_statement

T = TypeVar("T")

SingleFn = Callable[[AsyncConnection], Awaitable[Any]]
BatchFn = Callable[[AsyncConnection, Sequence[Any]], Awaitable[Sequence[Any]]]
Statements = Sequence[tuple[Executable, dict[str, Any]]]

MAX_BATCH = 1000
BACKGROUND_BATCH = 256  # bounds how long an urgent unit can wait behind background work
BACKGROUND_SINGLES = 16  # ... and so does this: single units are not coalesced, each costs its statements
BUSY_PAUSES = (0.002, 0.005, 0.01, 0.02, 0.05)  # SQLite's write lock held by another process
BUSY_LIMIT = 30.0  # seconds of a held lock after which queued writes fail instead of waiting
# PostgreSQL out of reach (restarted, failed over, network cut): queued writes wait for it
OUTAGE_PAUSES = (0.1, 0.2, 0.5, 1.0, 2.0)
OUTAGE_LIMIT = 60.0
CHECKPOINT_EVERY = 1.0  # seconds between WAL checkpoints while writes happen
# A PASSIVE checkpoint never catches up with a writer that never stops (new frames come in while
# it copies), so under sustained writes the WAL would grow without bound: past WAL_LIMIT bytes the
# writer pauses between two cycles while a TRUNCATE checkpoint empties it. WAL_KEEP is what a
# WAL reset keeps of the file (`journal_size_limit`), so a burst's WAL does not stay on disk.
# The pause holds every write (acks included) for tens of milliseconds, so the limit is high:
# at the most this machine ingests, about once every 15 s of writes that never let up.
WAL_LIMIT = 1024 * 1024 * 1024
WAL_KEEP = 64 * 1024 * 1024
# Before an urgent cycle, the writer lets the loop run while that brings more urgent units: each
# round is two loop passes (one reads the sockets that are ready, the next runs the handlers
# those reads started, up to their write), at most GATHER_ROUNDS of them. A commit's cost is
# mostly per commit and per page it dirties, so a cycle that carries every request already on
# its way costs less per request: under 32 concurrent posters, 31 events a commit instead of 12,
# and about 15 % less CPU per request (docs/benchmarks.md). A lone request waits two passes.
# The default of `Database(gather_rounds=...)`; 0 turns the gathering off.
GATHER_ROUNDS = 8
# Pages of 2 KB instead of SQLite's 4 KB for a new database: each message adds index entries at
# random places (its dedupe keys, its conversation), so a commit writes about one page per index
# per message, and a smaller page is less to copy, checksum and write into the WAL (measured on
# the inbox insert: 22 -> 15 us a row in group commits of 11; docs/benchmarks.md).
PAGE_SIZE = 2048


class StoreClosed(RuntimeError):
    """A write was queued after the store closed."""


class StoreBusy(Unavailable):
    """SQLite's write lock stayed with another process for longer than BUSY_LIMIT."""


class StoreUnavailable(Unavailable):
    """PostgreSQL stayed out of reach for longer than OUTAGE_LIMIT, or the connection was lost
    during a COMMIT (whether that write was applied is then unknown)."""


class _LockHeld(Exception):
    """BEGIN IMMEDIATE found the write lock taken: nothing ran, the cycle is retried later."""


class _Lost(Exception):
    """PostgreSQL: the connection is gone (or cannot be opened) and nothing of the cycle was
    applied: the cycle is run again on a new connection."""


@dataclass(slots=True)
class _Unit:
    future: asyncio.Future[Any]
    single: SingleFn | None = None
    batch: BatchFn | None = None
    item: Any = None
    statements: Statements | None = None
    many: bool = False  # `item` is a list of items of `batch`; the result, a list of theirs


@dataclass
class WriterStats:
    commits: int = 0
    units: int = 0
    failed_batches: int = 0
    extra: dict[str, int] = field(default_factory=dict)


def _sqlite_pragmas(dbapi_conn: Any, _record: Any) -> None:
    cursor = dbapi_conn.cursor()
    # Takes effect only when the database file is created (before WAL mode writes its header);
    # an existing database keeps its page size. See PAGE_SIZE.
    cursor.execute(f"PRAGMA page_size={PAGE_SIZE}")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute("PRAGMA busy_timeout=5000")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.close()


def _sqlite_writer_pragmas(dbapi_conn: Any, _record: Any) -> None:
    """The on-loop writer: the driver never begins transactions itself (the writer says BEGIN
    IMMEDIATE), SQLite never busy-waits (that would block the loop), never checkpoints inline.

    Statement journals stay in memory (`temp_store=MEMORY`): a multi-row INSERT ... ON CONFLICT
    inside a group transaction keeps one, so that the statement alone can be undone, and past
    64 KiB SQLite spills it to a temporary file: created, written page by page and unlinked for
    about every other commit. In memory, an inbox row with two random keys costs 18 us of SQLite
    instead of 29 (bench/accept.py, docs/benchmarks.md); nothing durable lives there."""
    _sqlite_pragmas(dbapi_conn, _record)
    dbapi_conn.isolation_level = None
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA busy_timeout=0")
    cursor.execute("PRAGMA wal_autocheckpoint=0")
    cursor.execute(f"PRAGMA journal_size_limit={WAL_KEEP}")
    cursor.execute("PRAGMA temp_store=MEMORY")
    cursor.close()


def _sqlite_reader_pragmas(dbapi_conn: Any, _record: Any) -> None:
    _sqlite_pragmas(dbapi_conn, _record)
    cursor = dbapi_conn.cursor()
    cursor.execute("PRAGMA busy_timeout=0")  # a WAL reader does not wait for writers
    cursor.execute("PRAGMA query_only=ON")
    cursor.close()


# JSON columns; and a statement's parameters (people's messages) are kept out of error messages,
# so out of the logs
_ENGINE_ARGS = {"json_serializer": jsoncodec.dumps, "json_deserializer": jsoncodec.loads, "hide_parameters": True}


def _sync_sqlite_engine(url: str, on_connect: Callable[[Any, Any], None]) -> Engine:
    engine = create_engine(make_url(url).set(drivername="sqlite+pysqlite"), pool_size=1, max_overflow=0,
                           **_ENGINE_ARGS)
    event.listen(engine, "connect", on_connect)
    return engine


def make_engine(url: str, *, pool_size: int) -> AsyncEngine:
    if url.startswith("sqlite"):
        engine = create_async_engine(url, pool_size=pool_size, max_overflow=0, **_ENGINE_ARGS)
        event.listen(engine.sync_engine, "connect", _sqlite_pragmas)
    else:
        engine = create_async_engine(url, pool_size=pool_size, max_overflow=0, pool_pre_ping=True, **_ENGINE_ARGS)
    return engine


class _OnLoopConnection:
    """A synchronous SQLAlchemy connection behind the `AsyncConnection` methods the store uses.

    Its coroutines never suspend, so a store function written against `AsyncConnection` runs to
    completion in one `_drive` call on the loop's thread.
    """

    __slots__ = ("sync", "driver")

    def __init__(self, sync: Connection) -> None:
        self.sync = sync
        # the `sqlite3` connection itself, for the few hot statements that skip SQLAlchemy's
        # per-row work (`bridge.store.dialect.sqlite_driver`)
        self.driver = sync.connection.driver_connection

    @property
    def dialect(self):
        return self.sync.dialect

    @property
    def closed(self) -> bool:
        return self.sync.closed

    @property
    def invalidated(self) -> bool:
        return self.sync.invalidated

    async def execute(self, statement: Any, parameters: Any = None, **kw: Any) -> Any:
        return self.sync.execute(statement, parameters, **kw)

    async def scalar(self, statement: Any, parameters: Any = None, **kw: Any) -> Any:
        return self.sync.scalar(statement, parameters, **kw)

    async def scalars(self, statement: Any, parameters: Any = None, **kw: Any) -> Any:
        return self.sync.scalars(statement, parameters, **kw)

    async def exec_driver_sql(self, statement: str, parameters: Any = None) -> Any:
        return self.sync.exec_driver_sql(statement, parameters)

    async def begin_immediate(self) -> None:
        """Take SQLite's write lock for the writer's cycle, on the driver itself: the cycle's own
        BEGIN and COMMIT cost no SQLAlchemy execution (a turn's cycles carry few statements)."""
        self.driver.execute("BEGIN IMMEDIATE")

    async def commit(self) -> None:
        if self.sync.in_transaction():
            self.sync.commit()  # a statement ran through SQLAlchemy, which began too: it commits
        else:
            self.driver.commit()

    async def rollback(self) -> None:
        self.sync.rollback()
        self.driver.rollback()  # what SQLAlchemy did not begin: the cycle's BEGIN IMMEDIATE

    async def close(self) -> None:
        self.sync.close()


def _drive(coro: Any) -> Any:
    """Run a coroutine that never suspends to its end, synchronously, and return its value."""
    try:
        coro.send(None)
    except StopIteration as done:
        return done.value
    coro.close()
    raise RuntimeError("a store function awaited something other than its connection")


async def _call(conn: Any, coro: Any) -> Any:
    """Await a store function; on an on-loop connection, drive it, so that one which suspends
    fails as its own unit (and is isolated by the halving) instead of stalling the cycle."""
    if isinstance(conn, _OnLoopConnection):
        return _drive(coro)
    return await coro


# PostgreSQL's error classes that pass: connection (08), transaction rollback such as a
# serialization failure or a deadlock (40), insufficient resources (53), operator intervention (57)
PASSING_SQLSTATE = ("08", "40", "53", "57")


def passes(exc: BaseException) -> bool:
    """Whether a failed write is worth waiting out: the store away, busy or locked, its
    connection lost, a transaction the database rolled back (serialization, deadlock)."""
    if isinstance(exc, (Unavailable, StoreClosed, OSError, TimeoutError, DisconnectionError, OperationalError,
                        sqlite3.OperationalError)):
        return True  # SQLite's operational errors: locked, busy, a table away during a migration
    if getattr(exc, "connection_invalidated", False):
        return True
    for error in (exc, getattr(exc, "orig", None)):
        state = getattr(error, "sqlstate", None) or getattr(error, "pgcode", None)
        if isinstance(state, str) and state.startswith(PASSING_SQLSTATE):
            return True
    return False


def _lock_held(exc: BaseException) -> bool:
    orig = getattr(exc, "orig", exc)
    return isinstance(orig, sqlite3.OperationalError) and "locked" in str(orig)


class Database:
    """The store's connections: `read()` for reads, `write()` and friends through the group
    committer; on SQLite both run on the loop's thread (see the module's docstring)."""

    def __init__(self, url: str, *, read_pool: int = 4, gather_rounds: int = GATHER_ROUNDS) -> None:
        self.url = url
        self.gather_rounds = gather_rounds
        self.is_sqlite = url.startswith("sqlite")
        self.dialect = "sqlite" if self.is_sqlite else "postgresql"
        self.reader = make_engine(url, pool_size=read_pool)
        self.writer_engine = make_engine(url, pool_size=1)
        # SQLite only: the on-loop connections (opened by start())
        self._sync_writer_engine = _sync_sqlite_engine(url, _sqlite_writer_pragmas) if self.is_sqlite else None
        self._sync_reader_engine = _sync_sqlite_engine(url, _sqlite_reader_pragmas) if self.is_sqlite else None
        self._sync_reader: _OnLoopConnection | None = None
        self._checkpointer: asyncio.Task[None] | None = None
        self._commits_at_checkpoint = 0
        # the checkpointer's pause of the writer (SQLite, a WAL past WAL_LIMIT): asked, and taken
        self._pause: asyncio.Event | None = None
        self._paused = asyncio.Event()
        self._urgent: deque[_Unit] = deque()
        self._background: deque[_Unit] = deque()
        self._wake = asyncio.Event()
        self._drained = asyncio.Event()
        self._drained.set()
        self._closed = False
        self._task: asyncio.Task[None] | None = None
        self._conn: AsyncConnection | _OnLoopConnection | None = None
        self._connect_error: str | None = None  # why the writer's last reconnection failed
        self.outage_since: float | None = None  # PostgreSQL out of reach: since when (monotonic)
        self.stats = WriterStats()

    # -- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        if self._task is None:
            self._conn = await self._connect_writer()
            if self.is_sqlite:
                assert self._sync_reader_engine is not None
                self._sync_reader = _OnLoopConnection(self._sync_reader_engine.connect())
                self._checkpointer = asyncio.create_task(self._checkpoints(), name="store-checkpointer")
            self._task = asyncio.create_task(self._run(), name="store-writer")

    async def _connect_writer(self) -> AsyncConnection | _OnLoopConnection:
        if self._sync_writer_engine is not None:
            engine = self._sync_writer_engine
            conn = engine.connect()
            return _OnLoopConnection(conn)
        return await self.writer_engine.connect()

    async def close(self) -> None:
        self._closed = True  # later writes fail at once instead of waiting for a writer that is gone
        if self.stats.commits:
            logger.info("store: {} commits of {} writes ({:.1f} a commit), {} failed batches", self.stats.commits,
                        self.stats.units, self.stats.units / self.stats.commits, self.stats.failed_batches)
        if self._task is not None:
            # Everything already queued is written before the writer stops.
            await self._drained.wait()
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None
        if self._checkpointer is not None:
            self._checkpointer.cancel()
            try:
                await self._checkpointer
            except asyncio.CancelledError:
                pass
            self._checkpointer = None
        if self._conn is not None:
            if isinstance(self._conn, _OnLoopConnection):
                try:  # leave a short WAL behind
                    self._conn.sync.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")
                except Exception as exc:  # noqa: BLE001 - another process may be reading
                    logger.debug("store: final checkpoint skipped: {}", brief(exc))
            await self._conn.close()
            self._conn = None
        if self._sync_reader is not None:
            await self._sync_reader.close()
            self._sync_reader = None
        for engine in (self._sync_writer_engine, self._sync_reader_engine):
            if engine is not None:
                engine.dispose()
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

    def write_batched_many(self, batch: BatchFn, items: Sequence[Any], *, urgent: bool = False) -> Awaitable[list[Any]]:
        """`write_batched` for several items at once: one unit, one future (a batch of requests
        that arrived together); resolves to their results, in order."""
        return self._put(_Unit(asyncio.get_running_loop().create_future(), batch=batch, item=items, many=True),
                         urgent)

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

    async def read(self, fn: Callable[[AsyncConnection], Awaitable[T]], *, offload: bool = False) -> T:
        """`fn(conn)` on a read connection. On SQLite it runs at once on the loop's thread, which
        suits the indexed, bounded reads of the pipeline; `offload=True` sends a read that may be
        large (a page of a transcript, a digest) to the aiosqlite pool's thread instead."""
        on_loop = self._sync_reader
        if on_loop is not None and not offload:
            try:
                return _drive(fn(on_loop))  # type: ignore[arg-type]
            finally:
                on_loop.sync.rollback()  # end the read snapshot
        async with self.reader.connect() as conn:
            return await fn(conn)

    def writer_state(self) -> dict[str, Any]:
        """For /readyz: writes waiting for the writer, and how long the database has been out of
        reach (PostgreSQL), if it is."""
        state: dict[str, Any] = {"queued_writes": len(self._urgent) + len(self._background)}
        if self.outage_since is not None:
            state["waiting_for_database_s"] = round(time.monotonic() - self.outage_since, 1)
        return state

    async def ping(self) -> None:
        async with self.reader.connect() as conn:
            await conn.execute(text("SELECT 1"))

    # -- the writer ------------------------------------------------------------------------

    async def _run(self) -> None:
        urgent_turn = True
        while True:
            if self._pause is not None:  # between two cycles: the checkpointer empties the WAL
                self._paused.set()
                await self._pause.wait()
                continue
            if not self._urgent and not self._background:
                self._drained.set()
                self._wake.clear()
                await self._wake.wait()
                continue
            take_urgent = bool(self._urgent) and (urgent_turn or not self._background)
            if take_urgent:
                await self._gather_urgent()
            units = self._take(self._urgent) if take_urgent else self._take(self._background, background=True)
            urgent_turn = not take_urgent
            if isinstance(self._conn, _OnLoopConnection):
                await self._commit_on_loop(units)
            else:
                await self._commit_remote(units)

    async def _gather_urgent(self) -> None:
        for _ in range(self.gather_rounds):
            queued = len(self._urgent)
            if queued >= MAX_BATCH:
                return
            await asyncio.sleep(0)
            await asyncio.sleep(0)
            if len(self._urgent) == queued:
                return

    @staticmethod
    def _take(source: deque[_Unit], *, background: bool = False) -> list[_Unit]:
        """The next cycle's units. Background cycles are bounded so an urgent unit never waits
        long behind one: by count, and by how many single units (each its own statements, not
        coalesced: creating a conversation, say) they carry."""
        if not background:
            return [source.popleft() for _ in range(min(MAX_BATCH, len(source)))]
        units: list[_Unit] = []
        singles = 0
        while source and len(units) < BACKGROUND_BATCH and singles < BACKGROUND_SINGLES:
            unit = source.popleft()
            singles += unit.single is not None
            units.append(unit)
        return units

    async def _commit_on_loop(self, units: list[_Unit]) -> None:
        """One SQLite cycle, synchronously; while another process holds the write lock, pause
        (without blocking the loop) and try again, up to BUSY_LIMIT."""
        started = time.monotonic()
        attempt = 0
        while True:
            try:
                _drive(self._commit_group(units))
                return
            except _LockHeld as held:
                if time.monotonic() - started > BUSY_LIMIT:
                    for unit in units:
                        self._fail(unit, StoreBusy(f"the database stayed locked by another process: {held}"))
                    return
                await asyncio.sleep(BUSY_PAUSES[min(attempt, len(BUSY_PAUSES) - 1)])
                attempt += 1
                # A failed batch retried in halves may have committed a half before the lock
                # was lost: what is settled is not run again.
                units = [unit for unit in units if not unit.future.done()]
                if not units:
                    return
            finally:
                # yield once per cycle, so requests that arrive meanwhile are parsed and join
                # the next cycle instead of waiting behind a run of cycles
                await asyncio.sleep(0)

    async def _commit_remote(self, units: list[_Unit]) -> None:
        """One PostgreSQL cycle. While the database is out of reach, the cycle waits (without
        blocking the loop) and runs again on a new connection, up to OUTAGE_LIMIT: a restart or a
        failover delays writes instead of failing them (a turn's reply among them)."""
        started = time.monotonic()
        attempt = 0
        while True:
            try:
                await self._commit_group(units)
                if self.outage_since is not None:
                    logger.info("store: the database is back after {:.1f}s", time.monotonic() - self.outage_since)
                    self.outage_since = None
                return
            except _Lost as lost:
                if self.outage_since is None:
                    self.outage_since = started
                units = [unit for unit in units if not unit.future.done()]  # a half may have committed
                if not units:
                    return
                waited = time.monotonic() - started
                if waited > OUTAGE_LIMIT:
                    logger.error("store: the database stayed out of reach for {:.0f}s; {} writes failed",
                                 waited, len(units))
                    for unit in units:
                        self._fail(unit, StoreUnavailable(f"the database is out of reach: {lost}"))
                    return
                if attempt == 0:
                    logger.warning("store: the database is out of reach ({}); {} writes wait for it", lost, len(units))
                await asyncio.sleep(OUTAGE_PAUSES[min(attempt, len(OUTAGE_PAUSES) - 1)])
                attempt += 1
                if attempt % 10 == 0:
                    logger.warning("store: still out of reach after {:.0f}s; {} writes wait", waited, len(units))

    async def _commit_group(self, units: list[_Unit]) -> None:
        conn = self._conn
        assert conn is not None
        remote = not isinstance(conn, _OnLoopConnection)
        if conn.closed or conn.invalidated:
            await self._reconnect(conn)
            conn = self._conn
            assert conn is not None
            if remote and (conn.closed or conn.invalidated):
                raise _Lost(self._connect_error or "no connection")
        if isinstance(conn, _OnLoopConnection):
            try:
                await conn.begin_immediate()
            except (OperationalError, sqlite3.OperationalError) as exc:
                await self._rollback(conn)
                if _lock_held(exc):
                    raise _LockHeld(brief(exc)) from None
                logger.error("store: cannot begin a write transaction: {}", brief(exc))
                for unit in units:
                    self._fail(unit, exc)
                return
        committing = False
        try:
            results = await self._execute(conn, units)
            committing = True
            await conn.commit()
        except Exception as exc:  # noqa: BLE001 - isolate the failing unit below
            await self._rollback(conn)
            if remote and _connection_lost(exc, conn):
                if not committing:
                    raise _Lost(brief(exc)) from None  # nothing was applied: run it again
                logger.error("store: the connection was lost during COMMIT of {} writes ({})", len(units), brief(exc))
                for unit in units:
                    self._fail(unit, StoreUnavailable(f"the connection was lost during COMMIT: {brief(exc)}"))
                return
            if len(units) == 1:
                self._fail(units[0], exc)
                return
            self.stats.failed_batches += 1
            logger.warning("store: batch of {} failed ({}); retrying it in halves", len(units), brief(exc))
            half = len(units) // 2
            await self._commit_group(units[:half])
            await self._commit_group(units[half:])
            return
        self.stats.commits += 1
        self.stats.units += sum(len(u.item) if u.many else 1 for u in units)
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
                results[ref] = await _call(conn, unit.single(conn))
            elif kind == "stmt":
                values = params[ref]
                plain = plain_statement(conn.dialect, ref, values) if isinstance(conn, _OnLoopConnection) else None
                if plain is not None:
                    plain.run(conn.driver, values)
                else:
                    await conn.execute(ref, values if len(values) > 1 else values[0])
            else:
                indexes = batches[ref]
                items: list[Any] = []
                for i in indexes:
                    if units[i].many:
                        items.extend(units[i].item)
                    else:
                        items.append(units[i].item)
                out = await _call(conn, ref(conn, items))
                if len(out) != len(items):
                    raise ValueError(f"{ref.__qualname__} returned {len(out)} results for {len(items)} items")
                at = 0
                for i in indexes:
                    if units[i].many:
                        results[i] = list(out[at:at + len(units[i].item)])
                        at += len(units[i].item)
                    else:
                        results[i] = out[at]
                        at += 1
        return results

    async def _rollback(self, conn: AsyncConnection) -> None:
        try:
            await conn.rollback()
            if not conn.invalidated:
                return
        except Exception as exc:  # noqa: BLE001
            logger.error("store: rollback failed: {}", brief(exc))
        await self._reconnect(conn)

    async def _reconnect(self, conn: AsyncConnection) -> None:
        """The connection is gone (database restarted, network cut): take a fresh one. When that
        fails too, the writer keeps the closed one and the next cycle tries again."""
        try:
            await conn.close()
        except Exception:  # noqa: BLE001
            pass
        try:
            self._conn = await self._connect_writer()
            logger.warning("store: writer reconnected")
        except Exception as exc:  # noqa: BLE001 - the next cycle tries again (_commit_remote says so)
            self._connect_error = brief(exc)
            logger.debug("store: writer cannot reconnect: {}", self._connect_error)

    async def _checkpoints(self) -> None:
        """SQLite: copy the WAL back into the database off the loop's thread (it fsyncs), about
        once a second while writes happen. PASSIVE never waits for readers or the writer."""
        while True:
            await asyncio.sleep(CHECKPOINT_EVERY)
            if self.stats.commits == self._commits_at_checkpoint:
                continue
            self._commits_at_checkpoint = self.stats.commits
            try:
                async with self.reader.connect() as conn:
                    await conn.exec_driver_sql("PRAGMA wal_checkpoint(PASSIVE)")
                if self._wal_size() > WAL_LIMIT:
                    await self._empty_wal()
            except Exception as exc:  # noqa: BLE001 - the next round tries again
                logger.warning("store: WAL checkpoint failed: {}", brief(exc))

    def _wal_size(self) -> int:
        try:
            return os.path.getsize(f"{make_url(self.url).database}-wal")
        except (OSError, TypeError):
            return 0

    async def _empty_wal(self) -> None:
        """The WAL outgrew WAL_LIMIT under writes that never paused: hold the writer between two
        cycles (what is queued waits, nothing fails) while a TRUNCATE checkpoint copies the rest
        back and empties the file, off the loop's thread."""
        size = self._wal_size()
        self._pause, self._paused = asyncio.Event(), asyncio.Event()
        self._wake.set()  # a writer waiting for work comes round to the pause
        started = time.monotonic()
        try:
            await self._paused.wait()
            async with self.reader.connect() as conn:
                result = (await conn.exec_driver_sql("PRAGMA wal_checkpoint(TRUNCATE)")).first()
        finally:
            pause, self._pause = self._pause, None
            pause.set()
        logger.info("store: the WAL reached {} MB under sustained writes; emptied with writes held for {:.0f} ms{}",
                    size // (1024 * 1024), (time.monotonic() - started) * 1000,
                    " (a reader kept part of it)" if result and result[0] else "")

    @staticmethod
    def _fail(unit: _Unit, exc: BaseException) -> None:
        if not unit.future.done():
            unit.future.set_exception(exc)


def _connection_lost(exc: BaseException, conn: Any) -> bool:
    """Whether a failed cycle failed because its connection went away (SQLAlchemy marks it
    invalidated), rather than because of what it ran."""
    return bool(getattr(exc, "connection_invalidated", False) or conn.invalidated or conn.closed
                or isinstance(exc, (OSError, ConnectionError)))


def brief(exc: BaseException) -> str:
    """The error's type and first line: never the statement's parameters (they carry user data)."""
    first = str(getattr(exc, "orig", None) or exc).splitlines()
    return f"{type(exc).__name__}: {first[0] if first else ''}"[:300]
