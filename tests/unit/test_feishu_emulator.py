"""The Feishu emulator and payload builders, proven against the real lark-oapi 1.7.5 client."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Iterator
from typing import Any

import lark_oapi as lark
import lark_oapi.ws.client as lark_ws_client
import pytest
from lark_oapi.api.im.v1 import (
    CreateMessageReactionRequest,
    CreateMessageReactionRequestBody,
    CreateMessageRequest,
    CreateMessageRequestBody,
    Emoji,
    GetMessageResourceRequest,
    PatchMessageRequest,
    PatchMessageRequestBody,
    ReplyMessageRequest,
    ReplyMessageRequestBody,
)
from lark_oapi.core.token.manager import TokenManager
from lark_oapi.core.utils import AESCipher
from lark_oapi.event.callback.model.p2_card_action_trigger import (
    P2CardActionTrigger,
    P2CardActionTriggerResponse,
)
from lark_oapi.ws.exception import ClientException

from tests.support import feishu_payloads as fp
from tests.support.feishu_emulator import FeishuEmulator, fresh_emulator

CARD = json.dumps({"schema": "2.0", "body": {"elements": [{"tag": "markdown", "content": "v1"}]}})


@pytest.fixture
def emulator() -> Iterator[FeishuEmulator]:
    with fresh_emulator() as emu:
        yield emu


@pytest.fixture
def client(emulator: FeishuEmulator) -> lark.Client:
    return (lark.Client.builder().app_id(emulator.app_id).app_secret(emulator.app_secret)
            .domain(emulator.url).timeout(5).log_level(lark.LogLevel.ERROR).build())


def send_request(text: str = "hi", *, chat_id: str = "oc_chat1", msg_type: str = "text",
                 content: str | None = None, uuid_: str | None = None) -> CreateMessageRequest:
    body = (CreateMessageRequestBody.builder().receive_id(chat_id).msg_type(msg_type)
            .content(content if content is not None else json.dumps({"text": text})))
    if uuid_:
        body = body.uuid(uuid_)
    return CreateMessageRequest.builder().receive_id_type("chat_id").request_body(body.build()).build()


def reply_request(target: str, text: str, *, in_thread: bool = False) -> ReplyMessageRequest:
    body = (ReplyMessageRequestBody.builder().msg_type("text").content(json.dumps({"text": text}))
            .reply_in_thread(in_thread).build())
    return ReplyMessageRequest.builder().message_id(target).request_body(body).build()


def patch_request(message_id: str, content: str) -> PatchMessageRequest:
    return (PatchMessageRequest.builder().message_id(message_id)
            .request_body(PatchMessageRequestBody.builder().content(content).build()).build())


# ---------------------------------------------------------------- REST API


async def test_token_is_fetched_once_and_cached(emulator: FeishuEmulator, client: lark.Client) -> None:
    for text in ("one", "two"):
        resp = await client.im.v1.message.acreate(send_request(text))
        assert resp.success(), (resp.code, resp.msg)
    assert emulator.token_calls == 1
    sends = [r for r in emulator.requests() if r["path"] == "/open-apis/im/v1/messages"]
    assert len(sends) == 2
    assert sends[0]["query"] == {"receive_id_type": "chat_id"}
    assert sends[0]["headers"]["Authorization"].startswith("Bearer t-")
    assert sends[0]["json"]["content"] == json.dumps({"text": "one"})


async def test_send_is_idempotent_per_uuid_and_enforces_size(emulator: FeishuEmulator,
                                                             client: lark.Client) -> None:
    first = await client.im.v1.message.acreate(send_request("hello", uuid_="key-1"))
    again = await client.im.v1.message.acreate(send_request("hello", uuid_="key-1"))
    assert first.success() and again.success()
    assert first.data.message_id == again.data.message_id and first.data.message_id.startswith("om_")
    assert first.data.chat_id == "oc_chat1"
    assert first.data.sender.id == emulator.app_id and first.data.sender.sender_type == "app"
    assert first.data.body.content == json.dumps({"text": "hello"})
    assert len(emulator.messages()) == 1
    assert emulator.messages()[0]["uuid"] == "key-1"

    too_big = await client.im.v1.message.acreate(send_request("x" * (150 * 1024 + 1)))
    assert (too_big.code, too_big.raw.status_code) == (230025, 400)
    not_json = await client.im.v1.message.acreate(send_request(content="not json"))
    assert not_json.code == 230001
    assert len(emulator.messages()) == 1


async def test_reply_in_thread_creates_then_reuses_a_thread(emulator: FeishuEmulator,
                                                            client: lark.Client) -> None:
    emulator.seed_message("om_user1", chat_id="oc_group")
    first = await client.im.v1.message.areply(reply_request("om_user1", "working", in_thread=True))
    second = await client.im.v1.message.areply(reply_request("om_user1", "done", in_thread=True))
    assert first.success() and second.success()
    assert first.data.thread_id.startswith("omt_") and second.data.thread_id == first.data.thread_id
    assert (first.data.parent_id, first.data.root_id, first.data.chat_id) == ("om_user1", "om_user1", "oc_group")

    plain = await client.im.v1.message.areply(reply_request("om_unknown", "seeded on demand"))
    assert plain.success() and plain.data.parent_id == "om_unknown" and plain.data.thread_id is None
    assert [m["content"] for m in emulator.messages()] == [
        json.dumps({"text": t}) for t in ("working", "done", "seeded on demand")]
    assert emulator.message("om_user1")["thread_id"] == first.data.thread_id


async def test_patch_keeps_history_and_rejects_non_cards(emulator: FeishuEmulator, client: lark.Client) -> None:
    card = await client.im.v1.message.acreate(send_request(msg_type="interactive", content=CARD))
    mid = card.data.message_id
    v2, v3 = CARD.replace("v1", "v2"), CARD.replace("v1", "v3")
    for content in (v2, v3):
        resp = await client.im.v1.message.apatch(patch_request(mid, content))
        assert resp.success(), (resp.code, resp.msg)
    stored = emulator.message(mid)
    assert stored["history"] == [CARD, v2, v3] and stored["content"] == v3 and stored["updated"] is True
    too_big = await client.im.v1.message.apatch(patch_request(mid, CARD.replace("v1", "x" * 30 * 1024)))
    assert (too_big.code, too_big.raw.status_code) == (230025, 400)  # the card limit holds for a patch too
    assert emulator.message(mid)["content"] == v3

    text = await client.im.v1.message.acreate(send_request("plain"))
    rejected = await client.im.v1.message.apatch(patch_request(text.data.message_id, v2))
    assert rejected.code == 230001

    emulator.configure(message_patch_qps=1)
    assert (await client.im.v1.message.apatch(patch_request(mid, v2))).success()
    limited = await client.im.v1.message.apatch(patch_request(mid, v3))
    assert limited.code == 230020 and limited.raw.status_code == 400


async def test_reaction_and_chat_rate_limit(emulator: FeishuEmulator, client: lark.Client) -> None:
    req = (CreateMessageReactionRequest.builder().message_id("om_user2")
           .request_body(CreateMessageReactionRequestBody.builder()
                         .reaction_type(Emoji.builder().emoji_type("OnIt").build()).build()).build())
    resp = await client.im.v1.message_reaction.acreate(req)
    assert resp.success() and resp.data.reaction_type.emoji_type == "OnIt"
    assert emulator.reactions()[0]["message_id"] == "om_user2"

    emulator.configure(chat_qps=2)
    codes = [(await client.im.v1.message.acreate(send_request(str(i)))).code for i in range(3)]
    assert codes == [0, 0, 230020]


async def test_revoked_token_gives_99991663(emulator: FeishuEmulator, client: lark.Client) -> None:
    assert (await client.im.v1.message.acreate(send_request())).success()
    emulator.revoke_tokens()
    resp = await client.im.v1.message.acreate(send_request())
    assert (resp.code, resp.raw.status_code) == (99991663, 400)
    # The SDK never evicts its cached token by itself; evicting it makes the next call fetch a new one.
    TokenManager.cache.set(f"self_tenant_token:{emulator.app_id}", "", 0)
    assert (await client.im.v1.message.acreate(send_request())).success()
    assert emulator.token_calls == 2


async def test_fault_429_reaches_the_client_with_headers(emulator: FeishuEmulator, client: lark.Client) -> None:
    emulator.fault("POST", r"/im/v1/messages$", status=429, code=99991400, msg="request trigger frequency limit",
                   headers={"x-ogw-ratelimit-limit": "50", "x-ogw-ratelimit-reset": "1"})
    limited = await client.im.v1.message.acreate(send_request())
    assert (limited.code, limited.raw.status_code) == (99991400, 429)
    assert limited.raw.headers["x-ogw-ratelimit-reset"] == "1"  # lower-case keys on the async path
    assert (await client.im.v1.message.acreate(send_request())).success()  # one-shot fault

    emulator.fault("POST", r"/im/v1/messages$", status=502, raw_body="<html>502 Bad Gateway</html>")
    with pytest.raises(json.JSONDecodeError):
        await client.im.v1.message.acreate(send_request())


async def test_bot_info_user_and_missing_auth(emulator: FeishuEmulator, client: lark.Client) -> None:
    req = (lark.BaseRequest.builder().http_method(lark.HttpMethod.GET).uri("/open-apis/bot/v3/info")
           .token_types({lark.AccessTokenType.TENANT}).build())
    resp = await client.arequest(req)
    assert resp.raw.status_code == 200
    assert json.loads(resp.raw.content)["bot"] == {
        "activate_status": 2, "app_name": "Bridge Bot", "avatar_url": "", "ip_white_list": [], "open_id": "ou_bot"}

    emulator.seed_user("ou_alice", "Alice")
    user = client.request(lark.BaseRequest.builder().http_method(lark.HttpMethod.GET)
                          .uri("/open-apis/contact/v3/users/ou_alice").queries([("user_id_type", "open_id")])
                          .token_types({lark.AccessTokenType.TENANT}).build())
    assert user.code == 0 and json.loads(user.raw.content)["data"]["user"]["name"] == "Alice"

    anonymous = client.request(lark.BaseRequest.builder().http_method(lark.HttpMethod.GET)
                               .uri("/open-apis/bot/v3/info").build())
    assert (anonymous.code, anonymous.raw.status_code) == (99991661, 400)


async def test_resource_download(emulator: FeishuEmulator, client: lark.Client) -> None:
    emulator.seed_resource("om_img", "img_v3_1", b"\x89PNG-bytes", filename="cat.png")

    def get(key: str) -> GetMessageResourceRequest:
        return GetMessageResourceRequest.builder().message_id("om_img").file_key(key).type("image").build()

    resp = await client.im.v1.message_resource.aget(get("img_v3_1"))
    assert resp.code == 0 and resp.file.read() == b"\x89PNG-bytes"
    # The sync path sees Content-Disposition (the async one loses it to header casing).
    sync = await asyncio.get_running_loop().run_in_executor(None, client.im.v1.message_resource.get,
                                                            get("img_v3_1"))
    assert sync.file_name == "cat.png"
    missing = await asyncio.get_running_loop().run_in_executor(None, client.im.v1.message_resource.get,
                                                               get("img_v3_none"))
    assert (missing.code, missing.raw.status_code) == (234003, 400)


# ---------------------------------------------------------------- long connection


class WsClientThread:
    """A ``lark.ws.Client`` running in its own thread and loop, as the SDK requires."""

    def __init__(self, emulator: FeishuEmulator, handler: lark.EventDispatcherHandler, *,
                 auto_reconnect: bool = False, app_secret: str | None = None) -> None:
        self.emulator, self.handler, self.auto_reconnect = emulator, handler, auto_reconnect
        self.app_secret = emulator.app_secret if app_secret is None else app_secret
        self.loop: asyncio.AbstractEventLoop | None = None
        self.error: Exception | None = None  # what start() raised, if it failed
        self._sdk_loop = lark_ws_client.loop  # restored on exit, so the SDK's import-time loop is not GC'd
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lark-ws-client", daemon=True)

    def __enter__(self) -> WsClientThread:
        self._thread.start()
        assert self._ready.wait(5)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self.loop is not None
        try:
            self.loop.call_soon_threadsafe(self.loop.stop)
        except RuntimeError:  # start() already failed and the loop is closed
            pass
        self._thread.join(5)
        lark_ws_client.loop = self._sdk_loop

    def join(self, timeout: float = 5.0) -> None:
        """Wait for the client thread to end (it does by itself only when start() fails)."""
        self._thread.join(timeout)

    def _run(self) -> None:
        loop = self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        lark_ws_client.loop = loop  # the SDK captured a module-level loop at import time
        # Built here: its constructor schedules a cache task on the current thread's loop.
        cli = lark.ws.Client(self.emulator.app_id, self.app_secret, event_handler=self.handler,
                             domain=self.emulator.url, auto_reconnect=self.auto_reconnect,
                             log_level=lark.LogLevel.CRITICAL)
        self._ready.set()
        try:
            cli.start()  # blocks until the loop is stopped
        except RuntimeError:
            pass
        except Exception as exc:
            self.error = exc
        finally:
            tasks = asyncio.all_tasks(loop)
            for task in tasks:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            if cli._conn is not None:
                loop.run_until_complete(cli._conn.close())
            loop.close()


def dispatcher(on_message: Callable[[Any], None],
               on_card: Callable[[P2CardActionTrigger], P2CardActionTriggerResponse] | None = None,
               ) -> lark.EventDispatcherHandler:
    builder = lark.EventDispatcherHandler.builder("", "").register_p2_im_message_receive_v1(on_message)
    if on_card is not None:
        builder = builder.register_p2_card_action_trigger(on_card)
    return builder.build()


def test_long_connection_delivers_events_and_card_responses(emulator: FeishuEmulator) -> None:
    received: list[Any] = []

    def on_card(data: P2CardActionTrigger) -> P2CardActionTriggerResponse:
        return P2CardActionTriggerResponse({"toast": {"type": "success", "content": data.event.action.value["a"]}})

    with WsClientThread(emulator, dispatcher(received.append, on_card)):
        assert emulator.wait_ws()
        event = fp.message_event(token="", text="hello over ws", app_id=emulator.app_id)
        ack = emulator.push_ws(event)
        assert ack["acked"] and ack["code"] == 200 and ack["data"] is None
        assert [m.event.message.content for m in received] == [json.dumps({"text": "hello over ws"})]
        assert received[0].header.event_id == event["header"]["event_id"]

        card = emulator.push_ws(fp.card_action_event(token="", value={"a": "approved"}), parts=3)
        assert card["code"] == 200 and card["data"] == {"toast": {"type": "success", "content": "approved"}}

        dropped = emulator.push_ws(event, type="card", timeout=0.3)  # the SDK drops type=card frames
        assert dropped["acked"] is False and len(received) == 1
    endpoint = next(r for r in emulator.requests() if r["path"] == "/callback/ws/endpoint")
    assert endpoint["json"] == {"AppID": emulator.app_id, "AppSecret": emulator.app_secret}
    assert emulator.ws_pings >= 1  # the client pings right after connecting; it got a pong


def test_long_connection_reconnects_after_drop(emulator: FeishuEmulator) -> None:
    emulator.configure(ws_client_config={"ReconnectNonce": 0, "ReconnectInterval": 1})
    received: list[Any] = []
    with WsClientThread(emulator, dispatcher(received.append), auto_reconnect=True):
        assert emulator.wait_ws()
        assert emulator.drop_ws() and not emulator.ws_connected()
        assert emulator.wait_ws(connections=2)
        ack = emulator.push_ws(fp.message_event(token="", text="after reconnect"))
        assert ack["code"] == 200 and len(received) == 1


def test_ws_endpoint_rejects_a_wrong_secret(emulator: FeishuEmulator) -> None:
    with WsClientThread(emulator, dispatcher(lambda _: None), app_secret="wrong") as ws:
        ws.join()
    assert isinstance(ws.error, ClientException) and ws.error.code == 514
    assert emulator.ws_connections == 0


# ---------------------------------------------------------------- payloads


def test_aes_round_trip_matches_the_sdk() -> None:
    key, text = "encrypt-key", json.dumps({"hello": "世界", "n": 1})
    sealed = fp.aes_encrypt(key, text)
    assert fp.aes_decrypt(key, sealed) == text
    assert AESCipher(key).decrypt_str(sealed) == text
    assert fp.aes_encrypt(key, text) != sealed  # random IV


def test_signed_encrypted_webhook_passes_the_sdk_dispatcher() -> None:
    key, token = "ek", "vt"
    got: list[Any] = []
    handler = (lark.EventDispatcherHandler.builder(key, token)
               .register_p2_im_message_receive_v1(got.append).build())

    def deliver(payload: dict[str, Any], **kw: Any) -> lark.RawResponse:
        headers, body = fp.webhook_request(payload, encrypt_key=key, **kw)
        raw = lark.RawRequest()
        raw.uri, raw.headers, raw.body = "/webhook/event", headers, body
        return handler.do(raw)

    mentions = [fp.mention("@_user_1", "ou_bot", "Bridge Bot")]
    resp = deliver(fp.message_event(token=token, text="@_user_1 hi", chat_type="group", mentions=mentions))
    assert resp.status_code == 200, resp.content
    msg = got[0].event.message
    assert (msg.chat_type, msg.mentions[0].id.open_id, got[0].event.sender.sender_id.open_id) == (
        "group", "ou_bot", "ou_alice")

    headers, body = fp.webhook_request({"x": 1}, encrypt_key=key, timestamp=1700000000, nonce="n")
    assert headers["X-Lark-Signature"] == fp.signature("1700000000", "n", key, body)
    assert json.loads(fp.aes_decrypt(key, json.loads(body)["encrypt"])) == {"x": 1}

    challenge = deliver(fp.url_verification(token=token, challenge="c-42"))
    assert json.loads(challenge.content) == {"challenge": "c-42"}
    wrong = fp.card_action_event(token=token, value={})
    assert deliver(wrong).status_code == 500  # unregistered callback type: the SDK answers 500
