"""The channel contract: channel-neutral types and the adapter protocol.

A channel adapter verifies and decodes what its platform sends, normalizes it into an
`InboundMessage` or `InboundAction`, hands it to the pipeline's `Ingest` (which persists it before
the adapter acknowledges the platform), and renders neutral `Reply` objects back into platform
payloads. Channels know nothing of runtimes; the pipeline knows nothing of platforms.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

from bridge.errors import Unavailable


@dataclass(frozen=True, slots=True)
class ConversationKey:
    """Where a conversation lives: channel + chat + optional thread."""

    channel: str
    chat_id: str
    thread_id: str | None = None

    def __str__(self) -> str:
        base = f"{self.channel}:{self.chat_id}"
        return f"{base}:{self.thread_id}" if self.thread_id else base

    @classmethod
    def parse(cls, value: str) -> "ConversationKey":
        channel, _, rest = value.partition(":")
        chat_id, _, thread = rest.partition(":")
        if not channel or not chat_id:
            raise ValueError(f"not a conversation key: {value!r}")
        return cls(channel, chat_id, thread or None)


@dataclass(frozen=True, slots=True)
class Sender:
    id: str
    display_name: str = ""
    is_bot: bool = False

    @property
    def name(self) -> str:
        return self.display_name or self.id


@dataclass(frozen=True, slots=True)
class Attachment:
    name: str
    path: str  # where the receiving replica kept it ("" when it could not be downloaded)
    mime_type: str = "application/octet-stream"
    key: str = ""  # its key in the FileKeeper (channels/files.py): how another replica finds it


@dataclass(frozen=True, slots=True)
class InboundMessage:
    """A message from a person (or a bot) in a conversation."""

    conversation: ConversationKey
    sender: Sender
    text: str
    event_key: str  # the platform's event id, channel-qualified: dedupes redeliveries
    message_key: str | None = None  # the platform's message id: dedupes re-sends under new event ids
    is_group: bool = False
    mentions_bot: bool = False
    platform_message_id: str | None = None
    attachments: tuple[Attachment, ...] = ()
    sent_at: float | None = None
    stale: bool = False  # arrived long after it was sent (a redelivery, a backfill): answered, not run
    # the message's own id when the channel marks it as being worked on (a reaction): the turn's
    # end is shown there (`react`); in a thread it is not the reply target above
    marked_message_id: str | None = None

    kind: Literal["message"] = "message"

    def to_payload(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "sender": {"id": self.sender.id, "name": self.sender.display_name, "is_bot": self.sender.is_bot},
            "is_group": self.is_group,
            "mentions_bot": self.mentions_bot,
            "platform_message_id": self.platform_message_id,
            "attachments": [asdict(a) for a in self.attachments],
            "sent_at": self.sent_at,
            **({"stale": True} if self.stale else {}),
            **({"marked_message_id": self.marked_message_id} if self.marked_message_id else {}),
        }


@dataclass(frozen=True, slots=True)
class InboundAction:
    """A click on a card button (or an equivalent reaction)."""

    conversation: ConversationKey
    actor: Sender
    action_id: str
    value: dict[str, Any]
    platform_message_id: str
    is_group: bool = False


@dataclass(frozen=True, slots=True)
class Button:
    id: str
    label: str
    style: Literal["primary", "danger", "default"] = "default"
    value: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Card:
    kind: str  # "approval", "status", "help", ...
    title: str
    body: str  # markdown
    status: str = ""
    actions: tuple[Button, ...] = ()


@dataclass(frozen=True, slots=True)
class Reply:
    """A neutral outbound message: markdown text and/or a card."""

    text: str = ""
    card: Card | None = None
    reply_to: str | None = None  # the platform message this answers (platforms that thread replies)

    def to_payload(self) -> dict[str, Any]:
        card = None
        if self.card is not None:
            card = {
                "kind": self.card.kind,
                "title": self.card.title,
                "body": self.card.body,
                "status": self.card.status,
                "actions": [
                    {"id": b.id, "label": b.label, "style": b.style, "value": b.value} for b in self.card.actions
                ],
            }
        payload: dict[str, Any] = {"text": self.text, "card": card}
        if self.reply_to:
            payload["reply_to"] = self.reply_to
        return payload

    @classmethod
    def from_payload(cls, data: dict[str, Any]) -> "Reply":
        card_data = data.get("card")
        card = None
        if card_data:
            card = Card(
                kind=card_data["kind"],
                title=card_data["title"],
                body=card_data["body"],
                status=card_data.get("status", ""),
                actions=tuple(
                    Button(b["id"], b["label"], b.get("style", "default"), b.get("value") or {})
                    for b in card_data.get("actions", ())
                ),
            )
        return cls(text=data.get("text", ""), card=card, reply_to=data.get("reply_to"))


@dataclass(frozen=True, slots=True)
class Record:
    """A channel's own copy of an inbound message (the web chat keeps a transcript, as a platform
    keeps its messages). Given to `Ingest.accept`, it is written in the same transaction as the
    event and only when the event is new: the event's dedupe covers it, so it needs no dedupe
    key of its own, and a message is never on record without its event or the other way round.

    `write(conn, items)` is a store batch function (one result per item, in order); records with
    the same `write` that commit together are written in one call.
    """

    write: Callable[[Any, Sequence[Any]], Awaitable[Sequence[Any]]]
    item: Any


@dataclass(frozen=True, slots=True)
class AcceptResult:
    event_id: int | None
    duplicate: bool
    record: Any = None  # what the Record's write returned for this event (None for a duplicate)
    # False when the event was stored closed: nothing will run and nothing will answer it (a
    # mention with no text, a bot's message), so a channel shows no "working on it" sign
    answered: bool = True
    # `accept_many` only: why this event could not be kept (nothing of it was kept; the others
    # of the batch were). The channel answers it as a failed request (503 or 500), to be resent.
    error: BaseException | None = None


@dataclass(frozen=True, slots=True)
class ActionResult:
    status: Literal["ok", "forbidden", "conflict", "not_found"]
    toast: str
    card: "Reply | None" = None  # the card in its new state, for platforms that take it in the answer


class Ingest(Protocol):
    """What the pipeline offers a channel adapter."""

    async def accept(self, event: InboundMessage, record: Record | None = None) -> AcceptResult:
        """Persist (dedupe) the event, and the channel's record of it if given; returns once both
        are durable. Ack the platform after this."""

    async def accept_many(self, events: Sequence[tuple[InboundMessage, Record | None]]) -> list[AcceptResult]:
        """`accept` for several events at once (one write); results in order. One event that
        cannot be kept fails alone: its result carries the `error`, the others are kept and
        dispatched as usual."""

    async def act(self, action: InboundAction) -> ActionResult:
        """Apply a card action. A store write plus a wake-up; never waits on a running turn."""


@dataclass(frozen=True, slots=True)
class Forward:
    """A webhook request that passed its checks: what the pipeline side needs of it. `body` is
    what crosses to the service when the checks ran in an HTTP edge worker (JSON bytes);
    `parsed` is the same, already decoded, when they ran in the service's own process."""

    body: bytes
    parsed: Any = None


@dataclass(frozen=True, slots=True)
class Answer:
    """A webhook's answer: a status and a JSON body."""

    status: int
    body: bytes


class WebhookCheck(Protocol):
    """The stateless half of a webhook: size, signature, timestamp, decryption, schema. No store,
    no network, no channel state, only its own settings; picklable, because an HTTP edge worker
    (another process) runs it before anything reaches the service."""

    path: str

    def check(self, body: bytes, headers: Mapping[str, str]) -> Forward | Answer:
        """Refuse (an `Answer`: 400, 401, ...), answer at once (a challenge), or pass it on."""


@dataclass(frozen=True, slots=True)
class Webhook:
    """A POST route of a channel, in two halves: `check` (anywhere) and `accept` (in the service:
    normalize, persist, answer). The platform's answer is sent only after `accept` returns.

    `accept_many`, when given, takes several requests that arrived together (an edge worker's
    link delivers them so) and answers each, in order: one store write for all of them instead
    of one each."""

    check: WebhookCheck
    accept: Callable[[Forward], Awaitable[Answer]]
    accept_many: Callable[[Sequence[Forward]], Awaitable[list[Answer]]] | None = None


class ChannelStartError(RuntimeError):
    """A channel cannot start (its credentials were refused): the service stops with this message."""


class ChannelNotReady(Unavailable):
    """The channel cannot handle this event yet (it does not know the bot's own identity, so it
    cannot tell whether the bot was mentioned): answered 503, which the platform sends again."""


class DeliveryError(Exception):
    """Delivery to the platform failed. `transient` failures are retried with backoff."""

    def __init__(self, message: str, *, transient: bool, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.transient = transient
        self.retry_after = retry_after


@runtime_checkable
class ChannelAdapter(Protocol):
    name: str

    async def start(self, ingest: Ingest) -> None: ...

    async def loaded(self) -> None:
        """Returns when what start() left running in the background (an SDK's import) is done,
        failed or not; at once for most channels."""

    async def stop(self) -> None: ...

    async def send(self, conversation: ConversationKey, reply: Reply, *, idempotency_key: str) -> str:
        """Post a new message; return the platform's message id. Raise DeliveryError on failure.

        A retried call with the same idempotency key must not post twice.
        """

    async def update(self, conversation: ConversationKey, platform_message_id: str, reply: Reply) -> None:
        """Edit a message in place."""

    async def react(self, conversation: ConversationKey, platform_message_id: str, state: str) -> None:
        """Show on the person's message how its turn ended: `done` (answered) or `stopped` (failed,
        stopped or not run). A channel that marked the message as being worked on (a reaction)
        replaces that mark; one without reactions does nothing. Best effort: a failure is logged,
        never raised (a reaction must not hold up the replies behind it)."""

    def render(self, reply: Reply) -> Any:
        """Neutral reply -> platform payload."""

    def routes(self) -> list[Any]:
        """The other HTTP routes the channel serves (aiohttp route definitions: pages, streams)."""

    def webhooks(self) -> list[Webhook]:
        """The POST routes whose requests a platform (or the web chat page) sends and the bridge
        must check, persist and acknowledge."""

    async def health(self) -> dict[str, Any]:
        """{"ok": bool, ...detail}"""

