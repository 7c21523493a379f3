"""The built-in web chat: a page at /chat, a JSON API (the contract the tests use) and a live
Server-Sent-Events stream. Conversation ids starting with `g-` are group conversations."""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from aiohttp import BodyPartReader, web
from loguru import logger

from bridge.store.db import Database
from bridge.web.http import error
from channels.base import (
    Answer,
    Attachment,
    ConversationKey,
    Forward,
    InboundAction,
    InboundMessage,
    Ingest,
    Record,
    Reply,
    Sender,
    Webhook,
)
from channels.http import failed, json_answer, refusal
from channels.webchat import transcript, uploads
from channels.webchat.checks import ACTIONS, ID_PATTERN, MESSAGES, PostAction, PostMessage, foreign_origin
from channels.webchat.uploads import Uploads

CHANNEL = "webchat"
PAGE_LIMIT = 500
MAX_SEQ = 2**63 - 1  # the store's integers; a larger `after` is no seq
ID = re.compile(ID_PATTERN)
SSE_PING = 15.0
SSE_QUEUE = 1000  # rows waiting for one page before it reads the store instead
SSE_WRITE_TIMEOUT = 30.0  # a page that takes nothing for this long is let go (it reconnects)
# the two answers to a posted message, encoded once (they are on every ack's path)
ACKS = {dup: Answer(202, json.dumps({"accepted": True, "duplicate": dup}).encode()) for dup in (False, True)}
NOT_STARTED = refusal(503, "web chat is not started")


def is_group(conversation_id: str) -> bool:
    return conversation_id.startswith("g-")


def public_message(row: dict[str, Any]) -> dict[str, Any]:
    """A transcript row as the API shows it (button values stay server-side)."""
    card = row.get("card")
    if card:
        card = {
            "kind": card["kind"], "title": card["title"], "body": card["body"], "status": card.get("status", ""),
            "actions": [{"id": a["id"], "label": a["label"], "style": a.get("style", "default")} for a in card["actions"]],
        }
    message = {
        "seq": row["seq"], "created_seq": row["created_seq"], "id": row["id"], "role": row["role"], "user_id": row["user_id"], "text": row["text"],
        "card": card, "updated_at": row["updated_at"],
    }
    if row.get("files"):
        message["files"] = [{"name": f["name"], "mime_type": f["mime_type"]} for f in row["files"]]
    return message


class _Subscription:
    """One open page's live stream: rows pushed to it (one process), or a flag to look again.
    A page that reads slower than its conversation is written falls behind: once its queue is
    full it is behind (from the first row left out), and its stream reads the rest from the
    store instead, so it loses none."""

    __slots__ = ("queue", "woken", "behind_from")

    def __init__(self) -> None:
        self.queue: asyncio.Queue[dict[str, Any]] = asyncio.Queue(maxsize=SSE_QUEUE)
        self.woken = asyncio.Event()
        self.behind_from: int | None = None  # the seq of the first row left out of the queue


class _Hub:
    """Live subscribers per conversation. With one process (SQLite) the rows it writes are pushed
    to them as they are. With several replicas (`from_store`) a page's replica is not always the
    one that writes: each change (here, or NOTIFY from any replica) wakes the conversation's
    subscribers, which read the store after the last seq they sent, so they miss nothing and send
    everything in seq order."""

    def __init__(self) -> None:
        self._subs: dict[str, set[_Subscription]] = {}
        self.from_store = False

    def subscribe(self, conversation_id: str) -> _Subscription:
        sub = _Subscription()
        self._subs.setdefault(conversation_id, set()).add(sub)
        return sub

    def unsubscribe(self, conversation_id: str, sub: _Subscription) -> None:
        subs = self._subs.get(conversation_id)
        if subs is not None:
            subs.discard(sub)
            if not subs:
                del self._subs[conversation_id]

    def publish(self, row: dict[str, Any]) -> None:
        """A row this process wrote (committed)."""
        if self.from_store:
            self.changed(row["conversation_id"])
            return
        for sub in self._subs.get(row["conversation_id"], ()):
            if sub.queue.full():
                if sub.behind_from is None or row["seq"] < sub.behind_from:
                    sub.behind_from = row["seq"]  # its stream reads the store from there
                continue
            sub.queue.put_nowait(public_message(row))

    def changed(self, conversation_id: str) -> None:
        for sub in self._subs.get(conversation_id, ()):
            sub.woken.set()

    def changed_all(self) -> None:
        for subs in self._subs.values():
            for sub in subs:
                sub.woken.set()

    @property
    def count(self) -> int:
        return sum(len(s) for s in self._subs.values())


class WebChatChannel:
    name = CHANNEL

    def __init__(self, db: Database, uploads: Uploads, *, shared_store: bool = False) -> None:
        """`shared_store`: several replicas write this store; live pages then follow the store
        (woken by `changed`) rather than this process's own writes alone."""
        self.db = db
        self.uploads = uploads
        self.hub = _Hub()
        self.hub.from_store = shared_store
        self.transcript = transcript.Transcript()
        self._ingest: Ingest | None = None
        self._page: bytes | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._streams: set[asyncio.Task[Any]] = set()  # the open pages' live streams

    # -- ChannelAdapter ----------------------------------------------------------------------

    async def start(self, ingest: Ingest) -> None:
        self._ingest = ingest
        self._page = resources.files("channels.webchat").joinpath("page.html").read_bytes()
        self._sweeper = asyncio.create_task(self._sweep_uploads(), name="webchat:uploads")

    async def _sweep_uploads(self) -> None:
        """Uploads never sent with a message go once they are older than the uploads' TTL."""
        interval = min(3600.0, max(1.0, self.uploads.unsent_ttl / 4))
        while True:
            await asyncio.sleep(interval)
            try:
                removed = await asyncio.to_thread(self.uploads.sweep)
            except OSError as exc:
                logger.warning("webchat: the sweep of unsent uploads failed: {}", exc)
                continue
            if removed:
                logger.info("webchat: {} upload(s) never sent with a message removed", removed)

    async def loaded(self) -> None:
        return None

    async def stop(self) -> None:
        """Stop taking messages and end the open pages' streams (they would otherwise hold the
        HTTP server's shutdown open); each page reconnects to the next start after its last id."""
        self._ingest = None
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
            self._sweeper = None
        streams = list(self._streams)
        for task in streams:
            task.cancel()
        if streams:
            await asyncio.wait(streams, timeout=5.0)

    def render(self, reply: Reply) -> dict[str, Any]:
        payload = reply.to_payload()
        return {"text": payload["text"], "card": payload["card"]}

    async def send(self, conversation: ConversationKey, reply: Reply, *, idempotency_key: str) -> str:
        rendered = self.render(reply)
        item = transcript.NewMessage(
            conversation_id=conversation.chat_id, role="bot", user_id="bot", text=rendered["text"],
            card=rendered["card"], dedupe_key=idempotency_key,
        )
        row = await self.db.write_batched(self.transcript.insert_many, item)
        self.hub.publish(row)
        return row["id"]

    async def update(self, conversation: ConversationKey, platform_message_id: str, reply: Reply) -> None:
        rendered = self.render(reply)
        row = await self.db.write_batched(
            self.transcript.edit_many, transcript.Edit(platform_message_id, rendered["text"], rendered["card"]))
        if row is not None:
            self.hub.publish(row)

    async def react(self, conversation: ConversationKey, platform_message_id: str, state: str) -> None:
        return None  # the web chat has no reactions

    async def health(self) -> dict[str, Any]:
        return {"ok": self._ingest is not None, "live_subscribers": self.hub.count}

    # -- HTTP --------------------------------------------------------------------------------

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/chat", self.page),
            web.get("/chat/", self.to_page),  # what a person may type for it, and the service's root
            web.get("/", self.to_page),
            web.post("/chat/api/files", self.post_file),
            web.get("/chat/api/messages", self.list_messages),
            web.get("/chat/api/stream", self.stream),
        ]

    def webhooks(self) -> list[Webhook]:
        return [Webhook(MESSAGES, self.post_message, self.post_messages), Webhook(ACTIONS, self.post_action)]

    async def page(self, request: web.Request) -> web.Response:
        return web.Response(body=self._page, content_type="text/html", charset="utf-8")

    async def to_page(self, request: web.Request) -> web.Response:
        raise web.HTTPFound(f"/chat?{request.query_string}" if request.query_string else "/chat")

    async def post_message(self, forward: Forward) -> Answer:
        return (await self.post_messages([forward]))[0]

    async def post_messages(self, forwards: Sequence[Forward]) -> list[Answer]:
        """Messages that arrived together: persisted in one write, answered in order."""
        ingest = self._ingest
        if ingest is None:
            return [NOT_STARTED] * len(forwards)
        answers: list[Answer | None] = [None] * len(forwards)
        accepted: list[int] = []
        events: list[tuple[InboundMessage, Record]] = []
        for index, forward in enumerate(forwards):
            body: PostMessage = MESSAGES.parsed(forward)  # type: ignore[assignment]
            attachments: list[Attachment] | Answer = []
            if body.file_ids:
                try:
                    attachments = await self._attachments(body)
                except Exception as exc:  # noqa: BLE001 - this message fails alone; the others go on
                    answers[index] = failed(exc, f"webchat: the files of a message in {body.conversation_id}")
                    continue
                if isinstance(attachments, Answer):
                    answers[index] = attachments
                    continue
            event = InboundMessage(
                conversation=ConversationKey(CHANNEL, body.conversation_id),
                sender=Sender(body.user_id, body.user_id),
                text=body.text,
                event_key=f"{CHANNEL}:{body.conversation_id}/{body.client_msg_id}",
                is_group=is_group(body.conversation_id),
                mentions_bot=True,
                platform_message_id=None,
                attachments=tuple(attachments),
            )
            # The web chat keeps the person's message, as a platform would: written with the
            # event, in its transaction, and only when the event is new (the client id's dedupe
            # is the event's).
            shown = [{"name": a.name, "mime_type": a.mime_type} for a in attachments] or None
            events.append((event, Record(self.transcript.insert_many, transcript.NewMessage(
                body.conversation_id, "user", body.user_id, body.text, None, files=shown))))
            accepted.append(index)
        if events:
            results = await ingest.accept_many(events)
            for index, result in zip(accepted, results, strict=True):
                if result.error is not None:
                    answers[index] = failed(result.error, "webchat: a posted message")
                    continue
                if result.record is not None:
                    self.hub.publish(result.record)
                answers[index] = ACKS[result.duplicate]
        return answers  # type: ignore[return-value]

    async def _attachments(self, body: PostMessage) -> list[Attachment] | Answer:
        """The uploaded files a message names (marked sent), or the 400 saying which is unknown."""
        attachments = []
        for file_id in dict.fromkeys(body.file_ids):
            found = await self.uploads.find(body.conversation_id, file_id)
            if found is None:
                return refusal(400, f"file_ids: no file {file_id!r} was uploaded in this conversation")
            attachments.append(found)
        if attachments:
            await self.uploads.mark_sent(body.conversation_id, dict.fromkeys(body.file_ids))
        return attachments

    async def post_file(self, request: web.Request) -> web.Response:
        """One file (multipart/form-data, field `file`) for a message to come; 201 with its id.
        Another site's page may not upload through a visitor's browser (a form can post
        multipart/form-data across sites): refused like the JSON posts."""
        refused = foreign_origin(request.headers)
        if refused is not None:
            return error(403, refused)
        conversation_id = request.query.get("conversation_id", "")
        if not ID.fullmatch(conversation_id) or not ID.fullmatch(request.query.get("user_id", "")):
            return error(400, "conversation_id and user_id (query) are required: letters, digits, _ . @ -")
        try:
            self.uploads.folder_of(conversation_id)
        except ValueError as exc:
            return error(400, f"conversation_id: {exc}")
        if not request.content_type.startswith("multipart/"):
            return error(400, "expected multipart/form-data with a `file` field")
        try:
            reader = await request.multipart()
            part = await reader.next()
            while part is not None and not (isinstance(part, BodyPartReader) and part.name == "file"):
                part = await reader.next()
            if part is None:
                return error(400, "no `file` field in the form")
            kept = await self.uploads.receive(conversation_id, part)
        except uploads.TooLarge as exc:
            return error(413, str(exc))
        except ValueError as exc:  # a malformed multipart body
            return error(400, f"malformed form: {exc}")
        return web.json_response({"file_id": Path(kept.path).parent.name, "name": kept.name,
                                  "mime_type": kept.mime_type}, status=201)

    async def list_messages(self, request: web.Request) -> web.Response:
        conversation_id, after = self._query(request)
        rows = await self.db.read(lambda c: transcript.list_after(c, conversation_id, after, PAGE_LIMIT), offload=True)
        return web.json_response({"messages": [public_message(r) for r in rows]})

    async def post_action(self, forward: Forward) -> Answer:
        body: PostAction = ACTIONS.parsed(forward)  # type: ignore[assignment]
        ingest = self._ingest
        if ingest is None:
            return NOT_STARTED
        row = await self.db.read(lambda c: transcript.get(c, body.message_id))
        if row is None or row["conversation_id"] != body.conversation_id:
            return refusal(404, "no such message in this conversation")
        card = row.get("card")
        if not card:
            return refusal(400, "this message is not a card: it has no buttons")
        buttons = card.get("actions") or ()
        if not buttons:  # decided, expired, stopped: its buttons are gone
            return refusal(409, "this card is no longer actionable", card_status=card.get("status"))
        button = next((a for a in buttons if a["id"] == body.action_id), None)
        if button is None and card.get("status") not in (None, "", "pending"):
            # a click on what the card offered before it was decided (Approve on an interrupted one)
            return refusal(409, "this card is no longer actionable", card_status=card.get("status"))
        if button is None:
            return refusal(400, f"this card has no button {body.action_id!r}",
                           actions=[a["id"] for a in buttons])
        action = InboundAction(
            conversation=ConversationKey(CHANNEL, body.conversation_id),
            actor=Sender(body.user_id, body.user_id),
            action_id=body.action_id,
            value=button.get("value") or {},
            platform_message_id=body.message_id,
            is_group=is_group(body.conversation_id),
        )
        result = await ingest.act(action)
        if result.status == "ok":
            return json_answer({"ok": True, "toast": result.toast})
        status = {"forbidden": 403, "conflict": 409, "not_found": 409}[result.status]
        return json_answer({"ok": False, "reason": result.toast, "toast": result.toast}, status)

    async def stream(self, request: web.Request) -> web.StreamResponse:
        conversation_id, after = self._query(request)
        sub = self.hub.subscribe(conversation_id)
        task = asyncio.current_task()
        assert task is not None
        self._streams.add(task)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        try:
            await response.prepare(request)
            last = await self._send_after(response, conversation_id, after)
            while True:
                try:
                    async with asyncio.timeout(SSE_PING):
                        if self.hub.from_store:
                            await sub.woken.wait()
                        else:
                            message = await sub.queue.get()
                except TimeoutError:
                    await _write(response, b": ping\n\n")
                    continue
                if self.hub.from_store:
                    sub.woken.clear()
                    last = await self._send_after(response, conversation_id, last)
                elif sub.behind_from is not None:
                    # Rows were left out while the page was slow: the store has them. Read from
                    # the first one left out (what the page has again, it drops by id and seq).
                    while not sub.queue.empty():
                        sub.queue.get_nowait()
                    since, sub.behind_from = min(last, sub.behind_from - 1), None
                    last = max(last, await self._send_after(response, conversation_id, since))
                else:
                    await _write(response, _sse(message))
                    last = max(last, message["seq"])
        except (ConnectionResetError, TimeoutError):
            pass  # the page went away, or took nothing for SSE_WRITE_TIMEOUT: it reconnects with its last id
        except asyncio.CancelledError:
            if self._ingest is not None:
                raise  # the connection was dropped
            # the channel is stopping: the stream ends, the page reconnects to the next start
        finally:
            self._streams.discard(task)
            self.hub.unsubscribe(conversation_id, sub)
        return response

    async def _send_after(self, response: web.StreamResponse, conversation_id: str, after: int) -> int:
        """Send the conversation's messages (and edits) after seq `after`; returns the last seq sent."""
        while True:
            rows = await self.db.read(lambda c: transcript.list_after(c, conversation_id, after, PAGE_LIMIT),
                                      offload=True)
            for row in rows:
                await _write(response, _sse(public_message(row)))
                after = row["seq"]
            if len(rows) < PAGE_LIMIT:
                return after

    def changed(self, conversation_id: str) -> None:
        """Another replica wrote to this conversation's transcript (several replicas only)."""
        self.hub.changed(conversation_id)

    def changed_all(self) -> None:
        """Changes may have been missed (the notifications were down): every open page looks again."""
        self.hub.changed_all()

    # -- helpers -----------------------------------------------------------------------------

    @staticmethod
    def _query(request: web.Request) -> tuple[str, int]:
        conversation_id = request.query.get("conversation_id", "")
        try:
            after = int(request.query.get("after", "0"))
        except ValueError:
            after = None
        if after is None or abs(after) > MAX_SEQ:
            raise web.HTTPBadRequest(text='{"error": "after must be an integer (a seq the API gave, or 0)"}',
                                     content_type="application/json")
        if not ID.fullmatch(conversation_id):
            raise web.HTTPBadRequest(text='{"error": "conversation_id is missing or invalid"}',
                                     content_type="application/json")
        return conversation_id, after


async def _write(response: web.StreamResponse, data: bytes) -> None:
    """Write to a page's stream; TimeoutError when it takes nothing for SSE_WRITE_TIMEOUT."""
    async with asyncio.timeout(SSE_WRITE_TIMEOUT):
        await response.write(data)


def _sse(message: dict[str, Any]) -> bytes:
    return f"id: {message['seq']}\nevent: message\ndata: {json.dumps(message)}\n\n".encode()

