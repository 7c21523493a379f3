"""Feishu's message formats: normalization of inbound content, cards out, and the crypto."""

from __future__ import annotations

import json

import pytest

from channels.base import Button, Card, Reply
from channels.feishu import crypto, normalize, render
from tests.support import feishu_payloads as fp

BOT = "ou_bot"


def parse(event, **policy):
    return normalize.parse(event, bot_open_id=BOT, policy_for=lambda _chat: normalize.ChatPolicy(**policy))


def test_text_mentions_resolve_to_names_and_the_bots_own_is_dropped():
    event = fp.message_event(token="t", text="@_user_1 ask @_user_2 and @_all", chat_type="group", mentions=[
        fp.mention("@_user_1", BOT, "Bot"), fp.mention("@_user_2", "ou_tom", "Tom")])
    parsed = parse(event)
    assert parsed.text == "ask @Tom and @all"
    assert parsed.mentions_bot and parsed.is_group and parsed.thread_key is None


def test_a_group_message_without_the_bot_is_not_a_mention():
    event = fp.message_event(token="t", text="@_user_1 hi", chat_type="group",
                             mentions=[fp.mention("@_user_1", "ou_tom", "Tom")])
    assert not parse(event).mentions_bot


def test_conversation_scope_per_thread_and_per_user():
    event = fp.message_event(token="t", text="x", chat_type="group", root_id="om_root", thread_id="omt_1",
                             sender_open_id="ou_ann")
    assert parse(event, scope="thread").thread_key == "om_root"
    assert parse(event, scope="user").thread_key == "u-ou_ann"
    first = fp.message_event(token="t", text="x", chat_type="group", message_id="om_first")
    assert parse(first, scope="thread").thread_key == "om_first"  # a new topic is named by its first message
    dm = fp.message_event(token="t", text="x", chat_type="p2p")
    assert parse(dm, scope="thread").thread_key is None


def test_a_post_becomes_markdown_with_its_files():
    content = {"zh_cn": {"title": "T", "content": [
        [{"tag": "text", "text": "bold", "style": ["bold"]}, {"tag": "text", "text": " and "},
         {"tag": "text", "text": "gone", "style": ["lineThrough"]}, {"tag": "at", "user_id": "@_user_1", "user_name": "Bot"}],
        [{"tag": "code_block", "language": "GO", "text": "fmt.Println(1)"}],
        [{"tag": "hr"}],
        [{"tag": "media", "file_key": "file_v3_1", "image_key": "img_1", "file_name": "clip.mp4"}],
    ]}}
    event = fp.message_event(token="t", content=content, message_type="post",
                             mentions=[fp.mention("@_user_1", BOT, "Bot")])
    parsed = parse(event)
    assert parsed.text == "**T**\n**bold** and ~~gone~~\n```go\nfmt.Println(1)\n```\n---\n[video]"
    assert [(f.key, f.kind, f.name) for f in parsed.files] == [("file_v3_1", "file", "clip.mp4")]


def test_other_message_types_say_what_they_are():
    for kind, content, expect in [("sticker", {"file_key": "s"}, "[sticker]"),
                                  ("merge_forward", {}, "[merge_forward message]")]:
        assert parse(fp.message_event(token="t", content=content, message_type=kind)).text == expect


def test_an_image_or_a_file_is_its_attachment_with_no_text():
    for kind, content, ref in [("image", {"image_key": "img_1"}, ("img_1", "image", "img_1.png")),
                               ("file", {"file_key": "f1", "file_name": "a.pdf"}, ("f1", "file", "a.pdf")),
                               ("audio", {"file_key": "f2"}, ("f2", "file", "f2"))]:
        parsed = parse(fp.message_event(token="t", content=content, message_type=kind))
        assert parsed.text == ""
        assert [(f.key, f.kind, f.name) for f in parsed.files] == [ref]


def test_missing_ids_are_not_a_message():
    with pytest.raises(normalize.NotAMessage):
        normalize.parse({"header": {}, "event": {"message": {}}}, bot_open_id=BOT,
                        policy_for=lambda _c: normalize.ChatPolicy())


def test_a_long_reply_splits_at_blocks_and_keeps_everything():
    paragraphs = [f"Paragraph {n}: " + "words " * 60 for n in range(60)]
    code = "```python\n" + "\n".join(f"print({n})" for n in range(2000)) + "\n```"
    text = "\n\n".join(paragraphs[:30] + [code] + paragraphs[30:])
    assert len(text.encode()) > 40_000
    cards = render.render(Reply(text=text))
    assert len(cards) > 1
    joined = []
    for n, card in enumerate(cards, start=1):
        assert len(render.card_json(card).encode()) <= render.CARD_LIMIT
        body, label = card["body"]["elements"]
        assert label["content"] == f"*({n} / {len(cards)})*"
        assert body["content"].count("```") % 2 == 0  # every part renders its code
        joined.append(body["content"])
    whole = "\n".join(joined)
    for n in range(60):
        assert f"Paragraph {n}:" in whole
    for n in range(2000):
        assert f"print({n})" in whole


def test_a_giant_line_is_cut_too():
    cards = render.render(Reply(text="x" * 100_000))
    assert sum(c["body"]["elements"][0]["content"].count("x") for c in cards) == 100_000
    assert all(len(render.card_json(c).encode()) <= render.CARD_LIMIT for c in cards)


def test_an_approval_card_has_callback_buttons_and_stays_one_card():
    card = Card(kind="approval", title="Waiting for approval", body="```\nrm x\n```\n" + "y" * 60_000,
                status="pending", actions=(Button("approve", "Approve", "primary", {"approval_id": "a1"}),
                                           Button("deny", "Deny", "danger", {"approval_id": "a1"})))
    [out] = render.render(Reply(card=card))
    assert out["schema"] == "2.0" and out["config"]["update_multi"] is True
    assert out["header"]["template"] == "orange"
    buttons = [e for e in out["body"]["elements"] if e["tag"] == "button"]
    assert [b["behaviors"][0]["value"] for b in buttons] == [
        {"action_id": "approve", "approval_id": "a1"}, {"action_id": "deny", "approval_id": "a1"}]
    assert len(render.card_json(out).encode()) <= render.CARD_LIMIT


def test_signature_and_decryption():
    body = json.dumps({"encrypt": fp.aes_encrypt("k", '{"a": 1}')}).encode()
    sig = fp.signature("1700000000", "n", "k", body)
    assert crypto.signature_ok("1700000000", "n", "k", body, sig)
    assert not crypto.signature_ok("1700000000", "n", "k", body + b" ", sig)
    assert not crypto.signature_ok("1700000000", "n", "other", body, sig)
    assert crypto.decrypt("k", fp.aes_encrypt("k", "héllo")) == "héllo"
    with pytest.raises(crypto.DecryptError):
        crypto.decrypt("wrong", fp.aes_encrypt("k", "hello"))
    with pytest.raises(crypto.DecryptError):
        crypto.decrypt("k", "not base64!")


def test_cbc_decryption_matches_the_librarys_cbc_mode():
    """The cached-ECB decryption is CBC: the same bytes as pycryptodome's own CBC mode, for
    random keys, IVs and lengths (one block up to 64)."""
    import os
    import random

    from Crypto.Cipher import AES

    rng = random.Random(7)
    for _ in range(200):
        key = f"key-{rng.random()}"
        iv = os.urandom(16)
        data = os.urandom(16 * rng.randint(1, 64))
        expected = AES.new(crypto.body_key(key), AES.MODE_CBC, iv).decrypt(data)
        assert crypto.cbc_decrypt(key, iv, data) == expected
