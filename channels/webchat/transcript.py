"""The web chat's own message store: it plays the platform's side, the way Feishu or Slack keep
their messages. Every insert or edit takes the next `seq`, so `?after=<seq>` polling sees edits.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import JSON, Column, Float, Index, Integer, String, Table, Text, bindparam, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from bridge import jsoncodec
from bridge.store.dialect import sqlite_driver, sqlite_insert_many, upsert
from bridge.store.notify import notify_statement
from bridge.store.schema import metadata

# On PostgreSQL every write to a conversation's transcript notifies this channel (payload: the
# conversation id), in the write's transaction, so pages open on any replica see it live.
LIVE_CHANNEL = "agent_bridge_webchat"

webchat_messages = Table(
    "webchat_messages",
    metadata,
    Column("id", String(64), primary_key=True),
    Column("seq", Integer, nullable=False, unique=True),
    # the seq it was first posted with: the order a chat shows messages in, kept across edits
    Column("created_seq", Integer, nullable=False),
    Column("conversation_id", String(255), nullable=False),
    Column("role", String(8), nullable=False),
    Column("user_id", String(255), nullable=False),
    Column("text", Text, nullable=False),
    Column("card", JSON, nullable=True),
    Column("files", JSON, nullable=True),  # a person's message: the files it carries, [{"name", "mime_type"}]
    # bot messages: the outbox idempotency key; user messages: "user:<id>" (their dedupe is the
    # inbox's: a user message is written with its inbound event, only when that event is new)
    Column("dedupe_key", String(255), nullable=False, unique=True),
    Column("created_at", Float, nullable=False),
    Column("updated_at", Float, nullable=False),
    Index("ix_webchat_messages_conversation_seq", "conversation_id", "seq"),
)


@dataclass(slots=True)
class NewMessage:
    conversation_id: str
    role: str
    user_id: str
    text: str
    card: dict[str, Any] | None
    # None: "user:<id>", unique and in insert order, so the index takes it at its end (a key made
    # of the client's id landed on a random page of the index, one more page written a message)
    dedupe_key: str | None = None
    files: list[dict[str, str]] | None = None  # a person's message: the files it carries


@dataclass(slots=True)
class Edit:
    message_id: str
    text: str
    card: dict[str, Any] | None


class Transcript:
    """Writes to the transcript. It hands out `seq`: on SQLite there is one writer connection, so
    the counter lives in memory (read once from the table); on PostgreSQL, where replicas share the
    table, it is read in each transaction (a collision on the unique seq fails that batch, which
    the writer then retries)."""

    def __init__(self) -> None:
        self._last: int | None = None

    async def _take(self, conn: AsyncConnection, count: int) -> int:
        if conn.dialect.name != "sqlite" or self._last is None:
            self._last = (await conn.execute(select(func.max(webchat_messages.c.seq)))).scalar() or 0
        first = self._last + 1
        self._last += count
        return first

    async def insert_many(self, conn: AsyncConnection, items: Sequence[NewMessage]) -> list[dict[str, Any]]:
        """Insert messages (idempotent on dedupe_key); returns each one's row (existing or new)."""
        now_ns = time.time_ns()
        now = now_ns / 1e9
        seq = await self._take(conn, len(items))
        rows = []
        for item in items:
            message_id = _message_id(now_ns, seq)
            rows.append({
                "id": message_id, "seq": seq, "created_seq": seq, "conversation_id": item.conversation_id,
                "role": item.role, "user_id": item.user_id, "text": item.text, "card": item.card, "files": item.files,
                "dedupe_key": item.dedupe_key or f"user:{message_id}", "created_at": now, "updated_at": now,
            })
            seq += 1
        driver = sqlite_driver(conn)
        if driver is not None:
            by_key = _insert_sqlite(driver, rows)
        else:
            by_key = {row.dedupe_key: dict(row._mapping) for row in await conn.execute(_insert(conn.dialect.name), rows)}
        missing = [r["dedupe_key"] for r in rows if r["dedupe_key"] not in by_key]
        if missing:  # duplicates: return the rows already stored
            found = await conn.execute(select(webchat_messages).where(webchat_messages.c.dedupe_key.in_(missing)))
            by_key.update({row.dedupe_key: dict(row._mapping) for row in found})
        if conn.dialect.name == "postgresql" and len(missing) < len(rows):
            skipped = set(missing)
            await _notify(conn, [r["conversation_id"] for r in rows if r["dedupe_key"] not in skipped])
        return [by_key[row["dedupe_key"]] for row in rows]

    async def edit_many(self, conn: AsyncConnection, items: Sequence[Edit]) -> list[dict[str, Any] | None]:
        """Edit messages in place; each edit takes a new seq. Returns each edited row (None if unknown)."""
        seq = await self._take(conn, len(items))
        now = time.time()
        params = [{"b_id": e.message_id, "b_text": e.text, "b_card": e.card, "b_seq": seq + i, "b_now": now}
                  for i, e in enumerate(items)]
        await conn.execute(EDIT, params)
        ids = list({e.message_id for e in items})
        rows = {row.id: dict(row._mapping) for row in await conn.execute(BY_IDS, {"b_ids": ids})}
        if rows and conn.dialect.name == "postgresql":
            await _notify(conn, [r["conversation_id"] for r in rows.values()])
        return [rows.get(e.message_id) for e in items]


async def _notify(conn: AsyncConnection, conversation_ids: Sequence[str]) -> None:
    """Several replicas: tell every replica's open pages to look again (sent at COMMIT, if any)."""
    statement, params = notify_statement(LIVE_CHANNEL, conversation_ids)
    await conn.execute(statement, params)


def _message_id(now_ns: int, seq: int) -> str:
    """A message id: unique because its seq is, and ordered by time, so that each insert lands
    at the end of the primary key's index (a random id wrote one more page per message, at a
    random place, and cost a getrandom call)."""
    return f"{now_ns:016x}{seq:08x}"


@functools.cache
def _insert(dialect: str):
    return (upsert(dialect, webchat_messages).on_conflict_do_nothing(index_elements=["dedupe_key"])
            .returning(*webchat_messages.c))


_COLUMNS = ("id", "seq", "created_seq", "conversation_id", "role", "user_id", "text", "card", "files",
            "dedupe_key", "created_at", "updated_at")


def _insert_sqlite(driver: Any, rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """On SQLite, the rows go straight to the driver (the person's message is on the ack's path);
    the rows built here are what is returned for those inserted. The same rule as `_insert`."""
    dumps = jsoncodec.dumps
    values = [(r["id"], r["seq"], r["created_seq"], r["conversation_id"], r["role"], r["user_id"], r["text"],
               None if r["card"] is None else dumps(r["card"]), None if r["files"] is None else dumps(r["files"]),
               r["dedupe_key"], r["created_at"], r["updated_at"])
              for r in rows]
    returned = sqlite_insert_many(driver, "webchat_messages", _COLUMNS, values,
                                  "ON CONFLICT (dedupe_key) DO NOTHING RETURNING dedupe_key")
    by_key = {r["dedupe_key"]: r for r in rows}
    return {key: by_key[key] for (key,) in returned}


BY_ID = select(webchat_messages).where(webchat_messages.c.id == bindparam("b_id"))
BY_IDS = select(webchat_messages).where(webchat_messages.c.id.in_(bindparam("b_ids", expanding=True)))
AFTER = (
    select(webchat_messages)
    .where(webchat_messages.c.conversation_id == bindparam("b_conv"), webchat_messages.c.seq > bindparam("b_after"))
    .order_by(webchat_messages.c.seq)
    .limit(bindparam("b_limit"))
)

EDIT = (
    update(webchat_messages)
    .where(webchat_messages.c.id == bindparam("b_id"))
    .values(text=bindparam("b_text"), card=bindparam("b_card"), seq=bindparam("b_seq"), updated_at=bindparam("b_now"))
)


async def list_after(conn: AsyncConnection, conversation_id: str, after: int, limit: int) -> list[dict[str, Any]]:
    result = await conn.execute(AFTER, {"b_conv": conversation_id, "b_after": after, "b_limit": limit})
    return [dict(row._mapping) for row in result]


async def get(conn: AsyncConnection, message_id: str) -> dict[str, Any] | None:
    row = (await conn.execute(BY_ID, {"b_id": message_id})).first()
    return dict(row._mapping) if row else None
