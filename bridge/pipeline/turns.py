"""The turn runner: inbound message -> session -> runtime turn -> exactly one final reply.

A turn first takes a runtime slot (`slots`), before anything is written. The claim, the turn's
ledger row and the final write are each coalescible, so a busy writer cycle carries them for many
conversations at once. The final reply, the turn's terminal status and the inbound event's
closing are written together in one transaction, so a crash leaves either a running turn
(recovery marks it interrupted, with a message) or a finished one with its reply queued, never a
reply twice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from loguru import logger

from bridge import presenter
from bridge.approvals.gate import HumanGate, TurnScope
from bridge.delivery.outbox import Outbox
from bridge.metrics import Metrics
from bridge.pipeline.answers import WriteRefused, answer, claim, until_written
from bridge.pipeline.dispatcher import Job
from bridge.pipeline.sessions import SessionResolver
from bridge.pipeline.slots import RuntimeSlots, Slot, Stopped
from bridge.runtimes.base import (
    Approval,
    ApprovalRequest,
    InputFile,
    Runtime,
    TurnOutcome,
    TurnRequest,
    storable,
)
from bridge.store import conversations, inbox, turns
from bridge.store import outbox as outbox_repo
from bridge.store.conversations import SessionRef
from bridge.store.db import Database
from channels.base import ConversationKey, Reply
from channels.files import FileKeeper

FIRST_PROGRESS_DELAY = 0.5  # a turn that finishes sooner shows only its final reply
PROGRESS_INTERVAL = 1.0  # at most one edit a second per turn
STOP_GRACE = 15.0  # seconds a runtime has to stop a turn over its time limit, before it is cancelled


@dataclass(slots=True)
class RunningTurn:
    turn_id: int
    session_id: int
    text: str
    started: float
    progress: "_Progress | None" = None
    stopped_for: str | None = None  # why the bridge stopped it, when that is not a person's /stop

    def doing(self) -> str | None:
        """What the turn shows now (its latest progress), for `/status`."""
        if self.progress is None:
            return None
        return self.progress.latest


class _Progress:
    """Throttled progress for one turn: the latest state, edited into the turn's reply message."""

    def __init__(self, runner: "TurnRunner", scope: TurnScope, ref: str, sent: bool) -> None:
        self.runner = runner
        self.scope = scope
        self.ref = ref
        self.sent = sent
        self.latest = presenter.working().text
        self.last_flush = 0.0
        self.started = time.monotonic()
        self.task: asyncio.Task[None] | None = None
        self.writing = False
        self.closed = False
        # a send of the message failed, perhaps only after it was committed (PostgreSQL lost during
        # COMMIT): the message may exist with an older text, so the final reply also edits it
        self.uncertain = False

    def schedule(self) -> None:
        if not self.closed and (self.task is None or self.task.done()):
            self.task = asyncio.create_task(self._flush_later())

    async def _flush_later(self) -> None:
        due = max(self.started + FIRST_PROGRESS_DELAY, self.last_flush + PROGRESS_INTERVAL)
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        if self.closed:
            return
        self.writing = True
        try:
            self.last_flush = time.monotonic()
            await self.runner.post(self.scope, self.ref, Reply(text=self.latest), sent=self.sent)
            self.sent = True
        except Exception as exc:  # noqa: BLE001 - progress is best effort; the outcome is written regardless
            self.uncertain = self.uncertain or not self.sent
            logger.bind(conversation=self.scope.conversation_key, session=self.scope.session_id,
                        turn=self.scope.turn_id).warning("turn: a progress edit was not written: {}: {}",
                                                         type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        finally:
            self.writing = False

    async def close(self) -> None:
        """Stop editing. An edit already being written is awaited, so `sent` is exact."""
        self.closed = True
        if self.task is None:
            return
        if not self.writing:
            self.task.cancel()
        try:
            await self.task
        except asyncio.CancelledError:
            pass


class _Context:
    """The TurnContext handed to a runtime for one turn."""

    def __init__(self, runner: "TurnRunner", scope: TurnScope, progress: _Progress, slot: Slot) -> None:
        self.runner = runner
        self.scope = scope
        self._progress = progress
        self.waited = 0.0  # seconds spent waiting for a person's decision (not counted as running)
        self.waiting_since: float | None = None
        self.slot = slot  # the turn's runtime slot (given back while a person decides)

    def running_for(self, started: float) -> float:
        """Seconds the turn has run since `started`, less the time it waited for a person."""
        now = time.monotonic()
        waiting = now - self.waiting_since if self.waiting_since is not None else 0.0
        return now - started - self.waited - waiting

    async def progress(self, text: str) -> None:
        self._progress.latest = storable(text)
        self._progress.schedule()

    async def ask_approval(self, request: ApprovalRequest) -> Approval:
        ruled = await self.runner.gate.by_rules(self.scope, request)
        if ruled is not None:
            return ruled  # the rules decided: no card, no waiting
        # A turn waiting for a person does not hold one of the runtime slots.
        self._progress.latest = presenter.waiting_for_approval().text
        self._progress.schedule()
        self.slot.release()
        self.waiting_since = time.monotonic()
        try:
            return await self.runner.gate.request(self.scope, request)
        finally:
            await self.slot.take()
            # the wait for the slot counts as waiting too: the turn runs again only once it has one
            self.waited += time.monotonic() - self.waiting_since
            self.waiting_since = None
            self._progress.latest = presenter.working().text
            self._progress.schedule()

    async def bind_thread(self, thread_id: str, *, lost: str | None = None, reason: str | None = None) -> None:
        await self.runner.sessions.bind_thread(self.scope.conversation_key, self.scope.session_id,
                                               thread_id=thread_id, lost=lost, reason=reason)
        log = logger.bind(conversation=self.scope.conversation_key, session=self.scope.session_id,
                          turn=self.scope.turn_id)
        if lost:
            log.warning("session: runtime thread {} lost ({}); bound to {}", lost, reason or "?", thread_id)
        else:
            log.info("session: bound to runtime thread {}", thread_id)

    async def notice(self, text: str) -> None:
        await self.runner.post(self.scope, self.runner.outbox.new_ref(), Reply(text=text), sent=False)


async def _finish_if_running(finish, rest, conn) -> bool:
    """The turn's terminal status, and with it the rest of its outcome, only if it is still
    running; False (nothing written) if it was finished elsewhere."""
    statement, params = finish
    if (await conn.execute(statement, params)).rowcount != 1:
        return False
    await outbox_repo.run(conn, rest)
    return True


async def _post_if_running(turn_id: int, ops, conn) -> bool:
    """A turn's message (progress, notice), only while the turn is still running."""
    if not await turns.is_running(conn, turn_id):
        return False
    await outbox_repo.run(conn, ops)
    return True


class TurnRunner:
    def __init__(
        self, db: Database, outbox: Outbox, runtime: Runtime, gate: HumanGate, metrics: Metrics, *,
        sessions: SessionResolver, workspace: str, max_concurrent: int, turn_timeout: float = 0.0,
        fenced: bool = False, files: FileKeeper | None = None,
    ) -> None:
        self.db = db
        self.outbox = outbox
        self.runtime = runtime
        self.gate = gate
        self.metrics = metrics
        self.workspace = workspace
        self.sessions = sessions
        self.slots = RuntimeSlots(max_concurrent, notify=self.notify_slot_wait)
        metrics.turns_waiting_for_slot.set_function(lambda: len(self.slots.waiting))
        self.turn_timeout = turn_timeout  # 0: no limit
        self.fenced = fenced  # several replicas: write an outcome only while the turn is still running
        self.running: dict[str, RunningTurn] = {}
        self.files = files  # where attachments are found (and fetched from the store, with several replicas)
        self.owns: Callable[[str], bool] | None = None  # several replicas: this one holds the conversation

    async def _start(self, job: Job, ref: str) -> tuple[SessionRef | None, Any, int | None]:
        """The session, then the claim of the event with its turn's creation in one writer unit
        (one commit before the runtime), tried again while the store fails them (the
        conversation's later messages wait behind this one). With several replicas a retry
        first checks that this one still holds the conversation: if its lease ran out meanwhile,
        the event is left to the holder, which runs it in order (None, None, None)."""
        tries = 0

        async def start() -> tuple[SessionRef | None, Any, int | None]:
            nonlocal tries
            tries += 1
            if tries > 1 and self.owns is not None and not self.owns(job.conversation_key):
                logger.bind(conversation=job.conversation_key, event=job.event_id).warning(
                    "turn: the conversation's lease ran out while the store was away; its holder runs the message")
                return None, None, None
            session = await self.sessions.resolve(job.conversation_key, is_group=job.is_group)
            row, turn_id = await self.db.write_batched(turns.claim_and_create_many, turns.Start(
                inbound_event_id=job.event_id, conversation_id=session.conversation_id,
                session_id=session.session_id, reply_ref=ref, accepts_files=self.runtime.accepts_files,
            ), urgent=True)  # a person waits on the turn's start
            return session, row, turn_id

        try:
            return await until_written(start, "turn: its start", conversation=job.conversation_key,
                                       event=job.event_id)
        except WriteRefused as exc:
            await self._start_refused(job, str(exc))
            return None, None, None

    async def _start_refused(self, job: Job, error: str) -> None:
        """The store refused this message's start for good: the event is closed, and the
        conversation told, so the next message is not held behind it."""
        channel = ConversationKey.parse(job.conversation_key).channel
        ops = [*self.outbox.send_ops(channel, job.conversation_key, presenter.start_refused(error),
                                     ref=self.outbox.new_ref()),
               inbox.finish_op(job.event_id, "failed", error)]
        await until_written(lambda: self.db.execute(ops), "turn: its refused start's note",
                            conversation=job.conversation_key, event=job.event_id)
        self.outbox.kick(job.conversation_key)

    async def process(self, job: Job) -> None:
        slot = await self.slots.take(job)
        if slot == "close":
            return  # the service is stopping: the event stays accepted, for the next start
        if isinstance(slot, Stopped):
            row = await claim(self.db, job.event_id)
            if row is not None:
                await answer(self.db, self.outbox, row, presenter.stopped_before_start(slot.why), status="skipped")
            return
        assert isinstance(slot, Slot)
        try:
            await self._process(job, slot)
        finally:
            slot.release()

    async def _process(self, job: Job, slot: Slot) -> None:
        """The turn of `job`, holding `slot` (given back by the caller, when still held)."""
        ref = self.outbox.new_ref()
        accepts_files = self.runtime.accepts_files
        session, row, turn_id = await self._start(job, ref)
        if row is None or session is None:
            return  # taken already, or left to the conversation's holder
        payload = row.payload
        sender = payload.get("sender") or {}
        text = (payload.get("text") or "").strip()
        files = await self._files_here(payload.get("attachments") or (), row.conversation_key)
        if not turns.runnable(row, accepts_files=accepts_files):
            reply: Reply | None = None
            if payload.get("stale"):
                age = row.received_at - (payload.get("sent_at") or row.received_at)
                reply = presenter.stale(age)
            elif files and not sender.get("is_bot"):
                # a file alone that cannot run: said so, never dropped in silence
                reply = presenter.files_not_run(files, runtime=self.runtime.name, accepts_files=accepts_files)
            if reply is not None:
                reply = dataclasses.replace(reply, reply_to=payload.get("platform_message_id"))
            await answer(self.db, self.outbox, row, reply, status="skipped")
            return
        if turn_id is None:
            return  # the event already has a turn: recovery owns it
        conv = ConversationKey.parse(row.conversation_key)
        is_group = bool(payload.get("is_group"))
        if row.reply_ref:
            # The queued notice stays where it was posted and says the turn started; the reply is
            # a new message below, so replies appear in the order the messages were sent.
            said = text or ", ".join(f.name for f in files)
            self.db.execute(self.outbox.update_ops(
                conv.channel, row.conversation_key, presenter.started(said), ref=row.reply_ref,
            )).add_done_callback(functools.partial(self._written, row.conversation_key))
        scope = TurnScope(
            turn_id=turn_id, conversation_id=session.conversation_id, session_id=session.session_id,
            conversation_key=row.conversation_key, channel=conv.channel, requested_by=row.sender_id, is_group=is_group,
            inbound_event_id=row.id, runtime=self.runtime.name, workspace=session.workspace,
            reply_to=payload.get("platform_message_id"), mode=session.settings.get("mode"),
        )
        log = logger.bind(conversation=row.conversation_key, session=session.session_id, turn=turn_id)
        request = TurnRequest(
            turn_id=turn_id, session_id=session.session_id, runtime_thread_id=session.runtime_thread_id,
            workspace=session.workspace, text=text, sender_id=row.sender_id,
            sender_name=sender.get("name") or row.sender_id, is_group=is_group, settings=session.settings,
            files=files,
        )
        progress = _Progress(self, scope, ref, sent=False)
        self.running[row.conversation_key] = RunningTurn(turn_id, session.session_id, text, time.monotonic(),
                                                         progress)
        self.metrics.turns_running.inc()
        log.info("turn: started")
        ctx = _Context(self, scope, progress, slot)
        try:
            progress.schedule()
            outcome = await self._run_limited(request, ctx, log)
        except asyncio.CancelledError:
            await asyncio.shield(self._finish(scope, row.id, progress, self._shutdown_outcome(), row.received_at,
                                              job.ready_at or job.accepted_at,
                                              marked=payload.get("marked_message_id")))
            raise
        except Exception as exc:  # noqa: BLE001 - a runtime failure becomes a visible message
            log.exception("turn: runtime failed")
            error = f"{type(exc).__name__}: {exc}"
            outcome = TurnOutcome("failed", presenter.runtime_failed(error).text, error=error)
        finally:
            running = self.running.pop(row.conversation_key, None)
            self.metrics.turns_running.dec()
        if outcome.status == "stopped" and running is not None and running.stopped_for:
            outcome = dataclasses.replace(outcome, text=f"{outcome.text}\n{running.stopped_for}")
        overhead = await self._finish(scope, row.id, progress, outcome, row.received_at,
                                      job.ready_at or job.accepted_at, marked=payload.get("marked_message_id"))
        log.bind(**overhead).info("turn: {}", outcome.status)

    async def _files_here(self, attachments, conversation_key: str) -> tuple[InputFile, ...]:
        """The message's files as paths on this replica: with several replicas the one that
        received a file may not be this one, and the store's copy is written here first."""
        out = []
        for a in attachments:
            path = a.get("path") or ""
            if self.files is not None and path:
                try:
                    path = await self.files.local(a.get("key") or "", path)
                except Exception as exc:  # noqa: BLE001 - said as a file not downloaded, never dropped
                    logger.bind(conversation=conversation_key).warning(
                        "turn: attachment {} not available here: {}: {}", a.get("name"), type(exc).__name__, exc)
                    path = ""
            out.append(InputFile(a.get("name") or "file", path, a.get("mime_type") or "application/octet-stream"))
        return tuple(out)

    async def _run_limited(self, request: TurnRequest, ctx: _Context, log) -> TurnOutcome:
        """The runtime's turn, stopped once it has run for longer than the turn time limit (time
        waiting for a person's approval is not counted); the reply then says so, after whatever
        the turn had answered."""
        if not self.turn_timeout:
            return await self.runtime.run_turn(request, ctx)
        started = time.monotonic()
        run = asyncio.ensure_future(self.runtime.run_turn(request, ctx))
        try:
            while True:
                left = self.turn_timeout - ctx.running_for(started)
                waiting = ctx.waiting_since is not None
                if left <= 0 and not waiting:
                    break
                done, _ = await asyncio.wait({run}, timeout=1.0 if waiting else left)
                if done:
                    return run.result()
            log.warning("turn: ran longer than {:g}s; stopping it", self.turn_timeout)
            await self.runtime.interrupt(request.session_id)
            done, _ = await asyncio.wait({run}, timeout=STOP_GRACE)
            stopped: TurnOutcome | None = None
            if done and run.exception() is None:
                stopped = run.result()
            elif not done:
                log.error("turn: the runtime did not stop within {:g}s; cancelled", STOP_GRACE)
                run.cancel()
                await asyncio.gather(run, return_exceptions=True)
            said = presenter.turn_timed_out(self.turn_timeout, stopped.text if stopped else "")
            return TurnOutcome("failed", said.text, output=stopped.output if stopped else None, error="timeout")
        except asyncio.CancelledError:
            run.cancel()
            await asyncio.gather(run, return_exceptions=True)
            raise

    def _written(self, conversation_key: str, future: asyncio.Future[None]) -> None:
        if future.cancelled() or future.exception() is not None:
            logger.bind(conversation=conversation_key).warning("turn: a notice was not written: {}",
                                                              None if future.cancelled() else future.exception())
            return
        self.outbox.kick(conversation_key)

    @staticmethod
    def _shutdown_outcome() -> TurnOutcome:
        return TurnOutcome("interrupted", presenter.interrupted_by_shutdown().text, error="shutdown")

    async def _finish(self, scope: TurnScope, event_id: int, progress: _Progress, outcome: TurnOutcome,
                      received_at: float, ready_at: float | None = None, *, marked: str | None = None
                      ) -> dict[str, float]:
        """Write the outcome; returns the bridge's own overhead around the runtime, when measurable."""
        await progress.close()
        reply = Reply(text=storable(outcome.text))
        finish = turns.finish_op(scope.turn_id, status=outcome.status,
                                 output=None if outcome.output is None else storable(outcome.output),
                                 error=None if outcome.error is None else storable(outcome.error))
        closing = [
            *self.outbox.react_ops(scope.channel, scope.conversation_key, platform_message_id=marked,
                                   state="done" if outcome.status == "completed" else "stopped",
                                   key=f"turn:{scope.turn_id}"),
            inbox.finish_op(event_id, "done"),
            conversations.touch_op(scope.session_id),
        ]
        rest = [*self._post_ops(scope, progress.ref, reply, sent=progress.sent, uncertain=progress.uncertain),
                *closing]

        def write() -> Awaitable[Any]:
            if self.fenced:
                # Several replicas: another one may have taken the conversation over while this
                # one was cut off or paused past its lease, and marked the turn interrupted (and
                # said so). The outcome is written only if the turn is still running: one outcome
                # per message (and a retry after an unknown commit cannot write it twice).
                return self.db.write(functools.partial(_finish_if_running, finish, rest))
            return self.db.execute([finish, *rest])  # idempotent: the reply's outbox key is unique

        handed = time.time()  # the reply goes into the outbox's queue now; durable once the write resolves
        ids = {"conversation": scope.conversation_key, "session": scope.session_id, "turn": scope.turn_id}
        try:
            result = await until_written(write, "turn: its outcome's write", **ids)
        except WriteRefused as exc:
            # The store refuses this outcome (what the runtime said, its output): the turn is
            # closed as failed with a short note instead, so that its conversation goes on.
            error = f"the outcome could not be stored: {exc}"
            note = presenter.not_stored(str(exc))
            finish = turns.finish_op(scope.turn_id, status="failed", output=None, error=error)
            rest = [*self._post_ops(scope, progress.ref, note, sent=progress.sent, uncertain=progress.uncertain),
                    *closing]
            outcome = TurnOutcome("failed", note.text or "", error=error)
            result = await until_written(write, "turn: its refused outcome's note", **ids)
        if result is False:
            logger.bind(conversation=scope.conversation_key, session=scope.session_id, turn=scope.turn_id).warning(
                "turn: another replica took it over meanwhile (it said so); this outcome ({}) is not sent",
                outcome.status)
            return {}
        self.outbox.kick(scope.conversation_key)
        self.metrics.turns.labels(outcome.status).inc()
        self.metrics.turn_latency.observe(max(0.0, time.time() - received_at))
        if outcome.timing and "sent_at" in outcome.timing and "done_at" in outcome.timing:
            # start: the message ready (accepted, the platform answered; or, if it waited behind
            # another turn, for the pacing or a runtime slot, out of that wait) -> the turn sent to
            # the runtime, less the time spent waiting on the runtime itself (starting or resuming
            # its thread); finish: the runtime done -> the reply handed to the outbox (and -> committed)
            t = outcome.timing
            start = t["sent_at"] - (ready_at or received_at) - t.get("waited", 0.0)
            finish = handed - t["done_at"]
            committed = time.time() - t["done_at"]
            self.metrics.runtime_overhead.labels("start").observe(max(0.0, start))
            self.metrics.runtime_overhead.labels("finish").observe(max(0.0, finish))
            return {"overhead_start_ms": round(start * 1000, 3), "overhead_finish_ms": round(finish * 1000, 3),
                    "overhead_finish_committed_ms": round(committed * 1000, 3)}
        return {}

    async def post(self, scope: TurnScope, ref: str, reply: Reply, *, sent: bool) -> None:
        ops = self._post_ops(scope, ref, reply, sent=sent)
        if self.fenced:  # never over what the replica that took the turn over has said
            if not await self.db.write(functools.partial(_post_if_running, scope.turn_id, ops)):
                return
        else:
            await self.db.execute(ops)
        self.outbox.kick(scope.conversation_key)

    async def abandon(self, conversation_key: str) -> bool:
        """Several replicas: another one took this conversation over (this one was paused or cut
        off past its lease) and has marked its turn interrupted. Stop the turn here: its edits
        and outcome would not be written anyway."""
        running = self.running.get(conversation_key)
        if running is None:
            return False
        logger.bind(conversation=conversation_key, session=running.session_id, turn=running.turn_id).warning(
            "turn: its conversation was taken over by another replica; stopping it here")
        if running.progress is not None:
            await running.progress.close()
        await self.runtime.interrupt(running.session_id)
        return True

    def _post_ops(self, scope: TurnScope, ref: str, reply: Reply, *, sent: bool, uncertain: bool = False):
        """The message's send (it is new), or its edit (`sent`), or both (`uncertain`: a send
        that may have been committed: then the send is a no-op on its key and the edit lands)."""
        if scope.reply_to and reply.reply_to is None:
            # an edit too: parts of a long reply the edited message cannot hold follow it there
            reply = dataclasses.replace(reply, reply_to=scope.reply_to)
        if sent:
            return self.outbox.update_ops(scope.channel, scope.conversation_key, reply, ref=ref)
        ops = self.outbox.send_ops(scope.channel, scope.conversation_key, reply, ref=ref)
        if uncertain:
            ops += self.outbox.update_ops(scope.channel, scope.conversation_key, reply, ref=ref)
        return ops

    def notify_backlog(self, conversation_key: str, count: int) -> None:
        """One notice for the messages of a conversation still waiting after a burst."""
        self.slots.told(conversation_key)  # their waits for a runtime slot are not told again
        channel = ConversationKey.parse(conversation_key).channel
        written = self.db.execute(self.outbox.send_ops(channel, conversation_key, presenter.backlog(count),
                                                       ref=self.outbox.new_ref()))
        written.add_done_callback(functools.partial(self._written, conversation_key))

    def notify_queued(self, job: Job, position: int) -> Awaitable[None]:
        """Tell the user their message waits (the turn edits this notice when it starts). Returns
        the pending write: a plain future, so a long backlog costs no task per message."""
        return self._notify_waiting(job, presenter.queued(position))

    def notify_slot_wait(self, job: Job) -> Awaitable[None]:
        """Tell the user their message waits for one of the runtime's slots."""
        return self._notify_waiting(job, presenter.waiting_for_slot(self.slots.limit))

    def _notify_waiting(self, job: Job, reply: Reply) -> Awaitable[None]:
        ref = self.outbox.new_ref()
        channel = ConversationKey.parse(job.conversation_key).channel
        written = self.db.execute([
            *self.outbox.send_ops(channel, job.conversation_key, reply, ref=ref),
            inbox.reply_ref_op(job.event_id, ref),
        ])
        written.add_done_callback(lambda _f: self.outbox.kick(job.conversation_key))
        return written
