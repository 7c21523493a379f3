"""Dialect-specific statement helpers shared by the repositories."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection
from sqlalchemy.sql import Executable


def upsert(dialect: AsyncConnection | str, table: Table):
    """An INSERT that supports ON CONFLICT on both SQLite and PostgreSQL (`dialect`: a connection
    or a dialect's name).

    Statements on the hot path are built once per dialect (`functools.cache` on a builder that
    takes the dialect's name) and reused: building a statement and computing its cache key costs
    several times more than running it.
    """
    name = dialect if isinstance(dialect, str) else dialect.dialect.name
    return (sqlite_insert if name == "sqlite" else pg_insert)(table)


def sqlite_driver(conn: Any) -> Any | None:
    """The `sqlite3` connection under the store's on-loop SQLite connection, or None (PostgreSQL,
    the aiosqlite pool). Hot statements run on it directly where SQLAlchemy's per-row work costs
    more than SQLite's (see docs/benchmarks.md); they keep the Core statement for the others."""
    return getattr(conn, "driver", None)


SQLITE_ROWS_PER_STATEMENT = 500  # with up to 65 columns, under SQLite's 32,766 parameters


@functools.lru_cache(maxsize=256)
def _multirow_insert(table: str, columns: tuple[str, ...], count: int, tail: str) -> str:
    row = "(" + ",".join("?" * len(columns)) + ")"
    return f"INSERT INTO {table} ({','.join(columns)}) VALUES {','.join([row] * count)} {tail}"


def sqlite_insert_many(driver: Any, table: str, columns: tuple[str, ...], rows: Sequence[Sequence[Any]],
                       tail: str) -> list[tuple[Any, ...]]:
    """Insert `rows` (values in `columns`' order) on a `sqlite3` connection as multi-row INSERTs
    ending in `tail` (its ON CONFLICT and RETURNING clauses); the rows RETURNING gave."""
    assert len(columns) <= 65
    returned: list[tuple[Any, ...]] = []
    for start in range(0, len(rows), SQLITE_ROWS_PER_STATEMENT):
        chunk = rows[start:start + SQLITE_ROWS_PER_STATEMENT]
        params = [value for row in chunk for value in row]
        returned.extend(driver.execute(_multirow_insert(table, columns, len(chunk), tail), params))
    return returned


@dataclass(frozen=True, slots=True)
class PlainStatement:
    """A Core DML statement compiled once for SQLite, to run straight on the `sqlite3` connection:
    its SQL, and per `?` the parameter's name, the value to use when the caller does not give one
    (a literal of the statement, such as `status="delivered"`), and the type's bind processor."""

    sql: str
    slots: tuple[tuple[str, Any, Callable[[Any], Any] | None], ...]

    def row(self, params: Mapping[str, Any]) -> tuple[Any, ...]:
        return tuple(
            (params[name] if name in params else fixed) if process is None
            else process(params[name] if name in params else fixed)
            for name, fixed, process in self.slots
        )

    def run(self, driver: Any, params: Sequence[Mapping[str, Any]]) -> None:
        if len(params) == 1:
            driver.execute(self.sql, self.row(params[0]))
        else:
            driver.executemany(self.sql, [self.row(p) for p in params])


def plain_statement(dialect: Dialect, statement: Executable,
                    params: Sequence[Mapping[str, Any]]) -> PlainStatement | None:
    """`statement` with `params` as a `PlainStatement`, or None when SQLAlchemy must run it:
    anything that is not a plain INSERT/UPDATE/DELETE (RETURNING, expanding IN lists, Python-side
    column defaults, computed bind values), parameter sets with different keys, or a required
    parameter missing (SQLAlchemy then says which)."""
    keys = tuple(params[0])
    for other in params[1:]:
        if other.keys() != params[0].keys():
            return None
    return _plain(dialect, statement, keys)


@functools.lru_cache(maxsize=512)
def _plain(dialect: Dialect, statement: Executable, keys: tuple[str, ...]) -> PlainStatement | None:
    if not getattr(statement, "is_dml", False):
        return None
    compiled: Any = statement.compile(dialect=dialect, column_keys=list(keys))
    if (not compiled.positional or compiled.insert_prefetch or compiled.update_prefetch
            or compiled.literal_execute_params or compiled.post_compile_params or compiled.effective_returning):
        return None
    slots = []
    for name in compiled.positiontup:
        bind = compiled.binds[name]
        if bind.expanding or bind.callable is not None or (name not in keys and bind.required):
            return None
        process = bind.type.dialect_impl(dialect).bind_processor(dialect)
        slots.append((name, bind.value, process))
    return PlainStatement(compiled.string, tuple(slots))
