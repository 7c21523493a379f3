"""The Feishu channel's edits, with the real lark-oapi client against the platform emulator on
127.0.0.1: a reply that outgrew its message keeps the first part there and follows in numbered
parts; a part the platform finds too large goes again as smaller parts, the edit included; and
through the delivery worker, a retried edit posts no part twice and is never sent anew once the
message was edited."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from bridge.delivery.worker import DeliveryWorker
from bridge.metrics import Metrics
from bridge.store import migrate
from bridge.store import outbox as repo
from bridge.store.db import Database
from channels.base import ConversationKey, DeliveryError, Reply
from channels.feishu import render
from channels.feishu.adapter import FeishuChannel, FeishuConfig
from channels.feishu.api import FeishuApi
from tests.support import feishu_emulator
from tests.support.feishu_emulator import FeishuEmulator, fresh_emulator

CONVERSATION = ConversationKey("feishu", "oc_chat1")
INTRO = "The intro, small enough for any card. " * 50
CODE = "```\n" + "\n".join(f"line {n:05d} " + "x" * 60 for n in range(330)) + "\n```"
TAIL = "The tail, after the code. " * 80
LONG = Reply(f"{INTRO}\n\n{CODE}\n\n{TAIL}", reply_to="om_user1")  # three cards: intro, code, tail


@pytest.fixture
def emulator() -> Iterator[FeishuEmulator]:
    with fresh_emulator() as emu:
        yield emu


@pytest.fixture
def channel(emulator: FeishuEmulator) -> FeishuChannel:
    channel = FeishuChannel(FeishuConfig(app_id=emulator.app_id, app_secret=emulator.app_secret,
                                         domain=emulator.url), lambda: None)
    channel._api = FeishuApi(app_id=emulator.app_id, app_secret=emulator.app_secret, domain=emulator.url)
    return channel


@pytest.fixture
async def db(tmp_path) -> AsyncIterator[Database]:
    database = Database(f"sqlite+aiosqlite:///{tmp_path / 'd.db'}")
    await migrate.upgrade(database.writer_engine)
    await database.start()
    yield database
    await database.close()


def _text(message: dict) -> str:
    card = json.loads(message["content"])
    return "\n".join(el["content"] for el in card["body"]["elements"] if el.get("tag") == "markdown")


def _label(message: dict) -> str:
    """The part's number as the card shows it ("2 / 3", "1.1 / 2")."""
    return _text(message).rsplit("*(", 1)[1].rstrip(")*")


def _whole(texts: list[str]) -> None:
    """Every line of the reply is there, once."""
    joined = "\n".join(texts)
    assert joined.count(INTRO.strip()) == 1 and joined.count(TAIL.strip()) == 1
    assert all(joined.count(f"line {n:05d} ") == 1 for n in range(330))


async def _progress_card(channel: FeishuChannel, emulator: FeishuEmulator) -> str:
    message_id = await channel.send(CONVERSATION, Reply("_working…_", reply_to="om_user1"), idempotency_key="p-1")
    assert [m["message_id"] for m in emulator.messages()] == [message_id]
    return message_id


async def test_an_edit_longer_than_one_card_keeps_part_one_and_posts_the_rest_once(emulator, channel):
    assert len(render.render(LONG)) == 3
    card = await _progress_card(channel, emulator)

    await channel.update(CONVERSATION, card, LONG)
    edited, *rest = emulator.messages()
    assert edited["message_id"] == card and len(edited["history"]) == 2
    assert _label(edited) == "1 / 3" and INTRO.strip() in _text(edited)
    assert [_label(m) for m in rest] == ["2 / 3", "3 / 3"]  # in order, after the edited message
    assert all(m["parent_id"] == "om_user1" for m in rest)  # where the reply's first part went
    _whole([_text(m) for m in (edited, *rest)])

    # the same edit again (the outbox retries it when its answer was lost): nothing posted twice
    await channel.update(CONVERSATION, card, LONG)
    assert [m["message_id"] for m in emulator.messages()] == [card, *(m["message_id"] for m in rest)]


async def test_an_edit_the_platform_finds_too_large_goes_as_smaller_parts(emulator, channel, monkeypatch):
    # the platform takes less than this bridge measured: 20 KiB a card instead of about 24
    monkeypatch.setitem(feishu_emulator.SIZE_LIMITS, "interactive", 20 * 1024)
    reply = Reply(f"{CODE}\n\n{TAIL}")
    assert len(render.render(reply)) == 2  # the code block, then the tail
    card = await _progress_card(channel, emulator)

    await channel.update(CONVERSATION, card, reply)
    edited, *rest = emulator.messages()
    assert edited["message_id"] == card and _label(edited) == "1.1 / 2"  # the 230025'd edit, made smaller
    assert [_label(m) for m in rest] == ["1.2 / 2", "2 / 2"]
    joined = "\n".join(_text(m) for m in (edited, *rest))
    assert all(joined.count(f"line {n:05d} ") == 1 for n in range(330)) and joined.count(TAIL.strip()) == 1
    patches = [r for r in emulator.requests() if r["method"] == "PATCH"]
    assert len(patches) == 2  # the part as rendered (refused), then its first smaller piece

    await channel.update(CONVERSATION, card, reply)
    assert len(emulator.messages()) == 3


class LostAnswers:
    """The API, except that the answers to the posts numbered in `lose` are lost on the way back
    (the platform posted them): the adapter sees a transient failure."""

    def __init__(self, api: FeishuApi, lose: set[int]) -> None:
        self.api, self.lose, self.posts = api, lose, 0

    def __getattr__(self, name: str):
        return getattr(self.api, name)

    async def send_card(self, **kw) -> str:
        message_id = await self.api.send_card(**kw)
        self.posts += 1
        if self.posts in self.lose:
            raise DeliveryError("send: ReadTimeout", transient=True)
        return message_id


async def _deliver(db: Database, channel: FeishuChannel, update: Reply, *, max_attempts: int = 5) -> None:
    """The progress card's send, then the edit to `update`, through the outbox and its worker."""
    worker = DeliveryWorker(db, {"feishu": channel}, Metrics(), max_attempts=max_attempts,
                            base_delay=0.01, max_delay=0.05)
    key = str(CONVERSATION)
    await db.execute(repo.send_ops(db.dialect, channel="feishu", conversation_key=key,
                                   payload=Reply("_working…_", reply_to="om_user1").to_payload(), ref="r1"))
    await db.execute(repo.update_ops(db.dialect, channel="feishu", conversation_key=key,
                                     payload=update.to_payload(), ref="r1"))
    await worker.start()
    try:
        worker.kick(key)
        assert await worker.flush(time.monotonic() + 20)
    finally:
        await worker.stop()


async def test_a_retried_edit_posts_no_part_twice(emulator, channel, db, monkeypatch):
    # the code block's card is refused (230025) and goes in two smaller parts; the answer to the
    # first of them is lost, so the worker tries the whole edit again
    monkeypatch.setitem(feishu_emulator.SIZE_LIMITS, "interactive", 20 * 1024)
    api = channel._api = LostAnswers(channel._api, lose={2})  # post 1 is the progress card
    await _deliver(db, channel, LONG)

    edited, *rest = emulator.messages()
    assert _label(edited) == "1 / 3" and INTRO.strip() in _text(edited)
    assert [_label(m) for m in rest] == ["2.1 / 3", "2.2 / 3", "3 / 3"]
    _whole([_text(m) for m in (edited, *rest)])
    assert api.posts > 4  # the lost answer's post went again, and the platform deduped it
    assert await db.read(repo.count_by_status) == {"delivered": 2}


async def test_a_part_refused_for_good_after_the_edit_never_sends_the_reply_anew(emulator, channel, db, monkeypatch):
    # 8 KiB a card: the intro fits, the code block not even in halves
    monkeypatch.setitem(feishu_emulator.SIZE_LIMITS, "interactive", 8 * 1024)
    await _deliver(db, channel, LONG, max_attempts=3)

    messages = emulator.messages()
    assert len(messages) == 1  # the edited card: neither its part nor another was posted again
    assert _label(messages[0]) == "1 / 3" and INTRO.strip() in _text(messages[0])
    dead = await db.read(repo.list_dead)
    assert [(d.op, d.attempts) for d in dead] == [("update", 3)]
    assert "230025" in dead[0].last_error and "edited" in dead[0].last_error
