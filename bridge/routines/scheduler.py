"""The routine scheduler and the running of one routine.

Every tick the scheduler reads the routine files (they may change while the service runs),
computes which due times have passed since each routine's last handled one, and claims them in
the store: a run is a `(routine, due_at)` row, so each due time runs once, whichever replica
claims it first, and a routine's runs never overlap. A due time that passed while no service ran
is *missed*: `catch_up: skip` posts a note and runs nothing, `latest` runs once for the newest,
`all` runs each in order.

A run is a turn of the routine's runtime in the routine's own session (conversation
`routine:<name>`, reused or fresh per run), unattended: approval requests are decided by the
rules alone. The scheduler is the one delivery owner: the final output goes to each target
through the outbox, in the same transaction that closes the run's receipt, so each target gets
it once. A failing routine posts a visible failure and stays scheduled.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loguru import logger

from bridge.approvals.gate import HumanGate, TurnScope
from bridge.delivery.outbox import Outbox
from bridge.logs import FailureStreak
from bridge.routines import digest
from bridge.routines.definitions import LIMIT, LoadError, Routine, load_dir, utc
from bridge.runtimes.base import Approval, ApprovalRequest, Decision, Runtime, TurnRequest
from bridge.store import conversations
from bridge.store import routines as repo
from bridge.store.db import Database
from channels.base import Card, ConversationKey, Reply

ON_TIME = 90.0  # a due time this recent is run as scheduled, not treated as missed
LEASE = 60.0  # a run's claim, renewed while it runs; a dead process's run expires after it


class _UnattendedContext:
    """A routine's TurnContext: no person to ask, no chat to stream into."""

    def __init__(self, runner: "RoutineRunner", scope: TurnScope, key: str) -> None:
        self.runner = runner
        self.scope = scope
        self.key = key
        self.latest = ""
        self.notices: list[str] = []
        self.refused: list[str] = []  # what the rules did not allow (nobody is asked instead)

    async def progress(self, text: str) -> None:
        self.latest = text

    async def ask_approval(self, request: ApprovalRequest) -> Approval:
        ruled = await self.runner.gate.by_rules(self.scope, request)
        if ruled is not None and ruled.allows:
            return ruled
        self.refused.append(request.summary)
        return ruled or Approval(Decision.DENY, "Routines run unattended: allow this in the approval rules for "
                                                "it to run.")

    async def bind_thread(self, thread_id: str, *, lost: str | None = None, reason: str | None = None) -> None:
        async def _bind(conn) -> None:
            await conversations.bind_thread(conn, self.scope.session_id, runtime=self.runner.runtime.name,
                                            thread_id=thread_id, lost=lost, reason=reason)

        await self.runner.db.write(_bind)

    async def notice(self, text: str) -> None:
        self.notices.append(text)


class RoutineRunner:
    """Runs one claimed routine run and delivers its outcome."""

    def __init__(self, db: Database, outbox: Outbox, runtime: Runtime, gate: HumanGate, *, workspace: str,
                 clock: Callable[[], float] = time.time) -> None:
        self.db = db
        self.outbox = outbox
        self.runtime = runtime
        self.gate = gate
        self.workspace = workspace
        self.clock = clock

    async def run(self, routine: Routine, run_id: int, due_at: float, *, note: str | None = None) -> Reply:
        """Run a claimed run and deliver its outcome. Whatever happens the run is closed, and its
        targets told once: its output or its failure; that it was interrupted, when the service
        stops during it (the cancellation then goes on); or that it failed, when something
        unexpected breaks the running of it (logged with the routine and its due time)."""
        log = logger.bind(routine=routine.name, run=run_id)
        renewer = asyncio.create_task(self._renew(run_id))
        try:
            return await self._run(routine, run_id, due_at, note=note, log=log)
        except asyncio.CancelledError:
            renewer.cancel()
            log.warning("routine: {} run {} (due {}) interrupted: the service is stopping", routine.name, run_id,
                        utc(due_at))
            reply = Reply(text=f"⚠️ Routine `{routine.name}` (due {utc(due_at)}) was interrupted: the service "
                               f"stopped while it ran. It is not run again; its next due time runs as usual.")
            await asyncio.shield(self._close_unfinished(routine, run_id, reply, status="interrupted",
                                                        error="the service stopped during the run", log=log))
            raise
        except Exception as exc:  # noqa: BLE001 - not the routine's failure: the running of it broke
            log.exception("routine: {} run {} (due {}) crashed", routine.name, run_id, utc(due_at))
            error = f"{type(exc).__name__}: {exc}"
            reply = Reply(text=f"❌ Routine `{routine.name}` (due {utc(due_at)}) failed: {error}")
            await self._close_unfinished(routine, run_id, reply, status="failed", error=error, log=log)
            return reply
        finally:
            renewer.cancel()

    async def _run(self, routine: Routine, run_id: int, due_at: float, *, note: str | None, log: Any) -> Reply:
        log.info("routine: {} run {} (due {})", routine.name, run_id, utc(due_at))
        status, output, error = "completed", "", None
        try:
            async with asyncio.timeout(routine.timeout):
                if routine.kind == "digest":
                    reply = await self._digest(routine, run_id, due_at)
                else:
                    reply = await self._turn(routine, run_id, routine.text)
            output = reply.card.body if reply.card else reply.text
            if reply.card is not None and reply.card.status == "failed":
                status, error = "failed", output
        except TimeoutError:
            status, error = "failed", f"timed out after {routine.timeout:g}s"
            reply = Reply(text=f"❌ Routine `{routine.name}` timed out after {routine.timeout:g}s.")
        except Exception as exc:  # noqa: BLE001 - a failing routine is reported, and stays scheduled
            log.exception("routine: {} failed", routine.name)
            status, error = "failed", f"{type(exc).__name__}: {exc}"
            reply = Reply(text=f"❌ Routine `{routine.name}` failed: {error}")
        if note:
            reply = _with_note(reply, note)
        if await self._deliver(routine, run_id, reply, status=status, output=output, error=error):
            log.info("routine: {} run {} {}", routine.name, run_id, status)
        else:
            log.warning("routine: {} run {} (due {}) was closed before it ended (its lease ran out); its outcome "
                        "({}) is not posted", routine.name, run_id, utc(due_at), status)
        return reply

    async def _close_unfinished(self, routine: Routine, run_id: int, reply: Reply, *, status: str, error: str,
                                log: Any) -> None:
        """Close a run that did not get to deliver its outcome, and tell its targets why (unless
        it was closed already: nothing is posted twice)."""
        async def close(conn, targets: list[str]) -> bool:
            return await repo.finish(conn, run_id, status=status, output=None, error=error, delivered_to=targets,
                                     now=self.clock())

        try:
            await post_to_targets(self.db, self.outbox, routine, run_id, reply, also=close)
        except Exception:  # noqa: BLE001 - the store out of reach: the run is reported when its lease runs out
            log.exception("routine: {} run {} could not be closed as {}; it is reported when its lease runs out",
                          routine.name, run_id, status)

    async def _renew(self, run_id: int) -> None:
        while True:
            await asyncio.sleep(LEASE / 3)
            await self.db.write(lambda c: repo.renew(c, run_id, until=self.clock() + LEASE))

    async def _session(self, routine: Routine) -> tuple[TurnScope, str, conversations.SessionRef]:
        key = f"routine:{routine.name}"
        runtime = routine.runtime or self.runtime.name
        workspace = routine.workspace or self.workspace

        async def _resolve(conn):
            conversation_id = await conversations.ensure_conversation(
                conn, key, channel="routine", chat_id=routine.name, thread_id=None, is_group=False)
            if routine.session == "fresh":
                return await conversations.new_session(conn, conversation_id, name=None, runtime=runtime,
                                                       workspace=workspace)
            return await conversations.active_session(conn, conversation_id, runtime=runtime, workspace=workspace)

        session = await self.db.write(_resolve)
        scope = TurnScope(turn_id=0, conversation_id=session.conversation_id, session_id=session.session_id,
                          conversation_key=key, channel="routine", requested_by=f"routine:{routine.name}",
                          is_group=False, runtime=self.runtime.name, workspace=session.workspace)
        return scope, key, session

    async def _turn(self, routine: Routine, run_id: int, text: str) -> Reply:
        if routine.runtime and routine.runtime != self.runtime.name:
            raise RuntimeError(f"runtime {routine.runtime!r} is not the service's ({self.runtime.name})")
        scope, key, session = await self._session(routine)
        ctx = _UnattendedContext(self, scope, key)
        os.makedirs(session.workspace, exist_ok=True)
        request = TurnRequest(turn_id=run_id, session_id=session.session_id, runtime_thread_id=session.runtime_thread_id,
                              workspace=session.workspace, text=text, sender_id=scope.requested_by,
                              sender_name=f"routine {routine.name}", is_group=False, settings=session.settings)
        try:
            outcome = await self.runtime.run_turn(request, ctx)
        except asyncio.CancelledError:
            await self.runtime.interrupt(session.session_id)
            raise
        if outcome.status == "completed" and ctx.refused:
            # not run as meant: what it needed was refused (a routine's rules must allow it)
            refused = "; ".join(ctx.refused)
            return Reply(card=Card(kind="routine", title=f"Routine {routine.name} failed",
                                   body=f"{outcome.text}\n\n_Refused by the approval rules: {refused}. Routines run "
                                        f"unattended: allow what this one needs in the rules._", status="failed"))
        if outcome.status == "failed":
            return Reply(card=Card(kind="routine", title=f"Routine {routine.name} failed", body=outcome.text,
                                   status="failed"))
        return Reply(card=Card(kind="routine", title=f"Routine {routine.name}", body=outcome.text,
                               status="completed"))

    async def _digest(self, routine: Routine, run_id: int, due_at: float) -> Reply:
        since, until = routine.period_ending(due_at)  # the period it was due for, however late it runs
        day = digest.label(since, until, routine.timezone)
        items = await self.db.read(lambda c: digest.activity(c, since, until), offload=True)
        summary = digest.render(day, items)
        if routine.prompt and items:
            # the runtime writes the digest from the day's activity
            reply = await self._turn(routine, run_id, f"{routine.prompt}\n\nThe activity of {day}:\n\n{summary}")
            if reply.card is not None and reply.card.status != "failed":
                return Reply(card=Card(kind="digest", title=f"Digest · {day}", body=reply.card.body,
                                       status="completed"))
            return reply
        return Reply(card=Card(kind="digest", title=f"Digest · {day}", body=summary, status="completed"))

    async def _deliver(self, routine: Routine, run_id: int, reply: Reply, *, status: str, output: str,
                       error: str | None) -> bool:
        async def close(conn, targets: list[str]) -> bool:
            return await repo.finish(conn, run_id, status=status, output=output, error=error, delivered_to=targets,
                                     now=self.clock())

        return await post_to_targets(self.db, self.outbox, routine, run_id, reply, also=close)


async def post_to_targets(db: Database, outbox: Outbox, routine: Routine, run_id: int, reply: Reply, *,
                          also: Callable[[Any, list[str]], Any] | None = None) -> bool:
    """Queue `reply` for each of the routine's targets (refs from the run: a retried write posts
    nothing twice), with `also(conn, targets)` in the same transaction; when `also` returns False
    nothing is queued (and False returned)."""
    targets = [str(ConversationKey.parse(t)) for t in routine.targets]

    async def _write(conn) -> bool:
        if also is not None and await also(conn, targets) is False:
            return False
        await send_in(conn, outbox, targets, run_id, reply)
        return True

    posted = await db.write(_write)
    for key in targets:
        outbox.kick(key)
    return posted


async def send_in(conn: Any, outbox: Outbox, targets: list[str], run_id: int, reply: Reply) -> None:
    """Queue `reply` for each target inside the caller's transaction, by the run's refs."""
    for n, key in enumerate(targets):
        await outbox.send_in(conn, ConversationKey.parse(key).channel, key, reply, ref=f"routine-{run_id}-{n}")


def _missed(name: str, missed: list[float], busy: list[tuple[float, float]]) -> str:
    """What became of missed due times, by cause: a run of the routine still going at the time
    (it ran longer than its schedule's step), or no service to run it (down, or the store out
    of reach). `missed` holds up to LIMIT + 1 of them; one more than LIMIT means "more than"."""
    listed = missed[:LIMIT]
    count = f"{len(missed)} run{'s' if len(missed) != 1 else ''}" if len(missed) <= LIMIT else f"more than {LIMIT} runs"
    going = sum(any(start <= due <= end for start, end in busy) for due in listed)
    if going == 0:
        return f"{count} of `{name}` missed while the service was down"
    if going == len(listed) and len(missed) <= LIMIT:
        return f"{count} of `{name}` missed while its previous run was still going"
    if len(missed) > LIMIT:
        return f"{count} of `{name}` missed, while its previous run was still going or the service was down"
    return (f"{count} of `{name}` missed ({going} while its previous run was still going, "
            f"{len(listed) - going} while the service was down)")


def _with_note(reply: Reply, note: str) -> Reply:
    if reply.card is not None:
        card = reply.card
        return Reply(card=Card(kind=card.kind, title=card.title, body=f"_{note}_\n\n{card.body}", status=card.status,
                               actions=card.actions))
    return Reply(text=f"_{note}_\n\n{reply.text}")


class Scheduler:
    def __init__(self, db: Database, runner: RoutineRunner, outbox: Outbox, *, directory: Path,
                 clock: Callable[[], float] = time.time, tick: float = 1.0, owner: str | None = None) -> None:
        self.db = db
        self.runner = runner
        self.outbox = outbox
        self.directory = directory
        self.clock = clock
        self.tick_interval = tick
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}"
        self.routines: dict[str, Routine] = {}
        self.errors: list[LoadError] = []
        self._running: dict[str, asyncio.Task[Any]] = {}
        self._task: asyncio.Task[None] | None = None
        self._reported: set[str] = set()

    def reload(self) -> None:
        self.routines, self.errors = load_dir(self.directory)
        for error in self.errors:
            if f"{error.file}:{error.reason}" not in self._reported:
                self._reported.add(f"{error.file}:{error.reason}")
                logger.error("routines: {} is not loaded: {}", error.file, error.reason)

    async def start(self) -> None:
        self.reload()
        await self._expire_stale(self.clock())
        self._task = asyncio.create_task(self._loop(), name="routines")
        if self.routines:
            logger.info("routines: {} loaded from {}", len(self.routines), self.directory)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        for task in list(self._running.values()):
            task.cancel()
        await asyncio.gather(*self._running.values(), return_exceptions=True)

    async def _loop(self) -> None:
        streak = FailureStreak("routines: a tick")
        while True:
            try:
                self.reload()
                await self.tick()
                streak.ok()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the scheduler outlives a bad tick
                streak.failed(exc)
            await asyncio.sleep(self.tick_interval)

    async def tick(self) -> None:
        now = self.clock()
        states = await self.db.read(repo.states)
        await self._expire_stale(now)
        for name, routine in self.routines.items():
            state = states.get(name)
            if state is None:
                await self.db.write(lambda c, r=routine: repo.init_state(
                    c, r.name, last_due_at=now, next_due_at=r.next_due(now)))
                continue
            enabled = routine.enabled if state.enabled is None else bool(state.enabled)
            if name in self._running:
                continue
            if routine.next_due(state.last_due_at) > now:
                continue
            if not enabled:  # a disabled routine's due times pass quietly
                newest = routine.latest_due(state.last_due_at, now)
                if newest is not None:
                    await self.db.write(lambda c, r=routine, d=newest: repo.advance(
                        c, r.name, last_due_at=d, next_due_at=r.next_due(d)))
                continue
            await self._handle(routine, state.last_due_at, now)

    async def _handle(self, routine: Routine, last_due: float, now: float) -> None:
        # missed: more than ON_TIME late. The newest is found backwards from now, so a long outage
        # is never walked through whole (only `catch_up: all` lists them, LIMIT at a time).
        newest_missed = routine.latest_before(last_due, now - ON_TIME)
        on_time = routine.due_between(newest_missed if newest_missed is not None else last_due, now)
        plan: list[tuple[float, str | None]] = []
        if newest_missed is not None:
            missed = routine.due_between(last_due, newest_missed, limit=LIMIT + 1)
            busy = await self.db.read(lambda c: repo.busy_spans(c, routine.name, missed[0], newest_missed))
            what = f"{_missed(routine.name, missed, busy)} ({utc(missed[0])} … {utc(newest_missed)})"
            if routine.catch_up == "all":
                plan += [(d, f"Catching up: {what}; this is the run due {utc(d)}.") for d in missed[:LIMIT]]
                if len(missed) > LIMIT:
                    on_time = []  # the next tick goes on from the last of these
            elif routine.catch_up == "latest" and not on_time:
                plan.append((newest_missed, f"Catching up: {what}; running once for the latest."))
            else:
                await self._note_missed(routine, newest_missed,
                                        f"⏭ Skipped: {what} (catch_up: {routine.catch_up}).")
        plan += [(d, None) for d in on_time]
        handled = plan[-1][0] if plan else newest_missed
        if handled is None:
            return
        if plan:
            self._running[routine.name] = asyncio.create_task(self._run_plan(routine, plan, handled))
        else:
            await self.db.write(lambda c: repo.advance(c, routine.name, last_due_at=handled,
                                                       next_due_at=routine.next_due(handled)))

    async def _run_plan(self, routine: Routine, plan: list[tuple[float, str | None]], last_due: float) -> None:
        log = logger.bind(routine=routine.name)
        due = plan[0][0]
        try:
            for due, note in plan:
                run_id = await self.db.write(lambda c, d=due: repo.claim(c, routine.name, d, owner=self.owner,
                                                                          lease=LEASE, now=self.clock()))
                if run_id is None:
                    if await self.db.read(lambda c, d=due: repo.run_exists(c, routine.name, d)):
                        continue  # another replica has this due time
                    # a run of the routine is still going (another replica's, the CLI's): this due
                    # time is not passed over; a later tick runs it, or follows catch_up, once it ends
                    log.debug("routine: {} due {} waits for its running run", routine.name, utc(due))
                    return
                await self.runner.run(routine, run_id, due, note=note)
            await self.db.write(lambda c: repo.advance(c, routine.name, last_due_at=last_due,
                                                       next_due_at=routine.next_due(last_due)))
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - not advanced: a later tick takes the due time up again
            log.exception("routine: {} (due {}) could not be run; a later tick tries again", routine.name, utc(due))
        finally:
            self._running.pop(routine.name, None)

    async def _expire_stale(self, now: float) -> None:
        """Runs left by a process that died (their lease ran out) are marked interrupted, and their
        targets told, in one transaction (each such run is returned to one replica)."""
        async def _write(conn) -> list[tuple[Any, list[str]]]:
            told = []
            for row in await repo.expire_stale(conn, now=now):
                routine = self.routines.get(row.routine)
                targets = [str(ConversationKey.parse(t)) for t in routine.targets] if routine else []
                reply = Reply(text=f"⚠️ Routine `{row.routine}` (due {utc(row.due_at)}) was interrupted: the "
                                   f"process running it stopped. It is not run again; its next due time runs as usual.")
                await send_in(conn, self.outbox, targets, row.id, reply)
                told.append((row, targets))
            return told

        for row, targets in await self.db.write(_write):
            logger.bind(routine=row.routine, run=row.id).warning(
                "routine: {} run {} (due {}) was interrupted: the process running it stopped (told: {})",
                row.routine, row.id, utc(row.due_at), ", ".join(targets) or "no target")
            for key in targets:
                self.outbox.kick(key)

    async def _note_missed(self, routine: Routine, due: float, text: str) -> None:
        run_id = await self.db.write(lambda c: repo.claim(c, routine.name, due, owner=self.owner, lease=0,
                                                          status="missed", note=text, now=self.clock()))
        if run_id is None:
            return  # another replica posted the note
        await post_to_targets(self.db, self.outbox, routine, run_id, Reply(text=text))

    async def run_now(self, name: str) -> str:
        """Run a routine at once (`/routines run`, `agent-bridge routines run`); a manual run."""
        routine = self.routines.get(name)
        if routine is None:
            self.reload()
            routine = self.routines.get(name)
        if routine is None:
            return f"No routine named `{name}`."
        if name in self._running:
            return f"`{name}` is running now."
        now = self.clock()
        run_id = await self.db.write(lambda c: repo.claim(c, name, now, owner=self.owner, lease=LEASE, manual=True,
                                                          now=now))
        if run_id is None:
            return f"`{name}` is running now."
        task = asyncio.create_task(self.runner.run(routine, run_id, now))
        self._running[name] = task
        task.add_done_callback(lambda _t: self._running.pop(name, None))
        return f"🔁 Running `{name}` now; its output goes to {', '.join(routine.targets) or 'no target'}."
