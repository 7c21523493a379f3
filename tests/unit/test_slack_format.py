"""Slack's formats: which events are acted on, text cleaning, markdown and mrkdwn rendering."""

from __future__ import annotations

import json

from slack_sdk.models.blocks import Block

from channels.base import Button, Card, Reply
from channels.slack import normalize, render
from tests.support import slack_payloads as sp

BOT = "UBOT"


def acted(event, trigger="mention"):
    return normalize.acted_on(event, bot_user_id=BOT, bot_id="B1", policy=normalize.ChannelPolicy(trigger=trigger))


def test_which_events_are_acted_on():
    assert acted(sp.message_event(text="hi", channel="D1", channel_type="im")) is None
    assert acted(sp.message_event(text="hi", channel="G1", channel_type="mpim")) is None
    assert acted(sp.app_mention_event(text=f"<@{BOT}> hi", channel="C1")) is None
    assert acted(sp.message_event(text=f"<@{BOT}> hi", channel="C1", channel_type="channel")) is not None
    assert acted(sp.message_event(text="hi", channel="C1", channel_type="channel"), trigger="all") is None
    assert "own" in acted(sp.message_event(text="x", channel="D1", channel_type="im", user=BOT, bot_id="B1"))
    assert "bot" in acted(sp.message_event(text="x", channel="D1", channel_type="im", bot_id="B9",
                                           subtype="bot_message"))
    assert "subtype" in acted(sp.message_event(text="x", channel="D1", channel_type="im", subtype="message_changed"))
    assert acted(sp.message_event(text="x", channel="D1", channel_type="im", subtype="file_share")) is None


def test_conversation_keys_follow_the_scope():
    root = sp.next_ts()
    reply = sp.event_callback(sp.app_mention_event(text="x", channel="C1", thread_ts=root))
    assert normalize.parse(reply, policy=normalize.ChannelPolicy(scope="thread")).thread_key == root
    assert normalize.parse(reply, policy=normalize.ChannelPolicy(scope="chat")).thread_key is None
    assert normalize.parse(reply, policy=normalize.ChannelPolicy(scope="user")).thread_key == "u-UALICE"
    dm = normalize.parse(sp.event_callback(sp.message_event(text="x", channel="D1", channel_type="im")),
                         policy=normalize.ChannelPolicy())
    assert dm.thread_key is None and dm.reply_root is None and not dm.is_group


def test_text_is_cleaned_of_the_bots_mention_and_slack_escapes():
    text = f"<@{BOT}> ask <@U123> about <https://x.io/a?b=1&amp;c=2|the doc> &lt;now&gt;"
    assert normalize.clean_text(text, bot_user_id=BOT, names={"U123": "Tom"}) == \
        "ask @Tom about [the doc](https://x.io/a?b=1&c=2) <now>"


def test_markdown_to_mrkdwn():
    md = "# Title\nSome **bold**, *italic*, ~~gone~~ and `a < b` and [link](https://e.com/?a=1&b=2).\n" \
         "- one\n| a | b |\n|---|---|\n| 1 | 22 |\n```python\nx = 1 < 2\n```\n1 < 2 & <@U1>"
    out = render.to_mrkdwn(md)
    assert "*Title*" in out and "*bold*" in out and "_italic_" in out and "~gone~" in out
    assert "`a < b`" in out  # code is left alone
    assert "<https://e.com/?a=1&b=2|link>" in out
    assert "• one" in out
    assert "```\na  b\n1  22\n```" in out
    assert "```\nx = 1 < 2\n```" in out
    assert "1 &lt; 2 &amp; <@U1>" in out


def test_a_long_reply_is_split_under_the_markdown_limit_with_code_kept_whole():
    text = "\n\n".join(f"Paragraph {n} " + "word " * 200 for n in range(30))
    text += "\n\n```\n" + "\n".join(f"line {n}" for n in range(3000)) + "\n```"
    messages = render.render(Reply(text=text))
    assert len(messages) > 2
    seen = ""
    for message in messages:
        [block] = message["blocks"]
        assert block["type"] == "markdown" and len(block["text"]) <= 12_000
        assert block["text"].count("```") % 2 == 0
        assert message["text"] and len(message["text"]) <= 301
        seen += block["text"]
    assert all(f"Paragraph {n} " in seen for n in range(30)) and all(f"line {n}\n" in seen for n in range(2999))


def test_the_mrkdwn_fallback_keeps_sections_and_blocks_within_limits():
    messages = render.render(Reply(text="x " * 100_000), fmt="mrkdwn")
    for message in messages:
        assert len(message["blocks"]) <= 50
        for block in message["blocks"]:
            Block.parse(block).to_dict()  # slack_sdk validates recursively here
            if block["type"] == "section":
                assert len(block["text"]["text"]) <= 3000


def test_an_approval_card_is_valid_block_kit():
    card = Card(kind="approval", title="Waiting for approval: Run `rm x`", body="```\nrm x\n```\nReason: tidy",
                status="pending", actions=(Button("approve", "Approve", "primary", {"approval_id": "a1"}),
                                           Button("approve_session", "Approve for session", "default",
                                                  {"approval_id": "a1"}),
                                           Button("deny", "Deny", "danger", {"approval_id": "a1"})))
    [message] = render.render(Reply(card=card))
    for block in message["blocks"]:
        Block.parse(block).to_dict()
    actions = message["blocks"][-1]["elements"]
    assert [json.loads(a["value"]) for a in actions][0] == {"action_id": "approve", "approval_id": "a1"}
    assert [a.get("style") for a in actions] == ["primary", None, "danger"]


def test_a_card_with_a_long_request_keeps_every_section_within_slacks_limit():
    """A command of 3.4k characters and a long title: each section under 3,000 characters (one
    over it gets the whole message refused, buttons and all), the code fence closed."""
    title = "Waiting for approval: Run `" + "t" * 300 + "`"
    body = "```\ncat <<'EOF' > big.txt\n" + "x" * 3400 + "\nEOF\n```\nin `/srv/ws`"
    card = Card(kind="approval", title=title, body=body, status="pending",
                actions=(Button("approve", "Approve", "primary", {"approval_id": "a1"}),))
    [message] = render.render(Reply(card=card))
    sections = [b["text"]["text"] for b in message["blocks"] if b["type"] == "section"]
    assert all(len(text) <= 3000 for text in sections)
    assert sections[-1].count("```") % 2 == 0 and "cut to fit" in sections[-1]
    assert message["blocks"][-1]["type"] == "actions"
