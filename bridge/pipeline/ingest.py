"""The pipeline's face towards the channels: persist-and-dedupe, then dispatch; card actions go
straight to the human gate."""

from __future__ import annotations

import asyncio
import functools
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any

from bridge import presenter
from bridge.approvals.gate import HumanGate
from bridge.metrics import Metrics
from bridge.pipeline.dispatcher import Job, JobSink
from bridge.pipeline.pacing import BurstPacer
from bridge.pipeline.retry import Retrier
from bridge.store import approvals, inbox, turns
from bridge.store.db import Database
from channels.base import AcceptResult, ActionResult, InboundAction, InboundMessage, Record


class Ingestor:
    def __init__(self, db: Database, dispatcher: JobSink, gate: HumanGate, retrier: Retrier,
                 metrics: Metrics, *, pacer: BurstPacer | None = None) -> None:
        self.db = db
        self.dispatcher = dispatcher
        self.gate = gate
        self.retrier = retrier
        self.metrics = metrics
        self._inbound = functools.cache(metrics.inbound.labels)  # one child per channel and kind
        self.pacer = pacer

    async def accept(self, event: InboundMessage, record: Record | None = None) -> AcceptResult:
        item = self._item(event, record)
        event_id, kept = await self.db.write_batched(inbox.insert_with_records, item, urgent=True)
        return self._accepted(event, item[0], event_id, kept)

    async def accept_many(self, events: Sequence[tuple[InboundMessage, Record | None]]) -> list[AcceptResult]:
        """`accept` for requests that arrived together: one write unit for all of them. Should
        that unit fail, each is tried alone, so one bad event fails by itself: its result carries
        the error, and every other one is kept and dispatched."""
        items = [self._item(event, record) for event, record in events]
        try:
            stored = await self.db.write_batched_many(inbox.insert_with_records, items, urgent=True)
        except Exception:  # noqa: BLE001 - isolated below: each alone
            stored = await asyncio.gather(*(self.db.write_batched(inbox.insert_with_records, item, urgent=True)
                                            for item in items), return_exceptions=True)
        results: list[AcceptResult] = []
        for (event, _), item, outcome in zip(events, items, stored, strict=True):
            if isinstance(outcome, asyncio.CancelledError):
                raise outcome
            if isinstance(outcome, BaseException):
                results.append(AcceptResult(None, False, answered=False, error=outcome))
            else:
                results.append(self._accepted(event, item[0], *outcome))
        return results

    @staticmethod
    def _item(event: InboundMessage, record: Record | None) -> tuple[inbox.NewEvent, Any]:
        key = sys.intern(str(event.conversation))  # held by every waiting job of the conversation
        payload = event.to_payload()
        # An event that will have no turn and no answer (no text and no file, a bot's) is stored
        # closed: it still dedupes and is on record, but costs no dispatch, claim or second write.
        # A stale one is answered (with a note), so it goes the usual way.
        closed = not turns.answerable_payload(payload)
        item = inbox.NewEvent(
            channel=event.conversation.channel,
            kind=event.kind,
            event_key=inbox.fit_key(event.event_key),
            message_key=None if event.message_key is None else inbox.fit_key(event.message_key),
            conversation_key=key,
            sender_id=event.sender.id,
            payload=payload,
            received_at=time.time(),
            status="skipped" if closed else "accepted",
        )
        return item, None if record is None else (record.write, record.item)

    def _accepted(self, event: InboundMessage, item: inbox.NewEvent, event_id: int | None, kept: Any) -> AcceptResult:
        if event_id is None:
            self.metrics.duplicates.labels(item.channel).inc()
            return AcceptResult(None, True)
        self._inbound(item.channel, item.kind).inc()
        if self.pacer is not None:
            self.pacer.note()
        closed = item.status != "accepted"
        if not closed:
            self.dispatcher.submit(Job(event_id, item.conversation_key, event.text, is_group=event.is_group,
                                       accepted_at=time.time()))
        return AcceptResult(event_id, False, kept, answered=not closed)

    async def act(self, action: InboundAction) -> ActionResult:
        if action.action_id.startswith("cmd:"):
            # a command button (the help card): the click is the person sending that command
            command = str(action.value.get("command", ""))
            if command not in presenter.CLICKABLE_COMMANDS:
                return ActionResult("not_found", "Unknown command button.")
            await self.accept(InboundMessage(
                conversation=action.conversation, sender=action.actor, text=command,
                event_key=f"{action.conversation.channel}:click:{uuid.uuid4().hex}", is_group=action.is_group,
                mentions_bot=True,
            ))
            return ActionResult("ok", f"Sent {command}")
        if action.action_id == "retry":
            approval_id = str(action.value.get("approval_id", ""))
            approval = await self.db.read(lambda c: approvals.get(c, approval_id)) if approval_id else None
            if approval is None:
                return ActionResult("not_found", "This approval no longer exists.")
            return await self.retrier.retry(approval, action.actor.id, action.conversation)
        return await self.gate.act(action)
