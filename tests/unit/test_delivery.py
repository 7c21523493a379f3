"""The delivery worker against a scripted channel (standing in for a platform's API)."""

from __future__ import annotations

import asyncio
import time

import pytest

from bridge.delivery.worker import DeliveryWorker
from bridge.metrics import Metrics
from bridge.store import migrate
from bridge.store import outbox as repo
from bridge.store.db import Database
from channels.base import ConversationKey, DeliveryError, Reply


class ScriptedChannel:
    """Fails as told, records what it delivered; idempotent on the key like a real platform."""

    name = "fake"

    def __init__(self, failures: dict[str, list[DeliveryError]] | None = None) -> None:
        self.failures = failures or {}
        self.posted: dict[str, str] = {}
        self.log: list[tuple[str, str, str]] = []

    async def send(self, conversation: ConversationKey, reply: Reply, *, idempotency_key: str) -> str:
        queue = self.failures.get(reply.text)
        if queue:
            raise queue.pop(0)
        if idempotency_key not in self.posted:
            self.posted[idempotency_key] = f"P{len(self.posted) + 1}"
            self.log.append(("send", str(conversation), reply.text))
        return self.posted[idempotency_key]

    async def update(self, conversation: ConversationKey, platform_message_id: str, reply: Reply) -> None:
        queue = self.failures.get(reply.text)
        if queue:
            raise queue.pop(0)
        self.log.append(("update", platform_message_id, reply.text))


_workers: list[DeliveryWorker] = []


@pytest.fixture
async def db(tmp_path):
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'd.db'}")
    await migrate.upgrade(database.writer_engine)
    await database.start()
    yield database
    # Every worker stops before its store closes and its loop ends: a task left pending there
    # would be torn down later, in another test's loop.
    while _workers:
        await _workers.pop().stop()
    await database.close()


async def make_worker(db, channel, **kw):
    worker = DeliveryWorker(db, {"fake": channel}, Metrics(), max_attempts=kw.get("max_attempts", 5),
                            base_delay=0.01, max_delay=0.05)
    await worker.start()
    _workers.append(worker)
    return worker


async def enqueue(db, conv: str, text: str, ref: str, op: str = "send", channel: str = "fake"):
    fn = repo.send_ops if op == "send" else repo.update_ops
    await db.execute(fn(db.dialect, channel=channel, conversation_key=conv, payload={"text": text}, ref=ref))


async def settle(worker, db, timeout=5.0):
    assert await worker.flush(time.monotonic() + timeout)


async def test_transient_failures_retry_in_order(db):
    channel = ScriptedChannel({"one": [DeliveryError("503", transient=True)] * 2})
    worker = await make_worker(db, channel)
    await enqueue(db, "fake:c1", "one", "r1")
    await enqueue(db, "fake:c1", "two", "r2")
    await enqueue(db, "fake:c1", "one, edited", "r1", op="update")
    worker.kick("fake:c1")
    await settle(worker, db)
    assert channel.log == [("send", "fake:c1", "one"), ("send", "fake:c1", "two"), ("update", "P1", "one, edited")]
    assert await db.read(repo.count_by_status) == {"delivered": 3}


async def test_only_the_latest_of_several_pending_edits_is_sent(db):
    channel = ScriptedChannel()
    worker = await make_worker(db, channel)
    await enqueue(db, "fake:c6", "v0", "r1")
    for i in range(1, 4):
        await enqueue(db, "fake:c6", f"v{i}", "r1", op="update")
    worker.kick("fake:c6")
    await settle(worker, db)
    assert channel.log == [("send", "fake:c6", "v0"), ("update", "P1", "v3")]
    assert await db.read(repo.count_by_status) == {"delivered": 2, "superseded": 2}
    await worker.stop()


async def test_permanent_failure_is_dead_and_visible_and_the_lane_goes_on(db):
    channel = ScriptedChannel({"bad": [DeliveryError("invalid payload", transient=False)]})
    worker = await make_worker(db, channel)
    await enqueue(db, "fake:c2", "bad", "r1")
    await enqueue(db, "fake:c2", "good", "r2")
    worker.kick("fake:c2")
    await settle(worker, db)
    assert channel.log == [("send", "fake:c2", "good")]
    dead = await db.read(repo.list_dead)
    assert len(dead) == 1 and dead[0].last_error == "invalid payload" and dead[0].attempts == 1
    assert 'bridge_delivery_failures_total{channel="fake",kind="dead"} 1.0' in worker.metrics.render().decode()
    await worker.stop()


async def test_gives_up_after_max_attempts(db):
    channel = ScriptedChannel({"flaky": [DeliveryError("timeout", transient=True)] * 10})
    worker = await make_worker(db, channel, max_attempts=3)
    await enqueue(db, "fake:c3", "flaky", "r1")
    worker.kick("fake:c3")
    await settle(worker, db)
    dead = await db.read(repo.list_dead)
    assert [(d.attempts, d.status) for d in dead] == [(3, "dead")]
    await worker.stop()


async def test_update_of_a_dead_send_is_posted_as_a_new_message(db):
    channel = ScriptedChannel({"first": [DeliveryError("gone", transient=False)]})
    worker = await make_worker(db, channel)
    await enqueue(db, "fake:c4", "first", "r1")
    await enqueue(db, "fake:c4", "final answer", "r1", op="update")
    worker.kick("fake:c4")
    await settle(worker, db)
    assert channel.log == [("send", "fake:c4", "final answer")]
    await worker.stop()


async def test_retry_after_is_honoured(db):
    channel = ScriptedChannel({"slow": [DeliveryError("429", transient=True, retry_after=0.3)]})
    worker = await make_worker(db, channel)
    await enqueue(db, "fake:c5", "slow", "r1")
    started = time.monotonic()
    worker.kick("fake:c5")
    await settle(worker, db)
    assert time.monotonic() - started >= 0.3
    assert channel.log == [("send", "fake:c5", "slow")]
    await worker.stop()


def test_backoff_grows_and_is_capped():
    worker = DeliveryWorker(None, {}, Metrics(), max_attempts=10, base_delay=0.5, max_delay=4.0)  # type: ignore[arg-type]
    for attempt, ceiling in [(1, 0.5), (2, 1.0), (3, 2.0), (4, 4.0), (9, 4.0)]:
        samples = [worker.backoff(attempt) for _ in range(200)]
        assert all(ceiling / 2 <= s <= ceiling for s in samples)


async def test_unknown_channel_is_dead_not_lost(db):
    worker = await make_worker(db, ScriptedChannel())
    await enqueue(db, "nowhere:c", "x", "r9", channel="nowhere")
    worker.kick("nowhere:c")
    await settle(worker, db)
    assert [d.last_error for d in await db.read(repo.list_dead)] == ["no channel 'nowhere'"]
    await worker.stop()
    await asyncio.sleep(0)


class CountingChannel(ScriptedChannel):
    """A platform with no idempotency keys: every call posts, so a re-delivery would show."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, bool]] = []

    async def send(self, conversation, reply, *, idempotency_key):
        fail = len(self.calls) % 7 == 6
        self.calls.append((idempotency_key, not fail))
        await asyncio.sleep(0.001)
        if fail:
            raise DeliveryError("flaky", transient=True)
        return f"P-{idempotency_key}"


async def test_no_operation_is_delivered_twice_under_a_storm_of_rounds(db):
    channel = CountingChannel()
    worker = await make_worker(db, channel, max_attempts=20)
    for n in range(40):
        for i in range(5):
            await enqueue(db, f"fake:s{n}", f"m{n}-{i}", f"r{n}-{i}")
    stop = asyncio.Event()

    async def storm():
        while not stop.is_set():
            worker.kick()
            await asyncio.sleep(0)

    stormer = asyncio.create_task(storm())
    await settle(worker, db, timeout=20)
    stop.set()
    await stormer
    delivered = [key for key, ok in channel.calls if ok]
    assert len(delivered) < len(channel.calls)  # some deliveries did fail and were retried
    assert sorted(delivered) == sorted(f"send:r{n}-{i}" for n in range(40) for i in range(5))
    assert await db.read(repo.count_by_status) == {"delivered": 200}
    await worker.stop()


class GatedChannel(ScriptedChannel):
    """Every send waits until the test opens the gate (a platform that is slow to answer)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()

    async def send(self, conversation: ConversationKey, reply: Reply, *, idempotency_key: str) -> str:
        await self.gate.wait()
        return await super().send(conversation, reply, idempotency_key=idempotency_key)


async def test_a_full_page_of_busy_conversations_does_not_hold_the_loop(db):
    """More pending operations than a page, all of conversations already being delivered: the
    worker waits for a lane to finish instead of re-reading the page back to back."""
    channel = GatedChannel()
    worker = DeliveryWorker(db, {"fake": channel}, Metrics(), max_attempts=5, base_delay=0.01, max_delay=0.05,
                            page=4)
    for n in range(3):
        for i in range(3):
            await enqueue(db, f"fake:b{n}", f"m{n}-{i}", f"r{n}-{i}")
    await worker.start()
    _workers.append(worker)
    ticks = 0
    started = time.monotonic()
    while time.monotonic() - started < 0.3:
        await asyncio.sleep(0.01)  # a livelocked worker would never give this back
        ticks += 1
    assert ticks >= 10
    channel.gate.set()
    await settle(worker, db)
    sends = [text for kind, _conv, text in channel.log if kind == "send"]
    assert sorted(sends) == sorted(f"m{n}-{i}" for n in range(3) for i in range(3))
    for n in range(3):  # each conversation in its own order
        assert [t for t in sends if t.startswith(f"m{n}-")] == [f"m{n}-{i}" for i in range(3)]


async def test_an_operation_that_cannot_be_read_is_dead_and_the_lane_goes_on(db):
    """A payload this code cannot read (left by another version, say) fails on every attempt:
    it is dead at once, visibly, and the conversation's next operation is delivered."""
    channel = ScriptedChannel()
    worker = await make_worker(db, channel)
    await db.execute(repo.send_ops(db.dialect, channel="fake", conversation_key="fake:c9",
                                   payload={"text": "x", "card": {"title": "no kind"}}, ref="r1"))
    await enqueue(db, "fake:c9", "after it", "r2")
    worker.kick("fake:c9")
    await settle(worker, db)
    assert channel.log == [("send", "fake:c9", "after it")]
    dead = await db.read(repo.list_dead)
    assert len(dead) == 1 and dead[0].last_error.startswith("unreadable: KeyError")
    await worker.stop()


async def test_an_edit_the_platform_refuses_for_good_is_sent_as_a_new_message(db):
    """The message to edit was deleted (or recalled, or is too old to edit): the reply is posted
    anew, and later edits go to the new message."""
    channel = ScriptedChannel({"final": [DeliveryError("message_not_found", transient=False)]})
    worker = await make_worker(db, channel)
    await enqueue(db, "fake:c10", "working", "r1")
    worker.kick("fake:c10")
    await settle(worker, db)
    await enqueue(db, "fake:c10", "final", "r1", op="update")
    worker.kick("fake:c10")
    await settle(worker, db)
    await enqueue(db, "fake:c10", "final, edited", "r1", op="update")
    worker.kick("fake:c10")
    await settle(worker, db)
    assert channel.log == [("send", "fake:c10", "working"), ("send", "fake:c10", "final"),
                           ("update", "P2", "final, edited")]
    assert await db.read(repo.count_by_status) == {"delivered": 3}
    await worker.stop()


async def test_a_conversation_waiting_for_a_retry_does_not_crowd_out_the_others(db):
    """A page's worth of operations behind one that waits for a long Retry-After (a platform
    rate-limiting one chat): another conversation's reply is still delivered at once."""
    channel = ScriptedChannel({"limited": [DeliveryError("429", transient=True, retry_after=30)]})
    worker = DeliveryWorker(db, {"fake": channel}, Metrics(), max_attempts=5, base_delay=0.01, max_delay=0.05,
                            page=3)
    await enqueue(db, "fake:busy", "limited", "r1")
    for i in range(4):
        await enqueue(db, "fake:busy", f"after {i}", f"r{i + 2}")
    await worker.start()
    _workers.append(worker)
    async with asyncio.timeout(5):  # its first attempt failed: it waits 30 s
        while not any(op.attempts for op in await db.read(lambda c: repo.list_ops(c, "pending"))):
            await asyncio.sleep(0.01)
    await enqueue(db, "fake:other", "hello", "o1")
    worker.kick("fake:other")
    async with asyncio.timeout(3):
        while ("send", "fake:other", "hello") not in channel.log:
            await asyncio.sleep(0.02)
    assert not any(conv == "fake:busy" for _kind, conv, _text in channel.log)  # still in its order


async def test_this_replicas_operations_are_found_behind_many_pages_of_others(db):
    """Several replicas: other replicas' due operations fill more pages than a round reads; this
    replica's own are still delivered, and flush waits for them."""
    channel = ScriptedChannel()
    worker = DeliveryWorker(db, {"fake": channel}, Metrics(), max_attempts=5, base_delay=0.01, max_delay=0.05,
                            page=2)
    worker.owns = lambda key: key == "fake:mine"
    for i in range(25):
        await enqueue(db, f"fake:theirs{i}", f"theirs {i}", f"t{i}")
    await enqueue(db, "fake:mine", "mine", "m1")
    assert await worker._any_pending()
    await worker.start()
    _workers.append(worker)
    await settle(worker, db)
    assert channel.log == [("send", "fake:mine", "mine")]


@pytest.mark.parametrize("committed_before", [True, False])
async def test_a_final_reply_after_a_send_of_unknown_outcome_shows_once(db, committed_before):
    """A turn's progress send failed, maybe after its COMMIT: the final reply is queued as the
    same send (a no-op if that one was kept) and an edit. Either way one message, showing it."""
    channel = ScriptedChannel()
    worker = await make_worker(db, channel)
    if committed_before:
        await enqueue(db, "fake:u", "working", "r1")
    await enqueue(db, "fake:u", "final", "r1")
    await enqueue(db, "fake:u", "final", "r1", op="update")
    worker.kick("fake:u")
    await settle(worker, db)
    first = "working" if committed_before else "final"
    assert channel.log == [("send", "fake:u", first), ("update", "P1", "final")]
