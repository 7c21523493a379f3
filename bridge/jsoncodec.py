"""JSON on the hot paths (webhook bodies, stored payloads): orjson, an order of magnitude faster
than the standard library here, with the standard library's encoder for what orjson refuses."""

from __future__ import annotations

import json
from typing import Any

import orjson

# bytes or str in; a ValueError (json.JSONDecodeError) for malformed input. Integers beyond 64 bits
# come back as floats: platform payloads carry their ids as strings.
loads = orjson.loads


def dumps(obj: Any) -> str:
    """Compact JSON text (UTF-8 characters as they are)."""
    try:
        return orjson.dumps(obj).decode()
    except TypeError:  # an int beyond 64 bits, a non-string key: what the standard library does
        return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
