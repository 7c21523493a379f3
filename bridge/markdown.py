"""Markdown the runtimes and the presenter both write (neutral: the channels render it)."""

from __future__ import annotations


def fence(text: str, info: str = "") -> str:
    """A markdown code block (with an info string such as `diff`) that survives backticks inside
    the text: its fence is longer than any run of backticks in it."""
    ticks = "```"
    while ticks in text:
        ticks += "`"
    return f"{ticks}{info}\n{text}\n{ticks}" if text else f"{ticks}{info}\n{ticks}"
