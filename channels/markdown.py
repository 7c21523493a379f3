"""Markdown helpers the channel renderers share."""

from __future__ import annotations

from collections.abc import Callable


def blocks(text: str) -> list[str]:
    """The text's blocks: paragraphs (split at blank lines), a fenced code block kept whole
    (``` or ~~~, blank lines inside it included). Joining them with blank lines gives the text
    back, less runs of blank lines."""
    out: list[str] = []
    current: list[str] = []
    fence: str | None = None
    for line in text.split("\n"):
        stripped = line.lstrip()
        if fence is None and stripped.startswith(("```", "~~~")):
            if current:
                out.append("\n".join(current))
                current = []
            fence = stripped[:3]
            current.append(line)
            continue
        if fence is not None:
            current.append(line)
            if stripped.startswith(fence) and len(current) > 1:
                out.append("\n".join(current))
                current = []
                fence = None
            continue
        if not line.strip():
            if current:
                out.append("\n".join(current))
                current = []
            continue
        current.append(line)
    if current:
        out.append("\n".join(current))
    return out


def pack(text: str, limit: int, *, cut: Callable[[str, int], list[str]],
         size: Callable[[str], int] = len) -> list[str]:
    """Cut text into parts of at most `limit` (as `size` measures), joining whole blocks while
    they fit; a block bigger than a part is cut by `cut(block, limit)`. Nothing is dropped."""
    if size(text) <= limit:
        return [text]
    parts: list[str] = []
    current = ""
    for block in blocks(text):
        for piece in [block] if size(block) <= limit else cut(block, limit):
            candidate = f"{current}\n\n{piece}" if current else piece
            if size(candidate) <= limit:
                current = candidate
            else:
                if current:
                    parts.append(current)
                current = piece
    if current:
        parts.append(current)
    return parts
