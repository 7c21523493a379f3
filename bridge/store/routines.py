"""Routine schedule state and run receipts."""

from __future__ import annotations

import json
import time
from typing import Any

from sqlalchemy import func, or_, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from bridge.store.dialect import upsert
from bridge.store.schema import routine_runs, routine_state


async def states(conn: AsyncConnection) -> dict[str, Any]:
    return {row.name: row for row in (await conn.execute(select(routine_state))).all()}


async def init_state(conn: AsyncConnection, name: str, *, last_due_at: float, next_due_at: float) -> None:
    """A routine seen for the first time starts from now (nothing before it is "missed")."""
    await conn.execute(upsert(conn, routine_state).values(
        name=name, last_due_at=last_due_at, next_due_at=next_due_at, enabled=None, updated_at=time.time(),
    ).on_conflict_do_nothing(index_elements=["name"]))


async def advance(conn: AsyncConnection, name: str, *, last_due_at: float, next_due_at: float) -> None:
    """Move the routine's schedule forward (never backwards: another replica may be ahead)."""
    await conn.execute(update(routine_state).where(routine_state.c.name == name,
                                                   routine_state.c.last_due_at < last_due_at)
                       .values(last_due_at=last_due_at, next_due_at=next_due_at, updated_at=time.time()))


async def set_enabled(conn: AsyncConnection, name: str, enabled: bool, *, now: float) -> None:
    await conn.execute(upsert(conn, routine_state).values(
        name=name, last_due_at=now, next_due_at=None, enabled=int(enabled), updated_at=time.time(),
    ).on_conflict_do_update(index_elements=["name"], set_={"enabled": int(enabled), "updated_at": time.time()}))


async def claim(conn: AsyncConnection, name: str, due_at: float, *, owner: str, lease: float, manual: bool = False,
                status: str = "running", note: str | None = None, now: float | None = None) -> int | None:
    """Claim the run of `name` due at `due_at`; None if another process has it, or if a run of the
    routine is still going (runs of one routine never overlap). `now`: the caller's clock, the one
    its leases are renewed and expired by."""
    now = time.time() if now is None else now
    if status == "running":
        live = (await conn.execute(select(routine_runs.c.id).where(
            routine_runs.c.routine == name, routine_runs.c.status == "running", routine_runs.c.lease_until > now,
        ).limit(1))).first()
        if live is not None:
            return None
    result = await conn.execute(upsert(conn, routine_runs).values(
        routine=name, due_at=due_at, manual=int(manual), status=status, owner=owner, started_at=now,
        lease_until=now + lease if status == "running" else None, note=note,
        finished_at=None if status == "running" else now,
    ).on_conflict_do_nothing(index_elements=["routine", "due_at"]).returning(routine_runs.c.id))
    row = result.first()
    return row.id if row else None


async def renew(conn: AsyncConnection, run_id: int, *, until: float) -> None:
    await conn.execute(update(routine_runs).where(routine_runs.c.id == run_id, routine_runs.c.status == "running")
                       .values(lease_until=until))


async def finish(conn: AsyncConnection, run_id: int, *, status: str, output: str | None, error: str | None,
                 delivered_to: list[str], now: float) -> bool:
    """Close a running run's receipt; False if it is closed already (a run is closed once: by its
    outcome, its interruption or its crash, whichever comes first)."""
    result = await conn.execute(update(routine_runs).where(
        routine_runs.c.id == run_id, routine_runs.c.status == "running",
    ).values(
        status=status, finished_at=now, output=output, error=error, delivered_to=json.dumps(delivered_to),
        lease_until=None,
    ))
    return bool(result.rowcount)


async def run_exists(conn: AsyncConnection, name: str, due_at: float) -> bool:
    """Whether the run of `name` due at `due_at` has a receipt (it is claimed, whatever came of it)."""
    return (await conn.execute(select(routine_runs.c.id).where(
        routine_runs.c.routine == name, routine_runs.c.due_at == due_at,
    ).limit(1))).first() is not None


async def expire_stale(conn: AsyncConnection, *, now: float) -> list[Any]:
    """Runs whose process died (their lease ran out) are marked interrupted; returns them (id,
    routine, due_at), for their targets to be told. Under concurrent replicas each is returned
    to one: the update takes only rows still running."""
    result = await conn.execute(update(routine_runs).where(
        routine_runs.c.status == "running", routine_runs.c.lease_until < now,
    ).values(status="interrupted", finished_at=now, error="the process running it stopped", lease_until=None)
        .returning(routine_runs.c.id, routine_runs.c.routine, routine_runs.c.due_at))
    return list(result.all())


async def busy_spans(conn: AsyncConnection, name: str, since: float, until: float) -> list[tuple[float, float]]:
    """When runs of `name` were going between `since` and `until`: (started, finished or `until`)
    of each run that overlaps that window. A run that was interrupted is left out: its process
    stopped at some point before it was found, so its span says nothing about when it ran."""
    rows = (await conn.execute(select(routine_runs.c.started_at, routine_runs.c.finished_at).where(
        routine_runs.c.routine == name,
        routine_runs.c.status.in_(("running", "completed", "failed")),
        routine_runs.c.started_at <= until,
        or_(routine_runs.c.finished_at.is_(None), routine_runs.c.finished_at >= since),
    ))).all()
    return [(row.started_at, until if row.finished_at is None else row.finished_at) for row in rows]


async def history(conn: AsyncConnection, name: str | None = None, limit: int = 20) -> list:
    query = select(routine_runs).order_by(routine_runs.c.id.desc()).limit(limit)
    if name:
        query = query.where(routine_runs.c.routine == name)
    return list((await conn.execute(query)).all())


async def last_runs(conn: AsyncConnection) -> dict[str, Any]:
    """Each routine's latest run (one row per routine, not the whole history)."""
    latest = select(func.max(routine_runs.c.id)).group_by(routine_runs.c.routine)
    rows = (await conn.execute(select(routine_runs).where(routine_runs.c.id.in_(latest)))).all()
    return {row.routine: row for row in rows}
