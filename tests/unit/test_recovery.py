"""Recovery at start-up (one process), in process on a real SQLite store."""

from __future__ import annotations

import time

from bridge.pipeline.recovery import recover
from bridge.store import inbox, migrate
from bridge.store.db import Database


class Collected:
    """Where recovery hands the events it dispatches again (the dispatcher's entry)."""

    def __init__(self) -> None:
        self.jobs = []

    def submit(self, job) -> None:
        self.jobs.append(job)


async def test_a_backlog_larger_than_a_page_is_dispatched_again_whole_and_in_order(tmp_path):
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'r.db'}")
    await migrate.upgrade(db.writer_engine)
    await db.start()
    try:
        events = [inbox.NewEvent(channel="webchat", kind="message", event_key=f"webchat:c{i % 3}/{i}",
                                 message_key=None, conversation_key=f"webchat:c{i % 3}", sender_id="alice",
                                 payload={"text": f"echo {i}"}, received_at=time.time(),
                                 status="skipped" if i % 10 == 9 else "accepted")
                  for i in range(25)]
        ids = await db.write(lambda c: inbox.insert_many(c, events))
        dispatcher = Collected()
        result = await recover(db, None, None, dispatcher, page_size=4)  # type: ignore[arg-type]
        wanted = [event_id for event_id, event in zip(ids, events) if event.status == "accepted"]
        assert [job.event_id for job in dispatcher.jobs] == wanted and len(wanted) == 23
        assert [job.text for job in dispatcher.jobs[:2]] == ["echo 0", "echo 1"]
        assert result == {"interrupted_turns": 0, "redispatched_events": 23}
    finally:
        await db.close()
