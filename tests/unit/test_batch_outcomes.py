"""Requests that arrive together (an edge worker's read, a platform's burst) are kept in one
write; one of them that cannot be kept fails alone, and every other one is kept, dispatched and
acknowledged. In process, on a real SQLite store."""

from __future__ import annotations

import json
from pathlib import Path

from bridge.metrics import Metrics
from bridge.pipeline.ingest import Ingestor
from bridge.store import migrate
from bridge.store.schema import inbound_events
from bridge.store.db import Database
from channels.base import ConversationKey, Forward, InboundMessage, Record, Sender
from channels.files import FileKeeper
from channels.slack.adapter import SlackChannel, SlackConfig
from channels.webchat.adapter import WebChatChannel
from channels.webchat.checks import MESSAGES
from channels.webchat.uploads import Uploads


class Collected:
    """The dispatcher's entry: what the ingest hands on to run."""

    def __init__(self) -> None:
        self.jobs = []

    def submit(self, job) -> None:
        self.jobs.append(job)


async def _store(tmp_path: Path) -> Database:
    db = Database(f"sqlite+aiosqlite:///{tmp_path / 'b.db'}")
    await migrate.upgrade(db.writer_engine)
    await db.start()
    return db


def _message(n: int) -> InboundMessage:
    return InboundMessage(conversation=ConversationKey("webchat", f"c{n}"), sender=Sender("alice", "alice"),
                          text=f"echo {n}", event_key=f"webchat:c{n}/{n}")


async def _refusing_bad(conn, items):
    """A channel's record write that cannot take one of its items."""
    if "bad" in items:
        raise RuntimeError("this record cannot be written")
    return [f"kept {item}" for item in items]


async def _event_keys(db: Database) -> list[str]:
    async def read(conn):
        return [row.event_key for row in (await conn.execute(inbound_events.select())).all()]

    return sorted(await db.read(read))


async def test_one_event_that_cannot_be_kept_fails_alone(tmp_path):
    db = await _store(tmp_path)
    try:
        dispatched = Collected()
        ingest = Ingestor(db, dispatched, None, None, Metrics())  # type: ignore[arg-type]
        results = await ingest.accept_many([(_message(n), Record(_refusing_bad, "bad" if n == 1 else f"r{n}"))
                                            for n in range(3)])
        assert [r.error is None for r in results] == [True, False, True]
        assert isinstance(results[1].error, RuntimeError) and results[1].event_id is None
        assert [r.record for r in results] == ["kept r0", None, "kept r2"]
        # the other two are kept and run; nothing of the failed one is kept (it is to be resent)
        assert [job.text for job in dispatched.jobs] == ["echo 0", "echo 2"]
        assert await _event_keys(db) == ["webchat:c0/0", "webchat:c2/2"]
        # sent again once what failed is gone, it is new, not a duplicate
        again = await ingest.accept_many([(_message(1), None)])
        assert again[0].error is None and not again[0].duplicate
        assert [job.text for job in dispatched.jobs] == ["echo 0", "echo 2", "echo 1"]
    finally:
        await db.close()


async def test_web_chat_answers_each_posted_message_of_a_batch_on_its_own(tmp_path, monkeypatch):
    db = await _store(tmp_path)
    try:
        dispatched = Collected()
        ingest = Ingestor(db, dispatched, None, None, Metrics())  # type: ignore[arg-type]
        uploads = Uploads(FileKeeper(tmp_path / "files"))
        channel = WebChatChannel(db, uploads)
        await channel.start(ingest)
        found = uploads.find

        async def find(conversation_id, file_id):
            if conversation_id == "c-disk":
                raise OSError(5, "Input/output error")  # the uploads' disk failing for this one
            return await found(conversation_id, file_id)

        monkeypatch.setattr(uploads, "find", find)

        def post(conversation_id: str, **extra) -> Forward:
            body = json.dumps({"conversation_id": conversation_id, "user_id": "alice", "text": "echo hi",
                               "client_msg_id": f"m-{conversation_id}", **extra}).encode()
            verdict = MESSAGES.check(body, {"Content-Type": "application/json"})
            assert isinstance(verdict, Forward)
            return verdict

        answers = await channel.post_messages([
            post("c-a"), post("c-disk", file_ids=["f" * 32]), post("c-b", file_ids=["0" * 32]), post("c-c"),
        ])
        assert [a.status for a in answers] == [202, 500, 400, 202]
        assert json.loads(answers[1].body) == {"error": "internal error"}
        assert "no file" in json.loads(answers[2].body)["error"]
        assert sorted(job.text for job in dispatched.jobs) == ["echo hi", "echo hi"]
        assert await _event_keys(db) == ["webchat:c-a/m-c-a", "webchat:c-c/m-c-c"]
        await channel.stop()
    finally:
        await db.close()


async def test_slack_events_of_one_batch_are_answered_each_on_its_own(tmp_path):
    db = await _store(tmp_path)
    try:
        dispatched = Collected()
        channel = SlackChannel(SlackConfig(bot_token="xoxb-test", reactions=False), FileKeeper(tmp_path / "files"))
        channel.bot_user_id, channel.bot_id = "UBOT", "BBOT"
        channel._ingest = Ingestor(db, dispatched, None, None, Metrics())  # type: ignore[arg-type]

        def event(n: int, **extra) -> dict:
            return {"type": "event_callback", "event_id": f"Ev{n}", "team_id": "T1", "event": {
                "type": "message", "channel": "D1", "channel_type": "im", "user": "U1", "text": f"echo {n}",
                "ts": f"1700000000.00000{n}", **extra}}

        broken = event(1)
        broken["event"]["files"] = "not a list of files"  # a payload this bridge cannot read
        answers = await channel.accept_events([Forward(json.dumps(p).encode()) for p in (event(0), broken, event(2))])
        assert [a.status for a in answers] == [200, 500, 200]
        assert [job.text for job in dispatched.jobs] == ["echo 0", "echo 2"]
        # one alone still raises, so Socket Mode does not acknowledge it (Slack sends it again)
        try:
            await channel.handle_event(broken)
        except Exception:  # noqa: BLE001
            pass
        else:
            raise AssertionError("an event that could not be taken was answered as taken")
    finally:
        await db.close()
