"""The delivery worker: drains the outbox into the channels.

It works in rounds: a read fetches the pending operations of the conversations whose first
pending operation is due, oldest first (a conversation waiting for a retry is left out whole, so
a platform's outage cannot crowd the others out of the page); each conversation not already
being delivered gets a task that delivers its operations in order and stops at the first that
fails or is not due yet, so an operation never overtakes an earlier one of its conversation. Of several pending edits of one message only the latest is sent. The
outcome of a conversation's operations is written as one coalescible unit.

Transient failures retry with exponential backoff and jitter (or the platform's Retry-After);
after `max_attempts`, or on a permanent failure, the operation becomes `dead`: an error record in
the log and in /metrics, never a silent drop. A retry that comes due, or work a previous process
left, is picked up by the periodic round.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import OrderedDict
from collections.abc import Callable

from loguru import logger

from bridge.logs import FailureStreak
from bridge.metrics import Metrics
from bridge.store import outbox as repo
from bridge.store.db import Database
from channels.base import ChannelAdapter, ConversationKey, DeliveryError, Reply

SWEEP_INTERVAL = 1.0
PAGE = 1000
MAX_PAGES = 10  # pages one round reads while nothing it read can start here


class DeliveryWorker:
    def __init__(
        self, db: Database, channels: dict[str, ChannelAdapter], metrics: Metrics, *,
        max_attempts: int, base_delay: float, max_delay: float, page: int = PAGE,
    ) -> None:
        self.db = db
        self.channels = channels
        self.metrics = metrics
        self.max_attempts = max_attempts
        self.base_delay = base_delay
        self.max_delay = max_delay
        self.page = page
        self._inflight: dict[str, asyncio.Task[None]] = {}
        # when each conversation's last lane finished: a round whose read began earlier saw stale rows
        self._settled: dict[str, float] = {}
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        # Several replicas: deliver only the conversations this replica holds (Ownership.owns);
        # None: one process delivers everything.
        self.owns: Callable[[str], bool] | None = None
        self._pending_here: set[str] = set()  # conversations with pending operations, last round
        self._retrying: dict[str, float] = {}  # conversation -> when its first operation is due again
        self._cursor = 0  # where the next round starts reading (an operation id)

    def in_delivery(self) -> set[str]:
        """Conversations whose operations this process is delivering or has yet to deliver."""
        return set(self._inflight) | self._pending_here

    async def start(self) -> None:
        self._task = asyncio.create_task(self._loop(), name="delivery")

    def kick(self, conversation_key: str = "") -> None:
        self._wake.set()

    async def flush(self, deadline: float) -> bool:
        """Deliver until nothing is pending (retries included) or the deadline passes. True if drained."""
        while time.monotonic() < deadline:
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    pending = await self._any_pending()
            except TimeoutError:
                return False
            if not self._inflight and not pending:
                return True
            self._wake.set()
            await asyncio.sleep(0.02)
        return False

    async def _any_pending(self) -> bool:
        if self.owns is None:
            return bool((await self.db.read(repo.count_by_status)).get("pending", 0))
        after = 0
        while True:  # other replicas' operations may fill many pages before one of this one's
            ops = await self.db.read(lambda c, after=after: repo.pending(c, self.page, after=after))
            if any(self.owns(op.conversation_key) for op in ops):
                return True
            if len(ops) < self.page:
                return False
            after = ops[-1].id

    async def stop(self) -> None:
        tasks = list(self._inflight.values()) + ([self._task] if self._task else [])
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._task = None

    async def _loop(self) -> None:
        streak = FailureStreak("delivery: a round")
        while True:
            try:
                async with asyncio.timeout(SWEEP_INTERVAL):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            try:
                await self._round()
                streak.ok()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - the worker must outlive store hiccups
                streak.failed(exc)
                await asyncio.sleep(0.5)
            # A round need not suspend (on SQLite its read runs on the loop's thread) and a set
            # wake-up returns at once: without this, back-to-back rounds would hold the loop.
            await asyncio.sleep(0)

    async def _round(self) -> None:
        """Start a lane for each conversation whose first pending operation is due, page by page
        (of those, oldest first): from the first page, or where the last round stopped when it
        read MAX_PAGES pages of which nothing could start here (conversations being delivered,
        or held by other replicas)."""
        read_at = time.monotonic()
        now = time.time()
        self._settled = {k: t for k, t in self._settled.items() if t >= read_at}
        self._retrying = {k: t for k, t in self._retrying.items() if t > now}
        seen: set[str] = set()
        after, pages, started = self._cursor, 0, 0
        while True:
            ops = await self.db.read(lambda c, after=after: repo.pending(c, self.page, after=after, due_by=now))
            pages += 1
            lanes: OrderedDict[str, list] = OrderedDict()
            for op in ops:
                if self.owns is None or self.owns(op.conversation_key):
                    lanes.setdefault(op.conversation_key, []).append(op)
            seen.update(lanes)
            for key, lane in lanes.items():
                if key in self._inflight or key in self._settled:
                    continue  # being delivered, or settled after this read: the next round has it
                due = []
                for op in lane:
                    if op.next_attempt_at > now:
                        break
                    due.append(op)
                if due:
                    task = asyncio.create_task(self._deliver_lane(key, due), name=f"deliver:{key}")
                    self._inflight[key] = task
                    task.add_done_callback(lambda t, k=key: self._lane_done(k, t))
                    started += 1
            if len(ops) < self.page:
                self._cursor = 0
                break
            after = ops[-1].id
            if started:
                # more than a page: come back for the rest. When nothing read could start (its
                # conversations are being delivered), the next lane to finish wakes the worker.
                self._cursor = 0
                self._wake.set()
                break
            if pages >= MAX_PAGES:
                self._cursor = after  # the next round reads on from here
                break
        self._pending_here = seen | set(self._retrying)

    def _lane_done(self, key: str, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # its outcome was not written (the store failed): the next round has its operations again
            logger.bind(conversation=key).opt(exception=task.exception()).error("delivery: a lane failed")
        self._inflight.pop(key, None)
        self._settled[key] = time.monotonic()
        self._wake.set()  # its conversation may have more by now

    async def _deliver_lane(self, key: str, ops: list) -> None:
        outcome: repo.Ops = []
        platform_ids: dict[str, str] = {}
        last_update = {op.message_ref: op.id for op in ops if op.op == "update"}
        try:
            for op in ops:
                if op.op == "update" and last_update[op.message_ref] != op.id:
                    outcome += repo.superseded(op.id)
                    continue
                ok, result = await self._deliver(op, platform_ids)
                outcome += result
                if not ok:
                    break
        finally:
            if outcome:
                await asyncio.shield(self.db.execute(outcome))

    async def _deliver(self, op, platform_ids: dict[str, str]) -> tuple[bool, repo.Ops]:
        """Deliver one op; (go on with the lane?, the statements recording the outcome)."""
        log = logger.bind(conversation=op.conversation_key, outbox=op.id)
        attempts = op.attempts + 1
        channel = self.channels.get(op.channel)
        if channel is None:
            self.metrics.delivery_failures.labels(op.channel, "dead").inc()
            log.error("delivery: op {} is dead: channel {!r} is not configured", op.id, op.channel)
            return True, repo.dead(op.id, attempts, f"no channel {op.channel!r}")
        try:
            conversation = ConversationKey.parse(op.conversation_key)
            reply = None if op.op == "react" else Reply.from_payload(op.payload)
        except Exception as exc:  # noqa: BLE001 - it would fail every attempt: dead, and the lane goes on
            self.metrics.delivery_failures.labels(op.channel, "dead").inc()
            log.opt(exception=exc).error("delivery: op {} is dead: it cannot be read", op.id)
            return True, repo.dead(op.id, attempts, f"unreadable: {type(exc).__name__}: {exc}")
        if op.op == "react":
            self.metrics.delivery_attempts.labels(op.channel).inc()
            try:
                await channel.react(conversation, op.payload["message_id"], op.payload["state"])
            except Exception as exc:  # noqa: BLE001 - cosmetic: recorded, never retried, never blocks the lane
                log.warning("delivery: reaction of op {} failed: {}", op.id, exc)
                return True, repo.dead(op.id, attempts, f"{type(exc).__name__}: {exc}")
            return True, repo.delivered(op.id, attempts, op.message_ref, None)
        assert reply is not None
        self.metrics.delivery_attempts.labels(op.channel).inc()
        try:
            target = platform_ids.get(op.message_ref) or op.platform_message_id
            if op.op == "update" and target is None:
                target = await self.db.read(lambda c: repo.platform_id(c, op.message_ref))
            if op.op == "send" or target is None:
                # An edit of a message whose send died is delivered as a new message: nothing is lost.
                platform_id = await channel.send(conversation, reply, idempotency_key=op.idempotency_key)
                platform_ids[op.message_ref] = platform_id
            else:
                try:
                    await channel.update(conversation, target, reply)
                    platform_id = None
                except DeliveryError as exc:
                    if exc.transient:
                        raise
                    # The message cannot be edited (deleted, recalled, too old): the reply is sent
                    # as a new one, and later edits go to that one.
                    log.warning("delivery: op {} cannot edit its message ({}); sending it anew", op.id, exc)
                    platform_id = await channel.send(conversation, reply, idempotency_key=op.idempotency_key)
                    platform_ids[op.message_ref] = platform_id
        except DeliveryError as exc:
            return self._failed(op, attempts, str(exc), exc.transient, exc.retry_after, log)
        except Exception as exc:  # noqa: BLE001 - an unexpected adapter error is treated as transient
            return self._failed(op, attempts, f"{type(exc).__name__}: {exc}", True, None, log)
        return True, repo.delivered(op.id, attempts, op.message_ref, platform_id)

    def _failed(self, op, attempts: int, error: str, transient: bool, retry_after: float | None, log
                ) -> tuple[bool, repo.Ops]:
        kind = "transient" if transient else "permanent"
        self.metrics.delivery_failures.labels(op.channel, kind).inc()
        if not transient or attempts >= self.max_attempts:
            self.metrics.delivery_failures.labels(op.channel, "dead").inc()
            log.error("delivery: op {} is dead after {} attempt(s): {}", op.id, attempts, error)
            return True, repo.dead(op.id, attempts, error)
        delay = self.backoff(attempts)
        if retry_after is not None:
            delay = max(delay, retry_after)
        log.warning("delivery: op {} attempt {} failed ({}); retrying in {:.2f}s", op.id, attempts, error, delay)
        asyncio.get_running_loop().call_later(delay, self._wake.set)
        self._retrying[op.conversation_key] = time.time() + delay
        return False, repo.retry(op.id, attempts, time.time() + delay, error)

    def backoff(self, attempts: int) -> float:
        """Exponential backoff with jitter (between half and all of the capped exponential delay)."""
        ceiling = min(self.max_delay, self.base_delay * (2 ** (attempts - 1)))
        return random.uniform(ceiling / 2, ceiling)
