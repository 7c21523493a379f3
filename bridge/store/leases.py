"""Conversation leases and the look-ups of the replicas that hold them (several replicas on one
PostgreSQL database; bridge/pipeline/ownership.py)."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import and_, delete, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from bridge.store.dialect import upsert
from bridge.store.inbox import OPEN_STATUSES
from bridge.store.schema import conversation_leases, inbound_events, outbox

L = conversation_leases.c


async def acquire(conn: AsyncConnection, keys: Sequence[str], *, owner: str, until: float, now: float) -> set[str]:
    """Take the leases of `keys` that are free or have run out, and renew those `owner` holds
    (each row locked by the upsert: two replicas never both win one); the keys `owner` holds now."""
    if not keys:
        return set()
    stmt = upsert(conn, conversation_leases).values(
        [{"conversation_key": key, "owner": owner, "expires_at": until} for key in keys])
    stmt = stmt.on_conflict_do_update(
        index_elements=["conversation_key"],
        set_={"owner": stmt.excluded.owner, "expires_at": stmt.excluded.expires_at},
        where=or_(L.owner == stmt.excluded.owner, L.expires_at < now),
    ).returning(L.conversation_key)
    return {row.conversation_key for row in await conn.execute(stmt)}


async def release(conn: AsyncConnection, keys: Sequence[str], *, owner: str) -> None:
    if keys:
        await conn.execute(delete(conversation_leases).where(L.owner == owner, L.conversation_key.in_(list(keys))))


async def release_all(conn: AsyncConnection, *, owner: str) -> None:
    await conn.execute(delete(conversation_leases).where(L.owner == owner))


async def expire_all(conn: AsyncConnection, *, owner: str) -> int:
    """Leases `owner` left behind when its process died: run out now, so they pass on at once."""
    result = await conn.execute(update(conversation_leases).where(L.owner == owner).values(expires_at=0.0))
    return result.rowcount or 0


async def holder(conn: AsyncConnection, key: str, *, now: float) -> str | None:
    row = (await conn.execute(select(L.owner).where(L.conversation_key == key, L.expires_at >= now))).first()
    return row.owner if row else None


async def unowned_work(conn: AsyncConnection, *, owner: str, now: float, limit: int = 1000) -> list[str]:
    """Conversations with open events (accepted or in processing) or pending deliveries, whose lease
    is missing or has run out, or is `owner`'s own; oldest work first."""
    lease_ok = or_(L.conversation_key.is_(None), L.expires_at < now, L.owner == owner)
    events = (select(inbound_events.c.conversation_key, inbound_events.c.id.label("at"))
              .select_from(inbound_events.outerjoin(
                  conversation_leases, L.conversation_key == inbound_events.c.conversation_key))
              .where(inbound_events.c.status.in_(OPEN_STATUSES), lease_ok)
              .order_by(inbound_events.c.id).limit(limit))
    deliveries = (select(outbox.c.conversation_key)
                  .select_from(outbox.outerjoin(conversation_leases, L.conversation_key == outbox.c.conversation_key))
                  .where(outbox.c.status == "pending", lease_ok)
                  .order_by(outbox.c.id).limit(limit))
    keys: dict[str, None] = {}
    for row in await conn.execute(events):
        keys.setdefault(row.conversation_key)
    for row in await conn.execute(deliveries):
        keys.setdefault(row.conversation_key)
    return list(keys)


async def open_events(conn: AsyncConnection, key: str, *, limit: int = 10_000):
    """One conversation's events accepted but not finished, oldest first."""
    return (await conn.execute(
        select(inbound_events.c.id, inbound_events.c.status, inbound_events.c.payload)
        .where(and_(inbound_events.c.conversation_key == key, inbound_events.c.status.in_(OPEN_STATUSES)))
        .order_by(inbound_events.c.id).limit(limit)
    )).all()
