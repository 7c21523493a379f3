"""Durable outbound operations and the logical bot-message references they address.

Writers get lists of (statement, parameters) from `send_ops` / `update_ops`, to queue with
`Database.execute()` alongside their own statements; the statements are built once per dialect so
the writer can coalesce them across callers.
"""

from __future__ import annotations

import functools
import time
import uuid
from typing import Any

from sqlalchemy import Executable, bindparam, func, select, update
from sqlalchemy.dialects.postgresql import insert as pg_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.ext.asyncio import AsyncConnection

from bridge.store.schema import bot_messages, outbox

Ops = list[tuple[Executable, dict[str, Any]]]

MARK_DELIVERED = (
    update(outbox)
    .where(outbox.c.id == bindparam("b_id"))
    .values(status="delivered", delivered_at=bindparam("b_now"), attempts=bindparam("b_attempts"), last_error=None)
)
SET_PLATFORM_ID = (
    update(bot_messages).where(bot_messages.c.ref == bindparam("b_ref")).values(platform_message_id=bindparam("b_pid"))
)
MARK_RETRY = (
    update(outbox)
    .where(outbox.c.id == bindparam("b_id"))
    .values(attempts=bindparam("b_attempts"), next_attempt_at=bindparam("b_next"), last_error=bindparam("b_error"))
)
MARK_DEAD = (
    update(outbox)
    .where(outbox.c.id == bindparam("b_id"))
    .values(status="dead", attempts=bindparam("b_attempts"), last_error=bindparam("b_error"))
)
MARK_SUPERSEDED = update(outbox).where(outbox.c.id == bindparam("b_id")).values(status="superseded")


def new_ref() -> str:
    return uuid.uuid4().hex


@functools.cache
def _inserts(dialect: str) -> tuple[Executable, Executable]:
    insert = sqlite_insert if dialect == "sqlite" else pg_insert
    return (
        insert(bot_messages).on_conflict_do_nothing(index_elements=["ref"]),
        insert(outbox).on_conflict_do_nothing(index_elements=["idempotency_key"]),
    )


def _op(channel: str, conversation_key: str, op: str, ref: str, payload: dict[str, Any], key: str, now: float):
    return {
        "idempotency_key": key, "channel": channel, "conversation_key": conversation_key, "op": op,
        "message_ref": ref, "payload": payload, "status": "pending", "attempts": 0, "next_attempt_at": now,
        "created_at": now,
    }


def send_ops(dialect: str, *, channel: str, conversation_key: str, payload: dict[str, Any], ref: str,
             idempotency_key: str | None = None) -> Ops:
    """Queue a new bot message known by `ref`. Idempotent on the key (default: the ref)."""
    now = time.time()
    bot, ops = _inserts(dialect)
    return [
        (bot, {"ref": ref, "conversation_key": conversation_key, "created_at": now}),
        (ops, _op(channel, conversation_key, "send", ref, payload, idempotency_key or f"send:{ref}", now)),
    ]


def update_ops(dialect: str, *, channel: str, conversation_key: str, payload: dict[str, Any], ref: str,
               idempotency_key: str | None = None) -> Ops:
    """Queue an edit of message `ref`. When several edits of one message are pending, the
    delivery worker sends only the latest (the others become `superseded`)."""
    now = time.time()
    _bot, ops = _inserts(dialect)
    key = idempotency_key or f"update:{ref}:{uuid.uuid4().hex}"
    return [(ops, _op(channel, conversation_key, "update", ref, payload, key, now))]


def react_ops(dialect: str, *, channel: str, conversation_key: str, platform_message_id: str, state: str,
              key: str) -> Ops:
    """Queue the mark of how a turn ended on the person's message (see ChannelAdapter.react);
    delivered in the conversation's order, after the reply queued with it. Idempotent on `key`."""
    now = time.time()
    _bot, ops = _inserts(dialect)
    payload = {"message_id": platform_message_id, "state": state}
    return [(ops, _op(channel, conversation_key, "react", f"react:{key}", payload, f"react:{key}", now))]


async def run(conn: AsyncConnection, ops: Ops) -> None:
    """Execute ops inside a unit that already holds the writer's connection."""
    for stmt, params in ops:
        await conn.execute(stmt, params)


def delivered(op_id: int, attempts: int, ref: str, platform_message_id: str | None) -> Ops:
    out: Ops = [(MARK_DELIVERED, {"b_id": op_id, "b_now": time.time(), "b_attempts": attempts})]
    if platform_message_id is not None:
        out.append((SET_PLATFORM_ID, {"b_ref": ref, "b_pid": platform_message_id}))
    return out


def retry(op_id: int, attempts: int, next_attempt_at: float, error: str) -> Ops:
    return [(MARK_RETRY, {"b_id": op_id, "b_attempts": attempts, "b_next": next_attempt_at, "b_error": error[:2000]})]


def dead(op_id: int, attempts: int, error: str) -> Ops:
    return [(MARK_DEAD, {"b_id": op_id, "b_attempts": attempts, "b_error": error[:2000]})]


def superseded(op_id: int) -> Ops:
    return [(MARK_SUPERSEDED, {"b_id": op_id})]


PENDING = (
    select(outbox, bot_messages.c.platform_message_id)
    .join(bot_messages, bot_messages.c.ref == outbox.c.message_ref, isouter=True)
    .where(outbox.c.status == "pending", outbox.c.id > bindparam("b_after"))
    .order_by(outbox.c.id)
    .limit(bindparam("b_limit"))
)
# each conversation's first pending operation
_HEADS = (select(outbox.c.conversation_key, func.min(outbox.c.id).label("head_id"))
          .where(outbox.c.status == "pending").group_by(outbox.c.conversation_key).subquery("heads"))
_HEAD = outbox.alias("head")
# Pending operations of the conversations whose first pending operation is due: the ones a round
# can start on. A conversation waiting for a retry (a platform away, rate limits) has none here,
# however many operations it has queued, so it cannot crowd the others out of the page.
PENDING_DUE = (
    select(outbox, bot_messages.c.platform_message_id)
    .join(_HEADS, _HEADS.c.conversation_key == outbox.c.conversation_key)
    .join(_HEAD, _HEAD.c.id == _HEADS.c.head_id)
    .join(bot_messages, bot_messages.c.ref == outbox.c.message_ref, isouter=True)
    .where(outbox.c.status == "pending", outbox.c.id > bindparam("b_after"),
           _HEAD.c.next_attempt_at <= bindparam("b_now"))
    .order_by(outbox.c.id)
    .limit(bindparam("b_limit"))
)
PLATFORM_ID = select(bot_messages.c.platform_message_id).where(bot_messages.c.ref == bindparam("b_ref"))


async def pending(conn: AsyncConnection, limit: int = 1000, *, after: int = 0, due_by: float | None = None):
    """Pending operations, oldest first, after id `after`, with the platform id of their message:
    of every conversation, or (`due_by`) of the conversations whose first one is due by then."""
    if due_by is None:
        return (await conn.execute(PENDING, {"b_limit": limit, "b_after": after})).all()
    return (await conn.execute(PENDING_DUE, {"b_limit": limit, "b_after": after, "b_now": due_by})).all()


async def platform_id(conn: AsyncConnection, ref: str) -> str | None:
    return (await conn.execute(PLATFORM_ID, {"b_ref": ref})).scalar()


async def ref_exists(conn: AsyncConnection, ref: str) -> bool:
    return (await conn.execute(select(bot_messages.c.ref).where(bot_messages.c.ref == ref))).first() is not None


async def count_by_status(conn: AsyncConnection) -> dict[str, int]:
    result = await conn.execute(select(outbox.c.status, func.count()).group_by(outbox.c.status))
    return {status: count for status, count in result}


async def list_dead(conn: AsyncConnection, limit: int = 100):
    return await list_ops(conn, "dead", limit=limit)


async def list_ops(conn: AsyncConnection, status: str | None, *, conversation_key: str | None = None,
                   limit: int = 100):
    """Operations, newest first: of one status (None: any), of one conversation or all."""
    stmt = select(outbox).order_by(outbox.c.id.desc()).limit(limit)
    if status is not None:
        stmt = stmt.where(outbox.c.status == status)
    if conversation_key is not None:
        stmt = stmt.where(outbox.c.conversation_key == conversation_key)
    return (await conn.execute(stmt)).all()


async def requeue_dead(conn: AsyncConnection, ids: list[int] | None, *, now: float) -> list[int]:
    """Dead operations pending again, with their attempts counted from zero (their last error is
    kept until they are delivered): the ones in `ids`, or (None) every dead send and edit. A
    reaction is left dead: it was cosmetic and is stale by now. Returns the ids requeued."""
    stmt = (update(outbox).where(outbox.c.status == "dead")
            .values(status="pending", attempts=0, next_attempt_at=now).returning(outbox.c.id))
    if ids is None:
        stmt = stmt.where(outbox.c.op != "react")
    else:
        stmt = stmt.where(outbox.c.id.in_(ids))
    return sorted(row.id for row in await conn.execute(stmt))