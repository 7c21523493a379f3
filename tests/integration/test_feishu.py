"""The Feishu channel end to end: signed, encrypted events into the real service; the real
lark-oapi client out to a Feishu Open Platform emulator on 127.0.0.1 (its own thread)."""

from __future__ import annotations

import asyncio
import json
import re
import sqlite3
import time
import uuid
from pathlib import Path

import aiohttp
import pytest

from tests.support import feishu_payloads as fp
from tests.support.feishu_emulator import FeishuEmulator
from tests.support.service import BridgeProcess
from tests.support.waiting import wait_ready, wait_until

pytestmark = pytest.mark.feishu

TOKEN = "vt-test"
KEY = "ek-test"
BOT = "ou_bot"


@pytest.fixture
def emulator():
    emu = FeishuEmulator(app_id=f"cli_{uuid.uuid4().hex[:10]}", app_secret="secret", bot_open_id=BOT).start()
    emu.seed_user("ou_alice", "Alice")
    emu.seed_user("ou_bob", "Bob")
    yield emu
    emu.stop()


def feishu_env(emu: FeishuEmulator, **extra: str) -> dict[str, str]:
    return {"FEISHU_APP_ID": emu.app_id, "FEISHU_APP_SECRET": "secret", "FEISHU_VERIFICATION_TOKEN": TOKEN,
            "FEISHU_ENCRYPT_KEY": KEY, "FEISHU_DOMAIN": emu.url, "BRIDGE_DELIVERY_BASE_DELAY": "0.05",
            "BRIDGE_DELIVERY_MAX_DELAY": "1", **extra}


@pytest.fixture
def service(tmp_path, emulator):
    started: list[BridgeProcess] = []

    def _start(**extra: str) -> BridgeProcess:
        proc = BridgeProcess(tmp_path / f"data{len(started)}", env=feishu_env(emulator, **extra)).start()
        started.append(proc)
        # lark-oapi loads on a worker thread after start-up; Feishu is pointed at a ready service
        wait_ready(proc.url)
        return proc

    yield _start
    for proc in started:
        proc.kill()


async def post_event(proc: BridgeProcess, payload: dict, *, key: str = KEY, **kw) -> tuple[int, dict]:
    headers, body = fp.webhook_request(payload, encrypt_key=key, **kw)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{proc.url}/feishu/events", data=body, headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)


def bot_messages(emu: FeishuEmulator) -> list[dict]:
    return [m for m in emu.messages() if not m.get("deleted")]


def card_text(message: dict) -> str:
    card = json.loads(message["content"])
    parts = []
    for el in card.get("body", {}).get("elements", []):
        if el.get("tag") == "markdown":
            parts.append(el["content"])
    return "\n".join(parts)



def replies_with(emu: FeishuEmulator, *words: str) -> list[dict]:
    return [m for m in bot_messages(emu) if all(w in card_text(m) for w in words)]


def inbox_count(proc: BridgeProcess) -> int:
    with sqlite3.connect(proc.data_dir / "bridge.db") as db:
        return db.execute("SELECT count(*) FROM inbound_events").fetchone()[0]


async def test_url_verification_answers_the_challenge(service):
    proc = service()
    status, body = await post_event(proc, fp.url_verification(token=TOKEN, challenge="c-123"), key="")
    assert (status, body) == (200, {"challenge": "c-123"})
    # encrypted, as Feishu sends it when an encrypt key is configured
    status, body = await post_event(proc, fp.url_verification(token=TOKEN, challenge="c-456"))
    assert (status, body) == (200, {"challenge": "c-456"})
    status, _ = await post_event(proc, fp.url_verification(token="wrong", challenge="c"), key="")
    assert status == 401


async def test_a_direct_message_gets_a_reply_to_it(service, emulator):
    proc = service()
    event = fp.message_event(token=TOKEN, text="echo hello-feishu", chat_type="p2p", chat_id="oc_dm1")
    started = time.monotonic()
    status, body = await post_event(proc, event)
    assert status == 200 and time.monotonic() - started < 3.0
    replies = await wait_until(lambda: replies_with(emulator, "hello-feishu", "exit 0"), what="the reply")
    reply = replies[0]
    assert reply["parent_id"] == event["event"]["message"]["message_id"]  # a reply to the person's message
    assert reply["msg_type"] == "interactive"
    # "OnIt" while the turn ran, replaced by "DONE" once it was answered
    message_id = event["event"]["message"]["message_id"]
    await wait_until(lambda: any(r["emoji_type"] == "DONE" for r in emulator.reactions()), what="the DONE reaction")
    marks = sorted((r["emoji_type"], r["deleted"]) for r in emulator.reactions() if r["message_id"] == message_id)
    assert marks == [("DONE", False), ("OnIt", True)]
    with sqlite3.connect(proc.data_dir / "bridge.db") as db:
        payload = json.loads(db.execute("SELECT payload FROM inbound_events").fetchone()[0])
    # an empty message: stored, nothing to run or answer, so no "working on it" reaction
    empty = fp.message_event(token=TOKEN, text="", chat_type="p2p", chat_id="oc_dm1")
    assert (await post_event(proc, empty))[0] == 200
    await asyncio.sleep(0.5)
    with sqlite3.connect(proc.data_dir / "bridge.db") as db:
        assert db.execute("SELECT count(*) FROM inbound_events").fetchone()[0] == 2
        assert db.execute("SELECT status FROM inbound_events ORDER BY id DESC").fetchone()[0] == "skipped"
    assert [r for r in emulator.reactions() if r["message_id"] == empty["event"]["message"]["message_id"]] == []
    # the conversation goes on as usual after it
    after = fp.message_event(token=TOKEN, text="echo after-empty", chat_type="p2p", chat_id="oc_dm1")
    assert (await post_event(proc, after))[0] == 200
    await wait_until(lambda: replies_with(emulator, "after-empty", "exit 0"), what="the reply after the empty one")
    assert payload["sender"]["name"] == "Alice"


async def test_group_messages_need_a_mention(service, emulator):
    proc = service()
    quiet = fp.message_event(token=TOKEN, text="echo not-for-the-bot", chat_type="group", chat_id="oc_g1")
    assert (await post_event(proc, quiet))[0] == 200
    mention = fp.message_event(token=TOKEN, text="@_user_1 echo for-the-bot", chat_type="group", chat_id="oc_g1",
                               mentions=[fp.mention("@_user_1", BOT, "Bridge Bot")])
    assert (await post_event(proc, mention))[0] == 200
    await wait_until(lambda: replies_with(emulator, "for-the-bot"), what="the reply to the mention")
    assert not replies_with(emulator, "not-for-the-bot")
    assert inbox_count(proc) == 1
    with sqlite3.connect(proc.data_dir / "bridge.db") as db:
        text = json.loads(db.execute("SELECT payload FROM inbound_events").fetchone()[0])["text"]
    assert text == "echo for-the-bot"  # the bot's own mention is stripped


async def test_a_threaded_group_message_is_answered_in_its_thread(service, emulator):
    proc = service(FEISHU_CONVERSATION_SCOPE="thread")
    root = fp.message_event(token=TOKEN, text="@_user_1 echo in-topic", chat_type="group", chat_id="oc_topic",
                            mentions=[fp.mention("@_user_1", BOT, "Bridge Bot")], thread_id="omt_t1")
    root_id = root["event"]["message"]["message_id"]
    await post_event(proc, root)
    reply = (await wait_until(lambda: replies_with(emulator, "in-topic"), what="the reply"))[0]
    assert reply["thread_id"] and reply["parent_id"] == root_id


async def test_a_post_with_code_and_an_image_is_normalized(service, emulator):
    proc = service()
    message_id = f"om_{uuid.uuid4().hex[:12]}"
    emulator.seed_resource(message_id, "img_v3_k1", b"\x89PNG fake image", content_type="image/png", filename="k1.png")
    content = {"title": "Report", "content": [
        [{"tag": "text", "text": "Look at ", "style": []}, {"tag": "text", "text": "this", "style": ["bold"]},
         {"tag": "a", "text": "doc", "href": "https://example.com/doc"}],
        [{"tag": "code_block", "language": "PYTHON", "text": "print('hi')\n"}],
        [{"tag": "img", "image_key": "img_v3_k1"}],
    ]}
    event = fp.message_event(token=TOKEN, content=content, message_type="post", message_id=message_id)
    assert (await post_event(proc, event))[0] == 200
    with sqlite3.connect(proc.data_dir / "bridge.db") as db:
        payload = json.loads(db.execute("SELECT payload FROM inbound_events").fetchone()[0])
    assert payload["text"].startswith("**Report**\nLook at **this**[doc](https://example.com/doc)")
    assert "```python\nprint('hi')\n```" in payload["text"]
    [attachment] = payload["attachments"]
    assert Path(attachment["path"]).read_bytes() == b"\x89PNG fake image"


async def test_a_file_alone_is_answered_never_dropped(service, emulator):
    """The shell runtime takes text only: an image alone gets a note with where it was saved; a
    file that could not be downloaded gets a note saying so. Neither becomes a shell command."""
    proc = service()
    image_id = f"om_{uuid.uuid4().hex[:12]}"
    emulator.seed_resource(image_id, "img_v3_k2", b"\x89PNG image alone", content_type="image/png",
                           filename="k2.png")
    image = fp.message_event(token=TOKEN, content={"image_key": "img_v3_k2"}, message_type="image",
                             message_id=image_id, chat_id="oc_files")
    assert (await post_event(proc, image))[0] == 200
    note = (await wait_until(lambda: replies_with(emulator, "takes text only"), what="the note on the image"))[0]
    assert note["parent_id"] == image_id
    saved = Path(card_text(note).split("`")[1])
    assert saved.read_bytes() == b"\x89PNG image alone"
    # not seeded in the emulator: the download fails
    lost = fp.message_event(token=TOKEN, content={"file_key": "file_v3_gone", "file_name": "plan.pdf"},
                            message_type="file", chat_id="oc_files")
    assert (await post_event(proc, lost))[0] == 200
    await wait_until(lambda: replies_with(emulator, "could not download", "plan.pdf"), what="the note on the file")
    with sqlite3.connect(proc.data_dir / "bridge.db") as db:
        assert db.execute("SELECT count(*) FROM turns").fetchone()[0] == 0
        assert {s for (s,) in db.execute("SELECT status FROM inbound_events")} == {"skipped"}


async def test_redeliveries_and_a_resend_under_a_new_event_id_give_one_reply(service, emulator):
    proc = service()
    event = fp.message_event(token=TOKEN, text="echo once-only", chat_id="oc_dup")
    results = await asyncio.gather(*(post_event(proc, event) for _ in range(3)))
    assert [s for s, _ in results] == [200, 200, 200]
    again = json.loads(json.dumps(event))
    again["header"]["event_id"] = uuid.uuid4().hex  # a reconnect backfill: same message, new event id
    assert (await post_event(proc, again))[0] == 200
    await wait_until(lambda: replies_with(emulator, "once-only", "exit 0"), what="the reply")
    await asyncio.sleep(1.0)
    assert len(replies_with(emulator, "once-only")) == 1
    assert inbox_count(proc) == 1


async def test_forged_or_stale_requests_are_refused_and_nothing_is_stored(service, emulator):
    proc = service()
    event = fp.message_event(token=TOKEN, text="echo forged")
    headers, body = fp.webhook_request(event, encrypt_key=KEY)
    async with aiohttp.ClientSession() as http:
        bad = dict(headers, **{"X-Lark-Signature": "0" * 64})
        async with http.post(f"{proc.url}/feishu/events", data=body, headers=bad) as resp:
            assert resp.status == 401
        async with http.post(f"{proc.url}/feishu/events", data=b"{not json", headers=headers) as resp:
            assert resp.status == 400
        odd = dict(headers, **{"X-Lark-Signature": "é" * 64})  # not ASCII: still a 401, never a 500
        async with http.post(f"{proc.url}/feishu/events", data=body, headers=odd) as resp:
            assert resp.status == 401
    status, _ = await post_event(proc, fp.message_event(token="wrong-token", text="echo x"))
    assert status == 401
    status, _ = await post_event(proc, fp.message_event(token=TOKEN, text="echo old"),
                                 timestamp=int(time.time()) - 3600)
    assert status == 401
    assert inbox_count(proc) == 0
    assert bot_messages(emulator) == []


async def test_an_old_message_is_not_run_and_the_person_is_told(service, emulator):
    proc = service()
    event = fp.message_event(token=TOKEN, text="touch late.txt", create_time_ms=int((time.time() - 3600) * 1000))
    assert (await post_event(proc, event))[0] == 200
    note = (await wait_until(lambda: replies_with(emulator, "did not run it"), what="the note"))[0]
    assert note["parent_id"] == event["event"]["message"]["message_id"]
    assert not (proc.data_dir / "workspace" / "late.txt").exists()


def _buttons(message: dict) -> dict[str, dict]:
    card = json.loads(message["content"])
    out = {}
    for el in card["body"]["elements"]:
        if el.get("tag") == "button":
            value = el["behaviors"][0]["value"]
            out[value["action_id"]] = value
    return out


async def _click(proc, card_message: dict, action: str, operator: str = "ou_alice", chat_id: str = "oc_chat1",
                 event_id: str | None = None):
    value = _buttons(card_message)[action]
    event = fp.card_action_event(token=TOKEN, value=value, operator_open_id=operator,
                                 message_id=card_message["message_id"], chat_id=chat_id, event_id=event_id)
    return await post_event(proc, event)


def approval_cards(emu: FeishuEmulator) -> list[dict]:
    return [m for m in bot_messages(emu) if "header" in json.loads(m["content"])]


async def test_approval_card_approve_and_deny(service, emulator):
    proc = service()
    await post_event(proc, fp.message_event(token=TOKEN, text="touch approved.txt"))
    card = (await wait_until(lambda: approval_cards(emulator), what="the approval card"))[0]
    assert set(_buttons(card)) == {"approve", "approve_session", "deny", "stop"}
    status, body = await _click(proc, card, "approve", operator="ou_bob")  # not the requester
    assert status == 200 and body["toast"]["type"] == "error"
    status, body = await _click(proc, card, "approve", event_id="ev-approve-1")
    assert status == 200 and body["toast"]["type"] == "success"
    assert body["card"]["type"] == "raw" and '"button"' not in json.dumps(body["card"]["data"])
    again = await _click(proc, card, "approve", event_id="ev-approve-1")  # Feishu redelivers the same click
    assert again == (status, body)
    status, body = await _click(proc, card, "approve")  # a click of its own: the card is decided
    assert status == 200 and body["toast"]["type"] != "success"
    await wait_until(lambda: replies_with(emulator, "exit 0"), what="the command's reply")
    assert (proc.data_dir / "workspace" / "approved.txt").exists()
    assert len(emulator.message(card["message_id"])["history"]) >= 2  # the card was patched

    await post_event(proc, fp.message_event(token=TOKEN, text="touch denied.txt"))
    second = (await wait_until(lambda: [c for c in approval_cards(emulator) if c["message_id"] != card["message_id"]],
                               what="the second card"))[0]
    status, body = await _click(proc, second, "deny")
    assert status == 200 and body["toast"]["type"] == "success"
    await wait_until(lambda: replies_with(emulator, "Not run (denied)"), what="the denial")
    assert not (proc.data_dir / "workspace" / "denied.txt").exists()


async def test_the_working_mark_is_taken_off_after_a_restart(service, emulator):
    """The "OnIt" put on before a crash is found and taken off when the turn ends after it (the
    reaction's id was in the dead process's memory only)."""
    proc = service()
    event = fp.message_event(token=TOKEN, text="touch never.txt", chat_type="p2p", chat_id="oc_mark")
    message_id = event["event"]["message"]["message_id"]
    await post_event(proc, event)
    await wait_until(lambda: approval_cards(emulator), what="the approval card")
    await wait_until(lambda: [r for r in emulator.reactions() if r["message_id"] == message_id
                              and r["emoji_type"] == "OnIt" and not r["deleted"]], what="the OnIt mark")
    proc.kill()
    proc.start()
    await wait_until(lambda: replies_with(emulator, "Interrupted"), what="the interrupted turn's message")
    await wait_until(lambda: [r for r in emulator.reactions() if r["message_id"] == message_id
                              and r["emoji_type"] == "OnIt" and r["deleted"]], what="the OnIt mark taken off")
    marks = [(r["emoji_type"], r["deleted"]) for r in emulator.reactions() if r["message_id"] == message_id]
    assert marks == [("OnIt", True)]  # interrupted, not answered: no DONE


async def test_a_revoked_token_is_replaced_and_nothing_is_lost(service, emulator):
    proc = service()
    await post_event(proc, fp.message_event(token=TOKEN, text="echo before-revoke"))
    await wait_until(lambda: replies_with(emulator, "before-revoke", "exit 0"), what="the first reply")
    calls = emulator.token_calls
    emulator.revoke_tokens()
    await post_event(proc, fp.message_event(token=TOKEN, text="echo after-revoke"))
    await wait_until(lambda: replies_with(emulator, "after-revoke", "exit 0"), what="the reply after the revoke")
    assert emulator.token_calls > calls
    assert len(replies_with(emulator, "after-revoke")) == 1


async def test_a_rate_limit_storm_delivers_every_reply_once_in_order(service, emulator):
    proc = service()
    emulator.fault("POST", r"/open-apis/im/v1/messages.*", status=429, code=99991400, msg="rate limited",
                   headers={"x-ogw-ratelimit-limit": "50", "x-ogw-ratelimit-reset": "0.3"}, times=6)
    emulator.fault("PATCH", r"/open-apis/im/v1/messages/.*", status=400, code=230020, msg="too fast", times=3)
    emulator.fault("POST", r"/open-apis/im/v1/messages.*", status=502, raw_body="<html>Bad Gateway</html>", times=2)
    for n in range(8):
        await post_event(proc, fp.message_event(token=TOKEN, text=f"echo storm-{n}", chat_id="oc_storm"))
    await wait_until(lambda: all(replies_with(emulator, f"storm-{n}", "exit 0") for n in range(8)), timeout=60,
                     what="every reply")
    await asyncio.sleep(0.5)
    finals = [m for m in bot_messages(emulator) if "exit 0" in card_text(m)]
    numbers = [int(card_text(m).split("storm-")[1].split()[0].strip("`")) for m in finals]
    assert sorted(numbers) == list(range(8)) and len(numbers) == 8  # each once


async def test_a_long_reply_is_split_into_valid_cards(service, emulator):
    proc = service(BRIDGE_SHELL_OUTPUT_LIMIT="100000")
    await post_event(proc, fp.message_event(token=TOKEN, text="seq 1 9000", chat_id="oc_long"))
    card = (await wait_until(lambda: approval_cards(emulator), what="the approval card"))[0]
    assert (await _click(proc, card, "approve", chat_id="oc_long"))[0] == 200
    await wait_until(lambda: replies_with(emulator, "exit 0"), timeout=30, what="the last part")
    await asyncio.sleep(0.5)
    parts = [m for m in bot_messages(emulator) if m["message_id"] != card["message_id"]]
    assert len(parts) >= 2
    for part in parts:
        assert len(part["content"].encode()) <= 30 * 1024
    text = "\n".join(card_text(m) for m in parts)
    numbers = {int(tok) for tok in text.split() if tok.isdigit()}
    assert set(range(1, 9001)) <= numbers  # nothing dropped


async def test_the_long_connection_end_to_end(service, emulator):
    proc = service(FEISHU_CONNECTION="websocket")
    assert await asyncio.get_running_loop().run_in_executor(None, emulator.wait_ws, 1, 15.0)
    headers, body = fp.webhook_request(fp.message_event(token=TOKEN, text="echo forged"), encrypt_key=KEY)
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{proc.url}/feishu/events", data=body, headers=headers) as resp:
            assert resp.status == 404  # events come over the connection: no webhook to forge them on
    event = fp.message_event(token=TOKEN, text="echo over-websocket", chat_id="oc_ws")
    ack = await asyncio.get_running_loop().run_in_executor(None, emulator.push_ws, event)
    assert ack["acked"] and ack["code"] == 200
    await wait_until(lambda: replies_with(emulator, "over-websocket", "exit 0"), what="the reply")
    ready = json.loads(aiohttp_get(f"{proc.url}/readyz"))
    assert ready["checks"]["channel:feishu"]["long_connection"]["connected"]
    # the server drops the connection: the client reconnects and events flow again
    emulator.drop_ws()
    assert await asyncio.get_running_loop().run_in_executor(None, emulator.wait_ws, 2, 20.0)
    ack = await asyncio.get_running_loop().run_in_executor(
        None, emulator.push_ws, fp.message_event(token=TOKEN, text="echo after-drop", chat_id="oc_ws"))
    assert ack["acked"]
    await wait_until(lambda: replies_with(emulator, "after-drop", "exit 0"), what="the reply after the reconnect")


def aiohttp_get(url: str) -> str:
    import urllib.error
    import urllib.request

    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.read().decode()


def test_doctor_checks_the_credentials(tmp_path, emulator):
    import os
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "FEISHU_"))}
    env = {**base, "BRIDGE_DATA_DIR": str(tmp_path), **feishu_env(emulator)}
    ok = subprocess.run([sys.executable, "-m", "bridge", "doctor"], env=env, cwd=tmp_path, capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "channel:feishu" in ok.stdout and BOT in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "bridge", "doctor"], env={**env, "FEISHU_APP_SECRET": "wrong"},
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "channel:feishu" in bad.stdout


async def test_group_mentions_wait_while_the_bots_identity_is_unknown(tmp_path, emulator):
    """Feishu's API fails the bot's identity at start: a group @mention cannot be told from any
    other message, so it is answered 503 (Feishu sends it again) rather than dropped as "not for
    the bot"; the identity is read again in the background, and the mention then gets its turn."""
    emulator.fault("GET", "/open-apis/bot/v3/info", status=502, raw_body="<html>bad gateway</html>", times=2)
    proc = BridgeProcess(tmp_path / "data", env=feishu_env(emulator)).start()
    try:
        statuses = []
        async with asyncio.timeout(30):
            while not statuses or statuses[-1] == 503:
                event = fp.message_event(token=TOKEN, text="@_user_1 echo once-known", chat_type="group",
                                         chat_id="oc_g9", mentions=[fp.mention("@_user_1", BOT, "Bridge Bot")])
                statuses.append((await post_event(proc, event))[0])
                await asyncio.sleep(0.3)
        assert statuses[0] == 503 and statuses[-1] == 200, statuses
        await wait_until(lambda: replies_with(emulator, "once-known"), what="the reply to the mention")
        assert inbox_count(proc) == 1
    finally:
        proc.stop()


async def test_help_card_buttons_act_in_the_conversation_they_came_from_each_click_once(service, emulator):
    """A group scoped per person: the help card's buttons act in the clicker's conversation, not
    the chat's; two clicks on Status are two commands, a redelivered click one."""
    proc = service(FEISHU_CONVERSATION_SCOPE="user")
    mention = [fp.mention("@_user_1", BOT, "Bridge Bot")]
    await post_event(proc, fp.message_event(token=TOKEN, text="@_user_1 /help", chat_type="group", chat_id="oc_gu",
                                             mentions=mention))
    card = (await wait_until(lambda: [m for m in bot_messages(emulator) if "cmd:status" in m["content"]],
                             what="the help card"))[0]
    for event_id in ("ev-status-1", "ev-status-1", "ev-status-2"):
        status, body = await _click(proc, card, "cmd:status", chat_id="oc_gu", event_id=event_id)
        assert status == 200 and body["toast"]["type"] == "success"
    with sqlite3.connect(proc.data_dir / "bridge.db") as db:
        keys = [key for (key,) in db.execute("SELECT conversation_key FROM inbound_events ORDER BY id")]
    assert keys == ["feishu:oc_gu:u-ou_alice"] * 3  # /help, then two clicks


async def test_a_long_reply_edited_into_its_progress_card_stays_with_its_message(service, emulator, tmp_path):
    """A turn that streamed progress ends with a reply longer than one card: its card is edited
    to the first part and the other parts follow as replies to the same message, even when a
    newer message of the conversation came in meanwhile."""
    rules = tmp_path / "rules.yaml"
    rules.write_text("version: 1\npreset: default\nrules:\n"
                     '  - {name: slow, action: allow, command: ["seq *", "sleep *"]}\n')
    proc = service(BRIDGE_SHELL_OUTPUT_LIMIT="100000", BRIDGE_APPROVAL_RULES=str(rules))
    first = fp.message_event(token=TOKEN, text="seq 1 3; sleep 2; seq 100000 112000", chat_type="p2p",
                             chat_id="oc_long")
    assert (await post_event(proc, first))[0] == 200
    await wait_until(lambda: replies_with(emulator, "running"), what="the progress card")
    later = fp.message_event(token=TOKEN, text="echo later-one", chat_type="p2p", chat_id="oc_long")
    assert (await post_event(proc, later))[0] == 200
    await wait_until(lambda: replies_with(emulator, "later-one", "exit 0"), timeout=30, what="the later reply")
    parts = [m for m in bot_messages(emulator) if re.search(r"\*\(\d+ / \d+\)\*", card_text(m))]
    first_id = first["event"]["message"]["message_id"]
    assert len(parts) >= 3, [card_text(m)[-40:] for m in parts]
    assert {m["parent_id"] for m in parts} == {first_id}, [(m["parent_id"], card_text(m)[-12:]) for m in parts]
    numbers = {int(tok) for m in parts for tok in card_text(m).split() if tok.isdigit()}
    assert set(range(100000, 112001)) <= numbers
