"""Control commands (`/stop`, `/status`, `/help`, `/retry`), approval shortcuts ("y", "n",
"approve all") and free-text answers to a waiting question: answered at once, never queued."""

from __future__ import annotations

import time
from collections.abc import Callable

from loguru import logger

from bridge import presenter
from bridge.approvals.gate import HumanGate
from bridge.delivery.outbox import Outbox
from bridge.pipeline import commands
from bridge.pipeline.answers import answer, claim
from bridge.pipeline.dispatcher import Job
from bridge.pipeline.retry import Retrier
from bridge.pipeline.turns import TurnRunner
from bridge.runtimes.base import Decision
from bridge.store import approvals, conversations
from bridge.store.db import Database
from channels.base import ConversationKey, Reply


class ControlCommands:
    def __init__(self, db: Database, outbox: Outbox, runner: TurnRunner, gate: HumanGate, retrier: Retrier,
                 queued: Callable[[str], int]) -> None:
        self.db = db
        self.outbox = outbox
        self.runner = runner
        self.gate = gate
        self.retrier = retrier
        self.queued = queued

    async def handle(self, job: Job) -> None:
        row = await claim(self.db, job.event_id)
        if row is None:
            return
        key = row.conversation_key
        user = row.sender_id
        command = commands.parse(job.text)
        shortcut = commands.shortcut(job.text) if command is None else None
        answering = command is None and self.gate.has_question(key)
        name = "answer" if answering else shortcut or (command.name if command else "?")
        logger.bind(conversation=key, event=row.id).info("command: {}", name)
        if answering:
            result = await self.gate.answer_text(ConversationKey.parse(key), user, job.text.strip())
            reply = Reply(text=result.toast)
        elif shortcut is not None:
            reply = await self._shortcut(key, user, shortcut)
        elif command.name == "stop":
            reply = await self._stop(key, user)
        elif command.name == "status":
            reply = self._status(key)
        elif command.name == "help":
            reply = presenter.help_text(self.runner.runtime.name)
        elif command.name == "retry":
            reply = await self._retry(key, user)
        else:
            reply = Reply(text=f"Unknown command `/{command.name}`. Send `/help` for the list.")
        await answer(self.db, self.outbox, row, reply)

    async def _conversation_id(self, key: str) -> int | None:
        conv = await self.db.read(lambda c: conversations.get_by_key(c, key))
        return conv.id if conv else None

    async def _shortcut(self, key: str, user: str, what: str) -> Reply:
        conversation_id = await self._conversation_id(key)
        pending = await self.db.read(lambda c: approvals.pending_in(c, conversation_id)) if conversation_id else []
        if not pending:
            return presenter.nothing_to_decide()
        if what != "approve_all" and len(pending) > 1:
            return presenter.several_pending(len(pending))
        decision = Decision.DENY if what == "deny" else Decision.APPROVE
        conv = ConversationKey.parse(key)
        results = []
        for approval in pending:
            if what == "approve_all" and not self.gate.may_decide(approval, conv.channel, user):
                continue
            result = await self.gate.decide(approval, decision, user, conv)
            results.append(f"{approval.summary}: {result.toast}")
        return presenter.decided_by_shortcut(results) if results else presenter.nothing_to_decide()

    async def _retry(self, key: str, user: str) -> Reply:
        conversation_id = await self._conversation_id(key)
        result = None
        if conversation_id is not None:
            result = await self.retrier.retry_latest(conversation_id, user, ConversationKey.parse(key))
        return presenter.nothing_to_retry() if result is None else Reply(text=result.toast)

    async def _stop(self, key: str, user_id: str) -> Reply:
        running = self.runner.running.get(key)
        if running is None:
            return presenter.nothing_to_stop()
        # A turn waiting for approval is stopped through its card; a running command is interrupted.
        stopped_approvals = await self.gate.stop_turn(running.turn_id, user_id)
        interrupted = await self.runner.runtime.interrupt(running.session_id)
        if not (stopped_approvals or interrupted):
            return presenter.nothing_to_stop()
        return presenter.stop_requested()

    def _status(self, key: str) -> Reply:
        running = self.runner.running.get(key)
        return presenter.status_text(
            runtime=self.runner.runtime.name,
            workspace=self.runner.workspace,
            running=running.text if running else None,
            elapsed=(time.monotonic() - running.started) if running else None,
            queued=self.queued(key),
        )
