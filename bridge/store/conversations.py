"""Conversations and their sessions (a conversation holds sessions; one is active)."""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field

from sqlalchemy import bindparam, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from bridge.store.dialect import upsert
from bridge.store.schema import conversations, runtime_threads, sessions


@dataclass(frozen=True, slots=True)
class SessionRef:
    conversation_id: int
    session_id: int
    name: str
    runtime: str
    runtime_thread_id: str | None
    workspace: str
    settings: dict = field(default_factory=dict)  # "model", "mode"


def _ref(row) -> SessionRef:
    settings = json.loads(row.settings) if row.settings else {}
    return SessionRef(row.conversation_id, row.id, row.name, row.runtime, row.runtime_thread_id, row.workspace,
                      settings)


@functools.cache
def _ensure(dialect: str):
    return upsert(dialect, conversations).on_conflict_do_nothing(index_elements=["key"])


ID_BY_KEY = select(conversations.c.id).where(conversations.c.key == bindparam("b_key"))
ACTIVE_SESSION = (
    select(sessions)
    .join(conversations, conversations.c.active_session_id == sessions.c.id)
    .where(conversations.c.id == bindparam("b_conversation"))
)
NEW_SESSION = sessions.insert().returning(sessions.c.id)
SET_ACTIVE = (
    update(conversations).where(conversations.c.id == bindparam("b_conversation"))
    .values(active_session_id=bindparam("b_session"), updated_at=bindparam("b_now"))
)


async def ensure_conversation(
    conn: AsyncConnection, key: str, *, channel: str, chat_id: str, thread_id: str | None, is_group: bool
) -> int:
    now = time.time()
    await conn.execute(_ensure(conn.dialect.name), {
        "key": key, "channel": channel, "chat_id": chat_id, "thread_id": thread_id, "is_group": int(is_group),
        "created_at": now, "updated_at": now,
    })
    return (await conn.execute(ID_BY_KEY, {"b_key": key})).scalar_one()


async def active_session(
    conn: AsyncConnection, conversation_id: int, *, runtime: str, workspace: str
) -> SessionRef:
    """The conversation's active session, created (named "main") when it has none."""
    row = (await conn.execute(ACTIVE_SESSION, {"b_conversation": conversation_id})).first()
    now = time.time()
    if row is None:
        session_id = (await conn.execute(NEW_SESSION, {
            "conversation_id": conversation_id, "name": "main", "runtime": runtime, "workspace": workspace,
            "status": "active", "created_at": now, "last_active_at": now,
        })).scalar_one()
        await conn.execute(SET_ACTIVE, {"b_conversation": conversation_id, "b_session": session_id, "b_now": now})
        return SessionRef(conversation_id, session_id, "main", runtime, None, workspace, {})
    return _ref(row)


async def new_session(conn: AsyncConnection, conversation_id: int, *, name: str | None, runtime: str,
                      workspace: str, runtime_thread_id: str | None = None) -> SessionRef:
    """A fresh session, made the conversation's active one (the others are kept, resumable)."""
    existing = {r.name for r in await list_sessions(conn, conversation_id)}
    if name is None:
        n = len(existing) + 1
        while f"s{n}" in existing:
            n += 1
        name = f"s{n}"
    elif name in existing:
        raise ValueError(f"a session named {name!r} exists already")
    now = time.time()
    session_id = (await conn.execute(
        sessions.insert().values(conversation_id=conversation_id, name=name, runtime=runtime, workspace=workspace,
                                 runtime_thread_id=runtime_thread_id, status="active", created_at=now,
                                 last_active_at=now).returning(sessions.c.id)
    )).scalar_one()
    await activate(conn, conversation_id, session_id)
    if runtime_thread_id:
        await conn.execute(runtime_threads.insert().values(
            session_id=session_id, runtime=runtime, thread_id=runtime_thread_id, status="active", created_at=now,
            reason="bound by /resume"))
    return SessionRef(conversation_id, session_id, name, runtime, runtime_thread_id, workspace, {})


async def list_sessions(conn: AsyncConnection, conversation_id: int, *, archived: bool = False) -> list:
    """The conversation's sessions, oldest first; `archived`: the archived ones too (a session's
    1-based position among all of them is its number in `/sessions` and `/switch n`, so archiving
    one renumbers none of the others)."""
    query = select(sessions).where(sessions.c.conversation_id == conversation_id)
    if not archived:
        query = query.where(sessions.c.status != "archived")
    return list((await conn.execute(query.order_by(sessions.c.id))).all())


async def activate(conn: AsyncConnection, conversation_id: int, session_id: int) -> None:
    await conn.execute(update(conversations).where(conversations.c.id == conversation_id)
                       .values(active_session_id=session_id, updated_at=time.time()))


SESSION_BY_ID = select(sessions).where(sessions.c.id == bindparam("b_id"))
BY_KEY = select(conversations).where(conversations.c.key == bindparam("b_key"))


async def get_session(conn: AsyncConnection, session_id: int) -> SessionRef | None:
    row = (await conn.execute(SESSION_BY_ID, {"b_id": session_id})).first()
    return _ref(row) if row else None


async def update_session(conn: AsyncConnection, session_id: int, *, workspace: str | None = None,
                         settings: dict | None = None) -> None:
    values: dict = {}
    if workspace is not None:
        values["workspace"] = workspace
    if settings is not None:
        values["settings"] = json.dumps(settings, sort_keys=True)
    if values:
        await conn.execute(update(sessions).where(sessions.c.id == session_id).values(**values))


async def archive_session(conn: AsyncConnection, session_id: int) -> bool | None:
    """Archive a session; the conversation's active one cannot be (switch away first). True when
    archived now, False when it was already, None when there is no such session."""
    row = (await conn.execute(select(sessions).where(sessions.c.id == session_id))).first()
    if row is None:
        return None
    if row.status == "archived":
        return False
    active = (await conn.execute(select(conversations.c.active_session_id)
                                 .where(conversations.c.id == row.conversation_id))).scalar_one_or_none()
    if active == session_id:
        raise ValueError("the conversation's active session cannot be archived; switch to another first")
    result = await conn.execute(update(sessions).where(sessions.c.id == session_id).values(status="archived"))
    return bool(result.rowcount)


async def all_sessions(conn: AsyncConnection, *, include_archived: bool = False) -> list:
    query = (select(sessions, conversations.c.key, conversations.c.active_session_id)
             .join(conversations, conversations.c.id == sessions.c.conversation_id)
             .order_by(conversations.c.key, sessions.c.id))
    if not include_archived:
        query = query.where(sessions.c.status != "archived")
    return list((await conn.execute(query)).all())


async def get_by_key(conn: AsyncConnection, key: str):
    return (await conn.execute(BY_KEY, {"b_key": key})).first()


async def key_of(conn: AsyncConnection, conversation_id: int) -> str:
    return (await conn.execute(select(conversations.c.key).where(conversations.c.id == conversation_id))).scalar_one()


TOUCH_SESSION = update(sessions).where(sessions.c.id == bindparam("b_id")).values(last_active_at=bindparam("b_now"))


def touch_op(session_id: int):
    return TOUCH_SESSION, {"b_id": session_id, "b_now": time.time()}


async def bind_thread(
    conn: AsyncConnection, session_id: int, *, runtime: str, thread_id: str, lost: str | None, reason: str | None
) -> None:
    """Bind the session to a new runtime thread; the one it replaces is recorded as lost."""
    now = time.time()
    if lost:
        ended = await conn.execute(
            update(runtime_threads)
            .where(runtime_threads.c.session_id == session_id, runtime_threads.c.thread_id == lost)
            .values(status="lost", reason=reason, ended_at=now)
        )
        if not ended.rowcount:
            await conn.execute(runtime_threads.insert().values(
                session_id=session_id, runtime=runtime, thread_id=lost, status="lost", reason=reason,
                created_at=now, ended_at=now))
    await conn.execute(runtime_threads.insert().values(
        session_id=session_id, runtime=runtime, thread_id=thread_id, status="active", created_at=now))
    await conn.execute(update(sessions).where(sessions.c.id == session_id).values(runtime_thread_id=thread_id))


async def threads_of(conn: AsyncConnection, session_id: int) -> list:
    return list((await conn.execute(
        select(runtime_threads).where(runtime_threads.c.session_id == session_id).order_by(runtime_threads.c.id)
    )).all())
