"""`im.message.receive_v1` -> the pieces of a neutral InboundMessage.

Text with `@_user_N` placeholders resolved to names (the bot's own mention removed), rich-text
posts as markdown (bold, italics, strike-through, links, mentions, code blocks, rules), images and
files as attachment references to download, and the conversation key per the chat's policy.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

import orjson

Scope = Literal["chat", "thread", "user"]
Trigger = Literal["mention", "all"]


@dataclass(frozen=True, slots=True)
class ChatPolicy:
    """How one chat is served: what starts a turn in a group, and what a conversation is."""

    trigger: Trigger = "mention"  # groups: only messages that @mention the bot, or all
    scope: Scope = "chat"  # groups: one conversation per chat, per thread (topic), or per user


@dataclass(frozen=True, slots=True)
class FileRef:
    """An image or file of the message, downloaded through the resources API."""

    key: str
    kind: Literal["image", "file"]
    name: str


@dataclass(slots=True)
class Parsed:
    event_id: str
    message_id: str
    chat_id: str
    chat_type: str
    sender_open_id: str
    sender_type: str
    text: str
    thread_key: str | None
    mentions_bot: bool
    create_time: float | None
    root_id: str | None = None
    thread_id: str | None = None
    files: list[FileRef] = field(default_factory=list)
    mention_names: dict[str, str] = field(default_factory=dict)

    @property
    def is_group(self) -> bool:
        return self.chat_type != "p2p"


class NotAMessage(ValueError):
    """The event is not a message we can read (missing fields)."""


def _mentions(message: dict[str, Any]) -> tuple[dict[str, tuple[str, str]], list[str]]:
    """placeholder -> (open_id, name), and the open ids mentioned."""
    by_key: dict[str, tuple[str, str]] = {}
    ids = []
    for m in message.get("mentions") or []:
        open_id = ((m.get("id") or {}).get("open_id")) or ""
        by_key[m.get("key", "")] = (open_id, m.get("name") or "")
        ids.append(open_id)
    return by_key, ids


def _resolve(text: str, mentions: dict[str, tuple[str, str]], bot_open_id: str) -> str:
    def sub(match: re.Match[str]) -> str:
        key = match.group(0)
        if key == "@_all":
            return "@all"
        open_id, name = mentions.get(key, ("", ""))
        if bot_open_id and open_id == bot_open_id:
            return ""
        return f"@{name}" if name else key

    return re.sub(r"@_user_\d+|@_all", sub, text)


def _styled(text: str, styles: list[str]) -> str:
    if not text.strip():
        return text
    for style, mark in (("bold", "**"), ("italic", "*"), ("lineThrough", "~~")):
        if style in styles:
            text = f"{mark}{text}{mark}"
    return text


def _post_markdown(content: dict[str, Any], mentions: dict[str, tuple[str, str]], bot_open_id: str,
                   files: list[FileRef]) -> str:
    body = content
    if "content" not in body:  # a locale wrapper: {"zh_cn": {...}}
        body = next((v for v in content.values() if isinstance(v, dict) and "content" in v), {})
    lines = []
    if body.get("title"):
        lines.append(f"**{body['title']}**")
    for paragraph in body.get("content") or []:
        parts: list[str] = []
        blocks: list[str] = []
        for el in paragraph or []:
            tag = el.get("tag")
            if tag == "text":
                parts.append(_styled(el.get("text", ""), el.get("style") or []))
            elif tag == "a":
                parts.append(f"[{el.get('text') or el.get('href', '')}]({el.get('href', '')})")
            elif tag == "at":
                user = el.get("user_id", "")
                if user in mentions:
                    open_id, name = mentions[user]
                    if not (bot_open_id and open_id == bot_open_id):
                        parts.append(f"@{name or el.get('user_name', '')}")
                elif user == "all" or user == "@_all":
                    parts.append("@all")
                elif not (bot_open_id and user == bot_open_id):
                    parts.append(f"@{el.get('user_name') or user}")
            elif tag == "img":
                files.append(FileRef(el.get("image_key", ""), "image", f"{el.get('image_key', 'image')}.png"))
                parts.append("[image]")
            elif tag == "media":
                files.append(FileRef(el.get("file_key", ""), "file", el.get("file_name") or el.get("file_key", "media")))
                parts.append("[video]")
            elif tag == "emotion":
                parts.append(f":{el.get('emoji_type', '')}:")
            elif tag == "code_block":
                language = (el.get("language") or "").lower()
                code = el.get("text", "").rstrip("\n")
                blocks.append(f"```{language}\n{code}\n```")
            elif tag == "hr":
                blocks.append("---")
            elif tag == "md":
                parts.append(el.get("text", ""))
        line = "".join(parts).strip()
        if line:
            lines.append(line)
        lines.extend(blocks)
    return "\n".join(lines)


def content_text(message: dict[str, Any], bot_open_id: str) -> tuple[str, list[FileRef]]:
    """The message's content as markdown, and the files it carries."""
    kind = message.get("message_type") or message.get("msg_type") or "text"
    try:
        content = orjson.loads(message.get("content") or "{}")
    except ValueError:
        content = {}
    if not isinstance(content, dict):
        content = {}
    mentions, _ = _mentions(message)
    files: list[FileRef] = []
    if kind == "text":
        return _resolve(content.get("text", ""), mentions, bot_open_id).strip(), files
    if kind == "post":
        text = _post_markdown(content, mentions, bot_open_id, files)
        return _resolve(text, mentions, bot_open_id).strip(), files
    if kind == "image":
        key = content.get("image_key", "")
        files.append(FileRef(key, "image", f"{key or 'image'}.png"))
        return "", files  # the attachment is the message (see the pipeline's rule for files)
    if kind in ("file", "audio", "media"):
        key = content.get("file_key", "")
        name = content.get("file_name") or key or kind
        files.append(FileRef(key, "file", name))
        return "", files
    if kind == "sticker":
        return "[sticker]", files
    return f"[{kind} message]", files


def parse(envelope: dict[str, Any], *, bot_open_id: str, policy_for) -> Parsed:
    """A v2 `im.message.receive_v1` envelope -> Parsed. `policy_for(chat_id) -> ChatPolicy`."""
    header = envelope.get("header") or {}
    event = envelope.get("event") or {}
    message = event.get("message") or {}
    sender = event.get("sender") or {}
    message_id = message.get("message_id")
    chat_id = message.get("chat_id")
    if not message_id or not chat_id:
        raise NotAMessage("message_id and chat_id are required")
    _, mentioned = _mentions(message)
    text, files = content_text(message, bot_open_id)
    chat_type = message.get("chat_type") or "p2p"
    sender_open_id = ((sender.get("sender_id") or {}).get("open_id")) or ""
    root_id = message.get("root_id") or None
    thread_id = message.get("thread_id") or None
    thread_key = None
    if chat_type != "p2p":
        scope = policy_for(chat_id).scope
        if scope == "thread":
            thread_key = root_id or message_id  # a topic is named by its first message
        elif scope == "user":
            thread_key = f"u-{sender_open_id}"
    created = message.get("create_time")
    try:
        create_time = int(created) / 1000.0 if created else None
    except (TypeError, ValueError):
        create_time = None
    return Parsed(
        event_id=header.get("event_id") or "", message_id=message_id, chat_id=chat_id, chat_type=chat_type,
        sender_open_id=sender_open_id, sender_type=sender.get("sender_type") or "user", text=text,
        thread_key=thread_key, mentions_bot=bool(bot_open_id) and bot_open_id in mentioned,
        create_time=create_time, root_id=root_id, thread_id=thread_id, files=files,
    )
