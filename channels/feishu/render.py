"""Neutral replies -> Feishu card JSON 2.0.

Every bot message is an interactive card (a card can be patched in place, which streaming
progress and approval state changes need). Markdown goes into `markdown` elements, which render
headings, lists, code blocks and tables. A card must stay within 30 KB after JSON escaping, so a
long reply is split at paragraph and code-fence boundaries into numbered parts; nothing is dropped.
"""

from __future__ import annotations

import json
from typing import Any

from channels.base import Card, Reply
from channels.markdown import pack

CARD_LIMIT = 30 * 1024  # bytes of the card's JSON, the platform's limit
BUDGET = 24 * 1024  # bytes of escaped markdown per card, leaving room for the frame and part label
TEMPLATES = {"pending": "orange", "approved": "green", "approved_for_session": "green", "denied": "red",
             "stopped": "grey", "expired": "grey", "interrupted": "grey"}
BUTTON_TYPES = {"primary": "primary", "danger": "danger", "default": "default"}


def _escaped_size(text: str) -> int:
    return len(json.dumps(text, ensure_ascii=False).encode("utf-8"))


def _hard_split(block: str, budget: int) -> list[str]:
    """A block too big for one card: cut by lines (by characters for a giant line); a cut code
    block is closed and reopened so each part renders."""
    lines = block.split("\n")
    fence_open = lines[0].lstrip()[:3] if lines and lines[0].lstrip().startswith(("```", "~~~")) else None
    opener = lines[0] if fence_open else ""
    parts: list[str] = []
    current: list[str] = []
    size = 0
    for line in lines:
        pieces = [line]
        if _escaped_size(line) > budget:
            step = max(1, budget // 4)
            pieces = [line[i:i + step] for i in range(0, len(line), step)]
        for piece in pieces:
            extra = _escaped_size(piece) + 2
            if current and size + extra > budget - 16:
                text = "\n".join(current)
                if fence_open:
                    text += f"\n{fence_open}"
                parts.append(text)
                current = [opener] if fence_open else []
                size = _escaped_size(opener) if fence_open else 0
            current.append(piece)
            size += extra
    if current:
        parts.append("\n".join(current))
    return parts


def split_markdown(text: str, budget: int = BUDGET) -> list[str]:
    """Cut markdown into parts of at most `budget` escaped bytes, at block boundaries."""
    return pack(text, budget, cut=_hard_split, size=_escaped_size)


def _markdown(content: str) -> dict[str, Any]:
    return {"tag": "markdown", "content": content}


def _frame(elements: list[dict[str, Any]], *, summary: str, header: dict[str, Any] | None = None) -> dict[str, Any]:
    card: dict[str, Any] = {
        "schema": "2.0",
        "config": {"update_multi": True, "width_mode": "fill", "summary": {"content": summary[:100]}},
        "body": {"elements": elements},
    }
    if header is not None:
        card["header"] = header
    return card


def _summary(text: str) -> str:
    first = next((line.strip(" #*`>") for line in text.splitlines() if line.strip()), "")
    return first or "agent-bridge"


def _buttons(card: Card) -> list[dict[str, Any]]:
    out = []
    for button in card.actions:
        out.append({
            "tag": "button",
            "text": {"tag": "plain_text", "content": button.label},
            "type": BUTTON_TYPES.get(button.style, "default"),
            "behaviors": [{"type": "callback", "value": {"action_id": button.id, **button.value}}],
        })
    return out


def _card(card: Card) -> dict[str, Any]:
    """A card with buttons stays one message (its state is patched in place), so an oversized
    body is cut, saying so."""
    header = {"title": {"tag": "plain_text", "content": card.title[:200]},
              "template": TEMPLATES.get(card.status, "blue")}
    chunks = split_markdown(card.body or " ")
    body = chunks[0]
    if len(chunks) > 1:
        body += "\n\n*(cut to fit the card; the full request is in the approval audit)*"
    return _frame([_markdown(body), *_buttons(card)], summary=card.title, header=header)


def render(reply: Reply, budget: int = BUDGET) -> list[dict[str, Any]]:
    """The reply as one or more cards (a long reply in numbered parts)."""
    if reply.card is not None:
        return [_card(reply.card)]
    text = reply.text or " "
    chunks = split_markdown(text, budget)
    if len(chunks) == 1:
        return [_frame([_markdown(text)], summary=_summary(text))]
    total = len(chunks)
    return [_frame([_markdown(chunk), _markdown(f"*({n} / {total})*")], summary=_summary(chunk))
            for n, chunk in enumerate(chunks, start=1)]


def smaller(reply: Reply, index: int, budget: int) -> list[dict[str, Any]]:
    """Part `index` of `render(reply)` again as smaller cards (of at most `budget`), for a part
    the platform measured bigger than we did; labelled within that part ("2.1 / 3")."""
    text = reply.text or " "
    chunks = split_markdown(text, BUDGET)
    pieces = split_markdown(chunks[index], budget)
    total = len(chunks)
    if total == 1:
        return [_frame([_markdown(piece), _markdown(f"*({k} / {len(pieces)})*")], summary=_summary(piece))
                for k, piece in enumerate(pieces, start=1)]
    return [_frame([_markdown(piece), _markdown(f"*({index + 1}.{k} / {total})*")], summary=_summary(piece))
            for k, piece in enumerate(pieces, start=1)]


def card_json(card: dict[str, Any]) -> str:
    return json.dumps(card, ensure_ascii=False, separators=(",", ":"))
