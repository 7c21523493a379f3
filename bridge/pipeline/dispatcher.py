"""One ordered queue per conversation: one active turn at a time, later messages wait in order
and are told their position. Control commands skip the queue, and so does whatever answers the
human gate while a turn of the conversation waits on it (a shortcut such as "y", a question's
free-text answer).

A message queued during a burst is held by its event id alone (the inbox has the rest): a burst's
backlog can be tens of thousands of messages, and a Job each would be ~230 bytes against ~36.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

from loguru import logger

from bridge.pipeline import commands
from bridge.pipeline.pacing import BurstPacer


@dataclass(slots=True)
class Job:
    event_id: int
    conversation_key: str
    text: str
    is_group: bool = False
    accepted_at: float | None = None  # when the platform was answered (the event durable)
    # when it stopped waiting (behind its conversation's earlier turn, for the burst pacing or a
    # runtime slot): the bridge's own time on it starts there, not at `accepted_at`
    ready_at: float | None = None
    queued: bool = False  # it waited behind its conversation's earlier turn
    notice: Awaitable[None] | None = None  # the queued notice's write
    timer: asyncio.TimerHandle | None = None  # posts the notice if the message is still waiting
    started: bool = False

    @classmethod
    def of_event(cls, event_id: int, conversation_key: str, payload: dict | None) -> "Job":
        """The job of a stored event (recovery, a retry, another replica's event)."""
        payload = payload or {}
        return cls(event_id, conversation_key, payload.get("text", ""), is_group=bool(payload.get("is_group")))


@dataclass(slots=True)
class _Lane:
    key: str
    is_group: bool
    # a Job, or the event id of a message held during a burst (no text, no notice yet)
    queue: deque[Job | int] = field(default_factory=deque)
    active: Job | None = None
    task: asyncio.Task[None] | None = None
    # the busy policy's messages (steer, interrupt), taken one after another in arrival order, so
    # that none overtakes another while the policy's work (a steer, a stop) is under way
    busy_jobs: deque[Job] = field(default_factory=deque)
    busy_task: asyncio.Task[None] | None = None
    fronted: int = 0  # jobs put at the queue's head (to run next) since the active one started

    def idle(self) -> bool:
        return not self.queue and self.active is None and self.task is None and self.busy_task is None

    def job_at(self, index: int) -> Job:
        """The queued entry at `index` as a Job (a held one becomes a Job in place)."""
        entry = self.queue[index]
        if isinstance(entry, Job):
            return entry
        job = self.queue[index] = Job(entry, self.key, "", is_group=self.is_group, queued=True)
        return job


QUEUED_NOTICE_DELAY = 0.5  # a message that starts sooner gets no "queued" notice (no chat noise)
CLOSE_CHECK = 0.2  # how often a closing dispatcher looks whether only turns waiting for a person are left

Process = Callable[[Job], Awaitable[None]]
Notify = Callable[[Job, int], Awaitable[None]]  # returns the pending write (no task per message)
NotifyBacklog = Callable[[str, int], None]  # one notice for a conversation's messages held in a burst


class JobSink(Protocol):
    """Where accepted events go: the dispatcher, or (several replicas) the conversation's owner."""

    def submit(self, job: Job) -> None: ...


class Dispatcher:
    def __init__(self, *, process: Process, control: Process, notify_queued: Notify,
                 intercepts: Callable[[str, str], bool] = lambda _key, _text: False,
                 on_busy: Process | None = None, pacer: BurstPacer | None = None,
                 notify_backlog: NotifyBacklog | None = None) -> None:
        self._process = process
        self._intercepts = intercepts
        self._control = control
        self._notify_queued = notify_queued
        self.on_busy = on_busy  # the busy policy (steer, interrupt): it enqueues what it does not take
        self._lanes: dict[str, _Lane] = {}
        self._controls: set[asyncio.Task[None]] = set()
        self._closing = False
        self._pacer = pacer
        self._notify_backlog = notify_backlog
        self._deferred: list[Job] = []  # queued notices held back during a burst
        self._held: set[str] = set()  # conversations with messages held by id during a burst

    def submit(self, job: Job) -> None:
        if self._closing:
            return  # stays `accepted` in the inbox; the next start dispatches it
        if commands.parse(job.text) is not None or self._intercepts(job.conversation_key, job.text):
            self._side_task(self._control(job), job, "control")
            return
        lane = self._lanes.get(job.conversation_key)
        if self.on_busy is not None and lane is not None and (lane.active is not None or lane.busy_task is not None):
            lane.busy_jobs.append(job)
            if lane.busy_task is None:
                lane.busy_task = asyncio.create_task(self._run_busy(lane), name=f"busy:{lane.key}")
                self._controls.add(lane.busy_task)
                lane.busy_task.add_done_callback(self._controls.discard)
            return
        self.enqueue(job)

    async def _run_busy(self, lane: _Lane) -> None:
        try:
            while lane.busy_jobs:
                job = lane.busy_jobs.popleft()
                await self._guard(self.on_busy(job), job)  # type: ignore[misc]
        finally:
            lane.busy_task = None
            if lane.idle() and self._lanes.get(lane.key) is lane:
                del self._lanes[lane.key]

    def _side_task(self, work: Awaitable[None], job: Job, kind: str) -> None:
        task = asyncio.create_task(self._guard(work, job), name=f"{kind}:{job.event_id}")
        self._controls.add(task)
        task.add_done_callback(self._controls.discard)

    def enqueue(self, job: Job, *, front: bool = False) -> None:
        """Into the conversation's queue (`front`: at its head, the next to run, after any put there
        earlier while the same job runs)."""
        if self._closing:
            return
        lane = self._lanes.get(job.conversation_key)
        if lane is None:
            lane = self._lanes[job.conversation_key] = _Lane(job.conversation_key, job.is_group)
        waits = lane.active is not None or bool(lane.queue)
        bursting = waits and self._pacer is not None and self._pacer.bursting
        held = False
        job.queued = waits
        if front:  # after those put there before it while the same job runs: in arrival order
            lane.queue.insert(min(lane.fronted, len(lane.queue)), job)
            lane.fronted += 1
        elif bursting and job.notice is None and job.timer is None:
            lane.queue.append(job.event_id)  # held by id; its notice waits for the burst's end
            self._held.add(job.conversation_key)
            self._pacer.when_calm(self._post_deferred)  # type: ignore[union-attr]
            held = True
        else:
            lane.queue.append(job)
        if waits and not held:
            if bursting:
                self._defer_notice(job)  # no timer per message while thousands may arrive
            else:
                job.timer = asyncio.get_running_loop().call_later(QUEUED_NOTICE_DELAY, self._notice_due, job)
        if lane.task is None:
            lane.task = asyncio.create_task(self._run(job.conversation_key, lane), name=f"lane:{job.conversation_key}")

    def busy(self, conversation_key: str) -> bool:
        lane = self._lanes.get(conversation_key)
        return lane is not None and lane.active is not None

    def queued_entries(self, conversation_key: str, limit: int) -> list[tuple[int, str | None]]:
        """The first `limit` waiting messages: (event id, text), the text None for one held by id."""
        lane = self._lanes.get(conversation_key)
        entries = []
        for entry in lane.queue if lane else ():
            if len(entries) == limit:
                break
            entries.append((entry.event_id, entry.text) if isinstance(entry, Job) else (entry, None))
        return entries

    def drop_queued(self, conversation_key: str) -> list[Job]:
        """Take every waiting message out of the queue (`/stop all`); the caller closes them."""
        lane = self._lanes.get(conversation_key)
        if lane is None:
            return []
        dropped = [lane.job_at(i) for i in range(len(lane.queue))]
        lane.queue.clear()
        for job in dropped:
            job.started = True  # no queued notice any more
            if job.timer is not None:
                job.timer.cancel()
        return dropped

    def _notice_due(self, job: Job) -> None:
        """The message still waits: tell its author, with its position now (after a burst, when
        one is under way: its notices would compete with the acknowledgements)."""
        job.timer = None
        lane = self._lanes.get(job.conversation_key)
        if job.started or lane is None:
            return
        if self._pacer is not None and self._pacer.bursting:
            self._defer_notice(job)
            return
        position = next((i for i, queued in enumerate(lane.queue, 1) if queued is job), None)
        if position is not None:
            job.notice = self._notify_queued(job, position)

    def _defer_notice(self, job: Job) -> None:
        assert self._pacer is not None
        self._deferred.append(job)
        self._pacer.when_calm(self._post_deferred)

    def _post_deferred(self) -> None:
        """The burst is over: tell the authors of what still waits. A conversation with one such
        message gets its usual notice; one with several gets one notice for all of them (a notice
        per message after a burst would be a second burst)."""
        deferred, self._deferred = self._deferred, []
        held_keys, self._held = self._held, set()
        waiting = {id(job) for job in deferred if not job.started}
        for key in {job.conversation_key for job in deferred} | held_keys:
            lane = self._lanes.get(key)
            if lane is None:
                continue
            held = [index for index, entry in enumerate(lane.queue)
                    if not isinstance(entry, Job) or (id(entry) in waiting and entry.notice is None)]
            if len(held) > 1 and self._notify_backlog is not None:
                self._notify_backlog(key, len(lane.queue))
                continue
            for index in held:
                job = lane.job_at(index)
                job.notice = self._notify_queued(job, index + 1)

    def queued(self, conversation_key: str) -> int:
        lane = self._lanes.get(conversation_key)
        return len(lane.queue) if lane else 0

    async def _run(self, key: str, lane: _Lane) -> None:
        try:
            while lane.queue and not self._closing:
                paced = False
                if self._pacer is not None:
                    paced = await self._pacer.admit()  # at once, unless a burst is under way
                    if not lane.queue or self._closing:
                        break
                job = lane.job_at(0)
                if paced or job.queued:
                    job.ready_at = time.time()
                lane.queue.popleft()
                lane.fronted = 0
                job.started = True
                if job.timer is not None:
                    job.timer.cancel()
                if job.notice is not None:
                    await self._guard(job.notice, job)
                lane.active = job
                try:
                    await self._guard(self._process(job), job)
                finally:
                    lane.active = None
        finally:
            lane.task = None
            if lane.idle() and self._lanes.get(key) is lane:
                del self._lanes[key]

    @staticmethod
    async def _guard(work: Awaitable[None], job: Job) -> None:
        try:
            await work
        except asyncio.CancelledError:
            raise
        except Exception:  # noqa: BLE001 - one failing event must not stop its conversation's queue
            logger.bind(conversation=job.conversation_key, event=job.event_id).exception("dispatch: job failed")

    async def close(self, timeout: float, *, waiting_on_people: Callable[[], int] | None = None) -> None:
        """Start nothing new; let active jobs finish within `timeout`, then cancel them. Waiting
        messages stay `accepted` in the store and run after the next start. `waiting_on_people`
        counts the turns that wait for a person (an approval card): once every job left is such a
        turn, they are cancelled at once, since nobody's click is worth holding a shutdown for (their
        cards end as interrupted, to be asked again with Retry)."""
        self._closing = True
        if self._pacer is not None:
            self._pacer.close()
        for lane in self._lanes.values():
            for job in lane.queue:
                if isinstance(job, Job) and job.timer is not None:
                    job.timer.cancel()
        pending = {lane.task for lane in self._lanes.values() if lane.task is not None} | set(self._controls)
        deadline = asyncio.get_running_loop().time() + timeout
        while pending:
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            _, pending = await asyncio.wait(pending, timeout=min(remaining, CLOSE_CHECK))
            if (pending and waiting_on_people is not None and not pending & self._controls
                    and len(pending) <= waiting_on_people()):
                logger.info("shutdown: {} turn(s) wait only for a person; interrupting them now", len(pending))
                break
        for task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*pending, return_exceptions=True)
