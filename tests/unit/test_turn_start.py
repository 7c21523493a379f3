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
        await runner.slots.semaphore.acquire()
    await runner.gate.stop_turn(runner.running["webchat:c2"].turn_id, "alice")
    await asyncio.sleep(0.2)  # decided: the turn now waits for a slot
    assert not turn.done()
    turn.cancel()
    await asyncio.gather(turn, return_exceptions=True)
    for _ in range(4):
        runner.slots.semaphore.release()
    for _ in range(4):
        await runner.slots.semaphore.acquire()
    assert runner.slots.semaphore.locked()  # four slots in all, as configured


def _rows(tmp_path, sql: str, *args) -> list[tuple]:
    with sqlite3.connect(tmp_path / "store.db", timeout=10) as conn:
        return conn.execute(sql, args).fetchall()


async def test_a_start_the_store_refuses_for_good_closes_the_event_and_says_so(runner, tmp_path):
    """Not an outage: the store refuses this message's turn (here a trigger, as a constraint
    would). Tried a few times, then the event is closed with a note in the conversation, and
    the conversation's next message runs."""
    db = runner.db
    refused = await _accepted(db, "webchat:c3", "echo refused")
    with sqlite3.connect(tmp_path / "store.db", timeout=10) as conn:
        conn.execute(f"CREATE TRIGGER no_turn BEFORE INSERT ON turns WHEN NEW.inbound_event_id = {refused} "
                     "BEGIN SELECT RAISE(ABORT, 'this turn is refused'); END")
    await asyncio.wait_for(runner.process(Job(refused, "webchat:c3", "echo refused")), 20)
    [(status, error)] = _rows(tmp_path, "SELECT status, error FROM inbound_events WHERE id = ?", refused)
    assert status == "failed" and "this turn is refused" in error
    notes = [p for (p,) in _rows(tmp_path, "SELECT payload FROM outbox WHERE conversation_key = 'webchat:c3'")]
    assert len(notes) == 1 and "could not be started" in notes[0] and "this turn is refused" in notes[0]
    event = inbox.NewEvent("webchat", "message", "webchat:c3/2", None, "webchat:c3", "alice",
                           {"text": "echo next", "sender": {"id": "alice", "name": "alice", "is_bot": False}},
                           time.time())
    [(following, _)] = await db.write_batched_many(inbox.insert_with_records, [(event, None)])
    await asyncio.wait_for(runner.process(Job(following, "webchat:c3", "echo next")), 20)
    assert _rows(tmp_path, "SELECT status FROM inbound_events WHERE id = ?", following) == [("done",)]


async def test_an_outcome_the_store_refuses_for_good_becomes_a_failed_turn_with_a_note(runner, tmp_path):
    event_id = await _accepted(runner.db, "webchat:c4", "echo kept-out")
    with sqlite3.connect(tmp_path / "store.db", timeout=10) as conn:
        conn.execute("CREATE TRIGGER no_completion BEFORE UPDATE ON turns WHEN NEW.status = 'completed' "
                     "BEGIN SELECT RAISE(ABORT, 'this outcome is refused'); END")
    await asyncio.wait_for(runner.process(Job(event_id, "webchat:c4", "echo kept-out")), 20)
    [(status, error)] = _rows(tmp_path, "SELECT status, error FROM turns")
    assert status == "failed" and "this outcome is refused" in error
    assert _rows(tmp_path, "SELECT status FROM inbound_events WHERE id = ?", event_id) == [("done",)]
    notes = [p for (p,) in _rows(tmp_path, "SELECT payload FROM outbox WHERE conversation_key = 'webchat:c4'")]
    assert any("could not be stored" in p for p in notes) and not any("kept-out" in p and "exit 0" in p for p in notes)


def test_what_is_waited_out_and_what_is_refused():
    from sqlalchemy.exc import IntegrityError
    from sqlalchemy.exc import OperationalError as SAOperationalError

    from bridge.pipeline.answers import passes
    from bridge.store.db import StoreBusy, StoreUnavailable

    assert passes(StoreUnavailable("away")) and passes(StoreBusy("locked"))
    assert passes(sqlite3.OperationalError("database is locked"))
    assert passes(SAOperationalError("BEGIN", {}, sqlite3.OperationalError("no such table: turns")))
    assert passes(ConnectionResetError()) and passes(TimeoutError())

    class Serialization(Exception):
        sqlstate = "40001"

    assert passes(Serialization())
    assert not passes(IntegrityError("INSERT", {}, sqlite3.IntegrityError("UNIQUE constraint failed")))
    assert not passes(sqlite3.IntegrityError("this turn is refused"))
    assert not passes(UnicodeEncodeError("utf-8", "\ud83d", 0, 1, "surrogates not allowed"))
    assert not passes(TypeError("a bug"))


async def test_an_answer_the_store_refuses_for_good_is_replaced_by_a_short_note(runner, tmp_path):
    """A message answered without a turn (a file alone the shell runtime cannot take): its answer
    refused for good, the event is closed with a note saying so instead."""
    event = inbox.NewEvent("webchat", "message", "webchat:c5/1", None, "webchat:c5", "alice",
                           {"text": "", "sender": {"id": "alice", "name": "alice", "is_bot": False},
                            "attachments": [{"name": "gone.txt", "path": "", "mime_type": "text/plain"}]},
                           time.time())
    [(event_id, _)] = await runner.db.write_batched_many(inbox.insert_with_records, [(event, None)])
    with sqlite3.connect(tmp_path / "store.db", timeout=10) as conn:
        conn.execute("CREATE TRIGGER no_note BEFORE INSERT ON outbox WHEN NEW.payload LIKE '%could not download%' "
                     "BEGIN SELECT RAISE(ABORT, 'this answer is refused'); END")
    await asyncio.wait_for(runner.process(Job(event_id, "webchat:c5", "")), 20)
    [(status, error)] = _rows(tmp_path, "SELECT status, error FROM inbound_events WHERE id = ?", event_id)
    assert status == "skipped" and "this answer is refused" in error
    notes = [p for (p,) in _rows(tmp_path, "SELECT payload FROM outbox WHERE conversation_key = 'webchat:c5'")]
    assert len(notes) == 1 and "could not be stored" in notes[0]
