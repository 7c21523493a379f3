"""The whole service on PostgreSQL (the multi-replica store), against the real server on 127.0.0.1."""

from __future__ import annotations

import asyncio
import re

import asyncpg
import pytest

from tests.support.chat import final_texts, finals
from tests.support.databases import PG_DSN, postgres_database

pytestmark = pytest.mark.postgres


async def test_service_on_postgres_end_to_end(bridge, chat):
    async with postgres_database() as url:
        proc = bridge(BRIDGE_DATABASE_URL=url)
        c = chat(proc)
        results = await asyncio.gather(*(c.post("c-pg", "alice", "echo on-postgres", client_msg_id="x") for _ in range(3)))
        assert sorted(b["duplicate"] for _, b in results) == [False, True, True]
        await c.post("c-pg", "alice", "touch pg.txt")
        card = await c.wait_card("c-pg", "pending")
        status, _ = await c.act("c-pg", card["id"], "approve", "alice")
        assert status == 200
        texts = await c.wait_for("c-pg", finals(2))
        assert "on-postgres" in texts[0] and "exit 0" in texts[1]
        assert (proc.data_dir / "workspace" / "pg.txt").exists()
        # restart keeps everything
        proc.kill()
        proc.start()
        await c.post("c-pg", "alice", "echo again")
        texts = await c.wait_for("c-pg", finals(3))
        assert "again" in texts[2] and len(final_texts(await c.bot_messages("c-pg"))) == 3
        proc.stop()


async def test_a_database_outage_delays_messages_and_replies_never_loses_or_doubles_them(bridge, chat):
    """PostgreSQL refuses connections for a few seconds (a restart, a failover): a message sent
    meanwhile is acknowledged once the database is back, and every message gets one reply."""
    async with postgres_database() as url:
        name = url.rsplit("/", 1)[1]
        proc = bridge(BRIDGE_DATABASE_URL=url, BRIDGE_LEASE_TTL="2")
        c = chat(proc)
        await c.post("c-outage", "alice", "echo before-outage")
        await c.wait_for("c-outage", finals(1))
        admin = await asyncpg.connect(PG_DSN)
        try:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name)
            during = asyncio.ensure_future(c.post("c-outage", "alice", "echo during-outage", client_msg_id="during"))
            await asyncio.sleep(3.0)  # longer than the lease: the replica must take its conversation back
            assert not during.done()  # not acknowledged while it cannot be stored
            async with c.http.get(f"{proc.url}/readyz") as resp:
                store = (await resp.json())["checks"]["store"]
            assert resp.status == 503 and not store["ok"]
            assert store["queued_writes"] >= 1 and store["waiting_for_database_s"] > 1
            async with c.http.get(f"{proc.url}/metrics") as resp:  # still scraped, saying so
                scraped = await resp.text()
            assert resp.status == 200 and "bridge_store_up 0.0" in scraped
            assert re.search(r"^bridge_store_unreachable_seconds [1-9]", scraped, re.M)
        finally:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            await admin.close()
        async with asyncio.timeout(20):
            status, body = await during
        assert (status, body) == (202, {"accepted": True, "duplicate": False})
        async with asyncio.timeout(10):  # ready again once each of its loops has had a round
            while True:
                async with c.http.get(f"{proc.url}/readyz") as resp:
                    store = (await resp.json())["checks"]["store"]
                    if resp.status == 200:
                        break
                await asyncio.sleep(0.2)
        assert store["ok"] and "waiting_for_database_s" not in store
        async with c.http.get(f"{proc.url}/metrics") as resp:
            scraped = await resp.text()
        assert "bridge_store_up 1.0" in scraped and "bridge_store_unreachable_seconds 0.0" in scraped
        await c.post("c-outage", "alice", "echo after-outage")
        texts = await c.wait_for("c-outage", finals(3), timeout=30)
        assert ["before-outage" in texts[0], "during-outage" in texts[1], "after-outage" in texts[2]] == [True] * 3
        await asyncio.sleep(2.0)
        assert len(final_texts(await c.bot_messages("c-outage"))) == 3  # none twice
        proc.stop()


async def test_a_turn_waiting_for_approval_outlasts_a_database_outage(bridge, chat):
    async with postgres_database() as url:
        name = url.rsplit("/", 1)[1]
        proc = bridge(BRIDGE_DATABASE_URL=url)
        c = chat(proc)
        await c.post("c-wait", "alice", "touch approved-after-outage.txt")
        card = await c.wait_card("c-wait", "pending")
        admin = await asyncpg.connect(PG_DSN)
        try:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
            await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name)
            await asyncio.sleep(4.5)  # the turn looks at its approval every 2 s meanwhile
        finally:
            await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')
            await admin.close()
        status, _ = await c.act("c-wait", card["id"], "approve", "alice")
        assert status == 200
        texts = await c.wait_for("c-wait", finals(1), timeout=20)
        assert "exit 0" in texts[0]
        assert (proc.data_dir / "workspace" / "approved-after-outage.txt").exists()
        proc.stop()


async def test_nul_bytes_in_a_command_output_are_replied_and_refused_in_a_message(bridge, chat):
    """PostgreSQL refuses NUL in text: a binary file's output is still stored and answered (its
    NULs shown as U+FFFD), the conversation goes on, and a message carrying NUL gets a 400."""
    async with postgres_database() as url:
        proc = bridge(BRIDGE_DATABASE_URL=url)
        workspace = proc.data_dir / "workspace"
        workspace.mkdir(parents=True, exist_ok=True)
        (workspace / "bin.dat").write_bytes(b"a\x00b\n")
        c = chat(proc)
        await c.post("c-nul", "alice", "cat bin.dat")
        await c.post("c-nul", "alice", "echo next")
        texts = await c.wait_for("c-nul", finals(2))
        assert "a\ufffdb" in texts[0] and "exit 0" in texts[0] and "next" in texts[1]
        status, body = await c.post("c-nul", "alice", "echo a\x00b")
        assert status == 400 and "NUL" in body["error"]
        assert [m["role"] for m in await c.messages("c-nul")].count("user") == 2
        proc.stop()


async def test_the_longest_ids_a_message_may_carry_are_kept_and_deduped(bridge, chat):
    """A 128-character conversation id with a 128-character client id makes a dedupe key longer
    than the store's key column: still kept (not a 500), still deduped, and run once."""
    async with postgres_database() as url:
        proc = bridge(BRIDGE_DATABASE_URL=url)
        c = chat(proc)
        conversation, client_id = "c" * 128, "m" * 128
        first = await c.post(conversation, "alice", "echo long-ids", client_msg_id=client_id)
        again = await c.post(conversation, "alice", "echo long-ids", client_msg_id=client_id)
        assert first == (202, {"accepted": True, "duplicate": False})
        assert again == (202, {"accepted": True, "duplicate": True})
        other = await c.post(conversation, "alice", "echo other", client_msg_id=client_id[:-1] + "n")
        assert other == (202, {"accepted": True, "duplicate": False})
        texts = await c.wait_for(conversation, finals(2))
        assert "long-ids" in texts[0] and "other" in texts[1]
        proc.stop()
