"""What the webhook channels answer a platform (or the web chat page) with: JSON `Answer`s."""

from __future__ import annotations

from typing import Any

import orjson

from channels.base import Answer

OK_EMPTY = Answer(200, b"{}")  # how a platform's event is usually answered: encoded once


def json_answer(data: dict[str, Any], status: int = 200) -> Answer:
    if not data and status == 200:
        return OK_EMPTY
    return Answer(status, orjson.dumps(data))


def refusal(status: int, message: str, **extra: Any) -> Answer:
    """A 4xx (or 5xx) with a message saying what is wrong."""
    return Answer(status, orjson.dumps({"error": message, **extra}))
