"""What the webhook channels answer a platform with."""

from __future__ import annotations

from typing import Any

from aiohttp import web

_EMPTY_OBJECT = b"{}"


def answer(data: dict[str, Any], status: int = 200) -> web.Response:
    """A JSON answer. `{}`, how a platform's event is usually answered, is encoded once: it is on
    every event's ack path."""
    if not data:
        return web.Response(body=_EMPTY_OBJECT, status=status, content_type="application/json")
    return web.json_response(data, status=status)
