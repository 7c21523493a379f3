"""Feishu's Open Platform API through lark-oapi, made safe for one event loop.

- The SDK fetches the tenant token with blocking `requests` and never refreshes a revoked one. The
  client is built with `enable_set_token(True)`: the token is fetched by the SDK's own
  TokenManager on a worker thread, passed with every call, and on 99991663 / 99991661 evicted and
  fetched again, once.
- Calls go through token buckets: 5/s per chat and 50/s per app (the platform's limits), so a
  burst waits here instead of being refused there.
- Every answer is classified: success, or a DeliveryError that says whether a retry can help
  and after how long (429 / 99991400 with `x-ogw-ratelimit-reset`, 230020, 5xx, network errors).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import OrderedDict
from typing import Any

from loguru import logger

from channels.base import DeliveryError
from channels.names import NameCache
from channels.feishu.errors import TooLarge
from channels.feishu import sdk

TOKEN_ERRORS = (99991663, 99991661)
RATE_LIMITED = 99991400
CHAT_RATE_LIMITED = 230020
TOO_LARGE = 230025
NAME_TTL = 3600.0
TOKEN_HOLD = 300.0  # seconds a token is reused without asking the SDK (it refreshes 10 min before expiry)


def _code(resp: Any) -> int | None:
    """The answer's code. On the async path the SDK skips parsing bodies whose Content-Type
    header it does not find (it looks it up case-sensitively), so read the body when needed."""
    status = getattr(resp.raw, "status_code", None) or 0
    code = resp.code
    if code is not None and not (code == 0 and status >= 400):
        return code
    try:
        body = json.loads(resp.raw.content or b"")
    except (ValueError, TypeError, AttributeError):
        return 0 if 200 <= status < 300 else None  # a binary body (a download), or an HTML error page
    parsed = body.get("code") if isinstance(body, dict) else None
    if parsed is None:
        return 0 if 200 <= status < 300 else None
    return int(parsed)


class TokenBucket:
    """`rate` tokens a second, up to `rate` at once."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self.tokens = rate
        self.updated = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self) -> None:
        async with self._lock:
            while True:
                now = time.monotonic()
                self.tokens = min(self.rate, self.tokens + (now - self.updated) * self.rate)
                self.updated = now
                if self.tokens >= 1:
                    self.tokens -= 1
                    return
                await asyncio.sleep((1 - self.tokens) / self.rate)


class FeishuApi:
    def __init__(self, *, app_id: str, app_secret: str, domain: str, timeout: float = 10.0,
                 chat_qps: float = 5.0, app_qps: float = 50.0) -> None:
        self.app_id = app_id
        self.client = sdk.OpenApi(app_id=app_id, app_secret=app_secret, domain=domain, timeout=timeout)
        self._app_bucket = TokenBucket(app_qps)
        self._chat_qps = chat_qps
        self._chat_buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._token_lock = asyncio.Lock()
        self._token = ""
        self._token_until = 0.0
        self._names = NameCache(self._user_name, channel="feishu", ttl=NAME_TTL)
        self.token_refreshes = 0

    # -- the tenant token, never fetched on the loop

    async def token(self, *, force: bool = False) -> str:
        # Held here for a few minutes so an ordinary call costs no thread hop; the SDK's own cache
        # (fetched on a worker thread) decides when Feishu is asked for a new one.
        if not force and self._token and time.monotonic() < self._token_until:
            return self._token
        async with self._token_lock:
            if force:
                sdk.TokenManager.cache.set(f"self_tenant_token:{self.app_id}", "", 0)
                self._token = ""
                self.token_refreshes += 1
            elif self._token and time.monotonic() < self._token_until:
                return self._token
            loop = asyncio.get_running_loop()
            try:
                token = await loop.run_in_executor(None, sdk.TokenManager.get_self_tenant_token, self.client.config)
            except Exception as exc:  # noqa: BLE001 - the SDK raises its own types and requests' errors
                raise DeliveryError(f"cannot get a tenant token: {type(exc).__name__}: {exc}", transient=True) from exc
            self._token, self._token_until = token, time.monotonic() + TOKEN_HOLD
            return token

    async def _option(self, *, force: bool = False) -> sdk.RequestOption:
        return sdk.RequestOption.builder().tenant_access_token(await self.token(force=force)).build()

    async def _bucket(self, chat_id: str | None) -> None:
        await self._app_bucket.take()
        if chat_id:
            bucket = self._chat_buckets.get(chat_id)
            if bucket is None:
                bucket = self._chat_buckets[chat_id] = TokenBucket(self._chat_qps)
                if len(self._chat_buckets) > 10_000:
                    self._chat_buckets.popitem(last=False)
            self._chat_buckets.move_to_end(chat_id)
            await bucket.take()

    async def call(self, what: str, make_call, *, chat_id: str | None = None) -> Any:
        """Run `make_call(option)` (a coroutine factory: requests are rebuilt for each try, the SDK
        mutates them) with rate limits, one token refresh on a token error, and classification."""
        await self._bucket(chat_id)
        force = False
        for attempt in range(2):
            option = await self._option(force=force)
            try:
                resp = await make_call(option)
            except DeliveryError:
                raise
            except Exception as exc:  # noqa: BLE001 - network errors, an HTML error page (JSONDecodeError)
                raise DeliveryError(f"{what}: {type(exc).__name__}: {exc}"[:300], transient=True) from exc
            code = _code(resp)
            if code == 0:
                return resp
            if code in TOKEN_ERRORS and attempt == 0:
                logger.warning("feishu: {}: token rejected ({}); fetching a new one", what, code)
                force = True
                continue
            raise self._error(what, resp)
        raise AssertionError("unreachable")

    @staticmethod
    def _error(what: str, resp: Any) -> DeliveryError:
        code = _code(resp)
        status = getattr(resp.raw, "status_code", None)
        headers = {k.lower(): v for k, v in (getattr(resp.raw, "headers", None) or {}).items()}
        message = f"{what}: code {code} {resp.msg or ''} (HTTP {status})".strip()
        if status == 429 or code == RATE_LIMITED:
            reset = headers.get("x-ogw-ratelimit-reset")
            try:
                retry_after = float(reset) if reset is not None else 1.0
            except ValueError:
                retry_after = 1.0
            return DeliveryError(message, transient=True, retry_after=retry_after)
        if code == CHAT_RATE_LIMITED:
            return DeliveryError(message, transient=True, retry_after=1.0)
        if code == TOO_LARGE:
            return TooLarge(message)
        if code in TOKEN_ERRORS or (status is not None and status >= 500) or code is None:
            return DeliveryError(message, transient=True)
        return DeliveryError(message, transient=False)

    # -- messages

    async def send_card(self, *, chat_id: str, card: str, uuid: str, reply_to: str | None, in_thread: bool) -> str:
        if reply_to:
            async def reply(option):
                body = (sdk.ReplyMessageRequestBody.builder().msg_type("interactive").content(card).uuid(uuid)
                        .reply_in_thread(in_thread).build())
                return await self.client.im.message.areply(
                    sdk.ReplyMessageRequest.builder().message_id(reply_to).request_body(body).build(), option)

            resp = await self.call("reply", reply, chat_id=chat_id)
        else:
            async def create(option):
                body = (sdk.CreateMessageRequestBody.builder().receive_id(chat_id).msg_type("interactive")
                        .content(card).uuid(uuid).build())
                return await self.client.im.message.acreate(
                    sdk.CreateMessageRequest.builder().receive_id_type("chat_id").request_body(body).build(), option)

            resp = await self.call("send", create, chat_id=chat_id)
        return resp.data.message_id

    async def patch_card(self, *, chat_id: str, message_id: str, card: str) -> None:
        async def patch(option):
            body = sdk.PatchMessageRequestBody.builder().content(card).build()
            return await self.client.im.message.apatch(
                sdk.PatchMessageRequest.builder().message_id(message_id).request_body(body).build(), option)

        await self.call("patch", patch, chat_id=chat_id)

    async def react(self, *, chat_id: str, message_id: str, emoji: str) -> str:
        async def create(option):
            body = (sdk.CreateMessageReactionRequestBody.builder()
                    .reaction_type(sdk.Emoji.builder().emoji_type(emoji).build()).build())
            return await self.client.im.message_reaction.acreate(
                sdk.CreateMessageReactionRequest.builder().message_id(message_id).request_body(body).build(), option)

        resp = await self.call("react", create, chat_id=chat_id)
        return resp.data.reaction_id

    async def own_reactions(self, *, chat_id: str, message_id: str, emoji: str) -> list[str]:
        """The ids of the `emoji` reactions this app put on the message (the first 50)."""
        async def listing(option):
            request = (sdk.ListMessageReactionRequest.builder().message_id(message_id).reaction_type(emoji)
                       .page_size(50).build())
            return await self.client.im.message_reaction.alist(request, option)

        resp = await self.call("reactions", listing, chat_id=chat_id)
        items = (resp.data.items if resp.data is not None else None) or []
        return [item.reaction_id for item in items if item.reaction_id and item.operator is not None
                and item.operator.operator_type == "app" and item.operator.operator_id in (None, "", self.app_id)]

    async def unreact(self, *, chat_id: str, message_id: str, reaction_id: str) -> None:
        async def delete(option):
            request = sdk.DeleteMessageReactionRequest.builder().message_id(message_id).reaction_id(reaction_id).build()
            return await self.client.im.message_reaction.adelete(request, option)

        await self.call("unreact", delete, chat_id=chat_id)

    async def download(self, *, message_id: str, key: str, kind: str) -> bytes:
        async def get(option):
            return await self.client.im.message_resource.aget(
                sdk.GetMessageResourceRequest.builder().message_id(message_id).file_key(key).type(kind).build(), option)

        resp = await self.call("download", get)
        return resp.file.read()

    # -- identity

    async def bot_open_id(self) -> str:
        async def info(option):
            request = (sdk.BaseRequest.builder().http_method(sdk.HttpMethod.GET).uri("/open-apis/bot/v3/info")
                       .token_types({sdk.AccessTokenType.TENANT}).build())
            return await self.client.arequest(request, option)

        resp = await self.call("bot info", info)
        body = json.loads(resp.raw.content or b"{}")
        return (body.get("bot") or {}).get("open_id", "")

    async def user_name(self, open_id: str) -> str:
        """The person's display name (cached for an hour); the open id when it cannot be read."""
        return await self._names.get(open_id)

    async def _user_name(self, open_id: str) -> str:
        async def get(option):
            return await self.client.contact.user.aget(
                sdk.GetUserRequest.builder().user_id(open_id).user_id_type("open_id").build(), option)

        async with asyncio.timeout(2.0):
            resp = await self.call("user", get)
        return resp.data.user.name
