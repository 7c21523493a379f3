"""Small store steps shared by the pipeline stages: claim an inbound event, answer it."""

from __future__ import annotations

from bridge import presenter
from bridge.delivery.outbox import Outbox
from bridge.store import inbox
from bridge.store.db import Database
from channels.base import ConversationKey, Reply


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
        if row.reply_ref:
            ops += outbox.update_ops(channel, key, reply, ref=row.reply_ref)
        else:
            ops += outbox.send_ops(channel, key, reply, ref=outbox.new_ref())
    if reply is not None:
        # the message was marked as being worked on when it arrived: answered without a turn (a
        # command), it is done; skipped or cancelled, it stopped
        ops += outbox.react_ops(channel, key, platform_message_id=(row.payload or {}).get("marked_message_id"),
                                state="done" if status == "done" else "stopped", key=f"event:{row.id}")
    ops.append(inbox.finish_op(row.id, status))
    await db.execute(ops)
    if reply is not None:
        outbox.kick(key)
