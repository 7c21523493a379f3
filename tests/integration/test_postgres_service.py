"""The whole service on PostgreSQL (the multi-replica store), against the real server on 127.0.0.1."""

from __future__ import annotations

import asyncio

import pytest

from tests.support.chat import final_texts, finals
from tests.support.databases import postgres_database

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
