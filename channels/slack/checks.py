"""The Slack HTTP routes' checks, before anything is stored: the v0 signature over the raw body
(constant-time) with a 5-minute window, then the body's shape. Light on purpose (no slack_sdk):
an HTTP edge worker imports it."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import parse_qs

import orjson
from loguru import logger

from channels.base import Answer, Forward
from channels.http import json_answer, refusal

TIMESTAMP_WINDOW = 300
INVALID = refusal(401, "invalid request")


def refused(secret: str, body: bytes, headers: Mapping[str, str]) -> str | None:
    """Why the request is refused (None: it is Slack's)."""
    if not secret:
        return "SLACK_SIGNING_SECRET is not set: HTTP events are refused"
    timestamp = headers.get("X-Slack-Request-Timestamp", "")
    given = headers.get("X-Slack-Signature", "")
    if not timestamp.isdigit() or not given:
        return "missing or malformed signature headers"
    if abs(time.time() - int(timestamp)) > TIMESTAMP_WINDOW:
        return "stale timestamp"
    expected = "v0=" + hmac.new(secret.encode(), b"v0:" + timestamp.encode() + b":" + body,
                                hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected.encode(), given.encode()):  # bytes: non-ASCII is a 401, not a 500
        return "bad signature"
    return None


def unsigned(secret: str, body: bytes, headers: Mapping[str, str]) -> Answer | None:
    """The 401 for a request that is not Slack's (logged with the reason), or None."""
    why = refused(secret, body, headers)
    if why:
        logger.warning("slack: refused a request: {}", why)
        return INVALID
    return None


@dataclass(frozen=True, slots=True)
class EventsCheck:
    """`POST /slack/events`: event callbacks; a URL verification is answered here."""

    signing_secret: str = field(repr=False)
    path: str = "/slack/events"

    def check(self, body: bytes, headers: Mapping[str, str]) -> Forward | Answer:
        if (denied := unsigned(self.signing_secret, body, headers)) is not None:
            return denied
        try:
            payload = orjson.loads(body)
        except ValueError:
            return refusal(400, "malformed JSON")
        if not isinstance(payload, dict):
            return refusal(400, "malformed body")
        if payload.get("type") == "url_verification":
            return json_answer({"challenge": payload.get("challenge", "")})
        return Forward(body, payload)


@dataclass(frozen=True, slots=True)
class InteractionsCheck:
    """`POST /slack/interactions`: a form whose `payload` field holds the interaction's JSON."""

    signing_secret: str = field(repr=False)
    path: str = "/slack/interactions"

    def check(self, body: bytes, headers: Mapping[str, str]) -> Forward | Answer:
        if (denied := unsigned(self.signing_secret, body, headers)) is not None:
            return denied
        try:
            raw = parse_qs(body.decode("utf-8"))["payload"][0]
            payload = orjson.loads(raw)
        except (KeyError, IndexError, ValueError, UnicodeDecodeError):
            return refusal(400, "expected a form field `payload` holding JSON")
        if not isinstance(payload, dict):
            return refusal(400, "expected a form field `payload` holding JSON")
        return Forward(raw.encode(), payload)
