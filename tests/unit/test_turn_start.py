"""The turn runner's start while the store fails it, in process on a real SQLite store: tried
again until the store answers, unless (several replicas) the conversation's lease ran out
meanwhile, in which case the event is left, still accepted, to the conversation's holder."""

from __future__ import annotations

import asyncio
import sqlite3
import time

import pytest

from bridge.approvals import rules
from bridge.approvals.gate import HumanGate
from bridge.delivery.outbox import Outbox
from bridge.metrics import Metrics
from bridge.pipeline.dispatcher import Job
from bridge.pipeline.sessions import SessionResolver
from bridge.pipeline.turns import TurnRunner
from bridge.runtimes.shell import ShellRuntime
from bridge.store import inbox, migrate
from bridge.store.db import Database


@pytest.fixture
async def runner(tmp_path):
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'store.db'}")
    await migrate.upgrade(db.writer_engine)
    await db.start()
    outbox, metrics = Outbox(db.dialect), Metrics()
    gate = HumanGate(db, outbox, metrics, rules=rules.load(), timeout=60, admins=[])
    runner = TurnRunner(db, outbox, ShellRuntime(timeout=10, output_limit=3500), gate, metrics,
                        sessions=SessionResolver(db, runtime="shell", workspace=str(tmp_path)),
                        workspace=str(tmp_path), max_concurrent=4)
    try:
        yield runner
    finally:
        await db.close()


async def _accepted(db: Database, key: str, text: str) -> int:
    event = inbox.NewEvent("webchat", "message", f"{key}/1", None, key, "alice",
                           {"text": text, "sender": {"id": "alice", "name": "alice", "is_bot": False}}, time.time())
    [(event_id, _)] = await db.write_batched_many(inbox.insert_with_records, [(event, None)])
    return event_id


@pytest.mark.parametrize("holds", [True, False], ids=["still-held", "lease-ran-out"])
async def test_a_start_the_store_fails_is_retried_while_the_conversation_is_held(runner, tmp_path, holds):
    db = runner.db
    event_id = await _accepted(db, "webchat:c1", "echo hi")
    with sqlite3.connect(tmp_path / "store.db", timeout=10) as conn:
        conn.execute("ALTER TABLE conversations RENAME TO conversations_away")
    runner.owns = lambda key: True
    started = asyncio.create_task(runner.process(Job(event_id, "webchat:c1", "echo hi")))
    await asyncio.sleep(0.2)  # the first try failed; the next is 0.5 s after it
    assert not started.done()
    runner.owns = lambda key: holds
    with sqlite3.connect(tmp_path / "store.db", timeout=10) as conn:
        conn.execute("ALTER TABLE conversations_away RENAME TO conversations")
    await asyncio.wait_for(started, 10)
    with sqlite3.connect(tmp_path / "store.db") as conn:
        status = conn.execute("SELECT status FROM inbound_events WHERE id = ?", (event_id,)).fetchone()[0]
        turns = conn.execute("SELECT status FROM turns").fetchall()
    if holds:
        assert (status, turns) == ("done", [("completed",)])
    else:
        assert (status, turns) == ("accepted", [])  # the holder's sweep dispatches it


async def test_a_turn_cancelled_while_it_waits_for_its_slot_back_gives_none_back(runner):
    """A turn gives its runtime slot back while a person decides, and waits to take it again
    after. Cancelled in that wait (a shutdown, a stop), it must not give back the slot it does
    not hold: the runtime's cap would grow by one each time."""
    event_id = await _accepted(runner.db, "webchat:c2", "touch made")
    turn = asyncio.create_task(runner.process(Job(event_id, "webchat:c2", "touch made")))
    async with asyncio.timeout(10):
        while not runner.gate.has_pending("webchat:c2"):
            await asyncio.sleep(0.02)
    for _ in range(4):  # every slot taken by other turns
        await runner.slots.acquire()
    await runner.gate.stop_turn(runner.running["webchat:c2"].turn_id, "alice")
    await asyncio.sleep(0.2)  # decided: the turn now waits for a slot
    assert not turn.done()
    turn.cancel()
    await asyncio.gather(turn, return_exceptions=True)
    for _ in range(4):
        runner.slots.release()
    for _ in range(4):
        await runner.slots.acquire()
    assert runner.slots.locked()  # four slots in all, as configured
