"""Markdown the runtimes and the presenter both write (neutral: the channels render it)."""

from __future__ import annotations


def fence(text: str, info: str = "") -> str:
    """A markdown code block (with an info string such as `diff`) that survives backticks inside
    the text: its fence is longer than any run of backticks in it."""
    ticks = "```"
    while ticks in text:
        ticks += "`"
    return f"{ticks}{info}\n{text}\n{ticks}" if text else f"{ticks}{info}\n{ticks}"


def code(text: str) -> str:
    """Inline code that survives backticks inside the text (``echo `date` ``): its delimiters are
    longer than any run of backticks in it, padded with a space where the text starts or ends
    with one (CommonMark code spans)."""
    longest = run = 0
    for char in text:
        run = run + 1 if char == "`" else 0
        longest = max(longest, run)
    ticks = "`" * (longest + 1)
    pad = " " if text.startswith("`") or text.endswith("`") else ""
    return f"{ticks}{pad}{text}{pad}{ticks}"
