"""Attachments a channel downloads: safe, distinct file names, written off the event loop (a file
can be megabytes)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath


def file_names(names: Sequence[str | None], fallback: str = "file") -> list[str]:
    """One file name per attachment of a message, in order: the name's last path part (never a
    folder of its own: no `..`, no separators), and distinct within the message, so two files
    that share a name ("image.png" twice) are both kept: "image.png", "image (2).png"."""
    taken: set[str] = set()
    out: list[str] = []
    for raw in names:
        name = PureWindowsPath(PurePosixPath(raw or "").name).name.strip()
        if name in ("", ".", ".."):
            name = fallback
        stem, suffix = _split(name)
        candidate, n = name, 1
        while candidate.lower() in taken:
            n += 1
            candidate = f"{stem} ({n}){suffix}"
        taken.add(candidate.lower())
        out.append(candidate)
    return out


def _split(name: str) -> tuple[str, str]:
    dot = name.rfind(".")
    return (name[:dot], name[dot:]) if dot > 0 else (name, "")


def _write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


async def save(path: Path, data: bytes) -> str:
    """Write `data` to `path` (creating its folder) on a worker thread; the path as a string."""
    await asyncio.to_thread(_write, path, data)
    return str(path)
