"""Control commands, parsed before anything reaches a runtime. They bypass the conversation's
queue, so `/stop` works while a turn runs."""

from __future__ import annotations

import re
from dataclasses import dataclass

COMMAND = re.compile(r"^/([A-Za-z][\w-]*)(?:\s+(.*))?$", re.DOTALL)
KNOWN = frozenset({"stop", "status", "help", "retry", "new", "sessions", "switch", "resume", "cwd", "model",
                   "mode", "queue", "steer", "routines", "output"})
SHORTCUTS = {
    "y": "approve", "yes": "approve", "approve": "approve", "ok": "approve",
    "n": "deny", "no": "deny", "deny": "deny",
    "approve all": "approve_all", "y all": "approve_all",
}


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    args: str
    known: bool


def parse(text: str) -> Command | None:
    """`/name args` -> Command. A path such as `/usr/bin/ls` is not a command. A lone `/` (what
    a person types to see the commands) is `/help`."""
    if text.strip() == "/":
        return Command("help", "", True)
    match = COMMAND.match(text.strip())
    if match is None:
        return None
    name = match.group(1).lower()
    return Command(name, (match.group(2) or "").strip(), name in KNOWN)


def shortcut(text: str) -> str | None:
    """A reply that answers a pending approval: "approve", "deny" or "approve_all"."""
    return SHORTCUTS.get(" ".join(text.lower().split()).rstrip(".!"))
