"""Inbound events: persist-and-dedupe (batched), claims, and recovery queries."""

from __future__ import annotations

import functools
import hashlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from bridge import jsoncodec
from bridge.store.dialect import sqlite_driver, sqlite_insert_many, upsert
from bridge.store.schema import inbound_events

OPEN_STATUSES = ("accepted", "processing")
KEY_LIMIT = 255  # the key columns' length (PostgreSQL refuses a longer value; SQLite would keep it)


def fit_key(key: str) -> str:
    """A dedupe or event key that fits its column: a longer one (a client's long message id in
    a long conversation id) keeps its start and ends with a digest of the whole, so it still
    names one event, the same one each time it is sent."""
    if len(key) <= KEY_LIMIT:
        return key
    return f"{key[:KEY_LIMIT - 41]}#{hashlib.sha256(key.encode()).hexdigest()[:40]}"


@dataclass(slots=True)
class NewEvent:
    channel: str
    kind: str
    event_key: str
    message_key: str | None  # the platform's message id, when the event carries one: its dedupe key
    conversation_key: str
    sender_id: str
    payload: dict[str, Any]
    received_at: float
    # "accepted" (to be processed), or "skipped" for an event known at once to need no turn and
    # no answer (stored for dedupe and the record, closed on arrival: nothing dispatches it)
    status: str = "accepted"

    @property
    def dedupe_key(self) -> str:
        """What makes two events one: the message, when there is one, else the event."""
        return self.message_key or self.event_key


RecordWrite = Callable[[AsyncConnection, Sequence[Any]], Awaitable[Sequence[Any]]]


async def insert_with_records(conn: AsyncConnection,
                              items: Sequence[tuple[NewEvent, tuple[RecordWrite, Any] | None]]
                              ) -> list[tuple[int | None, Any]]:
    """`insert_many`, then each new event's record (a channel's own copy of the message: a
    write function and its item) in the same transaction; a duplicate's record is not written.

    Returns, per item, (new row id or None, what the record's write returned or None).
    """
    ids = await insert_many(conn, [event for event, _ in items])
    records: list[Any] = [None] * len(items)
    groups: dict[RecordWrite, list[int]] = {}
    for index, ((_, record), event_id) in enumerate(zip(items, ids)):
        if record is not None and event_id is not None:
            groups.setdefault(record[0], []).append(index)
    for write, indexes in groups.items():
        written = await write(conn, [items[i][1][1] for i in indexes])  # type: ignore[index]
        for i, value in zip(indexes, written, strict=True):
            records[i] = value
    return list(zip(ids, records))


async def insert_many(conn: AsyncConnection, items: Sequence[NewEvent]) -> list[int | None]:
    """Insert events, ignoring any whose dedupe key is already stored.

    Returns, per item, the new row id, or None when the item was a duplicate (of a stored event
    or of an earlier item in the same batch).
    """
    seen: set[str] = set()
    fresh_items: list[NewEvent] = []
    fresh: list[bool] = []
    for item in items:
        key = item.dedupe_key
        if key in seen:
            fresh.append(False)
            continue
        seen.add(key)
        fresh.append(True)
        fresh_items.append(item)
    inserted: dict[str, int] = {}
    if fresh_items:
        driver = sqlite_driver(conn)
        if driver is not None:
            inserted = _insert_sqlite(driver, fresh_items)
        else:
            result = await conn.execute(_insert(conn.dialect.name), [_row(item) for item in fresh_items])
            inserted = {row.dedupe_key: row.id for row in result}
    return [inserted.get(item.dedupe_key) if ok else None for item, ok in zip(items, fresh)]


def _row(item: NewEvent) -> dict[str, Any]:
    return {
        "channel": item.channel, "kind": item.kind, "event_key": item.event_key, "dedupe_key": item.dedupe_key,
        "conversation_key": item.conversation_key, "sender_id": item.sender_id, "payload": item.payload,
        "status": item.status, "received_at": item.received_at,
        "processed_at": item.received_at if item.status != "accepted" else None,
    }


_COLUMNS = ("channel", "kind", "event_key", "dedupe_key", "conversation_key", "sender_id", "payload", "status",
            "received_at", "processed_at")


def _insert_sqlite(driver: Any, items: Sequence[NewEvent]) -> dict[str, int]:
    """The hot path of every channel's ack, on SQLite: multi-row INSERT ... RETURNING straight on
    the driver (the Core statement's per-row parameter processing cost more than SQLite's own
    work). The same rows and conflict rule as `_insert`."""
    dumps = jsoncodec.dumps
    rows = [(item.channel, item.kind, item.event_key, item.dedupe_key, item.conversation_key, item.sender_id,
             dumps(item.payload), item.status, item.received_at,
             item.received_at if item.status != "accepted" else None) for item in items]
    returned = sqlite_insert_many(driver, "inbound_events", _COLUMNS, rows,
                                  "ON CONFLICT DO NOTHING RETURNING id, dedupe_key")
    return {dedupe_key: event_id for event_id, dedupe_key in returned}


@functools.cache
def _insert(dialect: str):
    return (upsert(dialect, inbound_events).on_conflict_do_nothing()
            .returning(inbound_events.c.id, inbound_events.c.dedupe_key))


CLAIM = (
    update(inbound_events)
    .where(inbound_events.c.id.in_(bindparam("b_ids", expanding=True)), inbound_events.c.status == "accepted")
    .values(status="processing")
    .returning(*inbound_events.c)
)
BY_ID = select(inbound_events).where(inbound_events.c.id == bindparam("b_id"))

FINISH = (
    update(inbound_events)
    .where(inbound_events.c.id == bindparam("b_id"))
    .values(status=bindparam("b_status"), processed_at=bindparam("b_now"), error=bindparam("b_error"))
)


def finish_op(event_id: int, status: str, error: str | None = None):
    return FINISH, {"b_id": event_id, "b_status": status, "b_now": time.time(), "b_error": error}


async def claim_many(conn: AsyncConnection, event_ids: Sequence[int]) -> list[Any]:
    """accepted -> processing for each id; per id its row, or None when someone else took it."""
    rows = {row.id: row for row in await conn.execute(CLAIM, {"b_ids": list(event_ids)})}
    # an id asked for twice in one batch is given to the first asker only
    return [rows.pop(event_id, None) for event_id in event_ids]


async def get(conn: AsyncConnection, event_id: int):
    return (await conn.execute(BY_ID, {"b_id": event_id})).first()


async def finish(conn: AsyncConnection, event_id: int, status: str, error: str | None = None) -> None:
    stmt, params = finish_op(event_id, status, error)
    await conn.execute(stmt, params)


SET_REPLY_REF = update(inbound_events).where(inbound_events.c.id == bindparam("b_id")).values(reply_ref=bindparam("b_ref"))


def reply_ref_op(event_id: int, ref: str):
    return SET_REPLY_REF, {"b_id": event_id, "b_ref": ref}


async def list_open(conn: AsyncConnection, *, after: int = 0, limit: int = 10_000):
    """Events accepted but not finished, oldest first, from id `after` on (for recovery, page
    by page)."""
    result = await conn.execute(
        select(inbound_events)
        .where(inbound_events.c.status.in_(OPEN_STATUSES), inbound_events.c.id > after)
        .order_by(inbound_events.c.id)
        .limit(limit)
    )
    return result.all()


async def count_by_status(conn: AsyncConnection) -> dict[str, int]:
    result = await conn.execute(
        select(inbound_events.c.status, func.count()).group_by(inbound_events.c.status)
    )
    return {status: count for status, count in result}
