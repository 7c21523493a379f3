"""The Slack channel: Events API and interactivity over HTTP, or Socket Mode; Block Kit out.

Inbound (`POST /slack/events`, `POST /slack/interactions`): the v0 signature is checked over the
raw body with a 5-minute window (401 otherwise, nothing stored: `checks.py`, run in an HTTP edge
worker when there is one); in the service, events are normalized and persisted through the pipeline's `Ingest` before the 200. Retries (`X-Slack-Retry-Num`) reuse the
event id, and the `message` + `app_mention` pair of one post share channel + ts: both are inbox
keys, so each post runs once. Button clicks go to the gate, which never waits on the turn; the
card is then updated in place by the outbox (`chat.update`).

With `SLACK_APP_TOKEN` the same events arrive over Socket Mode (slack_sdk's aiohttp client),
acknowledged after they are persisted; a bad app token stops start-up with a clear message.

Outbound goes through one AsyncWebClient on one aiohttp session, with slack_sdk's retry handlers
for 429 (`Retry-After`), 5xx and dropped connections, and about one post per second per channel.
A send that posted some parts before failing does not post them again when retried.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import aiohttp
import orjson
from aiohttp import web
from loguru import logger
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
    AsyncServerErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient

from channels import files
from channels.files import FileKeeper
from channels.base import (
    Answer,
    Attachment,
    ChannelNotReady,
    ChannelStartError,
    ConversationKey,
    DeliveryError,
    Forward,
    InboundAction,
    InboundMessage,
    Ingest,
    Reply,
    Sender,
    Webhook,
)
from channels.backoff import again_until
from channels.http import event_answer, json_answer
from channels.marks import WorkingMarks
from channels.names import NameCache
from channels.slack import checks, normalize, render
from channels.slack.normalize import ChannelPolicy

CHANNEL = "slack"
WORKING = "eyes"  # the reaction on a message whose turn runs
DONE = "white_check_mark"  # ... and on one that was answered
POST_INTERVAL = 1.0  # chat.postMessage: about one a second per channel
NAME_TTL = 3600.0
MEMORY = 10_000
DOWNLOAD_BUDGET = 1.5


class SlackStartError(ChannelStartError):
    """The channel cannot start (a bad token): the service must not pretend it runs."""


REFUSED_TOKEN = ("invalid_auth", "not_authed", "token_revoked", "token_expired", "account_inactive",
                 "not_allowed_token_type")


@dataclass(frozen=True, slots=True)
class SlackConfig:
    bot_token: str
    signing_secret: str = ""
    app_token: str = ""
    api_url: str = "https://slack.com/api/"
    fmt: Literal["markdown", "mrkdwn"] = "markdown"
    default_policy: ChannelPolicy = ChannelPolicy()
    channel_policies: dict[str, ChannelPolicy] = field(default_factory=dict)
    allowed_users: frozenset[str] = frozenset()
    allowed_channels: frozenset[str] = frozenset()
    reactions: bool = True

    def policy_for(self, channel: str) -> ChannelPolicy:
        return self.channel_policies.get(channel, self.default_policy)


class _Pacer:
    """At most one post per `interval` per channel (a short queue, not a refusal)."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self._next: OrderedDict[str, float] = OrderedDict()
        self._locks: dict[str, asyncio.Lock] = {}

    async def wait(self, channel: str) -> None:
        lock = self._locks.setdefault(channel, asyncio.Lock())
        async with lock:
            now = time.monotonic()
            due = self._next.get(channel, 0.0)
            if due > now:
                await asyncio.sleep(due - now)
            self._next[channel] = max(now, due) + self.interval
            self._next.move_to_end(channel)
            if len(self._next) > MEMORY:
                old, _ = self._next.popitem(last=False)
                self._locks.pop(old, None)


class SlackChannel:
    name = CHANNEL

    def __init__(self, config: SlackConfig, files: FileKeeper | None = None) -> None:
        self.config = config
        self.files = files or FileKeeper(Path("./data/attachments"))  # where attachments are kept
        self.bot_user_id = ""
        self.bot_id = ""
        self._ingest: Ingest | None = None
        self._session: aiohttp.ClientSession | None = None
        self.client: AsyncWebClient | None = None
        self._socket = None
        self._pacer = _Pacer(POST_INTERVAL)
        self._names = NameCache(self._user_name, channel="slack", ttl=NAME_TTL)
        self._posted: OrderedDict[str, str] = OrderedDict()  # idempotency key + part -> ts
        self._actions: OrderedDict[str, None] = OrderedDict()
        self._fmt = config.fmt
        self._tasks: set[asyncio.Task[Any]] = set()
        self._working = WorkingMarks()  # "eyes" on messages whose turn runs

    # -- lifecycle

    async def start(self, ingest: Ingest) -> None:
        self._ingest = ingest
        self._session = aiohttp.ClientSession()
        self.client = AsyncWebClient(token=self.config.bot_token, base_url=self.config.api_url, session=self._session,
                                     timeout=10)
        self.client.retry_handlers.extend([
            AsyncRateLimitErrorRetryHandler(max_retry_count=3),
            AsyncServerErrorRetryHandler(max_retry_count=2),
        ])
        if not any(isinstance(h, AsyncConnectionErrorRetryHandler) for h in self.client.retry_handlers):
            self.client.retry_handlers.append(AsyncConnectionErrorRetryHandler())
        if not await self._identify():
            self._again_in_background(self._identify, "auth.test")
        if self.config.app_token:
            await self._start_socket_mode()

    async def _identify(self) -> bool:
        """auth.test: the bot's own ids (to tell its mentions and its own messages). A refused
        token stops the start; Slack away is logged, and the ids are read again later."""
        try:
            auth = await self.client.auth_test()
        except SlackApiError as exc:
            error = exc.response.get("error") if isinstance(exc.response.data, dict) else exc.response.status_code
            if error in REFUSED_TOKEN:
                await self._session.close()
                raise SlackStartError(f"SLACK_BOT_TOKEN was refused by Slack ({error})") from None
            logger.error("slack: auth.test failed: {}", error)
            return False
        except (aiohttp.ClientError, TimeoutError) as exc:
            logger.error("slack: cannot reach {}: {}", self.config.api_url, exc)
            return False
        self.bot_user_id, self.bot_id = auth.get("user_id", ""), auth.get("bot_id", "")
        logger.info("slack: connected as {} ({})", auth.get("user"), self.bot_user_id)
        return True

    def _again_in_background(self, attempt, what: str) -> None:
        """`attempt()` again, with backoff, until it works; a token refused meanwhile ends it."""
        async def again() -> bool:
            try:
                return await attempt()
            except SlackStartError as exc:  # said, and tried no more
                logger.error("slack: {}", exc)
                return True
            except Exception as exc:  # noqa: BLE001 - tried again
                logger.warning("slack: {} failed: {}: {}", what, type(exc).__name__, exc)
                return False

        task = asyncio.create_task(again_until(again), name=f"slack:{what}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _start_socket_mode(self) -> None:
        """Connect Socket Mode. A refused app token stops the start; Slack away for a moment
        (5xx, service_unavailable, no network) does not: the connection is tried again in the
        background with backoff, and /readyz says it is not connected meanwhile."""
        if not await self._connect_socket():
            self._again_in_background(self._connect_socket, "Socket Mode")

    async def _connect_socket(self) -> bool:
        from slack_sdk.socket_mode.aiohttp import SocketModeClient

        app_client = AsyncWebClient(token=self.config.app_token, base_url=self.config.api_url, session=self._session)
        socket = SocketModeClient(app_token=self.config.app_token, web_client=app_client, ping_interval=10,
                                  auto_reconnect_enabled=True)
        try:
            # first: connect() itself would retry a refused token forever
            socket.wss_uri = await socket.issue_new_wss_url()
        except SlackApiError as exc:
            await socket.close()
            error = exc.response.get("error") if isinstance(exc.response.data, dict) else exc.response.status_code
            if error in REFUSED_TOKEN:
                raise SlackStartError(f"SLACK_APP_TOKEN was refused by Slack ({error}); Socket Mode cannot start") from None
            logger.warning("slack: apps.connections.open failed ({}); Socket Mode is tried again", error)
            return False
        except (aiohttp.ClientError, TimeoutError) as exc:
            await socket.close()
            logger.warning("slack: cannot reach {} ({}); Socket Mode is tried again", self.config.api_url, exc)
            return False
        socket.socket_mode_request_listeners.append(self._on_socket_request)
        await socket.connect()
        self._socket = socket
        logger.info("slack: Socket Mode connected")
        return True

    async def loaded(self) -> None:
        return None

    async def stop(self) -> None:
        if self._socket is not None:
            await self._socket.close()
            self._socket = None
        for task in list(self._tasks):
            task.cancel()
        self._working.cancel_all()
        if self._session is not None:
            await self._session.close()
        self._ingest = None

    async def health(self) -> dict[str, Any]:
        detail: dict[str, Any] = {"ok": bool(self.bot_user_id), "bot_user_id": self.bot_user_id or None,
                                  "mode": "socket" if self.config.app_token else "http"}
        if self._socket is not None:
            connected = await self._socket.is_connected()
            detail["socket_connected"] = connected
            detail["ok"] = detail["ok"] and connected
        return detail

    def routes(self) -> list[web.RouteDef]:
        return []

    def webhooks(self) -> list[Webhook]:
        secret = self.config.signing_secret
        return [Webhook(checks.EventsCheck(secret), self.accept_event, self.accept_events),
                Webhook(checks.InteractionsCheck(secret), self.accept_interaction)]

    # -- inbound over HTTP (checked by channels/slack/checks.py)

    async def accept_event(self, forward: Forward) -> Answer:
        return (await self.accept_events([forward]))[0]

    async def accept_events(self, forwards: Sequence[Forward]) -> list[Answer]:
        payloads = [f.parsed if f.parsed is not None else orjson.loads(f.body) for f in forwards]
        return [event_answer(outcome, "slack: an event") for outcome in await self.handle_events(payloads)]

    async def accept_interaction(self, forward: Forward) -> Answer:
        payload = forward.parsed if forward.parsed is not None else orjson.loads(forward.body)
        return json_answer(await self.handle_interaction(payload))

    # -- inbound over Socket Mode

    async def _on_socket_request(self, client, request) -> None:
        from slack_sdk.socket_mode.response import SocketModeResponse

        payload = request.payload or {}
        try:
            if request.type == "events_api":
                await self.handle_event(payload)
            elif request.type == "interactive":
                await self.handle_interaction(payload)
            else:
                logger.info("slack: ignoring a {} envelope", request.type)
        except Exception:  # noqa: BLE001 - not acked: Slack redelivers, the inbox dedupes
            logger.exception("slack: a Socket Mode envelope failed; not acknowledged")
            return
        await client.send_socket_mode_response(SocketModeResponse(envelope_id=request.envelope_id))

    # -- events

    async def handle_event(self, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """One event -> (status, body). Raises when it could not be taken (not kept: to be sent
        again)."""
        answer = (await self.handle_events([payload]))[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer

    async def handle_events(self, payloads: Sequence[dict[str, Any]]) -> list[tuple[int, dict[str, Any]] | BaseException]:
        """Events that arrived together: each normalized, the messages persisted in one write.
        An event that could not be taken (the store away, the bot's identity unknown, a bug) is
        its own answer's exception; the others are taken as usual."""
        answers: list[tuple[int, dict[str, Any]] | BaseException] = [(200, {})] * len(payloads)
        messages: list[tuple[int, InboundMessage, normalize.Parsed]] = []
        for index, payload in enumerate(payloads):
            try:
                message = await self._message(payload)
            except Exception as exc:  # noqa: BLE001 - this event fails alone
                answers[index] = exc
                continue
            if message is not None:
                messages.append((index, *message))
        if messages:
            assert self._ingest is not None, "channel not started"
            results = await self._ingest.accept_many([(event, None) for _, event, _ in messages])
            for (index, _, parsed), result in zip(messages, results, strict=True):
                if result.error is not None:
                    answers[index] = result.error
                    continue
                if result.answered and not result.duplicate and self.config.reactions:
                    self._working.add(parsed.ts, self._react(parsed.channel, parsed.ts, WORKING))
        return answers

    async def _message(self, payload: dict[str, Any]) -> tuple[InboundMessage, normalize.Parsed] | None:
        """The message an event carries for the pipeline, or None when it is not one to act on."""
        if payload.get("type") != "event_callback":
            logger.info("slack: ignoring a {!r} request", payload.get("type"))
            return None
        event = payload.get("event") or {}
        channel = event.get("channel", "")
        if not self.bot_user_id and event.get("type") in ("message", "app_mention"):
            raise ChannelNotReady("the bot's own identity is not known yet (auth.test failed), so its mentions and "
                                  "its own messages cannot be told: send the event again")
        why = normalize.acted_on(event, bot_user_id=self.bot_user_id, bot_id=self.bot_id,
                                 policy=self.config.policy_for(channel))

        def log():  # bound only when a record is written: binding costs on every event
            return logger.bind(conversation=f"{CHANNEL}:{channel}", event=payload.get("event_id"))

        if why is not None:
            log().debug("slack: not acting on {}: {}", event.get("type"), why)
            return None
        parsed = normalize.parse(payload, policy=self.config.policy_for(channel))
        if self.config.allowed_channels and parsed.channel not in self.config.allowed_channels:
            log().info("slack: channel {} is not allowed", parsed.channel)
            return None
        if self.config.allowed_users and parsed.user not in self.config.allowed_users:
            log().info("slack: user {} is not allowed", parsed.user)
            return None
        names = {u: await self.user_name(u) for u in {parsed.user, *parsed.mentions} if u != self.bot_user_id}
        text = normalize.clean_text(parsed.text, bot_user_id=self.bot_user_id, names=names)
        conversation = ConversationKey(CHANNEL, parsed.channel, parsed.thread_key)
        attachments = await self._download(parsed)
        return InboundMessage(
            conversation=conversation, sender=Sender(parsed.user, names.get(parsed.user, "")), text=text,
            event_key=f"{CHANNEL}:{parsed.event_id or parsed.channel + ':' + parsed.ts}",
            message_key=f"{CHANNEL}:{parsed.channel}:{parsed.ts}",
            is_group=parsed.is_group, mentions_bot=event.get("type") == "app_mention",
            platform_message_id=parsed.reply_root, attachments=attachments,
            marked_message_id=parsed.ts if self.config.reactions else None,
            sent_at=float(parsed.ts) if parsed.ts.replace(".", "", 1).isdigit() else None,
        ), parsed

    async def _download(self, parsed: normalize.Parsed) -> tuple[Attachment, ...]:
        shared = [f for f in parsed.files if f.get("url_private_download") or f.get("url_private")]
        if not shared or self._session is None:
            return ()
        folder = files.safe_name(f"{parsed.channel}-{parsed.ts}")
        names = files.file_names([info.get("name") or info.get("id") for info in shared])
        keys = [f"{CHANNEL}/{folder}/{name}" for name in names]
        saved: dict[int, str] = {}

        async def fetch(index: int, info: dict[str, Any]) -> None:
            url = info.get("url_private_download") or info["url_private"]
            headers = {"Authorization": f"Bearer {self.config.bot_token}"}
            async with self._session.get(url, headers=headers) as resp:  # type: ignore[union-attr]
                kind = resp.headers.get("Content-Type", "")
                if resp.status != 200 or kind.startswith("text/html"):
                    raise DeliveryError(f"download of {info.get('name')} failed ({resp.status}, {kind})",
                                        transient=True)
                data = await resp.read()
            saved[index] = await self.files.keep(keys[index], data)

        try:
            async with asyncio.timeout(DOWNLOAD_BUDGET):
                await asyncio.gather(*(fetch(i, f) for i, f in enumerate(shared)))
        except (DeliveryError, TimeoutError, aiohttp.ClientError, OSError) as exc:
            logger.warning("slack: attachments of {} not downloaded: {}", parsed.ts, exc)
        # one entry per file, downloaded or not (an empty path): a file is never dropped unseen
        return tuple(Attachment(names[i], saved.get(i, ""), info.get("mimetype") or "application/octet-stream",
                                keys[i] if i in saved else "")
                     for i, info in enumerate(shared))

    # -- interactions

    async def handle_interaction(self, payload: dict[str, Any]) -> dict[str, Any]:
        if payload.get("type") != "block_actions":
            return {}
        user = (payload.get("user") or {}).get("id", "")
        channel = (payload.get("channel") or {}).get("id") or (payload.get("container") or {}).get("channel_id", "")
        message_ts = (payload.get("container") or {}).get("message_ts") or (payload.get("message") or {}).get("ts", "")
        for action in payload.get("actions") or []:
            try:
                value = json.loads(action.get("value") or "{}")
            except ValueError:
                continue
            if not isinstance(value, dict) or "action_id" not in value:
                continue
            # a click is one delivery (its action_ts): Socket Mode may deliver it again; a second
            # click on the same button is a click of its own. Kept once the click was handled, so
            # one that failed (the store away) is taken when Slack delivers it again.
            dedupe = json.dumps([channel, message_ts, user, action.get("action_ts") or value], sort_keys=True)
            if dedupe in self._actions:
                continue
            assert self._ingest is not None, "channel not started"
            thread = (payload.get("message") or {}).get("thread_ts")
            conversation = self._conversation_for(channel, thread, user)
            result = await self._ingest.act(InboundAction(
                conversation=conversation, actor=Sender(user), action_id=str(value["action_id"]),
                value={k: v for k, v in value.items() if k != "action_id"}, platform_message_id=message_ts,
            ))
            self._actions[dedupe] = None
            if len(self._actions) > MEMORY:
                self._actions.popitem(last=False)
            if result.status != "ok":
                self._spawn(self._ephemeral(channel, user, result.toast, thread))
        return {}

    def _conversation_for(self, channel: str, thread_ts: str | None, user: str) -> ConversationKey:
        if channel.startswith("D"):
            return ConversationKey(CHANNEL, channel)
        scope = self.config.policy_for(channel).scope
        key = thread_ts if scope == "thread" else f"u-{user}" if scope == "user" else None
        return ConversationKey(CHANNEL, channel, key)

    async def _ephemeral(self, channel: str, user: str, text: str, thread_ts: str | None) -> None:
        try:
            assert self.client is not None
            await self.client.chat_postEphemeral(channel=channel, user=user, text=text, thread_ts=thread_ts)
        except (SlackApiError, aiohttp.ClientError) as exc:
            logger.debug("slack: ephemeral not posted: {}", exc)

    # -- outbound

    def render(self, reply: Reply) -> list[dict[str, Any]]:
        return render.render(reply, fmt=self._fmt)

    def _thread(self, conversation: ConversationKey, reply: Reply) -> str | None:
        thread = conversation.thread_id
        if thread and not thread.startswith("u-"):
            return thread
        return reply.reply_to

    async def send(self, conversation: ConversationKey, reply: Reply, *, idempotency_key: str) -> str:
        thread_ts = self._thread(conversation, reply)
        messages = self.render(reply)
        first = ""
        for part, message in enumerate(messages):
            key = f"{idempotency_key}:{part}"
            ts = self._posted.get(key)
            if ts is None:
                await self._pacer.wait(conversation.chat_id)
                result = await self._call("chat.postMessage", self._post, conversation.chat_id, message, thread_ts)
                ts = result["ts"]
                self._posted[key] = ts
                if len(self._posted) > MEMORY:
                    self._posted.popitem(last=False)
            first = first or ts
        return first

    async def _post(self, channel: str, message: dict[str, Any], thread_ts: str | None):
        assert self.client is not None
        return await self.client.chat_postMessage(channel=channel, text=message["text"], blocks=message["blocks"],
                                                  thread_ts=thread_ts, unfurl_links=False, unfurl_media=False)

    async def update(self, conversation: ConversationKey, platform_message_id: str, reply: Reply) -> None:
        messages = self.render(reply)
        assert self.client is not None

        async def _update(channel: str, message: dict[str, Any], _thread: str | None):
            return await self.client.chat_update(channel=channel, ts=platform_message_id,  # type: ignore[union-attr]
                                                 text=message["text"], blocks=message["blocks"])

        await self._call("chat.update", _update, conversation.chat_id, messages[0], None)
        if len(messages) > 1:
            # a reply that outgrew its message: the rest follows in the thread, posted once
            digest = hashlib.sha256((reply.text or "").encode()).hexdigest()[:16]
            thread_ts = self._thread(conversation, reply)
            for part, message in enumerate(messages[1:], start=1):
                key = f"update:{platform_message_id}:{digest}:{part}"
                if key in self._posted:
                    continue
                await self._pacer.wait(conversation.chat_id)
                result = await self._call("chat.postMessage", self._post, conversation.chat_id, message, thread_ts)
                self._posted[key] = result["ts"]

    async def _call(self, what: str, fn, channel: str, message: dict[str, Any], thread_ts: str | None):
        """One Web API call with error classification; blocks Slack refuses are sent again as mrkdwn."""
        try:
            return await fn(channel, message, thread_ts)
        except SlackApiError as exc:
            status = exc.response.status_code
            data = exc.response.data if isinstance(exc.response.data, dict) else {}
            error = data.get("error") or f"HTTP {status}"
            has_buttons = any(block.get("type") == "actions" for block in message.get("blocks") or ())
            if (error in ("invalid_blocks", "invalid_blocks_format", "msg_blocks_too_long") and self._fmt == "markdown"
                    and not has_buttons):  # a card sent again as text would lose its buttons
                logger.warning("slack: {} refused the blocks ({}); sending mrkdwn sections", what, error)
                text = _message_markdown(message)
                fallback = render.render(Reply(text=text), fmt="mrkdwn")[0]
                return await self._call(what, fn, channel, fallback, thread_ts)
            retry_after = exc.response.headers.get("Retry-After") or exc.response.headers.get("retry-after")
            transient = status == 429 or status >= 500 or error in ("ratelimited", "internal_error",
                                                                    "service_unavailable", "request_timeout")
            raise DeliveryError(f"{what}: {error}", transient=transient,
                                retry_after=float(retry_after) if retry_after and retry_after.isdigit() else None
                                ) from None
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise DeliveryError(f"{what}: {type(exc).__name__}: {exc}", transient=True) from None

    async def react(self, conversation: ConversationKey, platform_message_id: str, state: str) -> None:
        """The turn ended: "eyes" is taken off the person's message, "white_check_mark" put on when
        it was answered."""
        if not self.config.reactions or self.client is None:
            return
        await self._working.take(platform_message_id)  # added (or not) before it is taken off
        try:
            await self.client.reactions_remove(channel=conversation.chat_id, name=WORKING, timestamp=platform_message_id)
        except (SlackApiError, aiohttp.ClientError) as exc:
            logger.debug("slack: reaction not removed: {}", exc)
        if state == "done":
            await self._react(conversation.chat_id, platform_message_id, DONE)

    async def _react(self, channel: str, ts: str, emoji: str) -> None:
        try:
            assert self.client is not None
            await self.client.reactions_add(channel=channel, name=emoji, timestamp=ts)
        except (SlackApiError, aiohttp.ClientError) as exc:
            logger.debug("slack: reaction not added: {}", exc)

    async def user_name(self, user_id: str) -> str:
        """The person's display name (cached for an hour); the user id when it cannot be read."""
        return await self._names.get(user_id)

    async def _user_name(self, user_id: str) -> str:
        assert self.client is not None
        async with asyncio.timeout(2.0):
            info = await self.client.users_info(user=user_id)
        user = info.get("user") or {}
        return (user.get("profile") or {}).get("display_name") or user.get("real_name") or user.get("name") or ""

    def _spawn(self, coro) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)


def _message_markdown(message: dict[str, Any]) -> str:
    parts = [b.get("text", "") for b in message.get("blocks") or [] if b.get("type") == "markdown"]
    return "\n\n".join(parts) or message.get("text", "")
