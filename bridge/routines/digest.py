"""The nightly digest's material: the period's activity from the store, per conversation.

The period is the one the run's due time ends (Routine.period_ending): a late or caught-up run
covers the period it was due for, not the one before it ran."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from datetime import datetime
from zoneinfo import ZoneInfo

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncConnection

from bridge.store.schema import approvals, conversations, sessions, turns


@dataclass(slots=True)
class ConversationActivity:
    key: str
    turns: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    sessions: set[str] = field(default_factory=set)
    approvals: dict[str, int] = field(default_factory=lambda: defaultdict(int))
    failures: list[str] = field(default_factory=list)
    people: set[str] = field(default_factory=set)


def label(since: float, until: float, zone: str) -> str:
    """The period (since, until] by its local date: the date it ends on (a period ending at
    midnight is the day before), or first and last dates when it is longer than a day."""
    tz = ZoneInfo(zone)
    last = datetime.fromtimestamp(until - 1, tz).strftime("%Y-%m-%d")
    if until - since <= 25 * 3600:  # a day, with a DST change in it
        return last
    return f"{datetime.fromtimestamp(since, tz).strftime('%Y-%m-%d')} – {last}"


async def activity(conn: AsyncConnection, since: float, until: float) -> list[ConversationActivity]:
    by_key: dict[str, ConversationActivity] = {}
    rows = (await conn.execute(
        select(conversations.c.key, sessions.c.name, turns.c.status, turns.c.requested_by, turns.c.input_text,
               turns.c.error)
        .select_from(turns.join(conversations, conversations.c.id == turns.c.conversation_id)
                     .join(sessions, sessions.c.id == turns.c.session_id))
        .where(turns.c.started_at >= since, turns.c.started_at < until)
        .order_by(turns.c.id)
    )).all()
    for row in rows:
        if row.key.startswith("routine:"):
            continue  # the routines' own turns are not the team's activity
        act = by_key.setdefault(row.key, ConversationActivity(row.key))
        act.turns[row.status] += 1
        act.sessions.add(row.name)
        act.people.add(row.requested_by)
        if row.status == "failed":
            act.failures.append(f"{row.input_text[:60]!r}: {(row.error or '')[:80]}")
    decided = (await conn.execute(
        select(conversations.c.key, approvals.c.status, func.count())
        .select_from(approvals.join(conversations, conversations.c.id == approvals.c.conversation_id))
        .where(approvals.c.requested_at >= since, approvals.c.requested_at < until)
        .group_by(conversations.c.key, approvals.c.status)
    )).all()
    for key, status, count in decided:
        if key.startswith("routine:"):
            continue
        by_key.setdefault(key, ConversationActivity(key)).approvals[status] += count
    return sorted(by_key.values(), key=lambda a: a.key)


def render(day: str, items: list[ConversationActivity]) -> str:
    """The digest as markdown; a quiet day says so."""
    if not items:
        return f"A quiet day ({day}): no turns and no approvals."
    total = sum(sum(a.turns.values()) for a in items)
    lines = [f"**{day}** · {len(items)} conversation{'s' if len(items) != 1 else ''} · {total} turn"
             f"{'s' if total != 1 else ''}", ""]
    for act in items:
        turns_part = ", ".join(f"{n} {status}" for status, n in sorted(act.turns.items())) or "no turns"
        approvals_part = ", ".join(f"{n} {status}" for status, n in sorted(act.approvals.items()))
        line = f"- `{act.key}`: {turns_part}"
        if approvals_part:
            line += f"; approvals: {approvals_part}"
        if act.people:
            line += f"; by {', '.join(sorted(act.people))}"
        lines.append(line)
        for failure in act.failures[:3]:
            lines.append(f"  - failed: {failure}")
    return "\n".join(lines)
