"""The Feishu webhook's checks, before anything is stored: the signature over the raw body
(constant-time, when an encrypt key is set), a ±5 min timestamp window, AES-256-CBC decryption
and the verification token. Light on purpose (no lark-oapi): an HTTP edge worker imports it."""

from __future__ import annotations

import hmac
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from loguru import logger

from channels.base import Answer, Forward
from channels.feishu import crypto
from channels.http import json_answer, refusal

PATH = "/feishu/events"
TIMESTAMP_WINDOW = 300.0


class Refused(Exception):
    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


def open_envelope(body: bytes, headers: Mapping[str, str], *, encrypt_key: str,
                  verification_token: str) -> tuple[dict[str, Any], bytes]:
    """Verify and decrypt a webhook body: (the event, its JSON). Raises Refused (4xx) for anything
    not from Feishu."""
    try:
        outer = orjson.loads(body)
    except ValueError:
        raise Refused(400, "malformed JSON") from None
    if not isinstance(outer, dict):
        raise Refused(400, "malformed body")
    if not (encrypt_key or verification_token):
        raise Refused(401, "the bridge has neither FEISHU_ENCRYPT_KEY nor FEISHU_VERIFICATION_TOKEN to check this by")
    plain = body
    if encrypt_key:
        timestamp = headers.get("X-Lark-Request-Timestamp", "")
        nonce = headers.get("X-Lark-Request-Nonce", "")
        given = headers.get("X-Lark-Signature", "")
        is_challenge = "encrypt" not in outer and outer.get("type") == "url_verification"
        if not is_challenge:
            if not (timestamp and given):
                raise Refused(401, "missing signature headers")
            if not crypto.signature_ok(timestamp, nonce, encrypt_key, body, given):
                raise Refused(401, "bad signature")
        if timestamp:
            try:
                skew = abs(time.time() - int(timestamp))
            except ValueError:
                raise Refused(401, "bad timestamp") from None
            if skew > TIMESTAMP_WINDOW:
                raise Refused(401, "stale timestamp")
    if "encrypt" in outer:
        if not encrypt_key:
            raise Refused(400, "encrypted body but FEISHU_ENCRYPT_KEY is not set")
        try:
            plain = crypto.decrypt_bytes(encrypt_key, str(outer["encrypt"]))
            outer = orjson.loads(plain)  # not UTF-8: refused here too
        except (crypto.DecryptError, ValueError):
            raise Refused(400, "cannot decrypt the body") from None
        if not isinstance(outer, dict):
            raise Refused(400, "malformed body")
    token = outer.get("token") if "schema" not in outer else (outer.get("header") or {}).get("token")
    if verification_token and not hmac.compare_digest(str(token or "").encode(), verification_token.encode()):
        raise Refused(401, "wrong verification token")
    return outer, plain


@dataclass(frozen=True, slots=True)
class EventsCheck:
    """`POST /feishu/events`: events and card callbacks. A URL verification is answered here."""

    encrypt_key: str = field(repr=False)
    verification_token: str = field(repr=False)
    path: str = PATH

    def check(self, body: bytes, headers: Mapping[str, str]) -> Forward | Answer:
        try:
            event, plain = open_envelope(body, headers, encrypt_key=self.encrypt_key,
                                         verification_token=self.verification_token)
        except Refused as exc:
            logger.warning("feishu: refused a webhook request: {}", exc.reason)
            return refusal(exc.status, exc.reason)
        if event.get("type") == "url_verification":
            return json_answer({"challenge": event.get("challenge", "")})
        return Forward(plain, event)
