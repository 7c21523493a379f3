"""Conversation leases (several replicas' ownership) in process, on a real SQLite store: a
takeover the store failed is tried again rather than forgotten behind a held lease."""

from __future__ import annotations

import asyncio

from bridge.pipeline.dispatcher import Dispatcher, Job
from bridge.pipeline.ownership import Ownership
from bridge.store import migrate
from bridge.store.db import Database


async def test_a_takeover_that_failed_is_tried_again(tmp_path):
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'o.db'}")
    await migrate.upgrade(db.writer_engine)
    await db.start()
    calls: list[str] = []

    async def take_over(key: str, mine: set[int]) -> int:
        calls.append(key)
        if len(calls) == 1:
            raise ConnectionError("the store went away mid-takeover")
        return 1

    async def nothing(*_args) -> None:
        return None

    dispatcher = Dispatcher(process=nothing, control=nothing, notify_queued=nothing)
    ownership = Ownership(db, dispatcher, owner="replica-a", take_over=take_over, ttl=1.5, sweep=0.05)
    await ownership.start()
    try:
        ownership.submit(Job(1, "webchat:c1", "echo hi"))
        async with asyncio.timeout(5):
            while len(calls) < 2:
                await asyncio.sleep(0.02)
        assert calls == ["webchat:c1", "webchat:c1"] and ownership.taken_over == 1
        assert "webchat:c1" in ownership.held
        await asyncio.sleep(1.0)  # a renewal later: taken over once, not again
        assert len(calls) == 2
    finally:
        await ownership.close()
        await dispatcher.close(timeout=1)
        await db.close()
