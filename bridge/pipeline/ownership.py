"""Which replica runs a conversation, when several replicas share one PostgreSQL database.

A conversation's turns, its queue and its deliveries belong to one replica at a time: the holder
of its lease (`conversation_leases`). Any replica accepts any event (persist before ack, dedupe:
the store is shared). Then:

- An accepted event goes to the local dispatcher only if this replica holds, or can take, the
  conversation's lease. Otherwise it stays `accepted`, and the holder takes it within a sweep
  (`SWEEP_INTERVAL`). Control commands go the same way, so `/stop` reaches the replica whose turn
  runs.
- Before a new event of a conversation is dispatched, the conversation's older open events are
  dispatched first (another replica may have accepted one while this one held the lease): a
  message sent after another is answered after it, whichever replica each one reached.
- Leases run out unless renewed (`LEASE_TTL`). A replica renews those it uses (a lane busy or
  queued, a delivery pending, or a use within the TTL) and releases the rest. When a replica dies,
  its leases run out, and the sweep of another one takes its conversations over: the turns left
  running are interrupted with a visible message, the events left in processing are accepted
  again, and all are dispatched there, oldest first.
- A restarted replica (same `BRIDGE_REPLICA_ID`) lets its old leases run out at once.
- Deliveries: a replica delivers only the conversations it holds (bridge/delivery/worker.py).

Taking an event is still the inbox's conditional claim, so even a lease lost under a partition
never runs one event twice; it can, at worst, run two turns of one conversation at once.

One process (SQLite) needs none of this: the dispatcher takes events directly.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any

from loguru import logger

from bridge.logs import FailureStreak
from bridge.pipeline.dispatcher import Dispatcher, Job
from bridge.store import leases
from bridge.store.db import Database

LEASE_TTL = 15.0
SWEEP_INTERVAL = 0.5

# takes a conversation over from a replica that stopped: (conversation key, events this process runs)
TakeOver = Callable[[str, Collection[int]], Awaitable[int]]


class Ownership:
    def __init__(self, db: Database, dispatcher: Dispatcher, *, owner: str, take_over: TakeOver,
                 in_delivery: Callable[[], Collection[str]] = frozenset,
                 kick_delivery: Callable[[], None] = lambda: None,
                 on_lost: Callable[[str], Awaitable[object]] | None = None,
                 ttl: float = LEASE_TTL, sweep: float = SWEEP_INTERVAL) -> None:
        self.db = db
        self.dispatcher = dispatcher
        self.owner = owner
        self._take_over = take_over
        self._in_delivery = in_delivery
        self._kick_delivery = kick_delivery
        self._on_lost = on_lost  # a conversation another replica took while this one held it
        self.ttl = ttl
        self.sweep_interval = sweep
        self.held: dict[str, float] = {}  # conversation key -> when its lease runs out (wall clock)
        self._used: dict[str, float] = {}  # conversation key -> last use (monotonic)
        self._known: dict[int, str] = {}  # events given to the dispatcher, not yet seen finished
        self._routing: dict[str, list[Job]] = {}  # events waiting while their conversation is routed
        self._tasks: set[asyncio.Task[None]] = set()
        self._loop_task: asyncio.Task[None] | None = None
        self._closing = False
        self.taken_over = 0
        self._taking_over: set[str] = set()  # leases taken whose takeover has not succeeded yet
        self._swept_at = time.monotonic()

    # -- the pipeline's entry (in place of Dispatcher.submit)

    def submit(self, job: Job) -> None:
        if self._closing:
            return  # stays `accepted`: the next holder runs it
        waiting = self._routing.get(job.conversation_key)
        if waiting is not None:
            waiting.append(job)  # its conversation is being routed: it goes after those, in order
            return
        self._route_soon(job.conversation_key, [job])

    def owns(self, key: str) -> bool:
        """This replica holds the conversation's lease (for the delivery worker and the turn runner)."""
        until = self.held.get(key)
        if until is None or until < time.time():
            return False
        self._used[key] = time.monotonic()
        return True

    def _route_soon(self, key: str, jobs: list[Job]) -> None:
        self._routing[key] = jobs
        task = asyncio.create_task(self._route(key), name=f"route:{key}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _route(self, key: str) -> None:
        try:
            while not self._closing:
                jobs, self._routing[key] = self._routing[key], []
                try:
                    if await self._hold(key):
                        await self._dispatch_open(key, {job.event_id: job for job in jobs})
                    # else: the events stay accepted; the holder's sweep takes them
                except Exception:  # noqa: BLE001 - the store may be away: the sweep tries again
                    logger.bind(conversation=key).exception("ownership: routing failed; the sweep retries")
                if not self._routing[key]:
                    break
        finally:
            self._routing.pop(key, None)

    async def _hold(self, key: str) -> bool:
        """Hold the conversation's lease: renewed without a look at the store while it has more
        than two thirds of its time left, else taken (and the conversation taken over when it was
        not this process's). A takeover that failed (the store away) is tried again on the next
        route, and the renewals route such a conversation until it succeeds."""
        now = time.time()
        until = self.held.get(key)
        self._used[key] = time.monotonic()
        if until is None or until - now <= self.ttl * 2 / 3:
            got = await self.db.write(
                lambda c: leases.acquire(c, [key], owner=self.owner, until=now + self.ttl, now=now), urgent=True)
            if key not in got:
                self.held.pop(key, None)
                self._taking_over.discard(key)
                return False
            if until is None or until < now:
                self._taking_over.add(key)
            self.held[key] = now + self.ttl
        if key in self._taking_over:
            # the conversation may hold what a stopped replica left (this one's earlier life included)
            mine = {event for event, k in self._known.items() if k == key}
            interrupted = await self._take_over(key, mine)
            self._taking_over.discard(key)
            if interrupted:
                self.taken_over += 1
                logger.bind(conversation=key).warning("ownership: took the conversation over ({} turn(s) interrupted)",
                                                      interrupted)
            self._kick_delivery()
        return True

    async def _dispatch_open(self, key: str, local: dict[int, Job]) -> None:
        """The conversation's open events this process has not dispatched yet, oldest first (the
        jobs that brought this here among them)."""
        rows = await self.db.read(lambda c: leases.open_events(c, key))
        for row in rows:
            if row.id in self._known or row.status != "accepted":
                continue
            job = local.get(row.id) or Job.of_event(row.id, key, row.payload)
            self._known[row.id] = key
            self.dispatcher.submit(job)

    async def health(self) -> dict[str, Any]:
        """For /readyz: not ready while the sweep has not run for a lease's time (the store is away:
        this replica's conversations pass to others)."""
        stale = time.monotonic() - self._swept_at > self.ttl
        out: dict[str, Any] = {"ok": not stale, "replica": self.owner, "conversations": len(self.held),
                               "taken_over": self.taken_over}
        if stale:
            out["error"] = f"no sweep for {time.monotonic() - self._swept_at:.0f}s (is the store reachable?)"
        return out

    # -- renewals and the sweep

    async def start(self) -> None:
        expired = await self.db.write(lambda c: leases.expire_all(c, owner=self.owner))
        if expired:
            logger.info("ownership: {} lease(s) of this replica's earlier run passed on", expired)
        self._loop_task = asyncio.create_task(self._loop(), name="ownership")

    async def _loop(self) -> None:
        renewed_at = 0.0
        streak = FailureStreak("ownership: a round")
        while not self._closing:
            try:
                if time.monotonic() - renewed_at >= self.ttl / 3:
                    await self._renew()
                    renewed_at = time.monotonic()
                await self._sweep()
                streak.ok()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a store outage: try again on the next round
                streak.failed(exc)
            await asyncio.sleep(self.sweep_interval)

    def _in_use(self, key: str) -> bool:
        return (self.dispatcher.busy(key) or self.dispatcher.queued(key) > 0 or key in self._routing
                or key in self._in_delivery() or time.monotonic() - self._used.get(key, 0.0) < self.ttl)

    async def _renew(self) -> None:
        if not self.held:
            return
        using = [key for key in self.held if self._in_use(key)]
        idle = [key for key in self.held if key not in using]
        now = time.time()
        if using:
            got = await self.db.write(lambda c: leases.acquire(c, using, owner=self.owner, until=now + self.ttl,
                                                               now=now))
            for key in using:
                if key in got:
                    self.held[key] = now + self.ttl
                else:
                    self.held.pop(key, None)
                    self._taking_over.discard(key)
                    logger.bind(conversation=key).warning("ownership: lease lost to another replica")
                    if self._on_lost is not None:
                        task = asyncio.create_task(self._on_lost(key), name=f"lost:{key}")
                        self._tasks.add(task)
                        task.add_done_callback(self._tasks.discard)
        if idle:
            await self.db.write(lambda c: leases.release(c, idle, owner=self.owner))
            for key in idle:
                self.held.pop(key, None)
                self._used.pop(key, None)
                self._taking_over.discard(key)
        for key in self._taking_over & set(self.held):
            if key not in self._routing and not self._closing:
                self._route_soon(key, [])  # its takeover failed: try again
        done = set(idle) | {key for key in self.held if not self.dispatcher.busy(key)
                            and not self.dispatcher.queued(key) and key not in self._routing}
        self._known = {event: key for event, key in self._known.items() if key not in done}

    async def _sweep(self) -> None:
        keys = await self.db.read(lambda c: leases.unowned_work(c, owner=self.owner, now=time.time()))
        self._swept_at = time.monotonic()
        for key in keys:
            if key not in self._routing and not self._closing:
                self._route_soon(key, [])

    async def close(self) -> None:
        """Stop routing (what waits stays `accepted`). Called after the dispatcher is closed."""
        self._closing = True
        if self._loop_task is not None:
            self._loop_task.cancel()
            await asyncio.gather(self._loop_task, return_exceptions=True)
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def release_all(self) -> None:
        """Pass every lease on at once (a clean stop; after the last delivery)."""
        try:
            await self.db.write(lambda c: leases.release_all(c, owner=self.owner))
        except Exception as exc:  # noqa: BLE001 - they run out by themselves
            logger.warning("ownership: leases not released ({}); they run out in {:.0f}s", exc, self.ttl)
        self.held.clear()
