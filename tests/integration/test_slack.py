"""The Slack channel end to end: signed events and interactions into the real service; the real
slack_sdk clients out to a Slack emulator on 127.0.0.1 (its own thread)."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path

import aiohttp
import pytest

from tests.support import slack_payloads as sp
from tests.support.service import BridgeProcess
from tests.support.waiting import wait_until
from tests.support.slack_emulator import SlackEmulator

pytestmark = pytest.mark.slack

SECRET = "signing-secret"
BOT = "UBOT"


@pytest.fixture
def emulator():
    emu = SlackEmulator(bot_token="xoxb-test", app_token="xapp-test", bot_user_id=BOT).start()
    emu.seed_user("UALICE", "alice", real_name="Alice")
    emu.seed_user("UBOB", "bob", real_name="Bob")
    yield emu
    emu.stop()


@pytest.fixture
def service(tmp_path, emulator):
    started: list[BridgeProcess] = []

    def _start(**extra: str) -> BridgeProcess:
        env = {"SLACK_BOT_TOKEN": "xoxb-test", "SLACK_SIGNING_SECRET": SECRET, "SLACK_API_URL": emulator.api_url,
               "BRIDGE_DELIVERY_BASE_DELAY": "0.05", "BRIDGE_DELIVERY_MAX_DELAY": "1",
               "HTTPS_PROXY": "", "HTTP_PROXY": "", **extra}
        proc = BridgeProcess(tmp_path / f"data{len(started)}", env=env).start()
        started.append(proc)
        return proc

    yield _start
    for proc in started:
        proc.kill()


async def post(proc, path: str, body: bytes, *, secret: str = SECRET, content_type="application/json",
               timestamp: int | None = None, extra: dict | None = None) -> tuple[int, dict]:
    headers = sp.signed_request(body, signing_secret=secret, timestamp=timestamp, content_type=content_type)
    headers.update(extra or {})
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{proc.url}{path}", data=body, headers=headers) as resp:
            return resp.status, await resp.json(content_type=None)


async def send_event(proc, event: dict, **kw) -> tuple[int, dict]:
    envelope = sp.event_callback(event, event_id=kw.pop("event_id", None))
    return await post(proc, "/slack/events", json.dumps(envelope).encode(), **kw)


def texts(message: dict) -> str:
    parts = [message.get("text") or ""]
    for block in message.get("blocks") or []:
        if block.get("type") == "markdown":
            parts.append(block.get("text", ""))
        elif block.get("type") == "section":
            parts.append((block.get("text") or {}).get("text", ""))
    return "\n".join(parts)


def replies_with(emu: SlackEmulator, *words: str) -> list[dict]:
    return [m for m in emu.messages() if not m.get("deleted") and all(w in texts(m) for w in words)]



def inbox_count(proc) -> int:
    with sqlite3.connect(proc.data_dir / "bridge.db") as db:
        return db.execute("SELECT count(*) FROM inbound_events").fetchone()[0]


async def test_url_verification_and_a_dm_reply(service, emulator):
    proc = service()
    status, body = await post(proc, "/slack/events", json.dumps(sp.url_verification("ch-1")).encode())
    assert (status, body) == (200, {"challenge": "ch-1"})
    started = time.monotonic()
    status, _ = await send_event(proc, sp.message_event(text="echo hello-slack", channel="D1", channel_type="im"))
    assert status == 200 and time.monotonic() - started < 3
    reply = (await wait_until(lambda: replies_with(emulator, "hello-slack", "exit 0"), what="the reply"))[0]
    assert reply["channel"] == "D1" and reply["thread_ts"] is None  # a DM is answered at the top level
    # "eyes" while the turn ran, replaced by a check mark once it was answered
    await wait_until(lambda: any(r["name"] == "white_check_mark" for r in emulator.reactions()), what="the check mark")
    assert sorted((r["name"], r["removed"]) for r in emulator.reactions()) == [("eyes", True), ("white_check_mark", False)]
    # only the bot's mention: stored, nothing to run or answer, so no "working on it" reaction
    ts = sp.next_ts()
    await send_event(proc, sp.message_event(text=f"<@{BOT}>", channel="D1", channel_type="im", ts=ts))
    await wait_until(lambda: inbox_count(proc) == 2, what="the bare mention stored")
    await asyncio.sleep(0.5)
    assert [r for r in emulator.reactions() if r["ts"] == ts] == []
    # a command answered without a turn is done too: its "eyes" make way for the check mark
    ts = sp.next_ts()
    await send_event(proc, sp.message_event(text="/help", channel="D1", channel_type="im", ts=ts))
    await wait_until(lambda: any(r["ts"] == ts and r["name"] == "white_check_mark" for r in emulator.reactions()),
                     what="the check mark on a command")
    assert sorted((r["name"], r["removed"]) for r in emulator.reactions() if r["ts"] == ts) == [
        ("eyes", True), ("white_check_mark", False)]


async def test_a_shared_file_is_downloaded_and_a_file_alone_is_answered(service, emulator):
    """The file is fetched with the bot token into the data dir; the shell runtime takes text only,
    so a file with no text gets a note with where it was saved, not a shell command."""
    proc = service()
    shared = emulator.seed_file("F7", "notes.txt", b"line one\n", "text/plain")
    status, _ = await send_event(proc, sp.message_event(text="", channel="D7", files=[shared]))
    assert status == 200
    note = (await wait_until(lambda: replies_with(emulator, "takes text only"), what="the note on the file"))[0]
    assert note["channel"] == "D7"
    saved = Path(texts(note).split("`")[1])
    assert saved.name == "notes.txt" and saved.read_bytes() == b"line one\n"
    with sqlite3.connect(proc.data_dir / "bridge.db") as db:
        assert db.execute("SELECT count(*) FROM turns").fetchone()[0] == 0
    # with text, the text runs as usual and the files stay saved beside it; two files with one
    # name are both kept
    other = emulator.seed_file("F8", "notes.txt", b"line two\n", "text/plain")
    await send_event(proc, sp.message_event(text="echo with-files", channel="D7", files=[shared, other]))
    await wait_until(lambda: replies_with(emulator, "with-files", "exit 0"), what="the command's reply")
    with sqlite3.connect(proc.data_dir / "bridge.db") as db:
        payload = json.loads(db.execute(
            "SELECT payload FROM inbound_events WHERE payload LIKE '%with-files%'").fetchone()[0])
    kept = {a["name"]: Path(a["path"]).read_bytes() for a in payload["attachments"]}
    assert kept == {"notes.txt": b"line one\n", "notes (2).txt": b"line two\n"}


async def test_a_channel_mention_is_answered_once_in_its_thread(service, emulator):
    proc = service()
    ts = sp.next_ts()
    text = f"<@{BOT}> echo in-channel"
    mention = sp.app_mention_event(text=text, channel="C1", ts=ts)
    as_message = sp.message_event(text=text, channel="C1", channel_type="channel", ts=ts)
    results = await asyncio.gather(send_event(proc, as_message), send_event(proc, mention))
    assert [s for s, _ in results] == [200, 200]
    reply = (await wait_until(lambda: replies_with(emulator, "in-channel", "exit 0"), what="the reply"))[0]
    assert reply["thread_ts"] == ts and reply["channel"] == "C1"
    await asyncio.sleep(1.0)
    assert len(replies_with(emulator, "in-channel", "exit 0")) == 1
    assert inbox_count(proc) == 1
    # a plain channel message without a mention is not for the bot
    await send_event(proc, sp.message_event(text="echo not-for-bot", channel="C1", channel_type="channel"))
    await asyncio.sleep(0.5)
    assert inbox_count(proc) == 1


async def test_a_thread_reply_continues_the_threads_conversation(service, emulator):
    proc = service()
    root = sp.next_ts()
    await send_event(proc, sp.app_mention_event(text=f"<@{BOT}> echo first-in-thread", channel="C2", ts=root))
    await wait_until(lambda: replies_with(emulator, "first-in-thread", "exit 0"), what="the first reply")
    await send_event(proc, sp.app_mention_event(text=f"<@{BOT}> echo second-in-thread", channel="C2",
                                                thread_ts=root))
    reply = (await wait_until(lambda: replies_with(emulator, "second-in-thread", "exit 0"), what="the reply"))[0]
    assert reply["thread_ts"] == root
    with sqlite3.connect(proc.data_dir / "bridge.db") as db:
        keys = {row[0] for row in db.execute("SELECT conversation_key FROM inbound_events")}
    assert keys == {f"slack:C2:{root}"}


async def test_retries_are_deduplicated_and_noise_is_ignored(service, emulator):
    proc = service()
    event = sp.message_event(text="echo once-only", channel="D3", channel_type="im")
    event_id = f"Ev{uuid.uuid4().hex[:10]}"
    for attempt in range(3):
        extra = {"X-Slack-Retry-Num": str(attempt), "X-Slack-Retry-Reason": "http_timeout"} if attempt else None
        assert (await send_event(proc, event, event_id=event_id, extra=extra))[0] == 200
    await send_event(proc, sp.message_event(text="echo from-a-bot", channel="D3", channel_type="im", bot_id="B9",
                                            subtype="bot_message"))
    await send_event(proc, sp.message_event(text="echo own", channel="D3", channel_type="im", user=BOT, bot_id="B1"))
    edited = sp.message_event(text="echo edited", channel="D3", channel_type="im", subtype="message_changed")
    await send_event(proc, edited)
    await wait_until(lambda: replies_with(emulator, "once-only", "exit 0"), what="the reply")
    await asyncio.sleep(1.0)
    assert len(replies_with(emulator, "once-only")) == 1
    assert inbox_count(proc) == 1


async def test_a_burst_through_the_edge_worker_is_stored_once_per_message(service, emulator):
    """Events that reach the service together (an edge worker's link hands them over in one
    call) are persisted in one write: each message once, whatever its copies, retries and noise."""
    proc = service(BRIDGE_HTTP_WORKERS="1")
    sends = []
    for n in range(20):
        event = sp.message_event(text=f"echo burst-{n}", channel=f"D{100 + n % 4}", channel_type="im")
        event_id = f"Ev{uuid.uuid4().hex[:10]}"
        sends.append(send_event(proc, event, event_id=event_id))
        if n % 5 == 0:  # a retry of the same event, and the same message under another event id
            sends.append(send_event(proc, event, event_id=event_id, extra={"X-Slack-Retry-Num": "1"}))
            sends.append(send_event(proc, event))
    sends.append(send_event(proc, sp.message_event(text="echo from-a-bot", channel="D100", channel_type="im",
                                                   bot_id="B9", subtype="bot_message")))
    results = await asyncio.gather(*sends)
    assert all(status == 200 for status, _ in results)
    assert inbox_count(proc) == 20
    for n in range(20):
        await wait_until(lambda n=n: replies_with(emulator, f"burst-{n}\n", "exit 0"), what=f"reply {n}")
    await asyncio.sleep(0.5)
    assert all(len(replies_with(emulator, f"burst-{n}\n")) == 1 for n in range(20))


async def test_bad_or_stale_signatures_are_refused_and_nothing_is_stored(service, emulator):
    proc = service()
    body = json.dumps(sp.event_callback(sp.message_event(text="echo forged", channel="D4"))).encode()
    assert (await post(proc, "/slack/events", body, secret="wrong"))[0] == 401
    assert (await post(proc, "/slack/events", body, timestamp=int(time.time()) - 600))[0] == 401
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{proc.url}/slack/events", data=body,
                             headers={"X-Slack-Request-Timestamp": "junk", "X-Slack-Signature": "v0=00"}) as resp:
            assert resp.status == 401
        async with http.post(f"{proc.url}/slack/events", data=body,  # not ASCII: a 401, never a 500
                             headers={"X-Slack-Request-Timestamp": str(int(time.time())),
                                      "X-Slack-Signature": "v0=" + "é" * 64}) as resp:
            assert resp.status == 401
    assert (await post(proc, "/slack/events", b"{not json"))[0] == 400
    assert inbox_count(proc) == 0
    assert emulator.messages() == []


def approval_messages(emu: SlackEmulator) -> list[dict]:
    return [m for m in emu.messages() if any(b.get("type") == "actions" for b in m.get("blocks") or [])
            or "Waiting for approval" in texts(m)]


def button(message: dict, action: str) -> dict:
    for block in message["blocks"]:
        if block.get("type") == "actions":
            for element in block["elements"]:
                if json.loads(element["value"])["action_id"] == action:
                    return element
    raise AssertionError(f"no {action} button")


async def click(proc, message: dict, action: str, user: str = "UALICE"):
    element = button(message, action)
    payload = sp.block_actions(action_id=element["action_id"], value=element["value"], user=user,
                               channel=message["channel"], message_ts=message["ts"])
    return await post(proc, "/slack/interactions", sp.form_body(payload),
                      content_type="application/x-www-form-urlencoded")


async def test_approval_buttons_approve_and_deny(service, emulator):
    proc = service()
    await send_event(proc, sp.message_event(text="touch approved.txt", channel="D5", channel_type="im"))
    card = (await wait_until(lambda: approval_messages(emulator), what="the approval card"))[0]
    started = time.monotonic()
    status, _ = await click(proc, card, "approve", user="UBOB")  # not the requester
    assert status == 200
    status, _ = await click(proc, card, "approve")
    assert status == 200 and time.monotonic() - started < 3
    await wait_until(lambda: replies_with(emulator, "exit 0"), what="the command's reply")
    assert (proc.data_dir / "workspace" / "approved.txt").exists()
    updated = emulator.message(card["channel"], card["ts"])
    assert len(updated["history"]) >= 2 and not any(b.get("type") == "actions" for b in updated["blocks"])
    assert any("may" in e.get("text", "") or "Only" in e.get("text", "") for e in emulator.ephemerals())

    await send_event(proc, sp.message_event(text="touch denied.txt", channel="D5", channel_type="im"))
    second = (await wait_until(lambda: [m for m in approval_messages(emulator) if m["ts"] != card["ts"]
                                        and any(b.get("type") == "actions" for b in m["blocks"])],
                               what="the second card"))[0]
    assert (await click(proc, second, "deny"))[0] == 200
    await wait_until(lambda: replies_with(emulator, "Not run (denied)"), what="the denial")
    assert not (proc.data_dir / "workspace" / "denied.txt").exists()


async def test_a_30kb_reply_is_split_and_nothing_is_lost(service, emulator, tmp_path):
    rules = tmp_path / "rules.yaml"
    rules.write_text('version: 1\npreset: default\nrules:\n  - {name: seq, action: allow, command: ["seq *"]}\n')
    proc = service(BRIDGE_SHELL_OUTPUT_LIMIT="100000", BRIDGE_APPROVAL_RULES=str(rules))
    await send_event(proc, sp.message_event(text="seq 1 6500", channel="D6", channel_type="im"))
    await wait_until(lambda: replies_with(emulator, "exit 0"), timeout=30, what="the last part")
    await asyncio.sleep(0.5)
    parts = [m for m in emulator.messages() if m["channel"] == "D6"]
    assert len(parts) >= 3
    numbers = set()
    for part in parts:
        markdown = sum(len(b.get("text", "")) for b in part["blocks"] if b.get("type") == "markdown")
        assert markdown <= 12_000 and len(part["blocks"]) <= 50
        numbers |= {int(tok) for tok in texts(part).split() if tok.isdigit()}
    assert set(range(1, 6501)) <= numbers


async def test_a_429_storm_delivers_every_reply_once(service, emulator):
    proc = service()
    emulator.fault("chat.postMessage", status=429, headers={"Retry-After": "1"}, times=4)
    emulator.fault("chat.update", status=503, raw_body="<html>unavailable</html>", times=2)
    for n in range(6):
        await send_event(proc, sp.message_event(text=f"echo storm-{n}", channel="D7", channel_type="im"))
    await wait_until(lambda: all(replies_with(emulator, f"storm-{n}", "exit 0") for n in range(6)), timeout=60,
                     what="every reply")
    await asyncio.sleep(0.5)
    finals = [m for m in emulator.messages() if "exit 0" in texts(m)]
    assert len(finals) == 6


async def test_socket_mode_end_to_end(service, emulator):
    service(SLACK_APP_TOKEN="xapp-test", SLACK_SIGNING_SECRET="")
    assert await asyncio.get_running_loop().run_in_executor(None, emulator.wait_socket, 1, 15.0)
    envelope = sp.event_callback(sp.message_event(text="echo over-socket", channel="D8", channel_type="im"))
    result = await asyncio.get_running_loop().run_in_executor(None, emulator.push_socket, "events_api", envelope)
    assert result["acked"]
    await wait_until(lambda: replies_with(emulator, "over-socket", "exit 0"), what="the reply")
    emulator.drop_socket()
    assert await asyncio.get_running_loop().run_in_executor(None, emulator.wait_socket, 2, 20.0)
    envelope = sp.event_callback(sp.message_event(text="echo after-reconnect", channel="D8", channel_type="im"))
    result = await asyncio.get_running_loop().run_in_executor(None, emulator.push_socket, "events_api", envelope)
    assert result["acked"]
    await wait_until(lambda: replies_with(emulator, "after-reconnect", "exit 0"), what="the reply after reconnect")


async def test_a_bad_app_token_stops_start_up_with_a_clear_message(tmp_path, emulator):
    proc = BridgeProcess(tmp_path / "data", env={
        "SLACK_BOT_TOKEN": "xoxb-test", "SLACK_APP_TOKEN": "xapp-wrong", "SLACK_API_URL": emulator.api_url,
        "HTTPS_PROXY": "", "HTTP_PROXY": ""})
    with pytest.raises(Exception):
        proc.start(timeout=15)
    log = proc.log_path.read_text()
    assert "SLACK_APP_TOKEN was refused" in log
    proc.kill()


def test_doctor_checks_the_tokens(tmp_path, emulator):
    import os
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "SLACK_"))}
    env = {**base, "BRIDGE_DATA_DIR": str(tmp_path), "SLACK_BOT_TOKEN": "xoxb-test", "SLACK_APP_TOKEN": "xapp-test",
           "SLACK_API_URL": emulator.api_url, "HTTPS_PROXY": "", "HTTP_PROXY": ""}
    ok = subprocess.run([sys.executable, "-m", "bridge", "doctor"], env=env, cwd=tmp_path, capture_output=True,
                        text=True, timeout=60)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "channel:slack" in ok.stdout and "Socket Mode ok" in ok.stdout
    bad = subprocess.run([sys.executable, "-m", "bridge", "doctor"], env={**env, "SLACK_BOT_TOKEN": "xoxb-wrong"},
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1 and "invalid_auth" in bad.stdout


def cli(proc, *args: str) -> subprocess.CompletedProcess[str]:
    """The operator's command line, on the service's store."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "SLACK_"))}
    env["BRIDGE_DATA_DIR"] = str(proc.data_dir)
    return subprocess.run([sys.executable, "-m", "bridge", *args], env=env, capture_output=True, text=True,
                          timeout=60)


def dead_ops(proc) -> list[tuple]:
    with sqlite3.connect(proc.data_dir / "bridge.db") as db:
        return db.execute("SELECT id, op, last_error FROM outbox WHERE status = 'dead'").fetchall()


async def test_a_reply_slack_refused_is_listed_and_delivered_again_from_the_command_line(service, emulator):
    proc = service()
    emulator.fault("chat.postMessage", error="not_in_channel", times=1)  # permanent: no retries
    ts = sp.next_ts()
    await send_event(proc, sp.app_mention_event(text=f"<@{BOT}> echo refused-once", channel="C9", ts=ts))
    dead = await wait_until(lambda: dead_ops(proc), what="the refused reply marked dead")
    assert [(op, "not_in_channel" in error) for _, op, error in dead] == [("send", True)]
    assert replies_with(emulator, "refused-once") == []

    listed = cli(proc, "outbox", "list")
    assert listed.returncode == 0, listed.stderr
    row = [line for line in listed.stdout.splitlines() if line.split()[0] == str(dead[0][0])]
    assert row and "dead" in row[0] and "slack:C9" in row[0] and "not_in_channel" in row[0]

    # the bot is invited to the channel; the operator delivers what failed
    wrong = cli(proc, "outbox", "retry", "999999")
    assert wrong.returncode == 1 and "999999 is not dead" in wrong.stderr
    retried = cli(proc, "outbox", "retry", "--all-dead")
    assert retried.returncode == 0 and f"1 operation(s) queued for delivery again: {dead[0][0]}" in retried.stdout
    reply = (await wait_until(lambda: replies_with(emulator, "refused-once", "exit 0"), what="the reply"))[0]
    assert reply["channel"] == "C9" and reply["thread_ts"] == ts
    await asyncio.sleep(1.5)
    assert len(replies_with(emulator, "refused-once", "exit 0")) == 1 and dead_ops(proc) == []
    assert "no dead outbound operations" in cli(proc, "outbox", "list").stdout
    assert cli(proc, "outbox", "retry").returncode == 2  # nothing named


async def test_events_wait_while_the_bots_identity_is_unknown(service, emulator):
    """auth.test fails at start (Slack away for a moment): the service starts all the same, an
    event is answered 503 (Slack sends it again) until the bot's ids are read again, then run."""
    emulator.fault("auth.test", status=500, error="internal_error", times=4)
    proc = service()
    statuses = []
    async with asyncio.timeout(30):
        while not statuses or statuses[-1] == 503:
            event = sp.message_event(text=f"<@{BOT}> echo once-known", channel="D9", channel_type="im")
            statuses.append((await send_event(proc, event))[0])
            await asyncio.sleep(0.3)
    assert statuses[0] == 503 and statuses[-1] == 200, statuses
    await wait_until(lambda: replies_with(emulator, "once-known"), what="the reply")
    assert inbox_count(proc) == 1


async def test_socket_mode_starts_when_slack_is_away_for_a_moment(service, emulator):
    """apps.connections.open fails once with a 503 at start: not a refused token; the service
    starts and Socket Mode connects on a later try."""
    emulator.fault("apps.connections.open", status=503, error="service_unavailable", times=1)
    service(SLACK_APP_TOKEN="xapp-test")
    assert await asyncio.get_running_loop().run_in_executor(None, emulator.wait_socket, 1, 20.0)


async def test_two_clicks_on_the_same_help_button_are_two_commands(service, emulator):
    proc = service()
    await send_event(proc, sp.message_event(text="/help", channel="D8", channel_type="im"))
    card = (await wait_until(lambda: [m for m in emulator.messages() if m["channel"] == "D8"
                                      and any(b.get("type") == "actions" for b in m.get("blocks") or [])],
                             what="the help card"))[0]
    for _ in range(2):
        assert (await click(proc, card, "cmd:status"))[0] == 200
        await asyncio.sleep(0.01)  # each click its own action_ts
    await wait_until(lambda: inbox_count(proc) == 3, what="both clicks taken")
