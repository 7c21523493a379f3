"""The store on both backends: migrations, the group-commit writer, and the repositories."""

from __future__ import annotations

import asyncio
import time

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import select, text

from bridge import jsoncodec
from bridge.store import approvals, conversations, inbox, migrate, outbox, turns
from bridge.store.db import Database
from bridge.store.schema import metadata
from channels.webchat import transcript
from tests.support.databases import database_url

BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=BACKENDS)
async def db(request, tmp_path):
    async with database_url(request.param, tmp_path) as url:
        database = Database(url)
        await migrate.upgrade(database.writer_engine)
        await database.start()
        try:
            yield database
        finally:
            await database.close()


def event(key: str, message_key: str | None = None, conv: str = "webchat:c1") -> inbox.NewEvent:
    return inbox.NewEvent("webchat", "message", key, message_key, conv, "alice", {"text": key}, time.time())


async def test_migrations_match_the_schema(db):
    def diff(sync_conn):
        return compare_metadata(MigrationContext.configure(sync_conn), metadata)

    async with db.reader.connect() as conn:
        assert await conn.run_sync(diff) == []
        assert await migrate.current_revision(db.reader) == migrate.HEAD


def test_head_constant_matches_the_migrations():
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(migrate.alembic_config("sqlite+aiosqlite://"))
    assert script.get_current_head() == migrate.HEAD


async def test_ensure_schema_upgrades_in_a_child_process_only_when_behind(tmp_path):
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'e.db'}")
    try:
        assert await migrate.current_revision(database.reader) is None
        await migrate.ensure_schema(database.writer_engine)
        assert await migrate.current_revision(database.reader) == migrate.HEAD
        await migrate.ensure_schema(database.writer_engine)  # at head: nothing to do
    finally:
        await database.close()


async def test_sqlite_pragmas(tmp_path):
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'p.db'}")
    async with database.reader.connect() as conn:
        assert (await conn.execute(text("PRAGMA journal_mode"))).scalar() == "wal"
        assert (await conn.execute(text("PRAGMA foreign_keys"))).scalar() == 1
        assert (await conn.execute(text("PRAGMA busy_timeout"))).scalar() == 5000
    await database.close()


async def test_inbox_dedupes_within_a_batch_and_across_batches(db):
    first = await asyncio.gather(*(db.write_batched(inbox.insert_many, e) for e in [
        event("e1", "m1"), event("e1", "m1"), event("e2", "m2"), event("e3", "m2"),
    ]))
    assert first[0] is not None and first[2] is not None
    assert first[1] is None and first[3] is None  # same event id; same message under a new event id
    again = await asyncio.gather(db.write_batched(inbox.insert_many, event("e1", "m1")),
                                 db.write_batched(inbox.insert_many, event("e9", "m2")),
                                 db.write_batched(inbox.insert_many, event("e4", "m4")),
                                 db.write_batched(inbox.insert_many, event("e5")),
                                 db.write_batched(inbox.insert_many, event("e5")))
    # a redelivery (same event, same message), the same message under a new event id: duplicates;
    # an event without a message is unique on its event key
    assert again[0] is None and again[1] is None and again[2] is not None
    assert sorted(x is None for x in again[3:]) == [False, True]
    assert await db.read(inbox.count_by_status) == {"accepted": 4}
    rows = await db.read(lambda c: c.execute(text("SELECT event_key, dedupe_key FROM inbound_events ORDER BY id")))
    assert [tuple(r) for r in rows.all()] == [("e1", "m1"), ("e2", "m2"), ("e4", "m4"), ("e5", "e5")]


@pytest.mark.parametrize("backend", BACKENDS)
async def test_events_stored_before_the_one_key_migration_still_dedupe(backend, tmp_path):
    """0010 folds (event key, message key) into one dedupe key: an event stored before it, then
    redelivered or re-sent after the upgrade, is still a duplicate."""
    async with database_url(backend, tmp_path) as url:
        database = Database(url)
        try:
            await migrate.upgrade(database.writer_engine, "0009")
            async with database.writer_engine.begin() as conn:
                await conn.execute(text(
                    "INSERT INTO inbound_events (channel, kind, event_key, message_key, conversation_key, sender_id,"
                    " payload, status, received_at) VALUES ('slack', 'message', 'slack:Ev1', 'slack:D1:1.0',"
                    " 'slack:D1', 'U1', '{}', 'done', 1.0), ('webchat', 'message', 'webchat:c/1', NULL, 'webchat:c',"
                    " 'a', '{}', 'done', 1.0)"))
            await migrate.upgrade(database.writer_engine)
            await database.start()
            results = await asyncio.gather(*(database.write_batched(inbox.insert_many, e) for e in [
                inbox.NewEvent("slack", "message", "slack:Ev1", "slack:D1:1.0", "slack:D1", "U1", {}, 2.0),
                inbox.NewEvent("slack", "message", "slack:Ev2", "slack:D1:1.0", "slack:D1", "U1", {}, 2.0),
                inbox.NewEvent("webchat", "message", "webchat:c/1", None, "webchat:c", "a", {}, 2.0),
                inbox.NewEvent("webchat", "message", "webchat:c/2", None, "webchat:c", "a", {}, 2.0),
            ]))
            assert results[:3] == [None, None, None] and results[3] is not None
        finally:
            await database.close()


async def test_group_commit_coalesces_and_isolates_a_failing_unit(db):
    before = db.stats.commits

    async def boom(conn):
        await conn.execute(text("INSERT INTO no_such_table VALUES (1)"))

    futures = [db.write_batched(inbox.insert_many, event(f"g{i}")) for i in range(50)]
    bad = db.write(boom)
    futures += [db.write_batched(inbox.insert_many, event(f"h{i}")) for i in range(50)]
    results = await asyncio.gather(*futures)
    assert all(r is not None for r in results)
    with pytest.raises(Exception):
        await bad
    assert db.stats.failed_batches >= 1
    counts = await db.read(inbox.count_by_status)
    assert counts == {"accepted": 100}
    assert db.stats.commits - before < 100  # batched, not one commit per unit


async def test_a_failing_statement_never_puts_its_parameters_in_the_error(db):
    """Errors get logged; their parameters carry people's messages and must stay out."""

    async def bad_insert(conn):
        await conn.execute(text("INSERT INTO no_such_table VALUES (:secret)"), {"secret": "the user's private text"})

    with pytest.raises(Exception) as failed:
        await db.write(bad_insert)
    with pytest.raises(Exception) as failed_read:
        await db.read(lambda c: c.execute(text("SELECT * FROM no_such_table WHERE x = :secret"),
                                          {"secret": "the user's private text"}))
    for exc in (failed.value, failed_read.value):
        assert "no_such_table" in str(exc) and "private text" not in str(exc)


async def test_dead_operations_are_requeued_by_id_or_all_but_reactions(db):
    key = "slack:C1"
    await db.execute([
        *outbox.send_ops(db.dialect, channel="slack", conversation_key=key, payload={"text": "a"}, ref="r1"),
        *outbox.update_ops(db.dialect, channel="slack", conversation_key=key, payload={"text": "b"}, ref="r1"),
        *outbox.react_ops(db.dialect, channel="slack", conversation_key=key, platform_message_id="m1",
                          state="done", key="k1"),
        *outbox.send_ops(db.dialect, channel="slack", conversation_key=key, payload={"text": "c"}, ref="r2"),
    ])
    ops = await db.read(lambda c: outbox.list_ops(c, None, conversation_key=key))
    send = next(o.id for o in ops if o.op == "send" and o.message_ref == "r1")
    edit = next(o.id for o in ops if o.op == "update")
    react = next(o.id for o in ops if o.op == "react")
    await db.execute([stmt for op in (send, edit, react) for stmt in outbox.dead(op, 8, "not_in_channel")])
    assert sorted(o.id for o in await db.read(outbox.list_dead)) == sorted([send, edit, react])

    assert await db.write(lambda c: outbox.requeue_dead(c, None, now=time.time())) == sorted([send, edit])
    pending = {o.id: o for o in await db.read(lambda c: outbox.list_ops(c, "pending"))}
    assert {send, edit} <= set(pending) and pending[send].attempts == 0
    assert pending[send].last_error == "not_in_channel"  # kept until delivered
    assert [o.id for o in await db.read(outbox.list_dead)] == [react]  # a stale reaction stays dead
    assert await db.write(lambda c: outbox.requeue_dead(c, [react, send], now=time.time())) == [react]


async def test_urgent_writes_that_arrive_over_a_few_loop_passes_share_one_commit(db):
    """Like requests read one after another: each is queued a loop pass later than the one before.
    The writer lets the loop run while that brings more urgent writes, so they commit together."""
    await db.write_batched(inbox.insert_many, event("first"), urgent=True)  # the writer is idle again
    before = db.stats.commits

    async def arrive(index: int):
        for _ in range(index):
            await asyncio.sleep(0)
        return await db.write_batched(inbox.insert_many, event(f"p{index}"), urgent=True)

    results = await asyncio.gather(*(arrive(i) for i in range(6)))
    assert all(r is not None for r in results)
    assert db.stats.commits - before == 1


async def test_claim_is_exclusive(db):
    event_id = await db.write_batched(inbox.insert_many, event("c1"))
    other = await db.write_batched(inbox.insert_many, event("c2"))
    results = await asyncio.gather(*(db.write_batched(inbox.claim_many, i) for i in (event_id, event_id, other)))
    assert [r.id if r else None for r in results] == [event_id, None, other]
    again = await asyncio.gather(db.write_batched(inbox.claim_many, event_id))
    assert again == [None]


async def _conversation_and_turn(db):
    event_id = await db.write_batched(inbox.insert_many, event("t1"))

    async def begin(conn):
        cid = await conversations.ensure_conversation(conn, "webchat:c1", channel="webchat", chat_id="c1",
                                                      thread_id=None, is_group=False)
        session = await conversations.active_session(conn, cid, runtime="shell", workspace="/tmp")
        again = await conversations.active_session(conn, cid, runtime="shell", workspace="/tmp")
        assert again.session_id == session.session_id
        item = turns.Start(inbound_event_id=event_id, conversation_id=cid, session_id=session.session_id,
                           reply_ref="r1")
        (row, turn_id), (again_row, duplicate) = await turns.claim_and_create_many(conn, [item, item])
        assert row is not None and again_row is None  # claimed once
        return cid, session, turn_id, duplicate

    return await db.write(begin)


async def test_one_turn_per_event_and_finish_once(db):
    _cid, _session, turn_id, duplicate = await _conversation_and_turn(db)
    assert turn_id is not None and duplicate is None
    assert await db.write(lambda c: turns.finish(c, turn_id, status="completed", output="ok")) is True
    assert await db.write(lambda c: turns.finish(c, turn_id, status="failed")) is False
    assert (await db.read(lambda c: turns.get(c, turn_id))).status == "completed"


async def test_approval_decides_once(db):
    cid, session, turn_id, _ = await _conversation_and_turn(db)
    await db.write(lambda c: approvals.create(
        c, approval_id="a1", conversation_id=cid, session_id=session.session_id, turn_id=turn_id, kind="command",
        summary="Run x", detail={"command": "x"}, requested_by="alice", expires_at=time.time() + 60, card_ref="r2"))
    results = await asyncio.gather(
        db.write(lambda c: approvals.decide(c, "a1", status="approved", decided_by="alice")),
        db.write(lambda c: approvals.decide(c, "a1", status="denied", decided_by="root")),
    )
    assert results == [True, False]
    row = await db.read(lambda c: approvals.get(c, "a1"))
    assert (row.status, row.decided_by) == ("approved", "alice")
    assert await db.read(approvals.count_pending) == 0


async def test_outbox_ops_are_idempotent_and_coalesce(db):
    send = outbox.send_ops(db.dialect, channel="webchat", conversation_key="webchat:c1", payload={"text": "a"}, ref="r1")
    updates = [outbox.update_ops(db.dialect, channel="webchat", conversation_key="webchat:c1",
                                 payload={"text": f"u{i}"}, ref="r1") for i in range(3)]
    before = db.stats.commits
    await asyncio.gather(db.execute(send), db.execute(send), *(db.execute(u) for u in updates))
    assert db.stats.commits - before == 1
    pending = await db.read(outbox.pending)
    assert [(p.op, p.payload["text"]) for p in pending] == [("send", "a"), ("update", "u0"), ("update", "u1"),
                                                            ("update", "u2")]
    await db.execute(outbox.delivered(pending[0].id, 1, "r1", "P1") + outbox.superseded(pending[1].id))
    assert await db.read(lambda c: outbox.platform_id(c, "r1")) == "P1"
    assert await db.read(outbox.count_by_status) == {"delivered": 1, "pending": 2, "superseded": 1}


async def test_transcript_edit_bumps_seq_and_inserts_are_idempotent(db):
    writer = transcript.Transcript()
    msg = transcript.NewMessage("c1", "bot", "bot", "hello", None, "k1")
    first = await db.write_batched(writer.insert_many, msg)
    again, third = await asyncio.gather(
        db.write_batched(writer.insert_many, msg),
        db.write_batched(writer.insert_many, transcript.NewMessage("c1", "bot", "bot", "x", None, "k3")))
    assert first["id"] == again["id"] and third["seq"] > first["seq"]
    other = await db.write_batched(writer.insert_many, transcript.NewMessage("c1", "user", "a", "hi", None, "k2"))
    edited, _unknown = await asyncio.gather(
        db.write_batched(writer.edit_many, transcript.Edit(first["id"], "hello, edited", None)),
        db.write_batched(writer.edit_many, transcript.Edit("nope", "x", None)))
    assert _unknown is None
    assert edited["created_seq"] == first["seq"]
    assert edited["seq"] > other["seq"] > first["seq"]
    rows = await db.read(lambda c: transcript.list_after(c, "c1", other["seq"], 100))
    assert [r["text"] for r in rows] == ["hello, edited"]
    # a second writer (another process after a restart) continues after what is stored
    later = await db.write_batched(transcript.Transcript().insert_many,
                                   transcript.NewMessage("c1", "bot", "bot", "later", None, "k4"))
    assert later["seq"] > edited["seq"]


async def test_writer_serves_many_concurrent_writers(db):
    results = await asyncio.gather(*(db.write_batched(inbox.insert_many, event(f"w{i}")) for i in range(2000)))
    assert len(set(results)) == 2000
    async with db.reader.connect() as conn:
        from bridge.store.schema import inbound_events

        rows = (await conn.execute(select(inbound_events.c.id))).all()
    assert len(rows) == 2000


@pytest.mark.postgres
async def test_writes_wait_out_a_lost_connection_and_an_outage(tmp_path):
    """PostgreSQL: a write whose connection was cut runs again on a new one; while the database
    refuses connections, writes wait (the loop stays free) and land once it is back, once each."""
    import asyncpg

    from tests.support.databases import PG_DSN

    async with database_url("postgres", tmp_path) as url:
        name = url.rsplit("/", 1)[1]
        database = Database(url)
        await migrate.upgrade(database.writer_engine)
        await database.start()
        admin = await asyncpg.connect(PG_DSN)
        cut = ("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
               "WHERE datname = $1 AND pid <> pg_backend_pid()")
        try:
            assert await database.write_batched(inbox.insert_many, event("before")) is not None
            await admin.execute(cut, name)
            assert await database.write_batched(inbox.insert_many, event("lost")) is not None  # alone in its cycle

            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            await admin.execute(cut, name)
            waiting = [asyncio.ensure_future(database.write_batched(inbox.insert_many, event(f"outage{i}")))
                       for i in range(3)]
            ticks = 0
            for _ in range(20):  # 1 s of outage: the writes wait, the loop keeps running
                await asyncio.sleep(0.05)
                ticks += 1
            assert ticks == 20 and not any(w.done() for w in waiting)
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            async with asyncio.timeout(15):
                ids = await asyncio.gather(*waiting)
            assert all(i is not None for i in ids) and len(set(ids)) == 3
        finally:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            await admin.close()
            await database.close()
        conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
        try:
            keys = [r[0] for r in await conn.fetch("SELECT dedupe_key FROM inbound_events ORDER BY id")]
        finally:
            await conn.close()
        assert len(keys) == 5 and len(set(keys)) == 5


async def test_hot_path_statements_coalesce_without_falling_back(db):
    """Every statement the pipeline queues through execute() must run as one executemany (a
    statement SQLAlchemy cannot executemany would silently degrade to one commit per unit)."""
    cid, session, turn_id, _ = await _conversation_and_turn(db)
    ids = [await db.write_batched(inbox.insert_many, event(f"hp{i}")) for i in range(3)]
    started = await asyncio.gather(*(db.write_batched(turns.claim_and_create_many, turns.Start(
        inbound_event_id=i, conversation_id=cid, session_id=session.session_id, reply_ref=f"ref{i}")) for i in ids))
    claimed = [row for row, _ in started]
    new_turns = [turn_id for _, turn_id in started]
    assert all(claimed) and all(new_turns)
    failed_before, commits_before = db.stats.failed_batches, db.stats.commits
    units = []
    for i, t in zip(ids, new_turns):
        units.append([
            turns.finish_op(t, status="completed", output="ok"),
            *outbox.send_ops(db.dialect, channel="webchat", conversation_key="webchat:c1", payload={}, ref=f"s{i}"),
            *outbox.update_ops(db.dialect, channel="webchat", conversation_key="webchat:c1", payload={}, ref=f"s{i}"),
            inbox.finish_op(i, "done"),
            inbox.reply_ref_op(i, f"q{i}"),
            conversations.touch_op(session.session_id),
            *outbox.delivered(1, 1, f"s{i}", "P"), *outbox.retry(2, 1, time.time(), "e"), *outbox.dead(3, 1, "e"),
            *outbox.superseded(4),
        ])
    if db.is_sqlite:  # ... and on SQLite, straight on the driver
        from bridge.store.dialect import plain_statement

        assert [stmt for unit in units for stmt, params in unit
                if plain_statement(db._conn.dialect, stmt, [params]) is None] == []
    await asyncio.gather(*(db.execute(u) for u in units))
    assert db.stats.failed_batches == failed_before
    assert db.stats.commits - commits_before == 1
    assert (await db.read(lambda c: turns.get(c, new_turns[0]))).status == "completed"


async def test_urgent_writes_overtake_background_work_which_still_progresses(db):
    done: list[str] = []
    background = [db.write_batched(inbox.insert_many, event(f"bg{i}")) for i in range(600)]
    for i, fut in enumerate(background):
        fut.add_done_callback(lambda _f, i=i: done.append(f"bg{i}"))
    urgent = db.write_batched(inbox.insert_many, event("urgent"), urgent=True)
    urgent.add_done_callback(lambda _f: done.append("urgent"))
    await asyncio.gather(urgent, *background)
    # the urgent unit commits after at most one bounded background cycle, not after all 600
    assert done.index("urgent") <= 256
    assert len(done) == 601


async def test_a_conversation_lease_has_one_holder_until_it_runs_out(db):
    from bridge.store import leases

    now = time.time()
    got = await db.write(lambda c: leases.acquire(c, ["k1", "k2"], owner="a", until=now + 10, now=now))
    assert got == {"k1", "k2"}
    # held by a: b gets neither; a renews its own
    assert await db.write(lambda c: leases.acquire(c, ["k1"], owner="b", until=now + 10, now=now)) == set()
    assert await db.write(lambda c: leases.acquire(c, ["k1"], owner="a", until=now + 20, now=now)) == {"k1"}
    assert await db.read(lambda c: leases.holder(c, "k1", now=now + 15)) == "a"
    # run out: b takes it; released: anyone does
    later = now + 30
    assert await db.write(lambda c: leases.acquire(c, ["k1", "k2"], owner="b", until=later + 10, now=later)) == {
        "k1", "k2"}
    await db.write(lambda c: leases.release(c, ["k2"], owner="a"))  # not a's any more: no effect
    assert await db.read(lambda c: leases.holder(c, "k2", now=later)) == "b"
    await db.write(lambda c: leases.release(c, ["k2"], owner="b"))
    assert await db.read(lambda c: leases.holder(c, "k2", now=later)) is None
    # a restarted owner's leases pass on at once
    assert await db.write(lambda c: leases.expire_all(c, owner="b")) == 1
    assert await db.write(lambda c: leases.acquire(c, ["k1"], owner="c", until=later + 10, now=later)) == {"k1"}


async def test_work_without_a_live_holder_is_found(db):
    from bridge.store import leases

    await db.write(lambda c: inbox.insert_many(c, [event("e1", conv="webchat:free"), event("e2", conv="webchat:held")]))
    now = time.time()
    await db.write(lambda c: leases.acquire(c, ["webchat:held"], owner="other", until=now + 10, now=now))
    assert await db.read(lambda c: leases.unowned_work(c, owner="me", now=now)) == ["webchat:free"]
    assert await db.read(lambda c: leases.unowned_work(c, owner="other", now=now)) == ["webchat:free", "webchat:held"]
    assert await db.read(lambda c: leases.unowned_work(c, owner="me", now=now + 20)) == ["webchat:free", "webchat:held"]
    assert [r.status for r in await db.read(lambda c: leases.open_events(c, "webchat:held"))] == ["accepted"]


async def test_statement_units_run_on_sqlite_driver_unless_sqlalchemy_must_run_them(tmp_path):
    """On SQLite, statements queued through execute() run straight on the driver, compiled once
    (with their literals and bind processors: JSON, floats); what needs SQLAlchemy's execution
    (Python-side defaults, RETURNING, expanding IN lists, a missing parameter) still gets it."""
    from sqlalchemy import bindparam, update

    from bridge.store.dialect import plain_statement
    from bridge.store.schema import conversations as conversations_table
    from bridge.store.schema import inbound_events

    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'plain.db'}")
    await migrate.upgrade(database.writer_engine)
    await database.start()
    try:
        dialect = database._conn.dialect  # the on-loop writer's
        ops = [
            *outbox.send_ops("sqlite", channel="webchat", conversation_key="webchat:c1",
                             payload={"text": "é", "n": [1, 2]}, ref="r1"),
            *outbox.delivered(1, 2, "r1", "P1"),  # literals: status="delivered", last_error=None
        ]
        for stmt, params in ops:
            assert plain_statement(dialect, stmt, [params]) is not None, stmt
        await database.execute(ops)
        row = (await database.read(outbox.count_by_status))
        assert row == {"delivered": 1}
        async with database.reader.connect() as conn:
            stored = (await conn.execute(text("SELECT payload, status, attempts, last_error FROM outbox"))).one()
        assert (jsoncodec.loads(stored.payload), stored.status, stored.attempts, stored.last_error) == (
            {"text": "é", "n": [1, 2]}, "delivered", 2, None)
        assert await database.read(lambda c: outbox.platform_id(c, "r1")) == "P1"

        # SQLAlchemy's own execution: a column default to fill in, RETURNING, an IN list
        new_conversation = {"key": "webchat:c9", "channel": "webchat", "chat_id": "c9", "thread_id": None,
                            "created_at": 1.0, "updated_at": 1.0}
        assert plain_statement(dialect, conversations_table.insert(), [new_conversation]) is None
        assert plain_statement(dialect, inbox.CLAIM, [{"b_ids": [1]}]) is None
        returning = update(inbound_events).where(inbound_events.c.id == bindparam("b_id")).values(
            status="done").returning(inbound_events.c.id)
        assert plain_statement(dialect, returning, [{"b_id": 1}]) is None
        # parameter sets of different shapes, and a missing parameter: SQLAlchemy's rules and words
        finish = inbox.finish_op(1, "done")[0]
        assert plain_statement(dialect, finish, [{"b_id": 1, "b_status": "done", "b_now": 1.0, "b_error": None},
                                                 {"b_id": 2, "b_status": "done", "b_now": 1.0}]) is None
        assert plain_statement(dialect, finish, [{"b_id": 1}]) is None
        with pytest.raises(Exception, match="b_status"):
            await database.execute([(finish, {"b_id": 1})])
        await database.execute([(conversations_table.insert(), new_conversation)])
        async with database.reader.connect() as conn:
            assert (await conn.execute(text("SELECT is_group FROM conversations WHERE key = 'webchat:c9'"))).scalar() == 0
    finally:
        await database.close()


async def test_writes_wait_for_a_write_lock_held_elsewhere_without_blocking_the_loop(tmp_path):
    """Another process (the CLI, say) holding SQLite's write lock: the writer's cycle pauses and
    tries again, the loop keeps running, and the write lands once the lock is free."""
    import sqlite3

    path = tmp_path / "locked.db"
    database = Database(f"sqlite+aiosqlite:///{path}")
    await migrate.upgrade(database.writer_engine)
    await database.start()
    other = sqlite3.connect(path, isolation_level=None)
    try:
        assert await database.write_batched(inbox.insert_many, event("before")) is not None
        other.execute("BEGIN IMMEDIATE")
        write = asyncio.ensure_future(database.write_batched(inbox.insert_many, event("held")))
        started = time.monotonic()
        for _ in range(20):
            await asyncio.sleep(0.01)
        assert time.monotonic() - started < 1.0  # the loop was free all along
        assert not write.done()
        other.execute("COMMIT")
        assert await asyncio.wait_for(write, 5) is not None
        # no transaction was left open: the next cycles begin and commit as usual
        assert await database.write_batched(inbox.insert_many, event("after")) is not None
        assert await database.read(inbox.count_by_status) == {"accepted": 3}
    finally:
        other.close()
        await database.close()


async def test_a_file_kept_on_one_replica_is_found_and_written_on_another(db, tmp_path):
    """Two replicas with data dirs of their own: what one keeps, the other reads from the store
    and writes under the same key in its own folder; copies past the retention are deleted."""
    from bridge.store.files import StoreFiles
    from channels.files import FileKeeper

    shared = StoreFiles(db, keep_days=7)
    here, there = FileKeeper(tmp_path / "a", shared), FileKeeper(tmp_path / "b", shared)
    data = bytes(range(256)) * 4096  # 1 MiB, every byte value
    path = await here.keep("slack/C1-1700000000.000100/report_%.bin", data)
    assert path == str(tmp_path / "a" / "slack" / "C1-1700000000.000100" / "report_%.bin")
    await here.keep("slack/C1-1700000000.000100/report_%.bin", b"a second copy is not kept")
    assert await shared.keys("slack/C1-1700000000.000100/") == ["slack/C1-1700000000.000100/report_%.bin"]
    assert await shared.keys("slack/C1-1700000000.0001") == ["slack/C1-1700000000.000100/report_%.bin"]
    assert await shared.keys("slack/C1-1700000000.000100/report_x") == []  # `_` and `%` are not wildcards
    assert await shared.keys("slack/C1-1700000000.000100/", kept_since=time.time() + 60) == []  # kept earlier
    assert await shared.stats() == (1, len(data))

    assert await there.local("slack/C1-1700000000.000100/report_%.bin", path) == path  # one volume: as it is
    elsewhere = "/replica-a/data/attachments/slack/C1-1700000000.000100/report_%.bin"  # another machine's path
    copied = await there.local("slack/C1-1700000000.000100/report_%.bin", elsewhere)
    assert copied == str(tmp_path / "b" / "slack" / "C1-1700000000.000100" / "report_%.bin")
    assert open(copied, "rb").read() == data
    assert await here.local("slack/C1-1700000000.000100/report_%.bin", path) == path  # there already
    assert await there.local("slack/C9-1/none.txt", "/nowhere/none.txt") == ""  # kept nowhere
    with pytest.raises(ValueError):
        await there.keep("../outside.txt", b"x")

    assert await shared.sweep(now=time.time() + 6 * 86400) == 0
    assert await shared.sweep(now=time.time() + 8 * 86400) == 1
    assert await shared.stats() == (0, 0)


async def test_the_wal_stays_bounded_under_writes_that_never_pause(tmp_path, monkeypatch):
    """A PASSIVE checkpoint never catches up with a writer that never stops, so the WAL grew
    with everything written (a gigabyte in a minute of ingest). Past WAL_LIMIT the writer is
    held between two cycles while the WAL is emptied; every write still lands; and a reset WAL
    keeps at most WAL_KEEP of its file."""
    from bridge.store import db as store_db

    monkeypatch.setattr(store_db, "CHECKPOINT_EVERY", 0.05)
    monkeypatch.setattr(store_db, "WAL_LIMIT", 1024 * 1024)
    monkeypatch.setattr(store_db, "WAL_KEEP", 256 * 1024)
    path = tmp_path / "wal.db"
    database = Database(f"sqlite+aiosqlite:///{path}")
    await migrate.upgrade(database.writer_engine)
    await database.start()
    wal = tmp_path / "wal.db-wal"
    largest = 0
    try:
        body = "x" * 4000
        written = 0
        started = time.monotonic()
        while time.monotonic() - started < 3.0:  # back-to-back cycles, no pause between them
            batch = [inbox.NewEvent("webchat", "message", f"k{written + i}", None, "webchat:c1", "alice",
                                    {"text": body}, time.time()) for i in range(50)]
            await asyncio.gather(*(database.write_batched(inbox.insert_many, e) for e in batch))
            written += len(batch)
            largest = max(largest, wal.stat().st_size)
        # what went through the WAL (at least the rows' text) is many times what it held at most
        assert largest < written * 4000 / 4 and largest < 80 * 1024 * 1024
        async with database.reader.connect() as conn:
            assert (await conn.execute(text("SELECT count(*) FROM inbound_events"))).scalar() == written
        await asyncio.sleep(0.2)  # quiet: a checkpoint catches up; the next write resets the WAL
        await database.write_batched(inbox.insert_many, event("after"))
        assert wal.stat().st_size <= 256 * 1024 + 64 * 1024
    finally:
        await database.close()
