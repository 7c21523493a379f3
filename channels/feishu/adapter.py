"""The Feishu / Lark channel: events in (webhook), cards out.

Inbound, `POST /feishu/events`: the signature (when an encrypt key is set, constant-time) and the
timestamp window are checked on the raw body, the body decrypted, the verification token
compared (`checks.EventsCheck`, which runs in an HTTP edge worker when there is one); then, in
the service, a message is normalized and persisted through the pipeline's `Ingest` before the
200 goes back, well inside Feishu's 3 s. A redelivered event, or the same message under a new
event id, is a duplicate by the inbox's keys. Every other subscribed event type gets a 200 and a
log line, never a 500 that Feishu would retry for hours.

Card clicks (`card.action.trigger`) go to the gate, which answers without waiting on the turn;
the response carries a toast and the card in its new state. Redelivered clicks get the same
answer again.

Outbound, every message is a card (cards can be patched in place, which progress and approval
state need), sent as a reply to the person's message where there is one, with an idempotency
`uuid` derived from the outbox key, so a retried send never posts twice. A reply too long for
one card goes in numbered parts, a part Feishu finds too large (230025) in smaller ones; an edit
puts the first part in the message and posts the others after it.
"""

from __future__ import annotations

import asyncio
import hashlib
import mimetypes
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import orjson
from aiohttp import web
from loguru import logger

from channels import files
from channels.files import FileKeeper
from channels.base import (
    Answer,
    Attachment,
    ChannelNotReady,
    ConversationKey,
    DeliveryError,
    InboundAction,
    Forward,
    InboundMessage,
    Ingest,
    Reply,
    Sender,
    Webhook,
)
from channels.backoff import again_until
from channels.feishu import checks, normalize, render
from channels.feishu.errors import TooLarge
from channels.feishu.normalize import ChatPolicy
from channels.http import event_answer
from channels.marks import WorkingMarks

CHANNEL = "feishu"
WORKING = "OnIt"  # the reaction on a message whose turn runs
DONE = "DONE"  # ... and on one that was answered
MEMORY_WORKING = 50_000  # message ids whose "OnIt" reaction this process remembers
ACTION_MEMORY = 4096
DOWNLOAD_BUDGET = 1.5  # seconds for attachments before the ack (Feishu waits 3 s)
LOAD_WAIT = 30.0  # seconds an event or a reply waits for the client to load at start-up

Poster = Callable[[dict[str, Any], str], Awaitable[str]]  # (card, uuid) -> the message id it went to


@dataclass(frozen=True, slots=True)
class FeishuConfig:
    app_id: str
    app_secret: str
    verification_token: str = ""
    encrypt_key: str = ""
    domain: str = "https://open.feishu.cn"
    connection: Literal["webhook", "websocket"] = "webhook"
    stale_after: float = 600.0
    default_policy: ChatPolicy = ChatPolicy()
    chat_policies: dict[str, ChatPolicy] = field(default_factory=dict)
    allowed_users: frozenset[str] = frozenset()
    allowed_chats: frozenset[str] = frozenset()
    reactions: bool = True

    def policy_for(self, chat_id: str) -> ChatPolicy:
        return self.chat_policies.get(chat_id, self.default_policy)


def _uuid(key: str, part: int = 0) -> str:
    """An idempotency uuid (Feishu allows 50 characters) for an outbox key and a card part."""
    digest = hashlib.sha256(key.encode()).hexdigest()[:40]
    return f"{digest}-{part}"


class FeishuChannel:
    name = CHANNEL

    def __init__(self, config: FeishuConfig, api_factory: Callable[[], Any], files: FileKeeper | None = None) -> None:
        self.config = config
        self.files = files or FileKeeper(Path("./data/attachments"))  # where attachments are kept
        self._api_factory = api_factory  # builds the FeishuApi (imports lark-oapi's messaging API: done off the loop)
        self._api: Any = None
        self._loading: asyncio.Future[None] | None = None
        self._identifying: asyncio.Task[None] | None = None  # the bot's identity, read again until known
        self.bot_open_id = ""
        self._ingest: Ingest | None = None
        self._actions: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self._last_message: OrderedDict[str, str] = OrderedDict()  # conversation -> latest inbound message id
        self._sent_in: OrderedDict[str, str] = OrderedDict()  # message id -> the conversation it was sent to
        self._started_error = ""
        self._working = WorkingMarks(MEMORY_WORKING)  # "OnIt" on messages whose turn runs
        self.transport = None  # the long connection, when FEISHU_CONNECTION=websocket

    # -- lifecycle

    async def start(self, ingest: Ingest) -> None:
        """Returns at once: lark-oapi is imported on a worker thread and the bot's identity read in
        the background, so the service is up in about a second; events that arrive meanwhile wait
        for it (they need the bot's open_id), replies are retried by the outbox."""
        self._ingest = ingest
        self._loading = asyncio.ensure_future(self._load())
        if self.transport is not None:
            await self.transport.start(self)

    async def _load(self) -> None:
        self._api = await asyncio.get_running_loop().run_in_executor(None, self._api_factory)
        if not await self._identify():
            self._identifying = asyncio.create_task(again_until(self._identify), name="feishu:identity")

    async def _identify(self) -> bool:
        try:
            self.bot_open_id = await self._api.bot_open_id()
        except DeliveryError as exc:
            # Still serve: events are persisted, replies retried; /readyz shows the problem, and
            # group messages wait (503, sent again) until it is known.
            self._started_error = str(exc)
            logger.error("feishu: cannot read the bot's identity: {}", exc)
            return False
        self._started_error = ""
        logger.info("feishu: bot open_id {}", self.bot_open_id)
        return True

    async def loaded(self) -> None:
        if self._loading is not None:
            await asyncio.wait([self._loading])  # its failure is reported by api() and /readyz

    async def api(self) -> Any:
        """The API client, once loaded."""
        if self._api is None:
            if self._loading is None:
                raise DeliveryError("the Feishu channel is not started", transient=True)
            async with asyncio.timeout(LOAD_WAIT):
                await asyncio.shield(self._loading)
        return self._api

    async def stop(self) -> None:
        if self._identifying is not None:
            self._identifying.cancel()
            await asyncio.gather(self._identifying, return_exceptions=True)
            self._identifying = None
        if self.transport is not None:
            await self.transport.stop()
        self._working.cancel_all()
        self._ingest = None

    async def health(self) -> dict[str, Any]:
        detail: dict[str, Any] = {"ok": bool(self.bot_open_id), "connection": self.config.connection,
                                  "bot_open_id": self.bot_open_id or None}
        if not self.bot_open_id and self._api is not None:
            try:
                self.bot_open_id = await self._api.bot_open_id()
                detail.update(ok=True, bot_open_id=self.bot_open_id)
            except DeliveryError as exc:
                detail["error"] = str(exc)
        if self.transport is not None:
            state = self.transport.health()
            detail["long_connection"] = state
            detail["ok"] = detail["ok"] and state.get("connected", False)
        return detail

    def routes(self) -> list[web.RouteDef]:
        return []

    def webhooks(self) -> list[Webhook]:
        if self.config.connection != "webhook":
            return []  # events come over the long connection: no public route to forge them on
        check = checks.EventsCheck(self.config.encrypt_key, self.config.verification_token)
        return [Webhook(check, self.accept_event, self.accept_events)]

    # -- inbound: the webhook (checked by checks.EventsCheck) and the long connection

    async def accept_event(self, forward: Forward) -> Answer:
        return (await self.accept_events([forward]))[0]

    async def accept_events(self, forwards: Sequence[Forward]) -> list[Answer]:
        payloads = [f.parsed if f.parsed is not None else orjson.loads(f.body) for f in forwards]
        return [event_answer(outcome, "feishu: an event") for outcome in await self.handle_many(payloads)]

    async def handle(self, payload: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """A verified, decrypted event (from the webhook or the long connection) -> (status, body).
        Raises when it could not be taken (not kept: to be sent again)."""
        answer = (await self.handle_many([payload]))[0]
        if isinstance(answer, BaseException):
            raise answer
        return answer

    async def handle_many(self, payloads: Sequence[dict[str, Any]]) -> list[tuple[int, dict[str, Any]] | BaseException]:
        """Events that arrived together: messages normalized one by one and persisted in one
        write; card clicks and the rest answered each on its own. An event that could not be
        taken (the store away, the bot's identity unknown, a bug) is its own answer's exception;
        the others are taken as usual."""
        answers: list[tuple[int, dict[str, Any]] | BaseException] = [(200, {})] * len(payloads)
        messages: list[tuple[int, InboundMessage, normalize.Parsed]] = []
        for index, payload in enumerate(payloads):
            if payload.get("type") == "url_verification":
                answers[index] = (200, {"challenge": payload.get("challenge", "")})
                continue
            header = payload.get("header") or {}
            event_type = header.get("event_type") or (payload.get("event") or {}).get("type") or ""
            try:
                if event_type == "im.message.receive_v1":
                    try:
                        message = await self._message(payload)
                    except normalize.NotAMessage as exc:
                        answers[index] = (400, {"error": str(exc)})
                        continue
                    if message is not None:
                        messages.append((index, *message))
                elif event_type == "card.action.trigger":
                    answers[index] = (200, await self._on_card_action(payload))
                else:
                    logger.info("feishu: ignoring event type {!r} (event {})", event_type, header.get("event_id"))
            except Exception as exc:  # noqa: BLE001 - this event fails alone
                answers[index] = exc
        if messages:
            assert self._ingest is not None, "channel not started"
            results = await self._ingest.accept_many([(event, None) for _, event, _ in messages])
            for (index, event, parsed), result in zip(messages, results, strict=True):
                if result.error is not None:
                    answers[index] = result.error
                    continue
                self._remember(str(event.conversation), parsed.message_id)
                if event.stale:
                    logger.bind(conversation=str(event.conversation), event=parsed.event_id).warning(
                        "feishu: message {} is {:.0f}s old; not run", parsed.message_id,
                        time.time() - (parsed.create_time or 0))
                elif result.answered and not result.duplicate and self.config.reactions:
                    self._working.add(parsed.message_id, self._react(parsed.chat_id, parsed.message_id, WORKING))
        return answers

    async def _message(self, payload: dict[str, Any]) -> tuple[InboundMessage, normalize.Parsed] | None:
        """The message an event carries for the pipeline; None when it is not one to act on.
        Raises normalize.NotAMessage for a malformed one."""
        api = await self.api()
        parsed = normalize.parse(payload, bot_open_id=self.bot_open_id, policy_for=self.config.policy_for)

        def log():  # bound only when a record is written: binding costs on every event
            return logger.bind(conversation=f"{CHANNEL}:{parsed.chat_id}", event=parsed.event_id)

        if parsed.sender_type != "user" or (self.bot_open_id and parsed.sender_open_id == self.bot_open_id):
            log().debug("feishu: ignoring a message from a bot")
            return None
        if self.config.allowed_chats and parsed.chat_id not in self.config.allowed_chats:
            log().info("feishu: chat {} is not allowed", parsed.chat_id)
            return None
        if self.config.allowed_users and parsed.sender_open_id not in self.config.allowed_users:
            log().info("feishu: user {} is not allowed", parsed.sender_open_id)
            return None
        policy = self.config.policy_for(parsed.chat_id)
        if parsed.is_group and policy.trigger == "mention" and not self.bot_open_id:
            raise ChannelNotReady("the bot's own identity is not known yet, so a mention of it cannot be told: "
                                  "send the event again")
        if parsed.is_group and policy.trigger == "mention" and not parsed.mentions_bot:
            log().debug("feishu: group message without a mention of the bot; not for us")
            return None
        conversation = ConversationKey(CHANNEL, parsed.chat_id, parsed.thread_key)
        stale = parsed.create_time is not None and time.time() - parsed.create_time > self.config.stale_after
        attachments = () if stale else await self._download(parsed)
        name = await api.user_name(parsed.sender_open_id) if parsed.sender_open_id else ""
        return InboundMessage(
            conversation=conversation,
            sender=Sender(parsed.sender_open_id, name),
            text=parsed.text,
            event_key=f"{CHANNEL}:{parsed.event_id or parsed.message_id}",
            message_key=f"{CHANNEL}:{parsed.message_id}",
            is_group=parsed.is_group,
            mentions_bot=parsed.mentions_bot,
            platform_message_id=parsed.message_id,
            attachments=attachments,
            sent_at=parsed.create_time,
            stale=stale,
            marked_message_id=parsed.message_id if self.config.reactions and not stale else None,
        ), parsed

    async def _download(self, parsed: normalize.Parsed) -> tuple[Attachment, ...]:
        if not parsed.files:
            return ()
        folder = files.safe_name(parsed.message_id)
        names = files.file_names([ref.name for ref in parsed.files])
        keys = [f"{CHANNEL}/{folder}/{name}" for name in names]
        saved: dict[int, str] = {}

        async def fetch(index: int, ref: normalize.FileRef) -> None:
            data = await (await self.api()).download(message_id=parsed.message_id, key=ref.key, kind=ref.kind)
            saved[index] = await self.files.keep(keys[index], data)

        try:
            async with asyncio.timeout(DOWNLOAD_BUDGET):
                await asyncio.gather(*(fetch(i, f) for i, f in enumerate(parsed.files)))
        except (DeliveryError, TimeoutError, OSError) as exc:
            logger.warning("feishu: attachments of {} not downloaded: {}", parsed.message_id, exc)
        # one entry per file, downloaded or not (an empty path): a file is never dropped unseen
        return tuple(Attachment(names[i], saved.get(i, ""), _mime_type(ref), keys[i] if i in saved else "")
                     for i, ref in enumerate(parsed.files))

    async def _react(self, chat_id: str, message_id: str, emoji: str) -> str | None:
        """Add a reaction; its id (None when it could not be added)."""
        try:
            return await (await self.api()).react(chat_id=chat_id, message_id=message_id, emoji=emoji)
        except DeliveryError as exc:
            logger.debug("feishu: reaction not added: {}", exc)
            return None

    def _remember(self, conversation: str, message_id: str) -> None:
        self._last_message[conversation] = message_id
        self._last_message.move_to_end(conversation)
        if len(self._last_message) > 50_000:
            self._last_message.popitem(last=False)

    async def _on_card_action(self, payload: dict[str, Any]) -> dict[str, Any]:
        event = payload.get("event") or {}
        operator = (event.get("operator") or {}).get("open_id", "")
        action = event.get("action") or {}
        value = action.get("value") or {}
        context = event.get("context") or {}
        message_id = context.get("open_message_id", "")
        chat_id = context.get("open_chat_id", "")
        if not isinstance(value, dict) or "action_id" not in value or not message_id:
            return {"toast": {"type": "error", "content": "This button is not from agent-bridge."}}
        # A click is one event: Feishu sends the same event_id again when it retries; two clicks
        # on the same button are two events (a second /status, a second Stop).
        dedupe = ((payload.get("header") or {}).get("event_id") or "") or None
        if dedupe is not None and dedupe in self._actions:
            return self._actions[dedupe]
        assert self._ingest is not None, "channel not started"
        conversation = self._conversation_of(chat_id, operator, message_id, value)
        result = await self._ingest.act(InboundAction(
            conversation=conversation, actor=Sender(operator), action_id=str(value["action_id"]),
            value={k: v for k, v in value.items() if k != "action_id"}, platform_message_id=message_id,
        ))
        kind = {"ok": "success", "forbidden": "error", "conflict": "warning", "not_found": "error"}[result.status]
        answer: dict[str, Any] = {"toast": {"type": kind, "content": result.toast}}
        if result.card is not None:
            answer["card"] = {"type": "raw", "data": self.render(result.card)[0]}
        if dedupe is not None:
            self._actions[dedupe] = answer
            if len(self._actions) > ACTION_MEMORY:
                self._actions.popitem(last=False)
        return answer

    def _conversation_of(self, chat_id: str, operator: str, message_id: str, value: dict[str, Any]) -> ConversationKey:
        """The conversation a clicked card belongs to: the one this process sent it to; else, for a
        chat scoped per person, the clicker's; else the chat's (a topic's card clicked after a
        restart: its topic is not in the click)."""
        if value.get("conversation"):
            try:
                return ConversationKey.parse(str(value["conversation"]))
            except ValueError:
                pass
        sent_in = self._sent_in.get(message_id)
        if sent_in is not None:
            return ConversationKey.parse(sent_in)
        if self.config.policy_for(chat_id).scope == "user" and operator:
            return ConversationKey(CHANNEL, chat_id or "unknown", f"u-{operator}")
        return ConversationKey(CHANNEL, chat_id or "unknown")

    # -- outbound

    def render(self, reply: Reply) -> list[dict[str, Any]]:
        return render.render(reply)

    def _target(self, conversation: ConversationKey, reply: Reply) -> tuple[str | None, bool]:
        """(message to reply to, in its thread?)"""
        thread = conversation.thread_id
        if thread and thread.startswith("om_"):
            return thread, True  # a topic conversation: everything goes into its thread
        return reply.reply_to or self._last_message.get(str(conversation)), False

    async def send(self, conversation: ConversationKey, reply: Reply, *, idempotency_key: str) -> str:
        reply_to, in_thread = self._target(conversation, reply)

        async def post(card: dict[str, Any], uuid: str) -> str:
            return await self._post(conversation, card, uuid, reply_to, in_thread)

        first = ""
        for part, card in enumerate(render.render(reply)):
            uuid = _uuid(f"{idempotency_key}:{render.BUDGET}", part)
            posted = await self._part(conversation, reply, part, card, uuid, idempotency_key, post, post)
            first = first or posted[0]
        return first

    async def _part(self, conversation: ConversationKey, reply: Reply, part: int, card: dict[str, Any], uuid: str,
                    key: str, first: Poster, rest: Poster) -> list[str]:
        """Part `part` of the reply (`card`), put with `first`: a post, or the edit of a message.
        When the platform measures it bigger than we did (230025), it goes again as smaller parts
        ("2.1 / 3"): the first of them with `first`, the others posted with `rest`. The parts
        already delivered stay; every part's uuid is its own (from `key`), so a retry posts none
        of them twice. Returns the ids of the messages it went to, in order."""
        try:
            delivered = [await first(card, uuid)]
        except TooLarge:
            if reply.card is not None:
                raise
            logger.warning("feishu: part {} of a reply was too large; sent in smaller parts", part + 1)
            half = render.BUDGET // 2
            pieces = render.smaller(reply, part, half)
            delivered = [await first(pieces[0], _uuid(f"{key}:{half}:{part}", 0))]
            for sub, piece in enumerate(pieces[1:], start=1):
                delivered.append(await rest(piece, _uuid(f"{key}:{half}:{part}", sub)))
        for message_id in delivered:
            self._sent_in[message_id] = str(conversation)
            if len(self._sent_in) > MEMORY_WORKING:
                self._sent_in.popitem(last=False)
        return delivered

    async def _post(self, conversation: ConversationKey, card: dict[str, Any], uuid: str,
                    reply_to: str | None, in_thread: bool) -> str:
        try:
            return await (await self.api()).send_card(chat_id=conversation.chat_id, card=render.card_json(card), uuid=uuid,
                                            reply_to=reply_to, in_thread=in_thread)
        except DeliveryError as exc:
            if reply_to and not exc.transient and "230011" in str(exc):
                # the message replied to was recalled: post in the chat instead
                return await (await self.api()).send_card(chat_id=conversation.chat_id, card=render.card_json(card),
                                                uuid=uuid, reply_to=None, in_thread=False)
            raise

    async def update(self, conversation: ConversationKey, platform_message_id: str, reply: Reply) -> None:
        """The message gets the reply's first part; a reply that outgrew it follows in numbered
        parts posted after it, as `send` numbers them. The parts' uuids come from the message and
        the content, so the outbox's retry of this edit posts none of them twice."""
        api = await self.api()
        reply_to, in_thread = self._target(conversation, reply)
        key = f"{platform_message_id}:{hashlib.sha256((reply.text or '').encode()).hexdigest()}"
        edited = False

        async def edit(card: dict[str, Any], _unused: str) -> str:  # an edit needs no uuid
            nonlocal edited
            await api.patch_card(chat_id=conversation.chat_id, message_id=platform_message_id,
                                 card=render.card_json(card))
            edited = True
            return platform_message_id

        async def post(card: dict[str, Any], uuid: str) -> str:
            return await self._post(conversation, card, uuid, reply_to, in_thread)

        try:
            for part, card in enumerate(self.render(reply)):
                await self._part(conversation, reply, part, card, _uuid(key, part), key,
                                 edit if part == 0 else post, post)
        except DeliveryError as exc:
            if exc.transient or not edited:
                raise  # a permanent failure of the edit itself: the outbox sends the reply anew
            # The message was edited and a part after it failed for good. Said to be permanent,
            # the outbox would send the whole reply anew, the edited part and the parts already
            # posted twice; as transient, it tries this edit again, which posts only what is
            # missing, until its attempts run out.
            raise DeliveryError(f"the message was edited but a part after it was refused: {exc}", transient=True,
                                retry_after=exc.retry_after) from exc

    async def react(self, conversation: ConversationKey, platform_message_id: str, state: str) -> None:
        """The turn ended: "OnIt" is taken off the person's message, and "DONE" put on when it was
        answered. The OnIt's id is in memory when this process put it on; when another one did (a
        replica, or this service before a restart), the app's OnIt reactions are looked up."""
        if not self.config.reactions:
            return
        reaction_id = await self._working.take(platform_message_id)
        api = await self.api()
        chat_id, log = conversation.chat_id, logger.bind(conversation=str(conversation))
        try:
            found = [reaction_id] if reaction_id else await api.own_reactions(
                chat_id=chat_id, message_id=platform_message_id, emoji=WORKING)
            for rid in found:
                await api.unreact(chat_id=chat_id, message_id=platform_message_id, reaction_id=rid)
        except DeliveryError as exc:
            log.info("feishu: the working mark not taken off {}: {}", platform_message_id, exc)
        if state == "done":
            try:
                await api.react(chat_id=chat_id, message_id=platform_message_id, emoji=DONE)
            except DeliveryError as exc:
                log.info("feishu: the done mark not put on {}: {}", platform_message_id, exc)


def _mime_type(ref: normalize.FileRef) -> str:
    guessed = mimetypes.guess_type(ref.name)[0]
    if ref.kind == "image":
        return guessed if guessed and guessed.startswith("image/") else "image/png"
    return guessed or "application/octet-stream"
