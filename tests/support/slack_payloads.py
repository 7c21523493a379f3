"""Inbound Slack traffic built exactly as the platform sends it.

Request signing (``v0`` HMAC-SHA256 over ``v0:{timestamp}:{raw body}``), the Events API
``event_callback`` envelope with ``message`` and ``app_mention`` inner events, the ``url_verification``
challenge, ``block_actions`` interactive payloads (form-encoded as ``payload=<json>`` over HTTP, plain
JSON inside a Socket Mode envelope) and slash-command form fields.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
import secrets
import threading
import time
import uuid
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

__all__ = ["sign", "signed_request", "event_callback", "message_event", "app_mention_event",
           "url_verification", "block_actions", "form_body", "encode_form", "slash_command", "next_ts"]

JSONDict = dict[str, Any]
VERIFICATION_TOKEN = "legacy-verification-token"
"""The deprecated ``token`` field Slack still puts in payloads; receivers must not use it for auth."""

_ts_lock = threading.Lock()
_last_ts = 0.0
_ids = itertools.count(1)


def next_ts() -> str:
    """A message ``ts`` ("seconds.micros") from the wall clock, strictly increasing within the process."""
    global _last_ts
    with _ts_lock:
        _last_ts = max(time.time(), _last_ts + 0.000001)
        return f"{_last_ts:.6f}"


def _event_id() -> str:
    return f"Ev{next(_ids):04d}{secrets.token_hex(4).upper()}"


def sign(signing_secret: str, timestamp: str, body: bytes) -> str:
    """``X-Slack-Signature``: ``"v0=" + hex(HMAC-SHA256(secret, b"v0:" + timestamp + b":" + body))``."""
    base = b"v0:" + timestamp.encode("ascii") + b":" + body
    return "v0=" + hmac.new(signing_secret.encode("utf-8"), base, hashlib.sha256).hexdigest()


def signed_request(body: bytes, *, signing_secret: str, timestamp: int | None = None,
                   content_type: str = "application/json") -> dict[str, str]:
    """Headers of a signed Slack POST carrying ``body`` (timestamp defaults to now)."""
    ts = str(int(time.time()) if timestamp is None else timestamp)
    return {
        "Content-Type": content_type,
        "X-Slack-Request-Timestamp": ts,
        "X-Slack-Signature": sign(signing_secret, ts, body),
        "User-Agent": "Slackbot 1.0 (+https://api.slack.com/robots)",
    }


def event_callback(event: JSONDict, *, event_id: str | None = None, team_id: str = "T1",
                   api_app_id: str = "A1", event_time: int | None = None,
                   bot_user_id: str = "UBOT") -> JSONDict:
    """The Events API envelope around an inner ``event`` (retries reuse the same ``event_id``)."""
    return {
        "token": VERIFICATION_TOKEN,
        "team_id": team_id,
        "context_team_id": team_id,
        "context_enterprise_id": None,
        "api_app_id": api_app_id,
        "event": event,
        "type": "event_callback",
        "event_id": event_id or _event_id(),
        "event_time": int(time.time()) if event_time is None else event_time,
        "authorizations": [{"enterprise_id": None, "team_id": team_id, "user_id": bot_user_id,
                            "is_bot": True, "is_enterprise_install": False}],
        "is_ext_shared_channel": False,
        "event_context": f"4-{secrets.token_urlsafe(24)}",
    }


def _rich_text(text: str) -> list[JSONDict]:
    """The ``rich_text`` block Slack clients attach to a typed message."""
    return [{"type": "rich_text", "block_id": secrets.token_urlsafe(4)[:5],
             "elements": [{"type": "rich_text_section", "elements": [{"type": "text", "text": text}]}]}]


def message_event(*, text: str, channel: str = "D1", channel_type: str = "im", user: str = "UALICE",
                  ts: str | None = None, thread_ts: str | None = None, subtype: str | None = None,
                  bot_id: str | None = None, files: list[JSONDict] | None = None,
                  blocks: list[JSONDict] | None = None, team_id: str = "T1") -> JSONDict:
    """An inner ``message`` event (``message.im`` / ``.mpim`` / ``.channels`` / ``.groups``).

    A human message has no ``subtype`` and carries ``client_msg_id`` and a ``rich_text`` block; with
    ``files`` the subtype defaults to ``file_share``; with ``bot_id`` (another bot, or our own bot when
    ``user`` is the bot user) there is no ``client_msg_id``. ``bot_message`` also gets a ``username``.
    """
    ts = ts or next_ts()
    if subtype is None and files:
        subtype = "file_share"
    event: JSONDict = {"type": "message"}
    if subtype:
        event["subtype"] = subtype
    event.update({"text": text, "user": user, "ts": ts, "team": team_id})
    if bot_id:
        event["bot_id"] = bot_id
        event["app_id"] = "A" + bot_id[1:]
        if subtype == "bot_message":
            event["username"] = "other-bot"
    else:
        event["client_msg_id"] = str(uuid.uuid4())
    event["blocks"] = blocks if blocks is not None else _rich_text(text)
    if files:
        event["files"] = files
        event["upload"] = False
        event["display_as_bot"] = False
    if thread_ts:
        event["thread_ts"] = thread_ts
    event.update({"channel": channel, "event_ts": ts, "channel_type": channel_type})
    return event


def app_mention_event(*, text: str, channel: str = "C1", user: str = "UALICE", ts: str | None = None,
                      thread_ts: str | None = None, team_id: str = "T1") -> JSONDict:
    """An inner ``app_mention`` event; ``text`` should contain ``<@UBOT>``. It has no ``channel_type``."""
    ts = ts or next_ts()
    event: JSONDict = {"type": "app_mention", "user": user, "text": text, "ts": ts,
                       "client_msg_id": str(uuid.uuid4()), "team": team_id, "blocks": _rich_text(text)}
    if thread_ts:
        event["thread_ts"] = thread_ts
    event.update({"channel": channel, "event_ts": ts})
    return event


def url_verification(challenge: str = "abc") -> JSONDict:
    """The challenge Slack POSTs (signed, JSON) when the Events Request URL is saved."""
    return {"token": VERIFICATION_TOKEN, "challenge": challenge, "type": "url_verification"}


def block_actions(*, action_id: str, value: str, user: str = "UALICE", channel: str = "C1",
                  message_ts: str = "1.0", trigger_id: str | None = None, response_url: str | None = None,
                  block_id: str = "b1", message: JSONDict | None = None, team_id: str = "T1",
                  api_app_id: str = "A1") -> JSONDict:
    """A ``block_actions`` payload for a button click on the message at ``(channel, message_ts)``.

    Over HTTP it arrives form-encoded (see ``form_body``). ``response_url`` defaults to a Slack-looking
    URL that goes nowhere useful; pass ``SlackEmulator.response_url(...)`` to have it served.
    """
    now = time.time()
    action = {"type": "button", "action_id": action_id, "block_id": block_id, "value": value,
              "text": {"type": "plain_text", "text": action_id, "emoji": True}, "action_ts": f"{now:.6f}"}
    msg = message if message is not None else {
        "type": "message", "text": "", "ts": message_ts, "bot_id": "B1",
        "user": "UBOT", "blocks": []}
    return {
        "type": "block_actions",
        "user": {"id": user, "username": user.lower(), "name": user.lower(), "team_id": team_id},
        "api_app_id": api_app_id,
        "token": VERIFICATION_TOKEN,
        "container": {"type": "message", "message_ts": message_ts, "channel_id": channel, "is_ephemeral": False},
        "trigger_id": trigger_id or f"{int(now)}.{secrets.randbelow(10**12)}.{secrets.token_hex(16)}",
        "team": {"id": team_id, "domain": "test"},
        "enterprise": None,
        "is_enterprise_install": False,
        "channel": {"id": channel, "name": "directmessage" if channel.startswith("D") else "general"},
        "message": msg,
        "state": {"values": {}},
        "response_url": response_url or f"https://hooks.slack.com/actions/{team_id}/{secrets.randbelow(10**12)}/"
                                        f"{secrets.token_urlsafe(18)}",
        "actions": [action],
    }


def encode_form(fields: Mapping[str, str]) -> bytes:
    """``application/x-www-form-urlencoded`` bytes, as Slack encodes them (spaces as ``+``)."""
    return urlencode(dict(fields)).encode("ascii")


def form_body(payload: JSONDict) -> bytes:
    """The interactivity POST body: ``payload=<url-encoded JSON>`` (sign these exact bytes)."""
    return encode_form({"payload": json.dumps(payload, separators=(",", ":"), ensure_ascii=False)})


def slash_command(*, command: str = "/status", text: str = "", user_id: str = "UALICE",
                  channel_id: str = "C1", team_id: str = "T1", api_app_id: str = "A1") -> dict[str, str]:
    """Slash-command form fields (HTTP: ``encode_form`` them; Socket Mode: the envelope payload as-is)."""
    return {
        "token": VERIFICATION_TOKEN,
        "team_id": team_id,
        "team_domain": "test",
        "channel_id": channel_id,
        "channel_name": "directmessage" if channel_id.startswith("D") else "general",
        "user_id": user_id,
        "user_name": user_id.lower(),
        "command": command,
        "text": text,
        "api_app_id": api_app_id,
        "is_enterprise_install": "false",
        "response_url": f"https://hooks.slack.com/commands/{team_id}/{secrets.randbelow(10**12)}/"
                        f"{secrets.token_urlsafe(18)}",
        "trigger_id": f"{int(time.time())}.{secrets.randbelow(10**12)}.{secrets.token_hex(16)}",
    }
