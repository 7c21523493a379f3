"""Markdown helpers the channel renderers share."""

from __future__ import annotations


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
