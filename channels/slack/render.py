"""Neutral replies -> Slack messages (text fallback + Block Kit).

Agent replies are standard markdown: by default they go in `markdown` blocks (Slack renders
markdown there; at most 12,000 characters across one message's markdown blocks), so a longer
reply becomes several messages in the thread. As a fallback (`SLACK_FORMAT=mrkdwn`, or when Slack
refuses the blocks) the markdown is converted to mrkdwn `section` blocks of at most 3,000
characters. Approval cards are section + context + actions blocks. Every message carries a short
plain `text` (notifications, screen readers).
"""

from __future__ import annotations

import json
import re
from typing import Any

from channels.base import Card, Reply
from channels.markdown import pack

MARKDOWN_LIMIT = 11_000  # of the 12,000 markdown characters per message, with room for a part label
SECTION_LIMIT = 2_900  # of the 3,000 per section block
MAX_BLOCKS = 45  # of the 50 per message
FALLBACK_CHARS = 300
BUTTON_STYLES = {"primary": "primary", "danger": "danger"}


def fallback_text(text: str) -> str:
    plain = re.sub(r"[`*_~#>]", "", text).strip()
    plain = " ".join(plain.split())
    return plain[:FALLBACK_CHARS] + ("…" if len(plain) > FALLBACK_CHARS else "") or " "


def split(text: str, limit: int) -> list[str]:
    """Cut text into pieces of at most `limit` characters at block, then line boundaries; a cut
    code block is closed and reopened."""
    return pack(text, limit, cut=_cut_block)


def _cut_block(block: str, limit: int) -> list[str]:
    lines = block.split("\n")
    fenced = lines[0].lstrip().startswith("```")
    budget = limit - 8
    out: list[str] = []
    current: list[str] = []
    size = 0
    for line in lines:
        for piece in [line[i:i + budget] for i in range(0, len(line), budget)] or [""]:
            if current and size + len(piece) + 1 > budget:
                chunk = "\n".join(current)
                out.append(chunk + ("\n```" if fenced and not chunk.rstrip().endswith("```") else ""))
                current = ["```"] if fenced else []
                size = 4 if fenced else 0
            current.append(piece)
            size += len(piece) + 1
    if current:
        out.append("\n".join(current))
    return out


# -- markdown -> mrkdwn (the fallback)

_CODE = re.compile(r"```.*?```|`[^`\n]+`", re.DOTALL)


def escape(text: str) -> str:
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def to_mrkdwn(markdown: str) -> str:
    """Standard markdown -> Slack mrkdwn: bold, italics, strike, links, headings as bold lines,
    lists as bullets, tables as monospace, `& < >` escaped; code left as it is."""
    out: list[str] = []
    table: list[list[str]] = []

    def flush_table() -> None:
        if not table:
            return
        widths = [max(len(row[i]) if i < len(row) else 0 for row in table) for i in range(max(map(len, table)))]
        rows = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip() for row in table]
        out.append("```\n" + "\n".join(rows) + "\n```")
        table.clear()

    fence = False
    for line in markdown.split("\n"):
        if line.lstrip().startswith("```"):
            flush_table()
            fence = not fence
            out.append("```" if line.strip().startswith("```") else line)
            continue
        if fence:
            out.append(line)
            continue
        stripped = line.strip()
        if stripped.startswith("|") and stripped.endswith("|"):
            cells = [c.strip() for c in stripped.strip("|").split("|")]
            if not all(re.fullmatch(r":?-{2,}:?", c) for c in cells if c):
                table.append(cells)
            continue
        flush_table()
        out.append(_inline(line))
    flush_table()
    return "\n".join(out)


def _inline(line: str) -> str:
    heading = re.match(r"^\s{0,3}#{1,6}\s+(.*)$", line)
    if heading:
        return f"*{_inline_spans(heading.group(1).strip())}*"
    bullet = re.match(r"^(\s*)[-*+]\s+(.*)$", line)
    if bullet:
        return f"{bullet.group(1)}• {_inline_spans(bullet.group(2))}"
    return _inline_spans(line)


def _inline_spans(text: str) -> str:
    parts = []
    last = 0
    for match in _CODE.finditer(text):
        parts.append(_format(text[last:match.start()]))
        parts.append(match.group(0))
        last = match.end()
    parts.append(_format(text[last:]))
    return "".join(parts)


def _format(text: str) -> str:
    links: list[str] = []

    def keep_link(match: re.Match[str]) -> str:
        links.append(f"<{match.group(2)}|{escape(match.group(1))}>")
        return f"\x00{len(links) - 1}\x00"

    def keep_token(match: re.Match[str]) -> str:
        links.append(match.group(0))  # <@U123>, <#C1>, <!here>: Slack's own tokens stay
        return f"\x00{len(links) - 1}\x00"

    text = re.sub(r"\[([^\]]+)\]\((https?://[^)\s]+)\)", keep_link, text)
    text = re.sub(r"<[@#!][^>\s]+>", keep_token, text)
    text = escape(text)
    text = re.sub(r"\*\*(.+?)\*\*|__(.+?)__", lambda m: f"\x01{m.group(1) or m.group(2)}\x01", text)
    text = re.sub(r"(?<![\w*])\*(?!\s)(.+?)(?<!\s)\*(?![\w*])", r"_\1_", text)
    text = re.sub(r"~~(.+?)~~", r"~\1~", text)
    text = text.replace("\x01", "*")
    return re.sub(r"\x00(\d+)\x00", lambda m: links[int(m.group(1))], text)


# -- messages


def _markdown_messages(text: str) -> list[dict[str, Any]]:
    chunks = split(text or " ", MARKDOWN_LIMIT)
    total = len(chunks)
    out = []
    for n, chunk in enumerate(chunks, start=1):
        body = chunk if total == 1 else f"{chunk}\n\n_({n} / {total})_"
        out.append({"text": fallback_text(chunk), "blocks": [{"type": "markdown", "text": body}]})
    return out


def _mrkdwn_messages(text: str) -> list[dict[str, Any]]:
    sections = split(to_mrkdwn(text or " "), SECTION_LIMIT)
    groups = [sections[i:i + MAX_BLOCKS] for i in range(0, len(sections), MAX_BLOCKS)]
    out = []
    for n, group in enumerate(groups, start=1):
        blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": s}} for s in group]
        if len(groups) > 1:
            blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": f"({n} / {len(groups)})"}]})
        out.append({"text": fallback_text(group[0]), "blocks": blocks})
    return out


CUT_NOTE = "\n…_(cut to fit; the full request is in the approval audit)_"


def _card(card: Card) -> dict[str, Any]:
    """The title and the body in sections of their own, the body cut to fit one (with its code
    fence closed): a section over Slack's limit gets the whole message refused, buttons and all."""
    body = to_mrkdwn(card.body or " ")
    if len(body) > SECTION_LIMIT:
        body = body[:SECTION_LIMIT - len(CUT_NOTE) - 4] + CUT_NOTE
    if body.count("```") % 2:
        body += "\n```"
    blocks: list[dict[str, Any]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": f"*{escape(card.title)[:280]}*"}},
        {"type": "section", "text": {"type": "mrkdwn", "text": body}},
    ]
    if card.status:
        blocks.append({"type": "context", "elements": [{"type": "mrkdwn", "text": f"Status: {card.status}"}]})
    if card.actions:
        elements = []
        for button in card.actions:
            element: dict[str, Any] = {
                "type": "button", "action_id": f"bridge.{button.id}"[:255],
                "text": {"type": "plain_text", "text": button.label[:75], "emoji": True},
                "value": json.dumps({"action_id": button.id, **button.value}, separators=(",", ":"))[:2000],
            }
            if button.style in BUTTON_STYLES:
                element["style"] = BUTTON_STYLES[button.style]
            elements.append(element)
        blocks.append({"type": "actions", "elements": elements[:25]})
    return {"text": fallback_text(card.title), "blocks": blocks}


def render(reply: Reply, *, fmt: str = "markdown") -> list[dict[str, Any]]:
    """The reply as one or more messages, each {"text", "blocks"}."""
    if reply.card is not None:
        return [_card(reply.card)]
    if fmt == "mrkdwn":
        return _mrkdwn_messages(reply.text)
    return _markdown_messages(reply.text)
