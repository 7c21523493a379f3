"""Two replicas of the service on one PostgreSQL database (the real server on 127.0.0.1): each
conversation runs on one replica at a time, in order, once; a replica that dies hands its
conversations to the other when its leases run out."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid

import aiohttp
import asyncpg
import pytest

from tests.support.chat import ChatClient, final_texts, finals
from tests.support.commands import kill_left, run_long, running
from tests.support.databases import postgres_database
from tests.support.service import BridgeProcess

pytestmark = pytest.mark.postgres

TTL = "2"


@pytest.fixture
def replicas(tmp_path):
    started: list[BridgeProcess] = []

    def _start(url: str, count: int = 2) -> list[BridgeProcess]:
        workspace = tmp_path / "workspace"
        for index in range(count):
            started.append(BridgeProcess(tmp_path / f"replica{index}", env={
                "BRIDGE_DATABASE_URL": url, "BRIDGE_WORKSPACE": str(workspace), "BRIDGE_LEASE_TTL": TTL,
                "BRIDGE_REPLICA_ID": f"replica-{index}", "BRIDGE_HTTP_WORKERS": "0",
            }).start())
        return started[-count:]

    yield _start
    for proc in started:
        proc.kill()


async def rows(url: str, sql: str, *args):
    conn = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
    try:
        return await conn.fetch(sql, *args)
    finally:
        await conn.close()


async def post_and_approve(poster: ChatClient, approver: ChatClient, conversation: str, command: str) -> None:
    """alice sends a command that asks for approval (through one replica) and approves its card
    (through the same or the other one)."""
    await poster.post(conversation, "alice", command)
    card = await poster.wait_card(conversation, "pending")
    status, body = await approver.act(conversation, card["id"], "approve", "alice")
    assert status == 200 and body["ok"]


async def test_messages_sent_to_either_replica_run_on_one_in_order(replicas, http):
    async with postgres_database() as url:
        a, b = replicas(url)
        chats = [ChatClient(http, a.url), ChatClient(http, b.url)]
        for n in range(8):  # each one acked before the next is sent, alternating replicas
            status, body = await chats[n % 2].post("g-team", f"user{n % 3}", f"echo reply-{n}")
            assert status == 202 and body == {"accepted": True, "duplicate": False}
        texts = await chats[0].wait_for("g-team", finals(8), timeout=30)
        assert [t for t in texts if "reply-" in t] == texts
        assert [int(t.split("reply-")[1].split()[0]) for t in texts] == list(range(8))
        await asyncio.sleep(1.0)
        assert len(final_texts(await chats[1].bot_messages("g-team"))) == 8  # exactly once, seen from both
        turns = await rows(url, "SELECT started_at, finished_at, status FROM turns ORDER BY id")
        assert [t["status"] for t in turns] == ["completed"] * 8
        for earlier, later in zip(turns, turns[1:]):
            assert earlier["finished_at"] <= later["started_at"]  # one turn of the conversation at a time
        owners = await rows(url, "SELECT owner FROM conversation_leases WHERE conversation_key = 'webchat:g-team'")
        assert len(owners) <= 1
        async with http.get(f"{b.url}/readyz") as resp:
            replica = (await resp.json())["checks"]["replica"]
        assert resp.status == 200 and replica["ok"] and replica["replica"] == "replica-1"
        # a second conversation may go to the other replica; both answer
        await chats[1].post("d-other", "alice", "echo other")
        assert "other" in (await chats[0].wait_for("d-other", finals(1)))[0]


async def test_a_replica_that_dies_hands_its_conversations_over(replicas, http):
    async with postgres_database() as url:
        a, b = replicas(url)
        chat_a, chat_b = ChatClient(http, a.url), ChatClient(http, b.url)
        await chat_a.post("d-fail", "alice", "echo first")
        await chat_a.wait_for("d-fail", finals(1))
        await chat_a.post("d-fail", "alice", "touch handed-over.txt")  # waits on a person's approval
        card = await chat_a.wait_card("d-fail", "pending")
        owner = await rows(url, "SELECT owner FROM conversation_leases WHERE conversation_key = 'webchat:d-fail'")
        assert [r["owner"] for r in owner] == ["replica-0"]
        a.kill()  # kill -9: its leases are left to run out
        # sent to the survivor while the dead replica's lease still holds: accepted, run after takeover
        status, _ = await chat_b.post("d-fail", "alice", "echo after", client_msg_id=uuid.uuid4().hex)
        assert status == 202
        texts = await chat_b.wait_for("d-fail", lambda msgs: (t := final_texts(msgs)) and "after" in t[-1] and t,
                                      timeout=20)
        assert any("interrupted" in t.lower() for t in texts)  # the dead replica's turn, said so
        assert not (b.data_dir.parent / "workspace" / "handed-over.txt").exists()
        assert (await chat_b.wait_card("d-fail", "interrupted"))["id"] == card["id"]
        turns = await rows(url, "SELECT input_text, status FROM turns ORDER BY id")
        assert [(t["input_text"], t["status"]) for t in turns] == [
            ("echo first", "completed"), ("touch handed-over.txt", "interrupted"), ("echo after", "completed")]
        owner = await rows(url, "SELECT owner FROM conversation_leases WHERE conversation_key = 'webchat:d-fail'")
        assert [r["owner"] for r in owner] == ["replica-1"]


async def test_a_replica_restarted_after_kill_9_ends_its_own_commands_only(replicas, http):
    """Each replica records what it runs in its own data dir: one killed and started again ends
    the commands it left running, before its turn is said interrupted, and never the other's."""
    async with postgres_database() as url:
        a, b = replicas(url)
        chat_a, chat_b = ChatClient(http, a.url), ChatClient(http, b.url)
        workspace = a.data_dir.parent / "workspace"
        on_a = await run_long(chat_a, chat_a, workspace, "d-on-a", "on-a", 42.5)
        on_b = await run_long(chat_b, chat_b, workspace, "d-on-b", "on-b", 42.5)
        try:
            owners = await rows(url, "SELECT conversation_key, owner FROM conversation_leases ORDER BY 1")
            assert [(r["conversation_key"], r["owner"]) for r in owners] == [
                ("webchat:d-on-a", "replica-0"), ("webchat:d-on-b", "replica-1")]
            b.kill()
            await asyncio.sleep(0.3)
            assert all(running(pid) for pid in on_a + on_b)
            b.start()
            assert not any(running(pid) for pid in on_b)
            texts = await chat_b.wait_for("d-on-b", lambda msgs: [t for t in final_texts(msgs) if "Interrupted" in t],
                                          timeout=20)
            assert len(texts) == 1
            assert all(running(pid) for pid in on_a)  # the other replica's command goes on
            turns = await rows(url, "SELECT input_text, status FROM turns ORDER BY id")
            assert [t["status"] for t in turns] == ["running", "interrupted"]
            await chat_a.post("d-on-a", "alice", "/stop")
            await chat_a.wait_for("d-on-a", lambda msgs: [t for t in final_texts(msgs) if "Stopped after" in t])
            await asyncio.sleep(1.0)
            assert not any(running(pid) for pid in on_a)
            assert len([t for t in final_texts(await chat_a.bot_messages("d-on-b")) if "Interrupted" in t]) == 1
        finally:
            kill_left(on_a + on_b)


async def test_stop_reaches_the_replica_that_runs_the_turn(replicas, http):
    async with postgres_database() as url:
        a, b = replicas(url)
        chat_a, chat_b = ChatClient(http, a.url), ChatClient(http, b.url)
        await chat_a.post("d-stop", "alice", "touch stopped.txt")
        await chat_a.wait_card("d-stop", "pending")
        await chat_b.post("d-stop", "alice", "/stop")  # to the other replica
        await chat_b.wait_for("d-stop", lambda msgs: any(m["card"] and m["card"]["status"] != "pending"
                                                         for m in msgs), timeout=10)
        turns = await rows(url, "SELECT status FROM turns ORDER BY id")
        assert [t["status"] for t in turns] == ["stopped"]
        # a clean stop passes the leases on at once
        a.stop()
        assert await rows(url, "SELECT * FROM conversation_leases WHERE owner = 'replica-0'") == []


async def test_a_card_clicked_on_the_other_replica_lets_the_turn_go_on(replicas, http):
    async with postgres_database() as url:
        a, b = replicas(url)
        chat_a, chat_b = ChatClient(http, a.url), ChatClient(http, b.url)
        await post_and_approve(chat_a, chat_b, "d-card", "touch approved-elsewhere.txt")
        texts = await chat_a.wait_for("d-card", finals(1), timeout=15)
        assert "exit 0" in texts[0]
        assert (a.data_dir.parent / "workspace" / "approved-elsewhere.txt").exists()


async def _live(http, base_url: str, conversation_id: str, seen: list[dict], after: int = 0) -> None:
    """Reads a page's live stream (SSE) into `seen` until cancelled."""
    params = {"conversation_id": conversation_id, "after": str(after)}
    async with http.get(f"{base_url}/chat/api/stream", params=params) as r:
        assert r.status == 200
        async for line in r.content:
            if line.startswith(b"data:"):
                seen.append(json.loads(line[5:]))


async def _until(predicate, timeout: float = 15.0):
    async with asyncio.timeout(timeout):
        while not (found := predicate()):
            await asyncio.sleep(0.05)
    return found


def _final_reply(seen: list[dict], token: str) -> bool:
    return any(m["role"] == "bot" and token in m["text"] and "exit 0" in m["text"] for m in seen)


async def test_a_page_on_one_replica_sees_live_what_another_replica_writes(replicas, http):
    async with postgres_database() as url:
        a, b = replicas(url)
        chat_b = ChatClient(http, b.url)
        seen: list[dict] = []
        page = asyncio.create_task(_live(http, a.url, "g-live", seen))  # a page open on replica 0
        try:
            await asyncio.sleep(0.5)
            # posted to replica 1, which holds the conversation, runs the turn and writes the reply
            await chat_b.post("g-live", "bob", "echo across-replicas")
            await _until(lambda: _final_reply(seen, "across-replicas"))
            owner = await rows(url, "SELECT owner FROM conversation_leases WHERE conversation_key = 'webchat:g-live'")
            assert [r["owner"] for r in owner] == ["replica-1"]
            assert any(m["role"] == "user" and m["user_id"] == "bob" for m in seen)  # the person's message too
            # each message once, in seq order, as the page would apply them
            seqs = [m["seq"] for m in seen]
            assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))

            # the replica's listening connection is cut: it listens again, and what was written
            # meanwhile still reaches the page
            cut = await rows(url, "SELECT pg_terminate_backend(pid) AS done FROM pg_stat_activity "
                                  "WHERE query LIKE 'LISTEN%' AND application_name = 'agent-bridge replica-0'")
            assert [r["done"] for r in cut] == [True]
            await chat_b.post("g-live", "bob", "echo after-the-cut")
            await _until(lambda: _final_reply(seen, "after-the-cut"), timeout=20)
            seqs = [m["seq"] for m in seen]
            assert seqs == sorted(seqs) and len(seqs) == len(set(seqs))
            async with http.get(f"{a.url}/readyz") as resp:
                live = (await resp.json())["checks"]["webchat_live"]
            assert live["ok"] and live["listening"] and live["connects"] == 2
        finally:
            page.cancel()
            await asyncio.gather(page, return_exceptions=True)


async def test_a_replica_paused_past_its_lease_does_not_answer_a_turn_taken_over(replicas, http):
    """A replica frozen (a VM pause, a stop signal) longer than its lease loses its conversation to
    the other, which marks the running turn interrupted and says so. When the frozen one wakes it
    stops that turn: no edit over the notice, no reply after it, one outcome per message."""
    async with postgres_database() as url:
        a, b = replicas(url)
        chat_a, chat_b = ChatClient(http, a.url), ChatClient(http, b.url)
        # a command of about 8 s that prints all along (a duration no other test uses: pgrep below)
        command = "for i in $(seq 1 16); do echo tick-$i; sleep 0.5; done; echo late-reply"
        await post_and_approve(chat_a, chat_a, "d-pause", command)
        approved = time.monotonic()
        await asyncio.sleep(0.7)  # the command runs on replica 0, its output streams into the reply
        os.kill(a.pid, signal.SIGSTOP)
        try:
            notice = await chat_b.wait_for("d-pause", lambda msgs: [m for m in msgs
                                                                    if "interrupted" in m["text"].lower()], timeout=15)
        finally:
            os.kill(a.pid, signal.SIGCONT)
        await asyncio.sleep(max(0.0, approved + 5.0 - time.monotonic()))
        ps = await asyncio.create_subprocess_exec("pgrep", "-f", "seq 1 16", stdout=asyncio.subprocess.PIPE)
        out, _ = await ps.communicate()
        assert out.strip() == b"", "the command still runs on the replica that lost its conversation"
        await asyncio.sleep(max(0.0, approved + 9.0 - time.monotonic()))  # when it would have ended
        messages = {m["id"]: m for m in await chat_b.bot_messages("d-pause")}
        assert "interrupted" in messages[notice[0]["id"]]["text"].lower()  # not edited over
        others = [m["text"] for m in messages.values() if m["id"] != notice[0]["id"]]
        assert not [t for t in others if "exit 0" in t or "tick-" in t], others  # no output, no reply
        turns = await rows(url, "SELECT status FROM turns ORDER BY id")
        assert [t["status"] for t in turns] == ["interrupted"]
        # the conversation goes on, on either replica
        await chat_a.post("d-pause", "alice", "echo after-the-pause")
        await chat_b.wait_for("d-pause", lambda msgs: [t for t in final_texts(msgs) if "after-the-pause" in t],
                              timeout=20)


async def test_a_file_uploaded_to_one_replica_reaches_the_turn_on_another(replicas, http, tmp_path):
    """Each replica has a data dir of its own. A file uploaded through replica 1, carried by a
    message posted through replica 0, which holds the conversation: the message finds the file
    (through the store), and the turn sees it on replica 0's own disk, with the same bytes."""
    async with postgres_database() as url:
        a, b = replicas(url)
        chat_a = ChatClient(http, a.url)
        await chat_a.post("c-files", "alice", "echo warm")  # replica 0 takes the conversation
        await chat_a.wait_for("c-files", finals(1))
        data = os.urandom(300_000)
        form = aiohttp.FormData()
        form.add_field("file", data, filename="build-log.bin", content_type="application/octet-stream")
        async with http.post(f"{b.url}/chat/api/files", params={"conversation_id": "c-files", "user_id": "alice"},
                             data=form) as r:
            assert r.status == 201
            kept = await r.json()
        assert not (tmp_path / "replica0" / "attachments" / "webchat" / "c-files" / kept["file_id"]).exists()
        async with http.post(f"{a.url}/chat/api/messages", json={
                "conversation_id": "c-files", "user_id": "alice", "text": "", "client_msg_id": "with-file",
                "file_ids": [kept["file_id"]]}) as r:
            assert r.status == 202, await r.text()
        notes = await chat_a.wait_for("c-files", lambda msgs: [m["text"] for m in msgs if "takes text only" in m["text"]])
        where = notes[0].split("`")[-2]
        assert where == str(tmp_path / "replica0" / "attachments" / "webchat" / "c-files" / kept["file_id"]
                            / "build-log.bin")
        with open(where, "rb") as f:
            assert f.read() == data
        stored = await rows(url, "SELECT key, size FROM shared_files")
        assert [(r["key"], r["size"]) for r in stored] == [
            (f"webchat/c-files/{kept['file_id']}/build-log.bin", len(data))]
        async with http.get(f"{a.url}/metrics") as resp:
            scraped = await resp.text()
        assert "bridge_shared_files 1.0" in scraped and f"bridge_shared_files_bytes {float(len(data))}" in scraped
        # an id never uploaded anywhere is still refused
        async with http.post(f"{a.url}/chat/api/messages", json={
                "conversation_id": "c-files", "user_id": "alice", "text": "", "client_msg_id": "no-file",
                "file_ids": ["0" * 32]}) as r:
            assert r.status == 400
