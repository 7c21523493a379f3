"""Recovery: what a process that stopped left unfinished.

- Turns still `running` died with that process: they become `interrupted`, their pending
  approvals too (the card says so), and the conversation gets a visible message. At start-up
  what their shell commands left running has been killed by then (the runtime's start,
  bridge/runtimes/shell_records.py): a turn said interrupted no longer runs, and sending it again
  cannot run it twice at once. (A replica taking over another's conversations cannot end that
  one's processes; they are ended when it starts again.)
- Inbound events accepted but never finished are dispatched again, oldest first.
- Pending outbox operations are left to the delivery worker's sweep.

One process (SQLite) recovers everything at start-up. With several replicas, a replica recovers
one conversation at a time, when it takes over the conversation's lease from a replica that
stopped (bridge/pipeline/ownership.py); it then dispatches the events itself.
"""

from __future__ import annotations

from collections.abc import Collection

from loguru import logger
from sqlalchemy import update

from bridge import presenter
from bridge.approvals.gate import HumanGate
from bridge.delivery.outbox import Outbox
from bridge.pipeline.dispatcher import Dispatcher, Job
from bridge.store import approvals, conversations, inbox, turns
from bridge.store import outbox as outbox_repo
from bridge.store.db import Database
from bridge.store.schema import inbound_events
from channels.base import ConversationKey


async def recover(db: Database, outbox: Outbox, gate: HumanGate, dispatcher: Dispatcher, *,
                  page_size: int = 10_000) -> dict[str, int]:
    """Everything (one process, at start-up): interrupt, reset, and dispatch again."""
    stale = await interrupt_and_reset(db, outbox, gate)
    resubmitted, after = 0, 0
    while True:  # page by page: a backlog of any size is dispatched again, in order
        page = await db.read(lambda c, after=after: inbox.list_open(c, after=after, limit=page_size), offload=True)
        for event in page:
            dispatcher.submit(Job.of_event(event.id, event.conversation_key, event.payload))
        resubmitted += len(page)
        if len(page) < page_size:
            break
        after = page[-1].id
    if stale or resubmitted:
        logger.warning("recovery: {} interrupted turn(s), {} event(s) dispatched again", stale, resubmitted)
    return {"interrupted_turns": stale, "redispatched_events": resubmitted}


async def interrupt_and_reset(db: Database, outbox: Outbox, gate: HumanGate, conversation_key: str | None = None,
                              *, keep: Collection[int] = ()) -> int:
    """Turns left running become interrupted, and events left in processing are accepted again
    (all, or one conversation's; not the events in `keep`, which this process runs). The number of
    turns interrupted."""
    stale = [turn for turn in await db.read(lambda c: turns.list_active(c, conversation_key))
             if turn.inbound_event_id not in keep]
    for turn in stale:
        await _interrupt(db, outbox, gate, turn)

    async def _reset(conn) -> None:
        stmt = update(inbound_events).where(inbound_events.c.status == "processing")
        if conversation_key is not None:
            stmt = stmt.where(inbound_events.c.conversation_key == conversation_key)
        if keep:
            stmt = stmt.where(inbound_events.c.id.not_in(list(keep)))
        await conn.execute(stmt.values(status="accepted"))

    await db.write(_reset)
    return len(stale)


async def _interrupt(db: Database, outbox: Outbox, gate: HumanGate, turn) -> None:
    async def _write(conn) -> str:
        key = await conversations.key_of(conn, turn.conversation_id)
        channel = ConversationKey.parse(key).channel
        await turns.finish(conn, turn.id, status="interrupted", error="service restarted")
        pending = await approvals.pending_for_turns(conn, [turn.id])
        for approval in pending:
            await approvals.decide(conn, approval.id, status="interrupted", decided_by=None)
            await approvals.audit(conn, approval.id, "interrupted", key, detail={"reason": "service restarted"})
            await gate.queue_card(conn, approval.id)
        reply = presenter.interrupted_by_restart(turn.input_text, card=bool(pending))
        if turn.reply_ref and await outbox_repo.ref_exists(conn, turn.reply_ref):
            await outbox.update_in(conn, channel, key, reply, ref=turn.reply_ref)
        else:
            await outbox.send_in(conn, channel, key, reply, ref=turn.reply_ref or outbox.new_ref())
        # the person's message may still show the "working on it" mark put on before the restart
        event = await inbox.get(conn, turn.inbound_event_id)
        marked = ((event.payload if event is not None else None) or {}).get("marked_message_id")
        await outbox_repo.run(conn, outbox.react_ops(channel, key, platform_message_id=marked, state="stopped",
                                                     key=f"turn:{turn.id}"))
        await inbox.finish(conn, turn.inbound_event_id, "done")
        return key

    key = await db.write(_write)
    outbox.kick(key)
    logger.bind(conversation=key, session=turn.session_id, turn=turn.id).warning("recovery: turn interrupted by restart")

