"""HTTP helpers shared by every route: JSON bodies with clear 400s, JSON error responses."""

from __future__ import annotations

import json
from typing import TypeVar

from aiohttp import web
from pydantic import BaseModel, ValidationError

MAX_BODY = 1024 * 1024  # larger request bodies get 413 before anything is stored

M = TypeVar("M", bound=BaseModel)


def error(status: int, message: str, **extra: object) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


async def read_model(request: web.Request, model: type[M]) -> M:
    """Parse and validate a JSON body; raise a 400 that says what is wrong."""
    body = await request.read()  # raises 413 past the app's client_max_size
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        first = exc.errors()[0]
        if first.get("type") == "json_invalid":
            message = f"malformed JSON: {first.get('ctx', {}).get('error', first.get('msg'))}"
        else:
            where = ".".join(str(p) for p in first.get("loc", ())) or "body"
            message = f"{where}: {first.get('msg')}"
        raise web.HTTPBadRequest(text=json.dumps({"error": message}), content_type="application/json") from None

