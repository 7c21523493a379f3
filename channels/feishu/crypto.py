"""Feishu's request signature and body encryption (AES-256-CBC), verified without the SDK.

The signature is sha256(timestamp + nonce + encrypt_key + raw body), hex; the body key is
sha256(encrypt_key); the encrypted body is base64(iv || AES-CBC(PKCS7(plaintext))).
"""

from __future__ import annotations

import binascii
import functools
import hashlib
import hmac
from typing import Any

from Crypto.Cipher import AES
from Crypto.Util.strxor import strxor


class DecryptError(ValueError):
    """The body could not be decrypted with the configured key."""


def signature(timestamp: str, nonce: str, encrypt_key: str, body: bytes) -> str:
    return hashlib.sha256((timestamp + nonce + encrypt_key).encode("utf-8") + body).hexdigest()


def signature_ok(timestamp: str, nonce: str, encrypt_key: str, body: bytes, given: str) -> bool:
    """Constant-time comparison of the request's signature with the expected one."""
    # as bytes: a str holding anything but ASCII makes compare_digest raise (a 500, not a 401)
    return hmac.compare_digest(signature(timestamp, nonce, encrypt_key, body).encode(), (given or "").encode())


@functools.lru_cache(maxsize=8)
def body_key(encrypt_key: str) -> bytes:
    """The AES key of `encrypt_key` (derived once per key, not once per request)."""
    return hashlib.sha256(encrypt_key.encode("utf-8")).digest()


@functools.lru_cache(maxsize=8)
def _block_decrypter(encrypt_key: str) -> Any:
    """AES-256 in ECB mode, one block at a time: no state between calls, so one object serves
    every request (a CBC object holds its IV and must be made anew for each: 7 us)."""
    return AES.new(body_key(encrypt_key), AES.MODE_ECB)


def cbc_decrypt(encrypt_key: str, iv: bytes, data: bytes) -> bytes:
    """AES-256-CBC decryption as CBC defines it: each block decrypted, then XORed with the
    ciphertext block before it (the IV for the first). The same bytes as pycryptodome's CBC mode
    (tests/unit/test_feishu_format.py checks it), at 5 us instead of 12 for a message."""
    return strxor(_block_decrypter(encrypt_key).decrypt(data), iv + data[:-16])


def decrypt_bytes(encrypt_key: str, data: str) -> bytes:
    """The plaintext (UTF-8 bytes) of an encrypted body's `encrypt` field."""
    try:
        raw = binascii.a2b_base64(data, strict_mode=True)
    except (ValueError, TypeError) as exc:
        raise DecryptError("not base64") from exc
    if len(raw) < 32 or len(raw) % 16:
        raise DecryptError("bad length")
    plain = cbc_decrypt(encrypt_key, raw[:16], raw[16:])
    pad = plain[-1]
    if not 1 <= pad <= 16 or plain[-pad:] != bytes([pad]) * pad:
        raise DecryptError("bad padding (wrong key?)")
    return plain[:-pad]


def decrypt(encrypt_key: str, data: str) -> str:
    try:
        return decrypt_bytes(encrypt_key, data).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecryptError("not UTF-8 (wrong key?)") from exc
