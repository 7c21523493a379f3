"""Approvals of the human gate: the pending request, its decision, its card, and the audit trail."""

from __future__ import annotations

import time
from typing import Any

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from bridge.store.schema import approval_audit, approvals, inbound_events


async def create(
    conn: AsyncConnection, *, approval_id: str, conversation_id: int, session_id: int, turn_id: int, kind: str,
    summary: str, detail: dict[str, Any], requested_by: str, expires_at: float, card_ref: str,
    match_key: str | None = None, inbound_event_id: int | None = None,
) -> None:
    await conn.execute(
        approvals.insert().values(
            id=approval_id, conversation_id=conversation_id, session_id=session_id, turn_id=turn_id, kind=kind,
            summary=summary, detail=detail, requested_by=requested_by, status="pending",
            requested_at=time.time(), expires_at=expires_at, card_ref=card_ref, match_key=match_key,
            inbound_event_id=inbound_event_id,
        )
    )


async def get(conn: AsyncConnection, approval_id: str):
    return (await conn.execute(select(approvals).where(approvals.c.id == approval_id))).first()


async def decide(conn: AsyncConnection, approval_id: str, *, status: str, decided_by: str | None,
                 answer: str | None = None) -> bool:
    """pending -> `status`; False when it was no longer pending (someone else decided, or it expired)."""
    result = await conn.execute(
        update(approvals)
        .where(approvals.c.id == approval_id, approvals.c.status == "pending")
        .values(status=status, decided_by=decided_by, decided_at=time.time(), answer=answer)
    )
    return result.rowcount == 1


async def session_grant(conn: AsyncConnection, session_id: int, match_key: str):
    """An earlier "approve for session" of the same request in this session, if any."""
    return (
        await conn.execute(
            select(approvals)
            .where(approvals.c.session_id == session_id, approvals.c.match_key == match_key,
                   approvals.c.status == "approved_for_session")
            .limit(1)
        )
    ).first()


async def pending_for_turns(conn: AsyncConnection, turn_ids: list[int]):
    if not turn_ids:
        return []
    return (
        await conn.execute(select(approvals).where(approvals.c.turn_id.in_(turn_ids), approvals.c.status == "pending"))
    ).all()


async def pending_in(conn: AsyncConnection, conversation_id: int):
    return (
        await conn.execute(
            select(approvals)
            .where(approvals.c.conversation_id == conversation_id, approvals.c.status == "pending")
            .order_by(approvals.c.requested_at)
        )
    ).all()


async def latest_retryable(conn: AsyncConnection, conversation_id: int):
    """The conversation's most recent expired or interrupted approval not retried yet."""
    retried = select(inbound_events.c.id).where(inbound_events.c.dedupe_key == "retry:" + approvals.c.id)
    return (
        await conn.execute(
            select(approvals)
            .where(approvals.c.conversation_id == conversation_id,
                   approvals.c.status.in_(("expired", "interrupted")), ~retried.exists())
            .order_by(approvals.c.requested_at.desc())
            .limit(1)
        )
    ).first()


async def count_pending(conn: AsyncConnection) -> int:
    return (await conn.execute(select(func.count()).where(approvals.c.status == "pending"))).scalar_one()


async def list_recent(conn: AsyncConnection, *, pending_only: bool = False, limit: int = 50):
    stmt = select(approvals).order_by(approvals.c.requested_at.desc()).limit(limit)
    if pending_only:
        stmt = stmt.where(approvals.c.status == "pending")
    return (await conn.execute(stmt)).all()


AUDIT = approval_audit.insert()


def audit_op(approval_id: str, event: str, conversation_key: str, *, actor: str | None = None,
             detail: dict[str, Any] | None = None):
    return AUDIT, {
        "approval_id": approval_id, "at": time.time(), "event": event, "actor": actor,
        "conversation_key": conversation_key, "detail": detail or {},
    }


async def audit(conn: AsyncConnection, approval_id: str, event: str, conversation_key: str, *,
                actor: str | None = None, detail: dict[str, Any] | None = None) -> None:
    stmt, params = audit_op(approval_id, event, conversation_key, actor=actor, detail=detail)
    await conn.execute(stmt, params)


async def audit_since(conn: AsyncConnection, since: float, limit: int = 1000) -> tuple[list, int]:
    """The newest `limit` audit records since `since`, oldest first, and how many the period
    holds in all (more than `limit`: the older ones were left out)."""
    recent = (await conn.execute(
        select(approval_audit).where(approval_audit.c.at >= since).order_by(approval_audit.c.id.desc()).limit(limit)
    )).all()
    total = len(recent) if len(recent) < limit else (await conn.execute(
        select(func.count()).select_from(approval_audit).where(approval_audit.c.at >= since))).scalar_one()
    return list(reversed(recent)), total
