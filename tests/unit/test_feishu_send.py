"""The Feishu channel's sends, with the real lark-oapi client against the platform emulator on
127.0.0.1: a long reply's part the platform finds too large goes again as smaller parts, and no
part is posted twice, neither then nor when the send is retried."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from channels.base import ConversationKey, Reply
from channels.feishu import render
from channels.feishu.adapter import FeishuChannel, FeishuConfig
from channels.feishu.api import FeishuApi
from tests.support import feishu_emulator
from tests.support.feishu_emulator import FeishuEmulator, fresh_emulator


@pytest.fixture
def emulator() -> Iterator[FeishuEmulator]:
    with fresh_emulator() as emu:
        yield emu


def _texts(emu: FeishuEmulator) -> list[str]:
    texts = []
    for message in emu.messages():
        card = json.loads(message["content"])
        texts.append("\n".join(el["content"] for el in card["body"]["elements"] if el.get("tag") == "markdown"))
    return texts


async def test_a_part_too_large_for_the_platform_goes_as_smaller_parts_and_none_twice(emulator, monkeypatch):
    # the platform takes less than this bridge measured: 20 KiB a card instead of about 24
    monkeypatch.setitem(feishu_emulator.SIZE_LIMITS, "interactive", 20 * 1024)
    channel = FeishuChannel(FeishuConfig(app_id=emulator.app_id, app_secret=emulator.app_secret,
                                         domain=emulator.url), lambda: None)
    channel._api = FeishuApi(app_id=emulator.app_id, app_secret=emulator.app_secret, domain=emulator.url)
    intro = "The intro, small enough for any card. " * 50
    code = "```\n" + "\n".join(f"line {n:05d} " + "x" * 60 for n in range(330)) + "\n```"
    reply = Reply(f"{intro}\n\n{code}\n\nThe end.")
    assert len(render.render(reply)) >= 2  # the intro alone, then the code block
    conversation = ConversationKey("feishu", "oc_chat1")

    first = await channel.send(conversation, reply, idempotency_key="reply-1")
    texts = _texts(emulator)
    assert first == emulator.messages()[0]["message_id"]
    assert sum(intro.strip() in t for t in texts) == 1  # the part already posted is not posted again
    assert len(texts) >= 3 and any("(2.1 / " in t for t in texts) and any("(2.2 / " in t for t in texts)
    assert all(f"line {n:05d}" in "".join(texts) for n in range(330))

    # the outbox retries the send (its result was lost): the platform dedupes every part's uuid
    assert await channel.send(conversation, reply, idempotency_key="reply-1") == first
    assert _texts(emulator) == texts
