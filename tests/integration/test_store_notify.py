"""LISTEN / NOTIFY between replicas, on the real PostgreSQL server on 127.0.0.1: a notification
goes out only when its transaction commits; a listener whose connection is cut listens again and
says that it may have missed some (on_gap), so nothing written meanwhile goes unseen."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import create_async_engine

from bridge.store import notify
from bridge.store.notify import Listener, notify_statement
from tests.support.databases import postgres_database

pytestmark = pytest.mark.postgres

CHANNEL = "ab_test_channel"


async def _until(predicate, timeout: float = 10.0) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.02)


async def test_notifications_follow_commits_and_a_cut_connection_reports_its_gap(monkeypatch):
    monkeypatch.setattr(notify, "RETRY_FIRST", 1.5)  # a gap long enough to write into
    async with postgres_database() as url:
        got: list[str] = []
        gaps: list[float] = []
        listener = Listener(url, CHANNEL, on_notify=got.append, on_gap=lambda: gaps.append(1),
                            application_name="ab-notify-test")
        engine = create_async_engine(url)
        try:
            await listener.start()
            assert (await listener.health())["listening"] and gaps == [1]  # the first connection: look at everything

            async with engine.begin() as conn:  # committed: one notification per distinct payload
                await conn.execute(*notify_statement(CHANNEL, ["c-1", "c-2", "c-1"]))
            async with engine.connect() as conn:  # rolled back: none
                await conn.execute(*notify_statement(CHANNEL, ["c-rolled-back"]))
                await conn.rollback()
            await _until(lambda: len(got) >= 2)
            await asyncio.sleep(0.2)
            assert sorted(got) == ["c-1", "c-2"]

            admin = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
            try:
                cut = await admin.fetch("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                        "WHERE application_name = 'ab-notify-test'")
                assert [r[0] for r in cut] == [True]
                await _until(lambda: not listener.listening)
                await admin.execute(f"NOTIFY {CHANNEL}, 'c-while-cut'")  # nobody listens: lost
            finally:
                await admin.close()
            await _until(lambda: len(gaps) == 2)  # listening again, and it says it may have missed some
            health = await listener.health()
            assert health["listening"] and health["connects"] == 2 and "c-while-cut" not in got
            async with engine.begin() as conn:
                await conn.execute(*notify_statement(CHANNEL, ["c-3"]))
            await _until(lambda: "c-3" in got)

            # a loss after a good connection starts the backoff over (it does not go on doubling)
            admin = await asyncpg.connect(url.replace("postgresql+asyncpg://", "postgresql://"))
            try:
                await admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                                    "WHERE application_name = 'ab-notify-test'")
            finally:
                await admin.close()
            await _until(lambda: listener.retry_in is not None)
            assert listener.retry_in == notify.RETRY_FIRST
            await _until(lambda: len(gaps) == 3)
        finally:
            await listener.stop()
            await engine.dispose()
        assert not listener.listening
