"""Shell commands run through the web chat, watched from outside the service: their pids, and
whether they are still running."""

from __future__ import annotations

import os
from pathlib import Path

from tests.support.chat import ChatClient
from tests.support.waiting import wait_until


def running(pid: int) -> bool:
    """The process is there and not a zombie (one whose parent has not reaped it yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def run_long(c: ChatClient, approver: ChatClient, workspace: Path, conversation: str, name: str,
                   seconds: float) -> list[int]:
    """alice sends a command that leads its process group, with a child in it, both waiting
    `seconds` (it asks for approval, given through `approver`): the pids of both, once they run."""
    await c.post(conversation, "alice", f"echo $$ > {name}.pid; sleep {seconds} & echo $! > {name}.child; wait")
    card = await c.wait_card(conversation, "pending")
    status, _ = await approver.act(conversation, card["id"], "approve", "alice")
    assert status == 200
    files = [workspace / f"{name}.pid", workspace / f"{name}.child"]
    await wait_until(lambda: all(f.exists() and f.read_text().strip() for f in files), what=f"{name}'s pid files")
    return [int(f.read_text()) for f in files]


def kill_left(pids: list[int]) -> None:
    """After a test: what it left running goes (its service was killed, so nothing else ends it)."""
    for pid in pids:
        if running(pid):
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
