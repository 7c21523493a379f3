"""Attachments a channel downloads, written off the event loop (a file can be megabytes)."""

from __future__ import annotations

import asyncio
from pathlib import Path


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


async def save(path: Path, data: bytes) -> str:
    """Write `data` to `path` (creating its folder) on a worker thread; the path as a string."""
    await asyncio.to_thread(_write, path, data)
    return str(path)
