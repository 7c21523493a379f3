"""What the webhook channels answer a platform (or the web chat page) with: JSON `Answer`s."""

from __future__ import annotations

from typing import Any

import orjson
from loguru import logger

from bridge.errors import Unavailable
from channels.base import Answer, ChannelNotReady

OK_EMPTY = Answer(200, b"{}")  # how a platform's event is usually answered: encoded once


def json_answer(data: dict[str, Any], status: int = 200) -> Answer:
    if not data and status == 200:
        return OK_EMPTY
    return Answer(status, orjson.dumps(data))


def refusal(status: int, message: str, **extra: Any) -> Answer:
    """A 4xx (or 5xx) with a message saying what is wrong."""
    return Answer(status, orjson.dumps({"error": message, **extra}))


INTERNAL_ERROR = refusal(500, "internal error")
STORE_AWAY = refusal(503, "the bridge's store is unavailable right now; nothing was kept: send it again")


def failed(exc: BaseException, what: str) -> Answer:
    """The answer to a request whose `accept` raised. The store out of reach (SQLite locked by
    another process, PostgreSQL away past the writer's patience) is an outage, not a bug: 503,
    which platforms retry and the web chat shows, with a one-line log; anything else is a 500
    with its traceback in the log."""
    if isinstance(exc, ChannelNotReady):
        logger.warning("{}: {}; answered 503", what, exc)
        return refusal(503, str(exc))
    if isinstance(exc, Unavailable):
        logger.warning("{}: the store is unavailable ({}); answered 503", what, exc)
        return STORE_AWAY
    logger.opt(exception=exc).error("{} failed", what)
    return INTERNAL_ERROR


def event_answer(outcome: tuple[int, dict[str, Any]] | BaseException, what: str) -> Answer:
    """A platform event's answer: its (status, body), or `failed` for the exception it raised."""
    if isinstance(outcome, BaseException):
        return failed(outcome, what)
    return json_answer(outcome[1], outcome[0])
