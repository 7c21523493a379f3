"""Attachments a channel downloads or receives: safe, distinct file names, kept by a `FileKeeper`
under the data dir's attachments folder, written off the event loop (a file can be megabytes).

With several replicas, the replica that receives a file is often not the one that runs its turn,
and each has its own data dir. The keeper then also puts each file in the store (`SharedFiles`),
under its key (its path below the attachments folder), before the message is acknowledged; the
replica that runs the turn writes it to its own data dir under the same key when it is missing."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Sequence
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Protocol

NAME_BYTES = 200  # a kept file's name, at most (UTF-8)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # not kept in a file name (NUL cannot be)


class SharedFiles(Protocol):
    """Files every replica can read: the store's copy (bridge/store/files.py)."""

    async def put(self, key: str, data: bytes) -> None: ...

    async def get(self, key: str) -> bytes | None: ...

    async def keys(self, prefix: str, *, kept_since: float = 0.0) -> list[str]: ...


class FileKeeper:
    """Where files people attach are kept: `root/<key>` on this replica's disk, and with several
    replicas in the store as well. Keys are relative POSIX paths such as
    `feishu/<message id>/<file name>`; the channel chooses them, made of safe names."""

    def __init__(self, root: Path, shared: SharedFiles | None = None) -> None:
        self.root = Path(root)
        self.shared = shared

    def path_of(self, key: str) -> Path:
        parts = PurePosixPath(key).parts
        if not parts or any(part in ("", ".", "..") for part in parts) or PurePosixPath(key).is_absolute():
            raise ValueError(f"{key!r} is not a file key")
        return self.root.joinpath(*parts)

    async def keep(self, key: str, data: bytes) -> str:
        """Keep `data` under `key`: in the store first (with several replicas), then on disk; the
        local path."""
        path = self.path_of(key)
        if self.shared is not None:
            await self.shared.put(key, data)
        return await save(path, data)

    async def local(self, key: str, path: str) -> str:
        """A path to the file on this replica: `path` when it is here, else the store's copy
        written under `key` in this replica's own folder; "" when there is none."""
        if path and await asyncio.to_thread(Path(path).is_file):
            return path
        if not key or self.shared is None:
            return ""
        try:
            target = self.path_of(key)
        except ValueError:
            return ""
        if await asyncio.to_thread(target.is_file):
            return str(target)
        data = await self.shared.get(key)
        if data is None:
            return ""
        return await save(target, data)


def sweep(root: Path, cutoff: float) -> int:
    """Delete the files under `root` last written before `cutoff` (epoch seconds), and the
    folders that leaves empty; how many files (blocking: run it on a worker thread)."""
    removed = 0
    if not root.is_dir():
        return 0
    for folder, _subfolders, names in os.walk(root, topdown=False):
        here = Path(folder)
        for name in names:
            path = here / name
            try:
                if path.lstat().st_mtime < cutoff:
                    path.unlink()
                    removed += 1
            except OSError:
                continue  # gone meanwhile, or not ours to remove: the next sweep looks again
        if here != root:
            try:
                here.rmdir()  # only when empty
            except OSError:
                pass
    return removed


def file_names(names: Sequence[str | None], fallback: str = "file") -> list[str]:
    """One file name per attachment of a message, in order: the name's last path part (never a
    folder of its own: no `..`, no separators), and distinct within the message, so two files
    that share a name ("image.png" twice) are both kept: "image.png", "image (2).png"."""
    taken: set[str] = set()
    out: list[str] = []
    for raw in names:
        name = _fit(_CONTROL.sub("", PureWindowsPath(PurePosixPath(raw or "").name).name).strip())
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


def safe_name(raw: str, fallback: str = "message") -> str:
    """A platform's id as one folder name: no separators, never `.` or `..`."""
    name = raw.replace("/", "_").replace("\\", "_").strip()
    return fallback if name in ("", ".", "..") else name


def _fit(name: str) -> str:
    """A name short enough for any file system (255 bytes, with room for a " (2)" and the
    ".partial" of its write): a longer one is cut, its suffix kept when it is short."""
    if len(name.encode()) <= NAME_BYTES:
        return name
    stem, suffix = _split(name)
    if len(suffix.encode()) > 16:
        stem, suffix = name, ""
    room = NAME_BYTES - len(suffix.encode())
    return stem.encode()[:room].decode(errors="ignore").rstrip() + suffix


def _split(name: str) -> tuple[str, str]:
    dot = name.rfind(".")
    return (name[:dot], name[dot:]) if dot > 0 else (name, "")


def _write(path: Path, data: bytes) -> None:
    partial = path.with_name(path.name + ".partial")
    for attempt in (1, 2):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            partial.write_bytes(data)
            break
        except FileNotFoundError:
            if attempt == 2:  # the retention sweep removed the empty folder just then: once more
                raise
    partial.replace(path)  # whole or absent: a reader never sees half a file


async def save(path: Path, data: bytes) -> str:
    """Write `data` to `path` (creating its folder) on a worker thread; the path as a string."""
    await asyncio.to_thread(_write, path, data)
    return str(path)
