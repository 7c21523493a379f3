"""Dialect-specific statement helpers shared by the repositories."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

from sqlalchemy import Table
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection


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
