"""The turn ledger: inbound event -> turn -> final reply."""

from __future__ import annotations

import functools
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from bridge.store import inbox
from bridge.store.dialect import upsert
from bridge.store.schema import conversations, turns

ACTIVE = ("running",)
TERMINAL = ("completed", "failed", "interrupted", "stopped")


@dataclass(frozen=True, slots=True)
class Start:
    """Claim an accepted event and, when it is to run, create its turn (one writer unit)."""

    inbound_event_id: int
    conversation_id: int
    session_id: int
    reply_ref: str
    accepts_files: bool = True  # the runtime takes attachments as input (a file alone is a turn)


def runnable(row, *, accepts_files: bool = True) -> bool:
    """Whether a claimed event becomes a turn: a person's message, not stale, with text or (for a
    runtime that takes files) a downloaded attachment."""
    return runnable_payload(row.payload or {}, accepts_files=accepts_files)


def runnable_payload(payload: dict[str, Any], *, accepts_files: bool = True) -> bool:
    if (payload.get("sender") or {}).get("is_bot") or payload.get("stale"):
        return False
    if (payload.get("text") or "").strip():
        return True
    return accepts_files and any(a.get("path") for a in payload.get("attachments") or ())


def answerable_payload(payload: dict[str, Any]) -> bool:
    """Whether an event gets an answer at all: a turn, or a note (stale; a file the runtime cannot
    take or that could not be downloaded). Anything else (no text, no file; a bot's) is stored
    closed."""
    if (payload.get("sender") or {}).get("is_bot"):
        return False
    return bool(payload.get("stale") or (payload.get("text") or "").strip() or payload.get("attachments"))


async def claim_and_create_many(conn: AsyncConnection, items: Sequence[Start]) -> list[tuple[Any, int | None]]:
    """Per item: the claimed event row (None if someone else took it) and its new turn's id (None
    when it does not run, or already has a turn). Claims and turns of many conversations that land
    in one writer cycle are two statements in all."""
    rows = await inbox.claim_many(conn, [item.inbound_event_id for item in items])
    starts = [(item, row) for item, row in zip(items, rows)
              if row is not None and runnable(row, accepts_files=item.accepts_files)]
    created: dict[int, int] = {}
    if starts:
        now = time.time()
        values = [
            {"inbound_event_id": row.id, "conversation_id": item.conversation_id, "session_id": item.session_id,
             "requested_by": row.sender_id, "status": "running", "input_text": (row.payload.get("text") or "").strip(),
             "reply_ref": item.reply_ref, "received_at": row.received_at, "started_at": now}
            for item, row in starts
        ]
        created = {r.inbound_event_id: r.id for r in await conn.execute(_insert(conn.dialect.name), values)}
    return [(row, created.pop(row.id, None) if row is not None else None) for row in rows]


@functools.cache
def _insert(dialect: str):
    return (upsert(dialect, turns).on_conflict_do_nothing(index_elements=["inbound_event_id"])
            .returning(turns.c.id, turns.c.inbound_event_id))


BY_ID = select(turns).where(turns.c.id == bindparam("b_id"))
# the latest turn of a conversation's active session that kept an output (`/output`)
LAST_OUTPUT = (
    select(turns.c.id, turns.c.input_text, turns.c.status, turns.c.output)
    .join(conversations, conversations.c.active_session_id == turns.c.session_id)
    .where(conversations.c.key == bindparam("b_key"), turns.c.output.is_not(None))
    .order_by(turns.c.id.desc())
    .limit(1)
)
BY_EVENT = select(turns).where(turns.c.inbound_event_id == bindparam("b_event"))

FINISH = (
    update(turns)
    .where(turns.c.id == bindparam("b_id"), turns.c.status == "running")  # no IN: executemany-safe
    .values(status=bindparam("b_status"), output=bindparam("b_output"), error=bindparam("b_error"),
            finished_at=bindparam("b_now"))
)


def finish_op(turn_id: int, *, status: str, output: str | None = None, error: str | None = None):
    return FINISH, {"b_id": turn_id, "b_status": status, "b_output": output, "b_error": error, "b_now": time.time()}


async def finish(
    conn: AsyncConnection, turn_id: int, *, status: str, output: str | None = None, error: str | None = None
) -> bool:
    """running -> a terminal status; False if the turn was already finished."""
    stmt, params = finish_op(turn_id, status=status, output=output, error=error)
    return (await conn.execute(stmt, params)).rowcount == 1


async def get(conn: AsyncConnection, turn_id: int):
    return (await conn.execute(BY_ID, {"b_id": turn_id})).first()


STATUS = select(turns.c.status).where(turns.c.id == bindparam("b_id"))


async def is_running(conn: AsyncConnection, turn_id: int) -> bool:
    """Whether the turn is still running (its status alone: not its kept output)."""
    return (await conn.execute(STATUS, {"b_id": turn_id})).scalar() == "running"


async def last_output(conn: AsyncConnection, conversation_key: str):
    """The active session's latest turn that kept an output (id, input_text, status, output), or None."""
    return (await conn.execute(LAST_OUTPUT, {"b_key": conversation_key})).first()


async def by_event(conn: AsyncConnection, inbound_event_id: int):
    return (await conn.execute(BY_EVENT, {"b_event": inbound_event_id})).first()


async def list_active(conn: AsyncConnection, conversation_key: str | None = None):
    """Running turns, oldest first: all of them, or one conversation's."""
    stmt = select(turns).where(turns.c.status.in_(ACTIVE)).order_by(turns.c.id)
    if conversation_key is not None:
        stmt = stmt.where(turns.c.conversation_id == select(conversations.c.id)
                          .where(conversations.c.key == conversation_key).scalar_subquery())
    return (await conn.execute(stmt)).all()


async def count_by_status(conn: AsyncConnection) -> dict[str, int]:
    result = await conn.execute(select(turns.c.status, func.count()).group_by(turns.c.status))
    return {status: count for status, count in result}
