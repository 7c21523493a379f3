"""The runtime slots: at most `BRIDGE_MAX_CONCURRENT_TURNS` turns run at once, across
conversations.

A conversation's next message takes its slot *before* its event is claimed and its turn is
created. While it waits, nothing about it is written: its event is still `accepted` in the inbox.
So a service killed or shut down during the wait leaves it to the next start, which runs it,
rather than telling the chat that a turn which never ran was interrupted. A shutdown starts none
of the waiting turns, and a turn's ledger times are its own, not the wait's.

A message that waits longer than a moment is told so once: one notice per conversation while its
messages keep waiting (a conversation told of a burst's backlog already knows), and the turn edits
that notice to "started", as it does a queued notice. `/status` shows the wait and `/stop` ends it.

A turn gives its slot back while a person decides (an approval card) and takes one again after.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from loguru import logger

from bridge.pipeline.dispatcher import Job

NOTICE_DELAY = 0.5  # a message that gets its slot sooner gets no notice (no chat noise)

Ended = Literal["stop", "close"]


@dataclass(frozen=True, slots=True)
class Stopped:
    """A wait ended by `/stop`, or by the `interrupt` busy policy for a newer message (`why`)."""

    why: str | None = None


@dataclass(slots=True)
class SlotWait:
    """A conversation's message waiting for a slot."""

    text: str
    since: float
    ended: asyncio.Future[Ended] = field(default_factory=lambda: asyncio.get_running_loop().create_future())
    notice: Awaitable[None] | None = None  # the notice's write, once one is posted
    why: str | None = None  # why it was stopped, when not by a person's /stop


class Slot:
    """A slot held by one turn."""

    __slots__ = ("_semaphore", "held")

    def __init__(self, semaphore: asyncio.Semaphore) -> None:
        self._semaphore = semaphore
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self._semaphore.release()

    async def take(self) -> None:
        """Take a slot again (after a person's decision). Cancelled while waiting, it holds none."""
        await self._semaphore.acquire()
        self.held = True


class RuntimeSlots:
    def __init__(self, limit: int, *, notify: Callable[[Job], Awaitable[None]]) -> None:
        """`notify(job)` posts the notice that the job's message waits for a slot and returns its
        write, which sets the event's reply ref (the turn edits that notice when it starts)."""
        self.limit = limit
        self.semaphore = asyncio.Semaphore(limit)
        self.waiting: dict[str, SlotWait] = {}
        self.closing = False
        self._notify = notify
        self._told: set[str] = set()  # conversations told that their messages wait

    def told(self, conversation_key: str) -> None:
        """The conversation knows its messages wait (a burst's backlog notice): no slot notice."""
        self._told.add(conversation_key)

    async def take(self, job: Job) -> Slot | Stopped | Literal["close"]:
        """A slot for `job`'s turn, or why there will be none: `Stopped` (its wait was stopped), or
        "close" (the service is stopping; the event stays accepted for the next start)."""
        key = job.conversation_key
        if self.closing:
            return "close"
        if not self.semaphore.locked():
            await self.semaphore.acquire()  # free: taken without suspending
            if self.waiting:
                self._told.discard(key)  # this conversation's wait, if it had one, is over
            else:
                self._told.clear()  # nobody waits: every conversation's is
            return Slot(self.semaphore)
        wait = self.waiting[key] = SlotWait(job.text, time.monotonic())
        timer = None
        if job.notice is None and key not in self._told:
            timer = asyncio.get_running_loop().call_later(NOTICE_DELAY, self._post_notice, job, wait)
        acquire = asyncio.ensure_future(self.semaphore.acquire())
        try:
            await asyncio.wait((acquire, wait.ended), return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            self._give_back(acquire)
            raise
        finally:
            if timer is not None:
                timer.cancel()
            if self.waiting.get(key) is wait:
                del self.waiting[key]
        if wait.notice is not None:
            try:
                await asyncio.shield(wait.notice)  # the claim must see the notice's reply ref
            except asyncio.CancelledError:
                self._give_back(acquire)  # a slot it may hold already
                raise
            except Exception as exc:  # noqa: BLE001 - a notice not written is logged, the turn goes on
                logger.bind(conversation=key, event=job.event_id).warning(
                    "turn: the notice of its wait for a runtime slot was not written: {}", exc)
        if wait.ended.done() or self.closing:
            self._give_back(acquire)
            return Stopped(wait.why) if wait.ended.done() and wait.ended.result() == "stop" else "close"
        job.ready_at = time.time()  # the wait is not the bridge's own time on the turn
        return Slot(self.semaphore)

    def _give_back(self, acquire: asyncio.Future[bool]) -> None:
        if acquire.done() and not acquire.cancelled() and acquire.exception() is None:
            self.semaphore.release()
        else:
            acquire.cancel()  # the semaphore passes a wake-up it had given to the next waiter

    def _post_notice(self, job: Job, wait: SlotWait) -> None:
        if wait.ended.done() or self.waiting.get(job.conversation_key) is not wait:
            return
        self._told.add(job.conversation_key)
        wait.notice = self._notify(job)

    def stop(self, conversation_key: str, *, why: str | None = None) -> str | None:
        """`/stop` (or the `interrupt` busy policy, saying `why`): end the conversation's wait; the
        waiting message's text, or None if none waits."""
        wait = self.waiting.get(conversation_key)
        if wait is None or wait.ended.done():
            return None
        wait.why = why
        wait.ended.set_result("stop")
        return wait.text

    def close(self) -> None:
        """The service is stopping: no waiting turn starts; their events stay accepted."""
        self.closing = True
        for wait in self.waiting.values():
            if not wait.ended.done():
                wait.ended.set_result("close")
