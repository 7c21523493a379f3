"""Control commands (`/stop`, `/status`, `/help`, `/retry`, `/queue`, `/steer` and the session
commands), approval shortcuts ("y", "n", "approve all") and free-text answers to a waiting
question: answered at once, never queued. Also the busy policy: what a message does while its
conversation's turn runs (`queue`, `steer` into the turn, or `interrupt` it)."""

from __future__ import annotations

import time

from loguru import logger

from bridge import presenter
from bridge.approvals.gate import HumanGate
from bridge.delivery.outbox import Outbox
from bridge.pipeline import commands
from bridge.pipeline.answers import answer, claim
from bridge.pipeline.dispatcher import Dispatcher, Job
from bridge.pipeline.retry import Retrier
from bridge.pipeline.session_commands import SessionCommands
from bridge.pipeline.turns import TurnRunner
from bridge.routines.scheduler import Scheduler
from bridge.runtimes.base import Decision
from bridge.store import approvals, conversations, inbox
from bridge.store import turns as turns_repo
from bridge.store.db import Database
from channels.base import ConversationKey, Reply


REFUSAL_INTERVAL = 60.0  # one "admins only" answer per person, conversation and command a minute
QUEUE_SHOWN = 20  # `/queue` lists this many waiting messages, then says how many more


class ControlCommands:
    def __init__(self, db: Database, outbox: Outbox, runner: TurnRunner, gate: HumanGate, retrier: Retrier,
                 dispatcher: Dispatcher, sessions: SessionCommands, *, busy_policy: str = "queue",
                 routines: Scheduler | None = None) -> None:
        self.db = db
        self.outbox = outbox
        self.runner = runner
        self.gate = gate
        self.retrier = retrier
        self.dispatcher = dispatcher
        self.sessions = sessions
        self.busy_policy = busy_policy
        self.routines = routines
        self._refused: dict[tuple[str, str, str], float] = {}

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
        is_group = bool((row.payload or {}).get("is_group"))
        if answering:
            result = await self.gate.answer_text(ConversationKey.parse(key), user, job.text.strip())
            reply = Reply(text=result.toast)
        elif shortcut is not None:
            reply = await self._shortcut(key, user, shortcut)
        elif command.name == "stop":
            reply = await self._stop(key, user, drop_queue=command.args.strip().lower() == "all")
        elif command.name == "status":
            reply = await self._status(key, is_group)
        elif command.name == "help":
            reply = presenter.help_text(self.runner.runtime.name)
        elif command.name == "retry":
            reply = await self._retry(key, user)
        elif command.name == "queue":
            reply = await self._queue(key)
        elif command.name == "steer":
            reply = await self._steer(key, command.args)
        elif command.name == "routines":
            reply = await self._routines(key, user, command.args)
        elif command.name == "output":
            reply = presenter.kept_output(await self.db.read(lambda c: turns_repo.last_output(c, key), offload=True))
        elif command.known:
            reply = await self.sessions.handle(command.name, command.args, key, user, is_group=is_group)
        else:
            reply = presenter.unknown_command(command.name)
        if reply.text.startswith("Sorry, ") and self._recently_refused(key, user, command.name):
            reply = None  # the same asked again within the minute: answered once already
        await answer(self.db, self.outbox, row, reply, status="done" if reply is not None else "skipped")

    def _recently_refused(self, key: str, user: str, command: str) -> bool:
        now = time.monotonic()
        last = self._refused.get((key, user, command))
        self._refused[(key, user, command)] = now if last is None or now - last >= REFUSAL_INTERVAL else last
        if len(self._refused) > 10_000:
            self._refused.clear()
        return last is not None and now - last < REFUSAL_INTERVAL

    async def on_busy(self, job: Job) -> None:
        """A message for a conversation whose turn is running, under the `steer` or `interrupt`
        policy. What this does not take is queued as usual."""
        running = self.runner.running.get(job.conversation_key)
        if running is None or self.busy_policy == "queue":
            if self.busy_policy == "interrupt" and self.runner.slots.stop(
                    job.conversation_key, why=presenter.NEWER_MESSAGE_RUNS):
                self.dispatcher.enqueue(job, front=True)  # the message waiting for a slot gives way to this one
                return
            self.dispatcher.enqueue(job)
            return
        if self.busy_policy == "steer":
            steer = getattr(self.runner.runtime, "steer", None)
            if steer is not None and await steer(running.session_id, job.text):
                row = await claim(self.db, job.event_id)
                if row is not None:
                    await answer(self.db, self.outbox, row, presenter.steered())
                return
            self.dispatcher.enqueue(job)
            return
        # interrupt: stop the running turn; the new message runs next
        running.stopped_for = presenter.interrupted_for_new_input().text
        await self.gate.stop_turn(running.turn_id, "busy-policy")
        await self.runner.runtime.interrupt(running.session_id)
        self.dispatcher.enqueue(job, front=True)

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

    async def _queue(self, key: str) -> Reply:
        entries = self.dispatcher.queued_entries(key, QUEUE_SHOWN)
        texts = []
        for event_id, text in entries:
            if text is None:  # held by id during a burst: the inbox has it
                row = await self.db.read(lambda c, event_id=event_id: inbox.get(c, event_id))
                text = (row.payload or {}).get("text", "") if row is not None else ""
            texts.append(text)
        return presenter.queue_text(texts, more=self.dispatcher.queued(key) - len(texts))

    async def _stop(self, key: str, user_id: str, *, drop_queue: bool = False) -> Reply:
        dropped = self.dispatcher.drop_queued(key) if drop_queue else []
        for job in dropped:
            row = await claim(self.db, job.event_id)
            if row is not None:
                await answer(self.db, self.outbox, row, presenter.cancelled_by_stop_all(), status="skipped")
        running = self.runner.running.get(key)
        stopped = False
        if running is not None:
            # A turn waiting for approval is stopped through its card; a running one is interrupted.
            stopped_approvals = await self.gate.stop_turn(running.turn_id, user_id)
            interrupted = await self.runner.runtime.interrupt(running.session_id)
            stopped = bool(stopped_approvals or interrupted)
        # a message waiting for a runtime slot is dropped (its turn closes it, as not run)
        unstarted = self.runner.slots.stop(key)
        if drop_queue:
            return presenter.stopped_all(len(dropped) + (unstarted is not None), stopping=stopped)
        if stopped:
            return presenter.stop_requested()
        return presenter.stopped_waiting(unstarted) if unstarted is not None else presenter.nothing_to_stop()

    async def _routines(self, key: str, user: str, args: str) -> Reply:
        if self.routines is None:
            return Reply(text="Routines are not available.")
        words = args.split()
        if words[:1] == ["run"]:
            if not self.gate.may_decide_as_admin(ConversationKey.parse(key).channel, user):
                return presenter.admins_only("/routines run")
            if len(words) != 2:
                return Reply(text="Usage: `/routines run <name>`")
            return Reply(text=await self.routines.run_now(words[1]))
        from bridge.store import routines as routines_repo

        states = await self.db.read(routines_repo.states)
        last = await self.db.read(routines_repo.last_runs)
        return presenter.routines_list(self.routines.routines, states, last, self.routines.errors)

    async def _steer(self, key: str, text: str) -> Reply:
        running = self.runner.running.get(key)
        steer = getattr(self.runner.runtime, "steer", None)
        if not text.strip():
            return Reply(text="Usage: `/steer <text>`")
        if running is None:
            return presenter.nothing_to_steer()
        if steer is None:
            return Reply(text=f"The {self.runner.runtime.name} runtime cannot take input during a turn; "
                              "send it as a message and it runs next.")
        if await steer(running.session_id, text.strip()):
            return presenter.steered()
        return Reply(text="The turn could not take it now; send it as a message and it runs next.")

    async def _status(self, key: str, is_group: bool) -> Reply:
        running = self.runner.running.get(key)
        wait = self.runner.slots.waiting.get(key)
        session = await self.runner.sessions.resolve(key, is_group=is_group)
        conversation_id = session.conversation_id
        pending = await self.db.read(lambda c: approvals.pending_in(c, conversation_id))
        return presenter.status_text(
            runtime=self.runner.runtime.name,
            session=session.name,
            workspace=session.workspace,
            running=running.text if running else None,
            elapsed=(time.monotonic() - running.started) if running else None,
            doing=running.doing() if running else None,
            queued=self.dispatcher.queued(key),
            pending=[a.summary for a in pending],
            settings=session.settings,
            slot_wait=(wait.text, time.monotonic() - wait.since, self.runner.slots.limit) if wait else None,
        )
