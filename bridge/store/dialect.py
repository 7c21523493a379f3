"""Dialect-specific statement helpers shared by the repositories."""

from __future__ import annotations

from sqlalchemy import Table
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection


def upsert(conn: AsyncConnection, table: Table):
    """An INSERT that supports ON CONFLICT on both SQLite and PostgreSQL."""
    return (sqlite_insert if conn.dialect.name == "sqlite" else pg_insert)(table)
