"""The core pipeline through the web chat API, against the real service process."""

from __future__ import annotations

import asyncio
import json
import os
import re
import sqlite3
import time
import uuid
from pathlib import Path

import aiohttp
import pytest

from tests.support.chat import final_texts, finals
from tests.support.commands import kill_left, run_long, running
from tests.support.waiting import wait_until


def db_counts(proc) -> dict[str, int]:
    with sqlite3.connect(proc.data_dir / "bridge.db") as conn:
        return {
            table: conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]
            for table in ("inbound_events", "webchat_messages", "turns", "outbox")
        }


# The acceptance scenarios run both ways: HTTP served by an edge worker process (the default on
# two or more CPUs) and by the service's own process.
HTTP_MODES = pytest.mark.parametrize("workers", ["1", "0"], ids=["edge", "in-process"])


@HTTP_MODES
async def test_echo_replies_once(bridge, chat, workers):
    proc = bridge(BRIDGE_HTTP_WORKERS=workers)
    c = chat(proc)
    status, body = await c.post("c-echo", "alice", "echo hello")
    assert (status, body) == (202, {"accepted": True, "duplicate": False})
    texts = await c.wait_for("c-echo", lambda msgs: final_texts(msgs))
    assert len(texts) == 1 and "hello" in texts[0] and "exit 0" in texts[0]
    await asyncio.sleep(0.5)
    assert len(final_texts(await c.bot_messages("c-echo"))) == 1


@HTTP_MODES
async def test_same_client_msg_id_three_times_concurrently_is_one_turn(bridge, chat, workers):
    proc = bridge(BRIDGE_HTTP_WORKERS=workers)
    c = chat(proc)
    results = await asyncio.gather(*(c.post("c-dup", "alice", "echo once", client_msg_id="same") for _ in range(3)))
    assert all(status == 202 for status, _ in results)
    assert sorted(body["duplicate"] for _, body in results) == [False, True, True]
    await c.wait_for("c-dup", final_texts)
    await asyncio.sleep(0.5)
    assert len(final_texts(await c.bot_messages("c-dup"))) == 1
    users = [m for m in await c.messages("c-dup") if m["role"] == "user"]
    assert len(users) == 1
    assert db_counts(proc)["turns"] == 1


@HTTP_MODES
async def test_malformed_and_oversized_bodies_store_nothing(bridge, http, workers):
    proc = bridge(BRIDGE_HTTP_WORKERS=workers)
    url = proc.url + "/chat/api/messages"
    async with http.post(url, data=b'{"conversation_id": "c-1", "user_id":', headers={"Content-Type": "application/json"}) as r:
        assert r.status == 400
        assert "malformed JSON" in (await r.json())["error"]
    async with http.post(url, json={"conversation_id": "c-1", "user_id": "a", "text": "x"}) as r:
        assert r.status == 400
        assert "client_msg_id" in (await r.json())["error"]
    async with http.post(url, json={"conversation_id": "bad:id", "user_id": "a", "text": "x", "client_msg_id": "1"}) as r:
        assert r.status == 400
    for blank in ("", " \n\t "):  # nothing to run or answer: refused, not kept unanswered
        async with http.post(url, json={"conversation_id": "c-1", "user_id": "a", "text": blank, "client_msg_id": "2"}) as r:
            assert r.status == 400
            assert (await r.json())["error"] == "text must not be empty (or send file_ids)"
    big = b'{"conversation_id": "c-1", "user_id": "a", "client_msg_id": "1", "text": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    async with http.post(url, data=big, headers={"Content-Type": "application/json"}) as r:
        assert r.status == 413
    assert db_counts(proc) == {"inbound_events": 0, "webchat_messages": 0, "turns": 0, "outbox": 0}


@HTTP_MODES
async def test_another_sites_page_cannot_post_through_a_visitors_browser(bridge, chat, http, workers):
    """What a page on another site can make a visitor's browser send without asking first (a
    form, or a "simple" fetch: text/plain or multipart, carrying that site's Origin) is refused
    before anything is stored or run. The service's own page (its own Origin), a proxy's HTTPS
    front (X-Forwarded-Proto) and clients that send no Origin (curl, scripts) go through."""
    proc = bridge(BRIDGE_HTTP_WORKERS=workers)
    c = chat(proc)
    messages, actions = proc.url + "/chat/api/messages", proc.url + "/chat/api/actions"

    def body(client_id: str) -> str:
        return json.dumps({"conversation_id": "c-csrf", "user_id": "alice", "text": "echo csrf",
                           "client_msg_id": client_id})

    action = json.dumps({"conversation_id": "c-csrf", "message_id": "m", "action_id": "approve", "user_id": "alice"})
    for url, data in ((messages, body("x1")), (actions, action)):
        for origin in ("https://evil.example", "null", f"https://127.0.0.1:{proc.port}", "http://127.0.0.1"):
            for content_type in ("text/plain", "application/x-www-form-urlencoded", "application/json"):
                async with http.post(url, data=data, headers={"Origin": origin, "Content-Type": content_type}) as r:
                    assert r.status == 403, (url, origin, content_type)
                    assert "cross-origin request refused" in (await r.json())["error"]
        for content_type in ("text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x"):
            async with http.post(url, data=data, headers={"Content-Type": content_type}) as r:
                assert r.status == 415, (url, content_type)
                assert "Content-Type must be application/json" in (await r.json())["error"]
        async with http.post(url, data=data.encode()) as r:  # no Content-Type at all
            assert r.status == 415
    form = aiohttp.FormData()
    form.add_field("file", b"x", filename="a.txt", content_type="text/plain")
    async with http.post(f"{proc.url}/chat/api/files", params={"conversation_id": "c-csrf", "user_id": "alice"},
                         data=form, headers={"Origin": "https://evil.example"}) as r:
        assert r.status == 403 and "cross-origin request refused" in (await r.json())["error"]
    assert db_counts(proc) == {"inbound_events": 0, "webchat_messages": 0, "turns": 0, "outbox": 0}
    assert not (proc.data_dir / "attachments" / "webchat" / "c-csrf").exists()

    # the service's own page, a proxy's HTTPS front, and a client without Origin
    own = {"Origin": f"http://127.0.0.1:{proc.port}", "Content-Type": "application/json; charset=utf-8"}
    async with http.post(messages, data=body("x2"), headers=own) as r:
        assert r.status == 202, await r.text()
    proxied = {"Origin": f"https://127.0.0.1:{proc.port}", "X-Forwarded-Proto": "https",
               "Content-Type": "application/json"}
    async with http.post(messages, data=body("x3"), headers=proxied) as r:
        assert r.status == 202, await r.text()
    async with http.post(messages, data=body("x4"), headers={"Content-Type": "application/json"}) as r:
        assert r.status == 202
    form = aiohttp.FormData()
    form.add_field("file", b"x", filename="a.txt", content_type="text/plain")
    async with http.post(f"{proc.url}/chat/api/files", params={"conversation_id": "c-csrf", "user_id": "alice"},
                         data=form, headers={"Origin": f"http://127.0.0.1:{proc.port}"}) as r:
        assert r.status == 201
    async with http.post(actions, data=action, headers=own) as r:
        assert r.status == 404  # past the checks: no such message
    await c.wait_for("c-csrf", finals(3))
    assert db_counts(proc)["inbound_events"] == 3


async def test_approve_runs_the_command_and_updates_the_card(bridge, chat):
    proc = bridge()
    c = chat(proc)
    await c.post("c-appr", "alice", "touch approved.txt")
    card = await c.wait_card("c-appr", "pending")
    assert [a["id"] for a in card["card"]["actions"]] == ["approve", "approve_session", "deny", "stop"]
    assert "touch approved.txt" in card["card"]["body"]
    assert not (proc.data_dir / "workspace" / "approved.txt").exists()
    # a button the card does not have, or a message that is not a card: 400, and nothing decided
    status, body = await c.act("c-appr", card["id"], "launch", "alice")
    assert status == 400 and body["error"] == "this card has no button 'launch'" and "approve" in body["actions"]
    mine = [m for m in await c.messages("c-appr") if m["role"] == "user"][0]
    status, body = await c.act("c-appr", mine["id"], "approve", "alice")
    assert status == 400 and "not a card" in body["error"]
    assert (await c.wait_card("c-appr", "pending"))["id"] == card["id"]
    status, body = await c.act("c-appr", card["id"], "approve", "alice")
    assert status == 200 and body["ok"] is True and body["toast"]
    decided = await c.wait_card("c-appr", "approved")
    assert decided["card"]["actions"] == []
    assert "by alice" in decided["card"]["body"]
    await c.wait_for("c-appr", lambda msgs: [t for t in final_texts(msgs) if "exit 0" in t])
    assert (proc.data_dir / "workspace" / "approved.txt").exists()
    # the card is no longer actionable
    status, _ = await c.act("c-appr", card["id"], "approve", "alice")
    assert status == 409


async def test_deny_does_not_run_and_says_so(bridge, chat):
    proc = bridge()
    c = chat(proc)
    await c.post("c-deny", "alice", "touch denied.txt")
    card = await c.wait_card("c-deny", "pending")
    status, body = await c.act("c-deny", card["id"], "deny", "alice")
    assert status == 200 and body["ok"] is True
    texts = await c.wait_for("c-deny", lambda msgs: [t for t in final_texts(msgs) if "Not run" in t])
    assert "denied" in texts[0]
    await c.wait_card("c-deny", "denied")
    assert not (proc.data_dir / "workspace" / "denied.txt").exists()


async def test_group_only_requester_or_admin_may_decide(bridge, chat):
    proc = bridge(BRIDGE_ADMINS="webchat:root")
    c = chat(proc)
    await c.post("g-team", "alice", "touch by-admin.txt")
    card = await c.wait_card("g-team", "pending")
    status, body = await c.act("g-team", card["id"], "approve", "bob")
    assert status == 403 and "alice" in body["reason"]
    assert (await c.wait_card("g-team", "pending"))["id"] == card["id"]
    status, _ = await c.act("g-team", card["id"], "approve", "root")
    assert status == 200
    assert "by root" in (await c.wait_card("g-team", "approved"))["card"]["body"]
    await c.wait_for("g-team", lambda msgs: [t for t in final_texts(msgs) if "exit 0" in t])
    assert (proc.data_dir / "workspace" / "by-admin.txt").exists()


async def test_messages_sent_while_busy_are_queued_visibly_and_run_in_order(bridge, chat):
    proc = bridge()
    c = chat(proc)
    await c.post("c-q", "alice", "sleep 1; echo first")  # needs approval: holds the conversation
    card = await c.wait_card("c-q", "pending")
    for word in ("second", "third"):
        await c.post("c-q", "alice", f"echo {word}")
    queued = await c.wait_for("c-q", lambda msgs: [m for m in msgs if m["text"].startswith("⏳")] if
                              len([m for m in msgs if m["text"].startswith("⏳")]) == 2 else None)
    assert "position 1" in queued[0]["text"] and "position 2" in queued[1]["text"]
    await c.act("c-q", card["id"], "approve", "alice")
    texts = await c.wait_for("c-q", finals(3))
    words = [next(w for w in ("first", "second", "third") if w in t) for t in texts]
    assert words == ["first", "second", "third"]
    # as a chat shows them (by first post): each reply is a new message after the earlier ones,
    # and the queued notices now say their turn started
    shown = sorted(await c.bot_messages("c-q"), key=lambda m: m["created_seq"])
    replies = [m for m in shown if m["text"] in texts]
    assert [r["text"] for r in replies] == texts
    notices = [m for m in shown if m["id"] in {q["id"] for q in queued}]
    assert [n["text"] for n in notices] == ["▶️ Started: `echo second`", "▶️ Started: `echo third`"]


async def test_stop_kills_a_long_command_within_a_second(bridge, chat):
    proc = bridge()
    c = chat(proc)
    await c.post("c-stop", "alice", "sleep 30")
    card = await c.wait_card("c-stop", "pending")
    await c.act("c-stop", card["id"], "approve", "alice")
    await c.wait_for("c-stop", lambda msgs: [m for m in msgs if m["text"].startswith("⚙️")])
    started = time.monotonic()
    await c.post("c-stop", "alice", "/stop")
    await c.wait_for("c-stop", lambda msgs: [t for t in final_texts(msgs) if "Stopped after" in t])
    assert time.monotonic() - started < 1.5
    await c.post("c-stop", "alice", "echo after-stop")
    await c.wait_for("c-stop", lambda msgs: [t for t in final_texts(msgs) if "after-stop" in t])


@HTTP_MODES
async def test_hundred_conversations_times_ten_messages_keep_order(bridge, chat, workers):
    proc = bridge(BRIDGE_HTTP_WORKERS=workers)
    c = chat(proc)

    async def conversation(n: int) -> None:
        for i in range(10):
            status, body = await c.post(f"c-load-{n}", f"user{n}", f"echo {n}-{i}")
            assert status == 202 and not body["duplicate"]

    await asyncio.gather(*(conversation(n) for n in range(100)))

    for n in range(100):
        texts = await c.wait_for(f"c-load-{n}", finals(10), timeout=120)
        assert [t.split("\n")[1] for t in texts] == [f"{n}-{i}" for i in range(10)], texts
    await asyncio.sleep(0.5)
    counts = db_counts(proc)
    assert counts["turns"] == 1000 and counts["inbound_events"] == 1000
    for n in (0, 57, 99):
        assert len(final_texts(await c.bot_messages(f"c-load-{n}"))) == 10


@HTTP_MODES
async def test_kill_minus_nine_after_accept_then_restart_gives_exactly_one_outcome(bridge, chat, workers):
    proc = bridge(BRIDGE_HTTP_WORKERS=workers)
    c = chat(proc)
    await c.post("c-crash", "alice", "echo survived")
    proc.kill()
    proc.start()
    texts = await c.wait_for("c-crash", final_texts)
    await asyncio.sleep(1.0)
    texts = final_texts(await c.bot_messages("c-crash"))
    assert len(texts) == 1, texts
    assert "survived" in texts[0] or "Interrupted" in texts[0]


async def test_accepted_but_unprocessed_event_is_run_after_restart(bridge, chat):
    """A message persisted by a process that died before dispatching it runs on the next start."""
    proc = bridge()
    c = chat(proc)
    await c.post("c-warm", "alice", "echo warm")
    await c.wait_for("c-warm", final_texts)
    proc.stop()
    with sqlite3.connect(proc.data_dir / "bridge.db") as conn:
        conn.execute(
            "INSERT INTO inbound_events (channel, kind, event_key, dedupe_key, conversation_key, sender_id, payload,"
            " status, received_at) VALUES ('webchat', 'message', 'webchat:c-left/1', 'webchat:c-left/1',"
            " 'webchat:c-left', 'alice', ?, 'accepted', ?)",
            ('{"text": "echo left-behind", "sender": {"id": "alice", "name": "alice", "is_bot": false}}', time.time()),
        )
    proc.start()
    texts = await c.wait_for("c-left", final_texts)
    assert "left-behind" in texts[0]
    await asyncio.sleep(0.5)
    assert len(final_texts(await c.bot_messages("c-left"))) == 1


async def test_a_turn_whose_start_the_store_fails_is_tried_again_and_keeps_its_place(bridge, chat):
    """The store fails a new conversation's session look-up (its table made unreadable from
    outside for a while): the message is not skipped until a restart, and the next one in the
    conversation waits behind it; both are answered once, in order, once the store is back."""
    proc = bridge()
    c = chat(proc)
    await c.post("c-warm", "alice", "echo warm")
    await c.wait_for("c-warm", final_texts)
    db = proc.data_dir / "bridge.db"
    with sqlite3.connect(db, timeout=10) as conn:
        conn.execute("ALTER TABLE conversations RENAME TO conversations_away")
    try:
        for word in ("first", "second"):
            assert (await c.post("c-away", "alice", f"echo {word}"))[0] == 202
        await asyncio.sleep(2.0)  # a few failed tries
        assert final_texts(await c.bot_messages("c-away")) == []
    finally:
        with sqlite3.connect(db, timeout=10) as conn:
            conn.execute("ALTER TABLE conversations_away RENAME TO conversations")
    texts = await c.wait_for("c-away", finals(2), timeout=20)
    assert ["first" in texts[0], "second" in texts[1]] == [True, True]
    await asyncio.sleep(0.5)
    assert len(final_texts(await c.bot_messages("c-away"))) == 2
    assert "turn: its start failed" in proc.log()


async def test_a_turn_whose_outcome_the_store_fails_is_written_once_it_is_back(bridge, chat):
    """The store fails the writes of a running turn (its progress edits, then its outcome) for a
    few seconds: the turn is not left running with its reply lost until a restart; the reply
    comes once, and the conversation goes on."""
    proc = bridge()
    c = chat(proc)
    await c.post("c-out", "alice", "sleep 1.5; echo finished")
    card = await c.wait_card("c-out", "pending")
    await c.act("c-out", card["id"], "approve", "alice")
    await asyncio.sleep(0.3)  # the command runs
    db = proc.data_dir / "bridge.db"
    with sqlite3.connect(db, timeout=10) as conn:
        conn.execute("ALTER TABLE outbox RENAME TO outbox_away")
    try:
        await asyncio.sleep(3.0)  # the command ended meanwhile; its outcome's write failed
        with sqlite3.connect(db, timeout=10) as conn:
            assert conn.execute("SELECT status FROM turns").fetchall() == [("running",)]
    finally:
        with sqlite3.connect(db, timeout=10) as conn:
            conn.execute("ALTER TABLE outbox_away RENAME TO outbox")
    texts = await c.wait_for("c-out", lambda msgs: [t for t in final_texts(msgs) if "finished" in t], timeout=20)
    assert len(texts) == 1 and "exit 0" in texts[0]
    await c.post("c-out", "alice", "echo next")
    await c.wait_for("c-out", lambda msgs: [t for t in final_texts(msgs) if "next" in t])
    await asyncio.sleep(0.5)
    assert len([t for t in final_texts(await c.bot_messages("c-out")) if "finished" in t]) == 1
    with sqlite3.connect(db) as conn:
        assert conn.execute("SELECT status FROM turns ORDER BY id").fetchall() == [("completed",), ("completed",)]
    assert "turn: its outcome's write failed" in proc.log()


async def test_restart_with_pending_approval_marks_it_interrupted(bridge, chat):
    proc = bridge()
    c = chat(proc)
    await c.post("c-int", "alice", "touch never.txt")
    card = await c.wait_card("c-int", "pending")
    proc.kill()
    proc.start()
    interrupted = await c.wait_card("c-int", "interrupted")
    assert interrupted["id"] == card["id"] and [a["id"] for a in interrupted["card"]["actions"]] == ["retry"]
    texts = await c.wait_for("c-int", lambda msgs: [t for t in final_texts(msgs) if "Interrupted" in t])
    assert len(texts) == 1
    status, _ = await c.act("c-int", card["id"], "approve", "alice")
    assert status == 409
    assert not (proc.data_dir / "workspace" / "never.txt").exists()


async def test_a_command_running_when_the_service_is_killed_is_ended_before_it_is_said_interrupted(bridge, chat):
    """kill -9 leaves the command running (nothing in the service runs to end it); the next start
    kills its whole process group before recovery tells the chat the turn was interrupted, so
    sending it again cannot run it twice at once."""
    proc = bridge()
    c = chat(proc)
    pids = await run_long(c, c, proc.data_dir / "workspace", "c-orphan", "deploy", 41.5)
    try:
        proc.kill()
        await asyncio.sleep(0.3)
        assert all(running(pid) for pid in pids)  # adopted by init, still going
        proc.start()
        # start-up waited for them to be gone, before recovery and before serving
        assert not any(running(pid) for pid in pids), "a command of the killed service outlived its restart"
        texts = await c.wait_for("c-orphan", lambda msgs: [t for t in final_texts(msgs) if "Interrupted" in t])
        await asyncio.sleep(1.0)
        assert len([t for t in final_texts(await c.bot_messages("c-orphan")) if "Interrupted" in t]) == 1
        assert "sleep 41.5" in texts[0]
        with sqlite3.connect(proc.data_dir / "bridge.db") as conn:
            assert conn.execute("SELECT status FROM turns").fetchall() == [("interrupted",)]
        assert re.search(rf"killed process group {pids[0]}, .* session=1 turn=1", proc.log())
        assert list((proc.data_dir / "running-commands").iterdir()) == []
    finally:
        kill_left(pids)


async def test_long_output_is_truncated_in_chat_and_kept_whole(bridge, chat):
    proc = bridge(BRIDGE_SHELL_OUTPUT_LIMIT="500")
    c = chat(proc)
    # `cat` of a generated file: allowlisted, so it runs at once
    (proc.data_dir / "workspace").mkdir(parents=True, exist_ok=True)
    (proc.data_dir / "workspace" / "big.txt").write_text("".join(f"line {i}\n" for i in range(2000)))
    await c.post("c-long", "alice", "cat big.txt")
    texts = await c.wait_for("c-long", final_texts)
    assert "line 1999" in texts[0] and "line 0\n" not in texts[0]
    assert "truncated" in texts[0]
    with sqlite3.connect(proc.data_dir / "bridge.db") as conn:
        output = conn.execute("SELECT output FROM turns").fetchone()[0]
    assert output.startswith("line 0\n") and "line 1999" in output
    assert "/output" in texts[0]  # the cut reply says how to see the rest
    # `/output` shows what the reply cut: the whole of it, in this conversation only
    await c.post("c-long", "alice", "/output")
    shown = await c.wait_for("c-long", lambda msgs: [t for t in final_texts(msgs)
                                                     if t.startswith("Output of the last turn (completed)")])
    assert len(shown) == 1 and '"cat big.txt"' in shown[0]
    assert "\nline 0\n" in shown[0] and "line 1999\n" in shown[0] and "not shown" not in shown[0]
    await c.post("c-other", "bob", "/output")
    none = await c.wait_for("c-other", final_texts)
    assert none == ["No turn of this session has kept an output yet."]
    # an output longer than /output shows: its end, and how much is not shown
    (proc.data_dir / "workspace" / "bigger.txt").write_text("".join(f"row {i}\n" for i in range(6000)))
    await c.post("c-long", "alice", "cat bigger.txt")
    await c.wait_for("c-long", lambda msgs: [t for t in final_texts(msgs) if "row 5999" in t])
    await c.post("c-long", "alice", "/output")
    shown = await c.wait_for("c-long", lambda msgs: [t for t in final_texts(msgs) if '"cat bigger.txt"' in t])
    assert "row 5999\n" in shown[0] and "row 0\n" not in shown[0]
    assert re.search(r"The first \d+ of \d+ characters are not shown", shown[0])


async def test_health_readiness_and_metrics(bridge, chat, http):
    proc = bridge(BRIDGE_HTTP_WORKERS="1")
    c = chat(proc)
    async with http.get(proc.url + "/healthz") as r:
        assert r.status == 200
    async with http.get(proc.url + "/readyz") as r:
        body = await r.json()
        assert r.status == 200 and body["ok"] is True
        assert set(body["checks"]) == {"store", "runtime", "channel:webchat", "http"}
        workers = body["checks"]["http"]["edge_workers"]
        assert len(workers) == 1 and workers[0]["up"] and workers[0]["pid"] != proc.pid
    await c.post("c-m", "alice", "echo metric")
    await c.post("c-m", "alice", "echo metric", client_msg_id="dup")
    await c.post("c-m", "alice", "echo metric", client_msg_id="dup")
    await c.wait_for("c-m", finals(2))
    async with http.get(proc.url + "/metrics") as r:
        text = await r.text()
    assert 'bridge_inbound_events_total{channel="webchat",kind="message"} 2.0' in text
    assert 'bridge_inbound_duplicates_total{channel="webchat"} 1.0' in text
    assert 'bridge_turns_total{status="completed"} 2.0' in text
    assert "bridge_turn_duration_seconds_bucket" in text
    assert "bridge_outbox_depth" in text and "bridge_approvals_pending 0.0" in text
    assert "bridge_delivery_attempts_total" in text


async def test_sigterm_lets_a_running_turn_finish(bridge, chat):
    proc = bridge()
    c = chat(proc)
    await c.post("c-term", "alice", "sleep 1; echo graceful")
    card = await c.wait_card("c-term", "pending")
    await c.act("c-term", card["id"], "approve", "alice")
    await c.wait_for("c-term", lambda msgs: [m for m in msgs if m["text"].startswith("⚙️")])
    assert proc.stop() == 0
    with sqlite3.connect(proc.data_dir / "bridge.db") as conn:
        rows = conn.execute("SELECT text FROM webchat_messages WHERE role = 'bot' AND text LIKE '%graceful%'").fetchall()
        statuses = conn.execute("SELECT status FROM turns").fetchall()
    assert len(rows) == 1 and statuses == [("completed",)]


@pytest.mark.parametrize("command", ["ls -la", "git status", "cat /dev/null | wc -l"])
async def test_read_only_commands_run_without_a_card(bridge, chat, command):
    proc = bridge()
    c = chat(proc)
    conv = f"c-ro-{uuid.uuid4().hex[:6]}"
    await c.post(conv, "alice", command)
    texts = await c.wait_for(conv, final_texts)
    assert "exit" in texts[0]
    assert not [m for m in await c.bot_messages(conv) if m["card"]]


async def test_stop_while_waiting_for_approval_stops_the_turn(bridge, chat):
    proc = bridge()
    c = chat(proc)
    await c.post("c-stopw", "alice", "touch stopped.txt")
    await c.wait_card("c-stopw", "pending")
    await c.post("c-stopw", "alice", "/stop")
    stopped = await c.wait_card("c-stopw", "stopped")
    assert stopped["card"]["actions"] == [] and "by alice" in stopped["card"]["body"]
    texts = await c.wait_for("c-stopw", lambda msgs: [t for t in final_texts(msgs) if "Not run (stopped)" in t])
    assert len(texts) == 1
    assert not (proc.data_dir / "workspace" / "stopped.txt").exists()
    await c.post("c-stopw", "alice", "/stop")
    await c.wait_for("c-stopw", lambda msgs: [t for t in final_texts(msgs) if "Nothing is running" in t])


async def test_command_timeout_kills_the_process_group(bridge, chat):
    proc = bridge(BRIDGE_SHELL_TIMEOUT="1")
    c = chat(proc)
    # a duration no other test uses: pgrep below looks machine-wide (the Codex tests run `sleep 20`)
    await c.post("c-to", "alice", "sleep 23.5 & sleep 23.5; echo never")
    card = await c.wait_card("c-to", "pending")
    await c.act("c-to", card["id"], "approve", "alice")
    texts = await c.wait_for("c-to", lambda msgs: [t for t in final_texts(msgs) if "Timed out" in t])
    assert "never" not in texts[0]
    await asyncio.sleep(1.0)  # the SIGKILL grace period
    ps = await asyncio.create_subprocess_exec("pgrep", "-f", "sleep 23.5", stdout=asyncio.subprocess.PIPE)
    out, _ = await ps.communicate()
    assert out.strip() == b"", "a child of the timed-out command survived"


async def test_a_turn_over_its_time_limit_is_stopped_but_waiting_for_approval_does_not_count(bridge, chat):
    proc = bridge(BRIDGE_TURN_TIMEOUT="1")
    c = chat(proc)
    await c.post("c-limit", "alice", "sleep 5 && touch late.txt")
    card = await c.wait_card("c-limit", "pending")
    await asyncio.sleep(1.5)  # longer than the limit, waiting for a person: not counted
    status, _ = await c.act("c-limit", card["id"], "approve", "alice")
    assert status == 200
    approved = time.monotonic()
    texts = await c.wait_for("c-limit", lambda msgs: [t for t in final_texts(msgs) if "BRIDGE_TURN_TIMEOUT" in t])
    assert time.monotonic() - approved < 4  # stopped about a second after it started running
    assert "ran longer than 1 s" in texts[0] and "Stopped after" in texts[0]
    with sqlite3.connect(proc.data_dir / "bridge.db") as db:
        assert db.execute("SELECT status, error FROM turns").fetchall() == [("failed", "timeout")]
    await asyncio.sleep(max(0.0, approved + 5.5 - time.monotonic()))
    assert not (proc.data_dir / "workspace" / "late.txt").exists()  # its process group was killed
    await c.post("c-limit", "alice", "echo still-here")  # the conversation goes on
    assert "still-here" in (await c.wait_for("c-limit", lambda msgs: [t for t in final_texts(msgs)
                                                                        if "still-here" in t]))[0]


async def test_approval_expires_and_the_turn_goes_on(bridge, chat):
    proc = bridge(BRIDGE_APPROVAL_TIMEOUT="2")
    c = chat(proc)
    await c.post("c-exp", "alice", "touch expired.txt")
    card = await c.wait_card("c-exp", "pending")
    expired = await c.wait_card("c-exp", "expired", timeout=10)
    assert expired["id"] == card["id"] and [a["id"] for a in expired["card"]["actions"]] == ["retry"]
    await c.wait_for("c-exp", lambda msgs: [t for t in final_texts(msgs) if "expired" in t])
    status, _ = await c.act("c-exp", card["id"], "approve", "alice")
    assert status == 409
    await c.post("c-exp", "alice", "echo next")
    await c.wait_for("c-exp", lambda msgs: [t for t in final_texts(msgs) if "next" in t])
    assert not (proc.data_dir / "workspace" / "expired.txt").exists()


async def test_sigterm_interrupts_turns_that_outlive_the_deadline(bridge, chat):
    proc = bridge(BRIDGE_SHUTDOWN_TIMEOUT="1")
    c = chat(proc)
    await c.post("c-dl", "alice", "sleep 30")
    card = await c.wait_card("c-dl", "pending")
    await c.act("c-dl", card["id"], "approve", "alice")
    await c.wait_for("c-dl", lambda msgs: [m for m in msgs if m["text"].startswith("⚙️")])
    started = time.monotonic()
    assert proc.stop() == 0
    assert time.monotonic() - started < 8
    with sqlite3.connect(proc.data_dir / "bridge.db") as conn:
        statuses = conn.execute("SELECT status FROM turns").fetchall()
        texts = [r[0] for r in conn.execute("SELECT text FROM webchat_messages WHERE role = 'bot'")]
    assert statuses == [("interrupted",)]
    assert any("shutting down" in t for t in texts)


async def test_a_message_that_waits_only_briefly_gets_no_queued_notice(bridge, chat):
    proc = bridge()
    c = chat(proc)
    await asyncio.gather(c.post("c-quick", "alice", "echo one"), c.post("c-quick", "alice", "echo two"))
    await c.wait_for("c-quick", finals(2))
    await asyncio.sleep(0.8)  # past the notice delay
    assert not [m for m in await c.bot_messages("c-quick") if m["text"].startswith(("⏳", "▶️"))]


async def test_a_blank_message_is_refused_and_the_conversation_goes_on(bridge, chat):
    """A message with nothing in it would have nothing to run or answer: the web chat refuses it
    (400) and keeps nothing; the next message runs as usual, the conversation's only turn."""
    proc = bridge()
    c = chat(proc)
    status, body = await c.post("c-empty", "alice", "   ", client_msg_id="blank")
    assert status == 400 and "text must not be empty" in body["error"]
    await c.post("c-empty", "alice", "echo after")
    texts = await c.wait_for("c-empty", final_texts)
    assert len(texts) == 1 and "after" in texts[0]
    with sqlite3.connect(proc.data_dir / "bridge.db") as conn:
        statuses = conn.execute("SELECT status FROM inbound_events WHERE conversation_key = 'webchat:c-empty'").fetchall()
        turns = conn.execute("SELECT input_text FROM turns").fetchall()
    assert statuses == [("done",)] and turns == [("echo after",)]
    assert [m["text"] for m in await c.messages("c-empty") if m["role"] == "user"] == ["echo after"]


async def upload(http, proc, conversation: str, name: str, data: bytes, user: str = "alice"):
    form = aiohttp.FormData()
    form.add_field("file", data, filename=name, content_type="application/octet-stream")
    async with http.post(f"{proc.url}/chat/api/files", params={"conversation_id": conversation, "user_id": user},
                         data=form) as r:
        return r.status, await r.json()


async def test_a_file_is_uploaded_then_carried_by_a_message(bridge, chat, http):
    """Uploaded first, named by id in the message: kept in the data dir, shown on the person's
    message, recorded on the event; the shell runtime takes text only, so a file alone gets a
    note with where it was saved, and with a command the command runs."""
    proc = bridge()
    c = chat(proc)
    status, kept = await upload(http, proc, "c-files", "notes.txt", b"line one\n")
    assert status == 201 and kept["name"] == "notes.txt" and kept["mime_type"] == "text/plain"
    async with http.post(proc.url + "/chat/api/messages", json={
            "conversation_id": "c-files", "user_id": "alice", "text": "", "client_msg_id": "f1",
            "file_ids": [kept["file_id"]]}) as r:
        assert r.status == 202
    notes = await c.wait_for("c-files", lambda msgs: [m for m in msgs if m["role"] == "bot" and "takes text only" in
                                                      (m["text"] or "")])
    saved = Path(notes[0]["text"].split("`")[1])
    assert saved.read_bytes() == b"line one\n" and saved.is_relative_to(proc.data_dir)
    person = [m for m in await c.messages("c-files") if m["role"] == "user"][0]
    assert person["files"] == [{"name": "notes.txt", "mime_type": "text/plain"}]
    # with a command: the command runs, and finds the file's path in $BRIDGE_FILES
    status, other = await upload(http, proc, "c-files", "notes.txt", b"line two\n")
    async with http.post(proc.url + "/chat/api/messages", json={
            "conversation_id": "c-files", "user_id": "alice", "text": 'cat "$BRIDGE_FILES"', "client_msg_id": "f2",
            "file_ids": [other["file_id"]]}) as r:
        assert r.status == 202
    card = await c.wait_card("c-files", "pending")  # a path from a variable: the rules cannot see it, so ask
    await c.act("c-files", card["id"], "approve", "alice")
    done = await c.wait_for("c-files", lambda msgs: [t for t in final_texts(msgs) if "line two" in t])
    assert "exit 0" in done[0] and "📎 1 file in `$BRIDGE_FILES`" in done[0]
    with sqlite3.connect(proc.data_dir / "bridge.db") as db:
        payloads = [json.loads(p) for (p,) in db.execute("SELECT payload FROM inbound_events ORDER BY id")]
    assert [Path(a["path"]).read_bytes() for p in payloads for a in p["attachments"]] == [b"line one\n", b"line two\n"]


async def test_bad_uploads_are_refused_and_store_nothing(bridge, http):
    proc = bridge(BRIDGE_WEBCHAT_MAX_FILE_MB="1")
    status, body = await upload(http, proc, "c-up", "big.bin", b"x" * (1024 * 1024 + 1))
    assert status == 413 and "larger than 1 MiB" in body["error"]
    for bad in ("bad:id", "..", "."):
        status, body = await upload(http, proc, bad, "a.txt", b"a")
        assert status == 400
    async with http.post(f"{proc.url}/chat/api/files", params={"conversation_id": "c-up", "user_id": "a"},
                         json={"file": "not a form"}) as r:
        assert r.status == 400 and "multipart" in (await r.json())["error"]
    # a file of another conversation, or an id never issued, is not carried
    status, kept = await upload(http, proc, "c-other", "a.txt", b"a")
    assert status == 201
    for file_id in (kept["file_id"], "0" * 32, "../../etc"):
        async with http.post(proc.url + "/chat/api/messages", json={
                "conversation_id": "c-up", "user_id": "a", "text": "", "client_msg_id": f"m-{file_id[:4]}",
                "file_ids": [file_id]}) as r:
            assert r.status == 400 and "file_ids" in (await r.json())["error"]
    assert db_counts(proc) == {"inbound_events": 0, "webchat_messages": 0, "turns": 0, "outbox": 0}
    assert not (proc.data_dir / "attachments" / "webchat" / "c-up").exists()


async def test_an_upload_never_sent_is_removed_and_a_sent_one_kept(bridge, chat, http):
    proc = bridge(BRIDGE_WEBCHAT_UPLOAD_TTL_HOURS=str(2 / 3600))  # two seconds; swept every second
    c = chat(proc)
    status, sent = await upload(http, proc, "c-sweep", "sent.txt", b"kept\n")
    status, unsent = await upload(http, proc, "c-sweep", "draft.txt", b"dropped\n")
    assert status == 201
    async with http.post(proc.url + "/chat/api/messages", json={
            "conversation_id": "c-sweep", "user_id": "alice", "text": "echo sent", "client_msg_id": "s1",
            "file_ids": [sent["file_id"]]}) as r:
        assert r.status == 202
    await c.wait_for("c-sweep", finals(1))
    folder = proc.data_dir / "attachments" / "webchat" / "c-sweep"
    await wait_until(lambda: not (folder / unsent["file_id"]).exists(), timeout=10, what="the unsent upload removed")
    assert (folder / sent["file_id"] / "sent.txt").read_bytes() == b"kept\n"
    # the removed one can no longer be sent
    async with http.post(proc.url + "/chat/api/messages", json={
            "conversation_id": "c-sweep", "user_id": "alice", "text": "", "client_msg_id": "s2",
            "file_ids": [unsent["file_id"]]}) as r:
        assert r.status == 400


async def test_attachments_past_their_keeping_time_are_deleted_from_disk(bridge, tmp_path):
    """Files kept longer than BRIDGE_ATTACHMENTS_KEEP_DAYS (30 by default) go, with the folders
    they leave empty; newer ones stay."""
    root = tmp_path / "data" / "attachments"
    old, new = root / "feishu" / "om_old" / "report.pdf", root / "slack" / "C1-1700000000.1" / "shot.png"
    for path in (old, new):
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
    long_ago = time.time() - 31 * 86400
    os.utime(old, (long_ago, long_ago))
    proc = bridge()
    await wait_until(lambda: not old.exists(), timeout=10, what="the old attachment deleted")
    assert not old.parent.exists() and new.read_bytes() == b"x"
    assert "1 file(s) past 30 days deleted from disk" in proc.log()


async def test_the_web_chat_can_be_turned_off(bridge, http):
    """BRIDGE_WEBCHAT=off (the port reachable by others, the platforms' webhooks served): no page,
    no API, nothing stored; the service is ready without it."""
    proc = bridge(BRIDGE_WEBCHAT="off")
    async with http.get(proc.url + "/chat") as r:
        assert r.status == 404
    body = {"conversation_id": "c1", "user_id": "alice", "text": "echo hi", "client_msg_id": "m1"}
    async with http.post(proc.url + "/chat/api/messages", json=body) as r:
        assert r.status == 404
    async with http.get(proc.url + "/readyz") as r:
        ready = await r.json()
    assert r.status == 200 and "channel:webchat" not in ready["checks"]
    with sqlite3.connect(proc.data_dir / "bridge.db") as db:
        assert db.execute("SELECT count(*) FROM inbound_events").fetchone()[0] == 0


async def test_odd_queries_and_file_names_get_a_clear_answer_not_a_500(bridge, chat, http):
    proc = bridge(BRIDGE_HTTP_WORKERS="0")
    c = chat(proc)
    for query in ({"conversation_id": "c-odd", "after": str(10**30)}, {"conversation_id": "c-odd", "after": "x"},
                  {"conversation_id": "c-odd\n"}, {"conversation_id": ""}):
        async with http.get(f"{proc.url}/chat/api/messages", params=query) as r:
            assert r.status == 400, query
            assert "error" in await r.json()
    async with http.get(f"{proc.url}/chat/api/messages", params={"conversation_id": "c-odd", "after": "-1"}) as r:
        assert r.status == 200 and (await r.json()) == {"messages": []}
    # a name longer than a file system takes: kept, shortened, its suffix kept
    long_name = "é" * 200 + "name.txt"
    status, kept = await upload(http, proc, "c-odd", long_name, b"data\n")
    assert status == 201, kept
    assert kept["name"].endswith(".txt") and len(kept["name"].encode()) <= 200
    status, body = await c._retrying("post", "/chat/api/messages", json={
        "conversation_id": "c-odd", "user_id": "alice", "text": "echo with-file", "client_msg_id": "f1",
        "file_ids": [kept["file_id"]]})
    assert status == 202, body
    texts = await c.wait_for("c-odd", finals(1))
    assert "with-file" in texts[0]
    status, kept = await upload(http, proc, "c-odd", "x" * 300, b"data\n")
    assert status == 201 and kept["name"] == "x" * 200


async def test_sigterm_with_pages_open_stops_at_once(bridge, chat, http):
    """Open live streams end at shutdown (each page reconnects to the next start) instead of
    holding the HTTP server's shutdown open past the deadline."""
    proc = bridge(BRIDGE_HTTP_WORKERS="0", BRIDGE_SHUTDOWN_TIMEOUT="5")
    c = chat(proc)
    await c.post("c-open", "alice", "echo before")
    await c.wait_for("c-open", finals(1))
    async with http.get(f"{proc.url}/chat/api/stream", params={"conversation_id": "c-open"}) as stream:
        assert stream.status == 200
        await stream.content.readline()
        started = time.monotonic()
        assert await asyncio.to_thread(proc.stop, 25.0) == 0
        assert time.monotonic() - started < 20


@HTTP_MODES
async def test_the_root_and_a_trailing_slash_lead_to_the_page(bridge, http, workers):
    proc = bridge(BRIDGE_HTTP_WORKERS=workers)
    for path, where in (("/", "/chat"), ("/chat/", "/chat"), ("/chat/?user=bob&conversation=g-x",
                                                              "/chat?user=bob&conversation=g-x")):
        async with http.get(proc.url + path, allow_redirects=False) as r:
            assert (r.status, r.headers["Location"]) == (302, where), path
    async with http.get(proc.url + "/") as r:
        assert r.status == 200 and "text/html" in r.headers["Content-Type"]


async def test_sigterm_does_not_wait_on_turns_that_wait_for_a_person(bridge, chat):
    """Only a turn waiting for an approval is left: the shutdown does not hold for a click that
    may never come (the deadline is 30 s here); the card ends interrupted, offering Retry."""
    proc = bridge(BRIDGE_SHUTDOWN_TIMEOUT="30")
    c = chat(proc)
    await c.post("c-wait", "alice", "touch later.txt")
    await c.wait_card("c-wait", "pending")
    started = time.monotonic()
    assert proc.stop() == 0
    assert time.monotonic() - started < 8
    with sqlite3.connect(proc.data_dir / "bridge.db") as conn:
        assert conn.execute("SELECT status FROM approvals").fetchall() == [("interrupted",)]
    assert not (proc.data_dir / "workspace" / "later.txt").exists()
    assert "wait only for a person" in proc.log()


async def _waiting_for_a_slot(c, proc) -> list[int]:
    """One runtime slot (BRIDGE_MAX_CONCURRENT_TURNS=1), held by a long command in c-busy; bob's
    `echo waited` in c-next waits for it. The long command's pids."""
    pids = await run_long(c, c, proc.data_dir / "workspace", "c-busy", "hold", 42.5)
    await c.post("c-next", "bob", "echo waited")
    [notice] = await c.wait_for("c-next", lambda msgs: [m["text"] for m in msgs if m["text"].startswith("⏳")])
    assert "as many turns as it may at once (1)" in notice
    return pids


def _unstarted(proc) -> tuple[str, list]:
    """c-next's message: its event's status, and its turns (none while it waits for its slot)."""
    with sqlite3.connect(proc.data_dir / "bridge.db") as conn:
        [(event_id, status)] = conn.execute(
            "SELECT id, status FROM inbound_events WHERE conversation_key = 'webchat:c-next' AND payload LIKE '%waited%'"
        ).fetchall()
        return status, conn.execute("SELECT status FROM turns WHERE inbound_event_id = ?", (event_id,)).fetchall()


async def test_a_message_waiting_for_a_runtime_slot_is_not_started_so_a_kill_does_not_interrupt_it(bridge, chat):
    """With every runtime slot taken, the next conversation's message waits unclaimed: it is told
    so once, /status shows the wait, and a service killed meanwhile runs it after the restart,
    exactly once, rather than telling bob that a turn which never ran was interrupted."""
    proc = bridge(BRIDGE_MAX_CONCURRENT_TURNS="1")
    c = chat(proc)
    pids = await _waiting_for_a_slot(c, proc)
    try:
        await c.post("c-next", "bob", "/status")
        [status] = await c.wait_for("c-next", lambda msgs: [m["text"] for m in msgs if "has waited" in m["text"]])
        assert "`echo waited` has waited" in status and "Working" not in status
        assert _unstarted(proc) == ("accepted", [])
        async with c.http.get(f"{c.base}/metrics") as resp:
            metrics = await resp.text()
        assert "bridge_turns_waiting_for_slot 1.0" in metrics and "bridge_turns_running 1.0" in metrics
        proc.kill()
        proc.start()
        await c.wait_for("c-next", lambda msgs: [t for t in final_texts(msgs) if "\nwaited\n" in t])
        await c.wait_for("c-busy", lambda msgs: [t for t in final_texts(msgs) if "Interrupted" in t])
        await asyncio.sleep(1.0)
        texts = final_texts(await c.bot_messages("c-next"))
        assert not [t for t in texts if "Interrupted" in t], texts
        assert len([t for t in texts if "\nwaited\n" in t]) == 1, texts
        assert _unstarted(proc) == ("done", [("completed",)])
        # the notice was edited to say the turn started, as a queued notice is
        assert not [m for m in await c.bot_messages("c-next") if m["text"].startswith("⏳")]
    finally:
        kill_left(pids)


async def test_a_shutdown_starts_no_turn_waiting_for_a_slot_and_it_runs_after_the_next_start(bridge, chat):
    proc = bridge(BRIDGE_MAX_CONCURRENT_TURNS="1", BRIDGE_SHUTDOWN_TIMEOUT="2")
    c = chat(proc)
    pids = await _waiting_for_a_slot(c, proc)
    try:
        assert proc.stop() == 0  # the long command is interrupted at the deadline, which frees the slot
        assert _unstarted(proc) == ("accepted", [])
        with sqlite3.connect(proc.data_dir / "bridge.db") as conn:  # nothing said of a turn: only the notice
            said = [t for (t,) in conn.execute("SELECT text FROM webchat_messages WHERE conversation_id = 'c-next'"
                                               " AND role = 'bot'")]
        assert len(said) == 1 and said[0].startswith("⏳ Waiting"), said
        proc.start()
        await c.wait_for("c-next", lambda msgs: [t for t in final_texts(msgs) if "\nwaited\n" in t])
        assert _unstarted(proc) == ("done", [("completed",)])
    finally:
        kill_left(pids)


async def test_stop_drops_a_message_waiting_for_a_runtime_slot(bridge, chat):
    proc = bridge(BRIDGE_MAX_CONCURRENT_TURNS="1")
    c = chat(proc)
    pids = await _waiting_for_a_slot(c, proc)
    try:
        await c.post("c-next", "bob", "/stop")
        await c.wait_for("c-next", lambda msgs: [m for m in msgs if "Dropped `echo waited` before it started" in m["text"]])
        await c.wait_for("c-next", lambda msgs: [m for m in msgs if "Stopped before it started" in m["text"]])
        assert _unstarted(proc) == ("skipped", [])
        await c.post("c-busy", "alice", "/stop")  # the slot is free again: bob's next message runs
        await c.post("c-next", "bob", "echo after")
        await c.wait_for("c-next", lambda msgs: [t for t in final_texts(msgs) if "\nafter\n" in t], timeout=20)
    finally:
        kill_left(pids)


async def test_with_the_interrupt_policy_a_newer_message_replaces_one_waiting_for_a_slot(bridge, chat):
    """`interrupt`: the newer message runs next. With the older one not started yet (it waits for
    a runtime slot) that means the older one is not run at all, and says so."""
    proc = bridge(BRIDGE_MAX_CONCURRENT_TURNS="1", BRIDGE_BUSY_POLICY="interrupt")
    c = chat(proc)
    pids = await _waiting_for_a_slot(c, proc)
    try:
        await c.post("c-next", "bob", "echo newer")
        await c.wait_for("c-next", lambda msgs: [m for m in msgs if m["text"] == (
            "⏹ Stopped before it started; not run. Your newer message runs instead.")])
        assert _unstarted(proc) == ("skipped", [])
        await c.post("c-busy", "alice", "/stop")  # the slot is free again
        await c.wait_for("c-next", lambda msgs: [t for t in final_texts(msgs) if "\nnewer\n" in t], timeout=20)
        assert not [t for t in final_texts(await c.bot_messages("c-next")) if "\nwaited\n" in t]
    finally:
        kill_left(pids)
