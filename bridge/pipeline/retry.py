"""Retry: an expired or interrupted approval's message runs again as a new turn (which asks again).

The retried message is a new inbound event keyed `retry:<approval id>`, so each card is retried
once however often Retry is clicked, and the retry is as durable as any other accepted message.
"""

from __future__ import annotations

import time

from loguru import logger

from bridge.approvals.gate import HumanGate
from bridge.pipeline.dispatcher import Job, JobSink
from bridge.store import approvals, inbox
from bridge.store.db import Database
from channels.base import ActionResult, ConversationKey

RETRYABLE = ("expired", "interrupted")


class Retrier:
    def __init__(self, db: Database, gate: HumanGate, dispatcher: JobSink) -> None:
        self.db = db
        self.gate = gate
        self.dispatcher = dispatcher

    async def retry(self, approval, user_id: str, conversation: ConversationKey) -> ActionResult:
        if approval.status not in RETRYABLE or approval.inbound_event_id is None:
            return ActionResult("conflict", "Only an expired or interrupted request can be retried.")
        if not self.gate.may_decide(approval, conversation.channel, user_id):
            return ActionResult("forbidden", f"Only {approval.requested_by} (who asked) or an admin can retry this.")
        original = await self.db.read(lambda c: inbox.get(c, approval.inbound_event_id))
        item = inbox.NewEvent(
            channel=original.channel, kind=original.kind, event_key=f"retry:{approval.id}", message_key=None,
            conversation_key=original.conversation_key, sender_id=original.sender_id, payload=original.payload,
            received_at=time.time(),
        )
        event_id = await self.db.write_batched(inbox.insert_many, item, urgent=True)
        if event_id is None:
            return ActionResult("conflict", "Already retried.")

        async def _card(conn) -> str:
            key = await self.gate.queue_card(conn, approval.id, retried_by=user_id)
            await approvals.audit(conn, approval.id, "retried", key, actor=user_id, detail={"event": event_id})
            return key

        key = await self.db.write(_card)
        self.gate.outbox.kick(key)
        self.dispatcher.submit(Job.of_event(event_id, original.conversation_key, original.payload))
        logger.bind(conversation=key, event=event_id).info("retry: {} retried approval {}", user_id, approval.id)
        return ActionResult("ok", "Retrying.")

    async def retry_latest(self, conversation_id: int, user_id: str, conversation: ConversationKey
                           ) -> ActionResult | None:
        approval = await self.db.read(lambda c: approvals.latest_retryable(c, conversation_id))
        if approval is None:
            return None
        return await self.retry(approval, user_id, conversation)
