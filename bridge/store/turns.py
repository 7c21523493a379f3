"""The turn ledger: inbound event -> turn -> final reply."""

from __future__ import annotations

import time

from collections.abc import Sequence
from dataclasses import dataclass

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from bridge.store.dialect import upsert
from bridge.store.schema import turns

ACTIVE = ("running",)
TERMINAL = ("completed", "failed", "interrupted", "stopped")


@dataclass(slots=True)
class NewTurn:
    inbound_event_id: int
    conversation_id: int
    session_id: int
    requested_by: str
    input_text: str
    reply_ref: str
    received_at: float


async def create_many(conn: AsyncConnection, items: Sequence[NewTurn]) -> list[int | None]:
    """Create the turn of each inbound event; None for an event that already has one."""
    now = time.time()
    rows = [
        {"inbound_event_id": t.inbound_event_id, "conversation_id": t.conversation_id, "session_id": t.session_id,
         "requested_by": t.requested_by, "status": "running", "input_text": t.input_text, "reply_ref": t.reply_ref,
         "received_at": t.received_at, "started_at": now}
        for t in items
    ]
    stmt = (
        upsert(conn, turns).on_conflict_do_nothing(index_elements=["inbound_event_id"])
        .returning(turns.c.id, turns.c.inbound_event_id)
    )
    created = {row.inbound_event_id: row.id for row in await conn.execute(stmt, rows)}
    # an event asked for twice in one batch gets its turn once
    return [created.pop(t.inbound_event_id, None) for t in items]


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
    return (await conn.execute(select(turns).where(turns.c.id == turn_id))).first()


async def by_event(conn: AsyncConnection, inbound_event_id: int):
    return (await conn.execute(select(turns).where(turns.c.inbound_event_id == inbound_event_id))).first()


async def list_active(conn: AsyncConnection):
    return (await conn.execute(select(turns).where(turns.c.status.in_(ACTIVE)).order_by(turns.c.id))).all()


async def count_by_status(conn: AsyncConnection) -> dict[str, int]:
    result = await conn.execute(select(turns.c.status, func.count()).group_by(turns.c.status))
    return {status: count for status, count in result}
