"""Slack events -> what the pipeline needs: which posts to act on, their text, their conversation.

Acted on: `message` events in DMs and group DMs, `app_mention` in channels (and, with the `all`
trigger, every `message` in channels). One post can arrive twice (as `message` and as
`app_mention`, with different event ids); both carry the channel and ts, which the inbox dedupes.
Ignored: the bot's own posts, other bots, edits, deletions, joins and every other subtype except
`file_share` and `thread_broadcast`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

Scope = Literal["chat", "thread", "user"]
Trigger = Literal["mention", "all"]
ACTED_SUBTYPES = (None, "file_share", "thread_broadcast")
MENTION = re.compile(r"<@([UW][A-Z0-9]+)(?:\|[^>]*)?>")
LABELLED_LINK = re.compile(r"<(https?://[^|>]+)\|([^>]+)>")
LINK = re.compile(r"<(https?://[^>]+)>")


@dataclass(frozen=True, slots=True)
class ChannelPolicy:
    trigger: Trigger = "mention"
    scope: Scope = "thread"  # Slack's natural unit in channels


@dataclass(slots=True)
class Parsed:
    event_id: str
    channel: str
    channel_type: str  # im | mpim | channel | group
    user: str
    ts: str
    thread_ts: str | None
    text: str
    mentions: list[str]
    thread_key: str | None
    reply_root: str | None  # the ts to reply under (None: top level, a DM)
    files: list[dict[str, Any]] = field(default_factory=list)

    @property
    def is_group(self) -> bool:
        return self.channel_type not in ("im",)


def channel_type_of(event: dict[str, Any]) -> str:
    kind = event.get("channel_type")
    if kind:
        return kind
    channel = event.get("channel", "")
    return "im" if channel.startswith("D") else "group" if channel.startswith("G") else "channel"


def acted_on(event: dict[str, Any], *, bot_user_id: str, bot_id: str, policy: ChannelPolicy) -> str | None:
    """Why the event is ignored (None: act on it)."""
    kind = event.get("type")
    if kind not in ("message", "app_mention"):
        return f"event type {kind}"
    if event.get("subtype") not in ACTED_SUBTYPES or event.get("hidden"):
        return f"subtype {event.get('subtype')}"
    if (bot_user_id and event.get("user") == bot_user_id) or (bot_id and event.get("bot_id") == bot_id):
        return "our own message"
    if event.get("bot_id") or event.get("bot_profile"):
        return "another bot's message"
    if not event.get("user") or not event.get("ts") or not event.get("channel"):
        return "missing user, ts or channel"
    channel_type = channel_type_of(event)
    if channel_type in ("im", "mpim"):
        return None if kind == "message" else "mention in a DM (the message event carries it)"
    # channels and private channels
    if kind == "app_mention":
        return None
    if policy.trigger == "all":
        return None
    return "channel message (a mention of the bot comes as app_mention)"


def clean_text(text: str, *, bot_user_id: str, names: dict[str, str]) -> str:
    """`<@UBOT> do x for <@U123>` -> `do x for @Alice`; Slack's escapes undone."""
    def sub(match: re.Match[str]) -> str:
        user = match.group(1)
        if user == bot_user_id:
            return ""
        return f"@{names.get(user, user)}"

    if "<" in text:
        text = MENTION.sub(sub, text)
        text = LABELLED_LINK.sub(r"[\2](\1)", text)
        text = LINK.sub(r"\1", text)
    if "&" in text:
        text = text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")
    return text.strip()


def parse(envelope: dict[str, Any], *, policy: ChannelPolicy) -> Parsed:
    event = envelope.get("event") or {}
    channel = event["channel"]
    channel_type = channel_type_of(event)
    ts = event["ts"]
    thread_ts = event.get("thread_ts") or None
    user = event["user"]
    thread_key = None
    reply_root: str | None = thread_ts
    if channel_type != "im":
        reply_root = thread_ts or ts  # in channels the bot answers in the thread of the post
        if policy.scope == "thread":
            thread_key = thread_ts or ts
        elif policy.scope == "user":
            thread_key = f"u-{user}"
    return Parsed(
        event_id=envelope.get("event_id") or "", channel=channel, channel_type=channel_type, user=user, ts=ts,
        thread_ts=thread_ts, text=event.get("text") or "", mentions=MENTION.findall(event.get("text") or ""),
        thread_key=thread_key, reply_root=reply_root, files=list(event.get("files") or []),
    )
