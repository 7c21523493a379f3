"""Small store steps shared by the pipeline stages: claim an inbound event, answer it, and
write what must not be lost until the store takes it."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from loguru import logger

from bridge import presenter
from bridge.delivery.outbox import Outbox
from bridge.logs import FailureStreak
from bridge.store import inbox
from bridge.store.db import Database, brief, passes
from channels.base import ConversationKey, Reply

T = TypeVar("T")
RETRY_FIRST = 0.5  # seconds before a write the store failed is tried again, doubling
RETRY_MAX = 30.0
REFUSED_TRIES = 3  # a write the store refuses for what it holds, tried this many times in all


class WriteRefused(Exception):
    """The store refused a write for what it holds (a constraint, a value it cannot take, a
    bug in the statement), not for an outage: trying it again would not help."""


async def until_written(write: Callable[[], Awaitable[T]], what: str, **ids: Any) -> T:
    """`write()` (an idempotent store write), tried again while the store fails it: the first
    failure logged in full under `what`, then every tenth, then the recovery. The caller waits,
    and with it its conversation's lane, so nothing is skipped or overtaken; cancelled at
    shutdown, it leaves the event for the next start. An outage is waited out however long it
    lasts; a write the store refuses for what it holds (`passes` is false) is tried
    REFUSED_TRIES times in all, then raises WriteRefused, for the caller to say so rather than
    hold its conversation for good."""
    pause, streak, refused = RETRY_FIRST, FailureStreak(what, every=10), 0
    while True:
        try:
            result = await write()
        except Exception as exc:  # noqa: BLE001 - tried again below
            with logger.contextualize(**ids):
                streak.failed(exc)
            if not passes(exc):
                refused += 1
                if refused >= REFUSED_TRIES:
                    with logger.contextualize(**ids):
                        logger.error("{}: the store refused it {} times ({}); not tried again", what, refused, brief(exc))
                    raise WriteRefused(brief(exc)) from exc
            await asyncio.sleep(pause)
            pause = min(pause * 2, RETRY_MAX)
            continue
        streak.ok()
        return result


async def claim(db: Database, event_id: int):
    """Take an accepted event for processing; its row, or None if it was taken already.
    Claims from every conversation that land in one writer cycle are one statement."""
    return await db.write_batched(inbox.claim_many, event_id)


async def answer(db: Database, outbox: Outbox, row, reply: Reply | None, *, status: str = "done") -> None:
    """Reply to an inbound event and close it. A queued notice it had is edited to the answer (or,
    with no answer, to "skipped") so that nothing keeps saying "queued"."""
    key = row.conversation_key
    channel = ConversationKey.parse(key).channel
    if reply is None and row.reply_ref:
        reply = presenter.skipped()
    ops = []
    if reply is not None:
        ops += _reply_ops(outbox, channel, key, row.reply_ref, reply)
        # the message was marked as being worked on when it arrived: answered without a turn (a
        # command), it is done; skipped or cancelled, it stopped
        ops += outbox.react_ops(channel, key, platform_message_id=(row.payload or {}).get("marked_message_id"),
                                state="done" if status == "done" else "stopped", key=f"event:{row.id}")
    ops.append(inbox.finish_op(row.id, status))
    try:
        await until_written(lambda: db.execute(ops), "answer: its write", conversation=key, event=row.id)
    except WriteRefused as exc:
        # what this answer carried cannot be stored: the event is closed with a short note instead
        reply = presenter.not_stored(str(exc))
        fallback = [*_reply_ops(outbox, channel, key, row.reply_ref, reply), inbox.finish_op(row.id, status, str(exc))]
        await until_written(lambda: db.execute(fallback), "answer: its note", conversation=key, event=row.id)
    if reply is not None:
        outbox.kick(key)


def _reply_ops(outbox: Outbox, channel: str, key: str, reply_ref: str | None, reply: Reply) -> list:
    """The reply to an event: its queued notice edited to it, or a new message."""
    if reply_ref:
        return outbox.update_ops(channel, key, reply, ref=reply_ref)
    return outbox.send_ops(channel, key, reply, ref=outbox.new_ref())
