"""Feishu's request signature and body encryption (AES-256-CBC), verified without the SDK.

The signature is sha256(timestamp + nonce + encrypt_key + raw body), hex; the body key is
sha256(encrypt_key); the encrypted body is base64(iv || AES-CBC(PKCS7(plaintext))).
"""

from __future__ import annotations

import base64
import functools
import hashlib
import hmac

from Crypto.Cipher import AES


class DecryptError(ValueError):
    """The body could not be decrypted with the configured key."""


def signature(timestamp: str, nonce: str, encrypt_key: str, body: bytes) -> str:
    return hashlib.sha256((timestamp + nonce + encrypt_key).encode("utf-8") + body).hexdigest()


def signature_ok(timestamp: str, nonce: str, encrypt_key: str, body: bytes, given: str) -> bool:
    """Constant-time comparison of the request's signature with the expected one."""
    return hmac.compare_digest(signature(timestamp, nonce, encrypt_key, body), given or "")


@functools.lru_cache(maxsize=8)
def body_key(encrypt_key: str) -> bytes:
    """The AES key of `encrypt_key` (derived once per key, not once per request)."""
    return hashlib.sha256(encrypt_key.encode("utf-8")).digest()


def decrypt(encrypt_key: str, data: str) -> str:
    try:
        raw = base64.b64decode(data, validate=True)
    except (ValueError, TypeError) as exc:
        raise DecryptError("not base64") from exc
    if len(raw) < 32 or len(raw) % 16:
        raise DecryptError("bad length")
    plain = AES.new(body_key(encrypt_key), AES.MODE_CBC, raw[:16]).decrypt(raw[16:])
    pad = plain[-1]
    if not 1 <= pad <= 16 or plain[-pad:] != bytes([pad]) * pad:
        raise DecryptError("bad padding (wrong key?)")
    try:
        return plain[:-pad].decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecryptError("not UTF-8 (wrong key?)") from exc
