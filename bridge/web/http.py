"""HTTP helpers shared by every route: JSON bodies with clear 400s, JSON error responses."""

from __future__ import annotations

from aiohttp import web
from pydantic import ValidationError

from bridge.errors import plain_message

MAX_BODY = 1024 * 1024  # larger request bodies get 413 before anything is stored


def error(status: int, message: str, **extra: object) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def validation_message(exc: ValidationError) -> str:
    """What is wrong with a JSON body, in one line: malformed JSON, or the first invalid field."""
    first = exc.errors()[0]
    if first.get("type") == "json_invalid":
        return f"malformed JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
    where = ".".join(str(p) for p in first.get("loc", ()))
    message = plain_message(first)
    return f"{where}: {message}" if where else message

