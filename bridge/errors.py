"""Exceptions shared across layers, and how a validation error is worded; light to import (the
HTTP edge workers load this, and not the store)."""

from typing import Any


class Unavailable(RuntimeError):
    """A transient outage of something the service needs (its store out of reach): a request
    that meets it is answered 503, to be sent again, rather than 500."""


def plain_message(error: Any) -> str:
    """A pydantic error's message without the "Value error, " pydantic puts before our own words."""
    message = str(error.get("msg", ""))
    return message.removeprefix("Value error, ") if error.get("type") == "value_error" else message
