"""Inbound Feishu traffic built exactly as the platform sends it.

AES-256-CBC body encryption, the ``X-Lark-Signature`` scheme, v2 event envelopes for
``im.message.receive_v1`` and ``card.action.trigger``, and the ``url_verification`` challenge.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import time
import uuid
from typing import Any

from Crypto.Cipher import AES

__all__ = ["aes_encrypt", "aes_decrypt", "signature", "webhook_request", "message_event", "mention",
           "card_action_event", "url_verification"]

JSONDict = dict[str, Any]
TENANT_KEY = "tenant_test"
_BLOCK = AES.block_size


def _key(encrypt_key: str) -> bytes:
    return hashlib.sha256(encrypt_key.encode("utf-8")).digest()


def aes_encrypt(encrypt_key: str, plaintext: str) -> str:
    """base64(iv || AES-256-CBC(sha256(encrypt_key), iv, PKCS7(plaintext))) with a random 16-byte IV."""
    data = plaintext.encode("utf-8")
    pad = _BLOCK - len(data) % _BLOCK
    iv = os.urandom(_BLOCK)
    cipher = AES.new(_key(encrypt_key), AES.MODE_CBC, iv)
    return base64.b64encode(iv + cipher.encrypt(data + bytes([pad]) * pad)).decode("ascii")


def aes_decrypt(encrypt_key: str, b64: str) -> str:
    """Inverse of ``aes_encrypt``; raises ValueError on a malformed ciphertext or padding."""
    raw = base64.b64decode(b64)
    if len(raw) < 2 * _BLOCK or len(raw) % _BLOCK:
        raise ValueError("invalid ciphertext length")
    plain = AES.new(_key(encrypt_key), AES.MODE_CBC, raw[:_BLOCK]).decrypt(raw[_BLOCK:])
    pad = plain[-1]
    if not 1 <= pad <= _BLOCK or plain[-pad:] != bytes([pad]) * pad:
        raise ValueError("invalid PKCS7 padding")
    return plain[:-pad].decode("utf-8")


def signature(timestamp: str, nonce: str, encrypt_key: str, body: bytes) -> str:
    """``X-Lark-Signature``: sha256 hex of (timestamp + nonce + encrypt_key) followed by the raw body."""
    return hashlib.sha256((timestamp + nonce + encrypt_key).encode("utf-8") + body).hexdigest()


def webhook_request(payload: JSONDict, *, encrypt_key: str = "", timestamp: int | None = None,
                    nonce: str | None = None) -> tuple[dict[str, str], bytes]:
    """Headers and body of a webhook POST.

    With an encrypt key the body is ``{"encrypt": …}`` and the ``X-Lark-*`` headers carry a valid
    signature. Without one the body is the plain JSON and the headers are still present (signed with
    an empty key, which receivers ignore). Header names use Feishu's exact spelling.
    """
    plain = json.dumps(payload, ensure_ascii=False)
    body_obj: JSONDict = {"encrypt": aes_encrypt(encrypt_key, plain)} if encrypt_key else payload
    body = json.dumps(body_obj, ensure_ascii=False).encode("utf-8")
    ts = str(int(time.time()) if timestamp is None else timestamp)
    nonce = nonce if nonce is not None else secrets.token_hex(8)
    headers = {
        "Content-Type": "application/json; charset=utf-8",
        "X-Lark-Request-Timestamp": ts,
        "X-Lark-Request-Nonce": nonce,
        "X-Lark-Signature": signature(ts, nonce, encrypt_key, body),
        "X-Request-Id": str(uuid.uuid4()),
    }
    return headers, body


def _user_ids(open_id: str) -> JSONDict:
    """open_id plus deterministic union_id and user_id, as an id object in events."""
    tail = open_id.removeprefix("ou_")
    return {"open_id": open_id, "union_id": f"on_{tail}", "user_id": f"u_{tail}"}


def _header(event_type: str, token: str, event_id: str | None, app_id: str) -> JSONDict:
    return {"event_id": event_id or uuid.uuid4().hex, "event_type": event_type,
            "create_time": str(int(time.time() * 1000)), "token": token, "app_id": app_id,
            "tenant_key": TENANT_KEY}


def mention(key: str, open_id: str, name: str) -> JSONDict:
    """One entry of ``event.message.mentions`` (``key`` is the ``@_user_N`` placeholder in the text)."""
    return {"key": key, "id": _user_ids(open_id), "name": name, "tenant_key": TENANT_KEY}


def message_event(*, token: str, text: str | None = None, content: JSONDict | None = None,
                  message_type: str = "text", chat_id: str = "oc_chat1", chat_type: str = "p2p",
                  sender_open_id: str = "ou_alice", sender_type: str = "user",
                  mentions: list[JSONDict] | None = None, message_id: str | None = None,
                  event_id: str | None = None, root_id: str | None = None, parent_id: str | None = None,
                  thread_id: str | None = None, create_time_ms: int | None = None,
                  app_id: str = "cli_test") -> JSONDict:
    """A v2 ``im.message.receive_v1`` envelope. ``text`` gives content ``{"text": text}``; ``content``
    (a dict) is JSON-encoded as the content of other message types. Ids are random when None.
    """
    if text is not None and content is not None:
        raise ValueError("pass text or content, not both")
    body = {"text": text} if text is not None else (content if content is not None else
                                                      ({"text": ""} if message_type == "text" else {}))
    created = str(int(time.time() * 1000) if create_time_ms is None else create_time_ms)
    message: JSONDict = {"message_id": message_id or f"om_{secrets.token_hex(16)}"}
    for key, value in (("root_id", root_id), ("parent_id", parent_id), ("thread_id", thread_id)):
        if value:
            message[key] = value
    message.update({"create_time": created, "update_time": created, "chat_id": chat_id, "chat_type": chat_type,
                    "message_type": message_type, "content": json.dumps(body, ensure_ascii=False)})
    if mentions:
        message["mentions"] = mentions
    return {
        "schema": "2.0",
        "header": _header("im.message.receive_v1", token, event_id, app_id),
        "event": {
            "sender": {"sender_id": _user_ids(sender_open_id), "sender_type": sender_type,
                       "tenant_key": TENANT_KEY},
            "message": message,
        },
    }


def card_action_event(*, token: str, value: JSONDict, operator_open_id: str = "ou_alice",
                      message_id: str = "om_card", chat_id: str = "oc_chat1", event_id: str | None = None,
                      app_id: str = "cli_test") -> JSONDict:
    """A v2 ``card.action.trigger`` callback for a button click carrying ``value``."""
    return {
        "schema": "2.0",
        "header": _header("card.action.trigger", token, event_id, app_id),
        "event": {
            "operator": {"tenant_key": TENANT_KEY, **_user_ids(operator_open_id)},
            "token": f"c-{secrets.token_hex(16)}",
            "action": {"tag": "button", "value": value},
            "host": "im_message",
            "delivery_type": "url_callback",
            "context": {"open_message_id": message_id, "open_chat_id": chat_id},
        },
    }


def url_verification(*, token: str, challenge: str = "abc") -> JSONDict:
    """The challenge Feishu posts when a request URL is configured."""
    return {"challenge": challenge, "token": token, "type": "url_verification"}
