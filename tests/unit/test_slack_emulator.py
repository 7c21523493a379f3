"""The Slack emulator and payload builders, proven against the real slack_sdk clients."""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import AsyncIterator, Iterator
from urllib.parse import parse_qs

import aiohttp
import pytest
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry import builtin_async_handlers
from slack_sdk.http_retry.builtin_async_handlers import AsyncRateLimitErrorRetryHandler
from slack_sdk.signature import SignatureVerifier
from slack_sdk.socket_mode.aiohttp import SocketModeClient
from slack_sdk.socket_mode.async_client import AsyncBaseSocketModeClient
from slack_sdk.socket_mode.request import SocketModeRequest
from slack_sdk.socket_mode.response import SocketModeResponse
from slack_sdk.web.async_client import AsyncWebClient
from slack_sdk.webhook.async_client import AsyncWebhookClient

from tests.support import slack_payloads as sp
from tests.support.slack_emulator import SlackEmulator

TS_RE = re.compile(r"^\d{10}\.\d{6}$")
PROXY_VARS = ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy")


@pytest.fixture(autouse=True)
def _no_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    # slack_sdk reads these (and ignores NO_PROXY), which would send 127.0.0.1 traffic to a proxy.
    for name in PROXY_VARS:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture
def emulator() -> Iterator[SlackEmulator]:
    emu = SlackEmulator().start()
    yield emu
    emu.stop()


@pytest.fixture
def client(emulator: SlackEmulator) -> AsyncWebClient:
    return AsyncWebClient(token=emulator.bot_token, base_url=emulator.api_url, timeout=5)


async def api_error(coro: object) -> SlackApiError:
    """Await ``coro`` and return the SlackApiError it raised."""
    with pytest.raises(SlackApiError) as info:
        await coro  # type: ignore[misc]
    return info.value


# ---------------------------------------------------------------- Web API


async def test_auth_test_identifies_the_bot(emulator: SlackEmulator, client: AsyncWebClient) -> None:
    resp = await client.auth_test()
    assert (resp["user_id"], resp["bot_id"], resp["team_id"]) == ("UBOT", "B1", "T1")
    assert "chat:write" in resp.headers["X-OAuth-Scopes"]
    [req] = emulator.requests()
    assert (req["method"], req["http_verb"], req["token"]) == ("auth.test", "POST", "xoxb-test")
    assert req["headers"]["Authorization"] == "Bearer xoxb-test"


async def test_post_message_and_thread_reply(emulator: SlackEmulator, client: AsyncWebClient) -> None:
    blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": "*hi*"}}]
    root = await client.chat_postMessage(channel="C1", text="hi", blocks=blocks, unfurl_links=False)
    assert TS_RE.match(root["ts"]) and root["channel"] == "C1"
    assert root["message"]["user"] == "UBOT" and root["message"]["blocks"] == blocks
    reply = await client.chat_postMessage(channel="C1", text="in thread", thread_ts=root["ts"])
    assert float(reply["ts"]) > float(root["ts"])
    assert reply["message"]["thread_ts"] == root["ts"]

    first, second = emulator.messages()
    assert (first["text"], first["blocks"], first["user"]) == ("hi", blocks, "UBOT")
    assert first["thread_ts"] == root["ts"] and first["reply_count"] == 1  # a root with replies, as Slack
    assert first["args"]["unfurl_links"] is False
    assert (second["thread_ts"], second["deleted"]) == (root["ts"], False)
    assert emulator.message("C1", reply["ts"]) == second
    post = emulator.requests("chat.postMessage")[0]
    assert post["content_type"].startswith("application/json") and post["params"]["channel"] == "C1"

    dm = await client.chat_postMessage(channel="UALICE", text="to a user id")
    assert dm["channel"] == "DALICE"  # posting to a user id lands in the DM


async def test_update_keeps_every_version(emulator: SlackEmulator, client: AsyncWebClient) -> None:
    v1 = [{"type": "section", "text": {"type": "mrkdwn", "text": "working"}}]
    v2 = [{"type": "context", "elements": [{"type": "mrkdwn", "text": "done"}]}]
    posted = await client.chat_postMessage(channel="D1", text="working", blocks=v1)
    updated = await client.chat_update(channel="D1", ts=posted["ts"], text="done", blocks=v2)
    assert updated["ts"] == posted["ts"] and updated["text"] == "done"
    await client.chat_update(channel="D1", ts=posted["ts"], text="done!")  # no blocks: they are kept
    msg = emulator.message("D1", posted["ts"])
    assert msg is not None and msg["text"] == "done!" and msg["blocks"] == v2 and msg["edited"]
    assert msg["history"] == [{"text": "working", "blocks": v1}, {"text": "done", "blocks": v2},
                              {"text": "done!", "blocks": v2}]
    err = await api_error(client.chat_update(channel="D1", ts="1.000000", text="x"))
    assert err.response["error"] == "message_not_found"

    await client.chat_delete(channel="D1", ts=posted["ts"])
    assert emulator.message("D1", posted["ts"])["deleted"] is True  # type: ignore[index]


async def test_message_limits(emulator: SlackEmulator, client: AsyncWebClient) -> None:
    assert (await api_error(client.chat_postMessage(channel="C1", text="x" * 40_001))).response["error"] \
        == "msg_too_long"
    many = [{"type": "divider"}] * 51
    err = await api_error(client.chat_postMessage(channel="C1", text="x", blocks=many))
    assert err.response["error"] == "invalid_blocks" and err.response["errors"]
    long_section = [{"type": "section", "text": {"type": "mrkdwn", "text": "y" * 3001}}]
    assert (await api_error(client.chat_postMessage(channel="C1", text="x", blocks=long_section))) \
        .response["error"] == "invalid_blocks"
    with pytest.warns(UserWarning, match="top-level `text`"):  # slack_sdk warns before sending
        assert (await api_error(client.chat_postMessage(channel="C1", text=""))).response["error"] == "no_text"
    await client.chat_postMessage(channel="C1", text="x" * 40_000, blocks=[{"type": "divider"}] * 50)
    assert len(emulator.messages()) == 1


async def test_reactions_users_channels_and_ephemerals(emulator: SlackEmulator,
                                                       client: AsyncWebClient) -> None:
    await client.reactions_add(channel="D1", name="eyes", timestamp="1700000001.000001")
    err = await api_error(client.reactions_add(channel="D1", name="eyes", timestamp="1700000001.000001"))
    assert err.response["error"] == "already_reacted"
    await client.reactions_remove(channel="D1", name="eyes", timestamp="1700000001.000001")
    assert emulator.reactions() == [{"channel": "D1", "ts": "1700000001.000001", "name": "eyes",
                                     "user": "UBOT", "removed": True}]
    assert emulator.requests("reactions.add")[0]["params"] == {
        "channel": "D1", "name": "eyes", "timestamp": "1700000001.000001"}

    emulator.seed_user("UALICE", "alice", real_name="Alice Liddell")
    alice = await client.users_info(user="UALICE")
    assert (alice["user"]["name"], alice["user"]["real_name"], alice["user"]["is_bot"]) == \
        ("alice", "Alice Liddell", False)
    assert (await client.users_info(user="UBOT"))["user"]["is_bot"] is True
    assert (await api_error(client.users_info(user="UNOBODY"))).response["error"] == "user_not_found"

    dm = (await client.conversations_info(channel="D1"))["channel"]
    assert dm["is_im"] is True and dm["user"] == "UALICE"
    emulator.seed_channel("C9", "ops", is_private=True)
    ops = (await client.conversations_info(channel="C9"))["channel"]
    assert (ops["name"], ops["is_private"], ops["is_im"]) == ("ops", True, False)

    eph = await client.chat_postEphemeral(channel="C1", user="UALICE", text="only you")
    assert TS_RE.match(eph["message_ts"])
    assert emulator.ephemerals()[0]["user"] == "UALICE" and emulator.messages() == []


async def test_files_need_the_bot_token(emulator: SlackEmulator, client: AsyncWebClient) -> None:
    obj = emulator.seed_file("F1", "shot.png", b"\x89PNG data", "image/png")
    info = await client.files_info(file="F1")
    assert info["file"]["url_private_download"] == obj["url_private_download"]
    assert info["file"]["size"] == 9
    assert (await api_error(client.files_info(file="F404"))).response["error"] == "file_not_found"
    async with aiohttp.ClientSession() as http:
        auth = {"Authorization": f"Bearer {emulator.bot_token}"}
        async with http.get(obj["url_private_download"], headers=auth) as resp:
            assert resp.content_type == "image/png" and await resp.read() == b"\x89PNG data"
        async with http.get(obj["url_private"]) as resp:  # no token: Slack's sign-in page, status 200
            assert resp.status == 200 and resp.content_type == "text/html"


async def test_error_faults_surface_as_slack_api_error(emulator: SlackEmulator,
                                                       client: AsyncWebClient) -> None:
    emulator.fault("chat.postMessage", error="channel_not_found")
    err = await api_error(client.chat_postMessage(channel="C1", text="x"))
    assert (err.response.status_code, err.response["error"]) == (200, "channel_not_found")

    emulator.fault("chat.update", status=503, raw_body="<html>oops</html>")
    err = await api_error(client.chat_update(channel="C1", ts="1.0", text="x"))
    assert err.response.status_code == 503 and err.response.data == {}  # HTML body is not parsed

    emulator.fault("*", delay=0.2)  # delay only, then served normally
    started = time.monotonic()
    assert (await client.chat_postMessage(channel="C1", text="slow"))["ok"]
    assert time.monotonic() - started >= 0.2


async def test_rate_limit_fault_without_retry_handler(emulator: SlackEmulator, client: AsyncWebClient) -> None:
    emulator.fault("chat.postMessage", status=429, headers={"Retry-After": "1"})
    started = time.monotonic()
    err = await api_error(client.chat_postMessage(channel="C1", text="x"))
    assert time.monotonic() - started < 0.5  # the default handlers do not retry a 429
    assert (err.response.status_code, err.response["error"]) == (429, "ratelimited")
    assert err.response.headers["Retry-After"] == "1"
    assert (await client.chat_postMessage(channel="C1", text="x"))["ok"]  # the fault was used up


async def test_rate_limit_retry_handler_honours_retry_after(emulator: SlackEmulator,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(builtin_async_handlers.random, "random", lambda: 0.0)  # no jitter
    client = AsyncWebClient(token=emulator.bot_token, base_url=emulator.api_url, timeout=5)
    client.retry_handlers.append(AsyncRateLimitErrorRetryHandler(max_retry_count=1))
    emulator.fault("chat.postMessage", status=429, headers={"Retry-After": "1"})
    started = time.monotonic()
    resp = await client.chat_postMessage(channel="C1", text="retried")
    assert resp["ok"] and 1.0 <= time.monotonic() - started < 2.0
    assert len(emulator.requests("chat.postMessage")) == 2 and len(emulator.messages()) == 1


async def test_configured_rate_limit(emulator: SlackEmulator, client: AsyncWebClient) -> None:
    emulator.configure(method_limits={"reactions.add": 2})
    for ts in ("1.1", "1.2"):
        await client.reactions_add(channel="C1", name="eyes", timestamp=ts)
    err = await api_error(client.reactions_add(channel="C1", name="eyes", timestamp="1.3"))
    assert err.response.status_code == 429 and 1 <= int(err.response.headers["Retry-After"]) <= 60
    await client.chat_postMessage(channel="C1", text="other methods are not limited")
    emulator.reset()
    await client.reactions_add(channel="C1", name="eyes", timestamp="1.3")


async def test_tokens(emulator: SlackEmulator, client: AsyncWebClient) -> None:
    for token, error in ((None, "not_authed"), ("xoxb-wrong", "invalid_auth"),
                         ("xapp-test", "not_allowed_token_type")):
        other = AsyncWebClient(token=token, base_url=emulator.api_url)
        assert (await api_error(other.auth_test())).response["error"] == error
    emulator.revoke_token()
    assert (await api_error(client.chat_postMessage(channel="C1", text="x"))).response["error"] \
        == "token_revoked"
    emulator.reset()
    assert (await client.auth_test())["ok"]


async def test_response_url_replaces_the_original(emulator: SlackEmulator, client: AsyncWebClient) -> None:
    posted = await client.chat_postMessage(channel="C1", text="Approve?")
    hook = AsyncWebhookClient(emulator.response_url("C1", posted["ts"]))
    resp = await hook.send(text="Approved", replace_original=True)
    assert resp.status_code == 200
    assert emulator.message("C1", posted["ts"])["text"] == "Approved"  # type: ignore[index]
    assert (await hook.send(text="just for you")).status_code == 200
    assert emulator.ephemerals()[0]["via"] == "response_url"


# ---------------------------------------------------------------- Socket Mode


@pytest.fixture
async def socket_client(emulator: SlackEmulator) -> AsyncIterator[tuple[SocketModeClient, list[SocketModeRequest]]]:
    """A real aiohttp SocketModeClient that acks everything (slash commands with a payload)."""
    seen: list[SocketModeRequest] = []

    async def listener(client: AsyncBaseSocketModeClient, req: SocketModeRequest) -> None:
        seen.append(req)
        payload = {"text": "pong"} if req.accepts_response_payload else None
        await client.send_socket_mode_response(SocketModeResponse(envelope_id=req.envelope_id, payload=payload))

    web_client = AsyncWebClient(token=emulator.app_token, base_url=emulator.api_url)
    smc = SocketModeClient(app_token=emulator.app_token, web_client=web_client, ping_interval=0.25)
    smc.socket_mode_request_listeners.append(listener)
    yield smc, seen
    await smc.close()


async def test_socket_mode_delivers_acks_and_reconnects(
        emulator: SlackEmulator, socket_client: tuple[SocketModeClient, list[SocketModeRequest]]) -> None:
    smc, seen = socket_client
    await smc.connect()
    assert await emulator.await_socket(1)
    [opened] = emulator.requests("apps.connections.open")
    assert opened["token"] == "xapp-test" and smc.wss_uri and smc.wss_uri.startswith("ws://127.0.0.1:")

    event = sp.event_callback(sp.message_event(text="hello"), event_id="Ev1")
    result = await emulator.apush_socket("events_api", event, retry_attempt=1, retry_reason="timeout")
    assert result["acked"] and result["ack"] == {"envelope_id": result["envelope_id"]}
    assert seen[0].type == "events_api" and seen[0].payload == event and seen[0].retry_attempt == 1

    command = await emulator.apush_socket("slash_commands", sp.slash_command(text="now"))
    assert command["ack"]["payload"] == {"text": "pong"}

    assert emulator.drop_socket()
    assert await emulator.await_socket(2)
    after_drop = await emulator.apush_socket("interactive", sp.block_actions(action_id="a", value="v"))
    assert after_drop["acked"] and seen[-1].payload["type"] == "block_actions"

    assert emulator.request_disconnect()
    assert await emulator.await_socket(3)
    assert (await emulator.apush_socket("events_api", event))["acked"]
    assert len(emulator.requests("apps.connections.open")) == 3
    assert [a["envelope_id"] for a in emulator.socket_acks()] == [r.envelope_id for r in seen]
    assert emulator.socket_pings >= 1  # the client pings right after connecting


async def test_socket_mode_recovers_from_an_abrupt_drop_via_pings(
        emulator: SlackEmulator, socket_client: tuple[SocketModeClient, list[SocketModeRequest]]) -> None:
    smc, _ = socket_client
    await smc.connect()
    assert await emulator.await_socket(1)
    assert emulator.drop_socket(abrupt=True)
    assert not emulator.socket_connected()
    assert await emulator.await_socket(2, timeout=5)
    assert (await emulator.apush_socket("events_api", sp.event_callback(sp.message_event(text="x"))))["acked"]


async def test_socket_mode_reconnects_when_pings_go_unanswered(
        emulator: SlackEmulator, socket_client: tuple[SocketModeClient, list[SocketModeRequest]]) -> None:
    smc, _ = socket_client
    await smc.connect()
    assert await emulator.await_socket(1)
    emulator.configure(answer_pings=False)  # aiohttp's heartbeat (= ping_interval) gives up on the link
    assert await emulator.await_socket(2, timeout=5)
    emulator.configure(answer_pings=True)
    assert emulator.socket_pings >= 2


async def test_socket_push_without_a_client_is_not_acked(emulator: SlackEmulator) -> None:
    result = await asyncio.to_thread(emulator.push_socket, "events_api", {}, 0.5)
    assert result["acked"] is False and result["ack"] is None
    assert emulator.drop_socket() is False and emulator.request_disconnect() is False


async def test_bad_app_token_cannot_open_a_socket(emulator: SlackEmulator, client: AsyncWebClient) -> None:
    err = await api_error(client.apps_connections_open(app_token="xapp-wrong"))
    assert err.response["error"] == "invalid_auth"
    err = await api_error(client.apps_connections_open(app_token=emulator.bot_token))
    assert err.response["error"] == "not_allowed_token_type"


# ---------------------------------------------------------------- payloads


def test_signature_matches_slack_sdk_verifier() -> None:
    secret, body = "8f742231b10e8888abcd99yyyzzz85a5", json.dumps(sp.url_verification("c1")).encode()
    verifier = SignatureVerifier(secret)
    ts = str(int(time.time()))
    assert sp.sign(secret, ts, body) == verifier.generate_signature(timestamp=ts, body=body)

    headers = sp.signed_request(body, signing_secret=secret)
    assert verifier.is_valid_request(body, headers)
    assert not verifier.is_valid_request(body + b" ", headers)
    assert not SignatureVerifier("other").is_valid_request(body, headers)
    stale = sp.signed_request(body, signing_secret=secret, timestamp=int(time.time()) - 600)
    assert not verifier.is_valid_request(body, stale)

    form = sp.form_body(sp.block_actions(action_id="approval.approve", value="req-42"))
    form_headers = sp.signed_request(form, signing_secret=secret, content_type="application/x-www-form-urlencoded")
    assert verifier.is_valid_request(form, form_headers)
    payload = json.loads(parse_qs(form.decode())["payload"][0])
    assert payload["actions"][0]["action_id"] == "approval.approve" and payload["actions"][0]["value"] == "req-42"


def test_event_builders_match_slack_shapes() -> None:
    mention = sp.event_callback(sp.app_mention_event(text="<@UBOT> hi", thread_ts="1.0"), event_id="Ev9")
    assert (mention["type"], mention["event_id"], mention["team_id"]) == ("event_callback", "Ev9", "T1")
    assert mention["authorizations"][0]["user_id"] == "UBOT"
    assert mention["event"]["type"] == "app_mention" and "channel_type" not in mention["event"]

    dm = sp.message_event(text="hi")
    assert (dm["channel"], dm["channel_type"], dm["ts"], dm["event_ts"]) == ("D1", "im", dm["ts"], dm["ts"])
    assert "subtype" not in dm and dm["client_msg_id"] and dm["blocks"][0]["type"] == "rich_text"
    assert sp.message_event(text="f", files=[{"id": "F1"}])["subtype"] == "file_share"
    other_bot = sp.message_event(text="beep", subtype="bot_message", bot_id="B2")
    assert other_bot["bot_id"] == "B2" and "client_msg_id" not in other_bot
    assert float(sp.message_event(text="b")["ts"]) > float(dm["ts"])

    command = sp.slash_command(command="/status", text="all")
    assert parse_qs(sp.encode_form(command).decode())["text"] == ["all"]
