"""Files a person attaches in the web chat. Each is uploaded on its own (`POST /chat/api/files`)
before the message that carries it, and kept under the data dir by conversation and upload id; the
message names its files by id (`file_ids`), and the pipeline hands them to the runtime like a
platform's downloaded attachments.

Before a message that carries files is stored, each of its uploads gets a mark beside its folder
(`<file id>.sent`). A sweep deletes the uploads that never got one once they are older than
`unsent_ttl` (a page closed before sending, a file removed from the draft).

With several replicas the upload and the message that carries it may reach different replicas:
the keeper has put the file in the store too, and the message finds it there by its key."""

from __future__ import annotations

import asyncio
import mimetypes
import re
import shutil
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

from aiohttp import BodyPartReader

from channels import files
from channels.base import Attachment
from channels.files import FileKeeper

MAX_FILE = 20 * 1024 * 1024
FILE_ID = re.compile(r"^[0-9a-f]{32}$")
CHUNK = 64 * 1024
FOLDER = "webchat"  # the uploads' folder (and key prefix) in the FileKeeper


class TooLarge(ValueError):
    pass


class Uploads:
    def __init__(self, files: FileKeeper, *, max_bytes: int = MAX_FILE, unsent_ttl: float = 24 * 3600.0) -> None:
        self.files = files
        self.root = files.path_of(FOLDER)
        self.max_bytes = max_bytes
        self.unsent_ttl = unsent_ttl

    def folder_of(self, conversation_id: str) -> Path:
        """The conversation's folder; ValueError for an id that is not a plain folder name."""
        if not conversation_id.strip(".") or "/" in conversation_id:
            raise ValueError(f"{conversation_id!r} cannot name a folder")
        return self.root / conversation_id

    async def receive(self, conversation_id: str, part: BodyPartReader) -> Attachment:
        """Read one file part (at most `max_bytes`, or TooLarge and nothing kept) and keep it."""
        self.folder_of(conversation_id)  # ValueError for an id that cannot name a folder
        data = bytearray()
        while chunk := await part.read_chunk(CHUNK):
            data += chunk
            if len(data) > self.max_bytes:
                raise TooLarge(f"the file is larger than {self.max_bytes // (1024 * 1024)} MiB")
        file_id = uuid.uuid4().hex
        name = files.file_names([part.filename])[0]
        key = _key(conversation_id, file_id, name)
        path = await self.files.keep(key, bytes(data))
        return Attachment(name, path, _mime_type(name, part.headers.get("Content-Type")), key)

    async def find(self, conversation_id: str, file_id: str) -> Attachment | None:
        """The file uploaded in this conversation under `file_id`, or None."""
        if not FILE_ID.match(file_id):
            return None
        try:
            folder = self.folder_of(conversation_id) / file_id
        except ValueError:
            return None
        kept = await asyncio.to_thread(lambda: [p for p in folder.iterdir() if p.is_file() and
                                                not p.name.endswith(".partial")] if folder.is_dir() else [])
        if len(kept) == 1:
            name = kept[0].name
        elif not kept and self.files.shared is not None:
            # uploaded through another replica: the store has it (the turn's replica writes it
            # to its own disk when it runs); one older than the unsent uploads' TTL is treated
            # as that replica's sweep treats it: gone
            keys = await self.files.shared.keys(_key(conversation_id, file_id),
                                                kept_since=time.time() - self.unsent_ttl)
            if len(keys) != 1:
                return None
            name = keys[0].rsplit("/", 1)[1]
        else:
            return None
        return Attachment(name, str(folder / name), _mime_type(name, None), _key(conversation_id, file_id, name))

    async def mark_sent(self, conversation_id: str, file_ids: Iterable[str]) -> None:
        """The uploads a message carries are kept until the attachments' retention (the mark goes
        beside each folder, so the folder still holds just the file)."""
        folder = self.folder_of(conversation_id)

        def mark() -> None:
            folder.mkdir(parents=True, exist_ok=True)  # uploaded through another replica: no folder here yet
            for file_id in file_ids:
                (folder / f"{file_id}.sent").touch()

        await asyncio.to_thread(mark)

    def sweep(self, now: float | None = None) -> int:
        """Delete the uploads never sent with a message and older than `unsent_ttl` (blocking: run
        it on a worker thread); how many."""
        cutoff = (now if now is not None else time.time()) - self.unsent_ttl
        removed = 0
        if not self.root.is_dir():
            return 0
        for conversation in self.root.iterdir():
            if not conversation.is_dir():
                continue
            for upload in conversation.iterdir():
                if not (upload.is_dir() and FILE_ID.match(upload.name)):
                    continue
                try:
                    if (conversation / f"{upload.name}.sent").exists() or upload.stat().st_mtime > cutoff:
                        continue
                    shutil.rmtree(upload)
                    removed += 1
                except OSError:
                    continue  # gone meanwhile, or not ours to remove: the next sweep looks again
        return removed


def _key(conversation_id: str, file_id: str, name: str = "") -> str:
    """An upload's key in the FileKeeper (without a name: the prefix of its upload's keys)."""
    return f"{FOLDER}/{conversation_id}/{file_id}/{name}"


def _mime_type(name: str, given: str | None) -> str:
    guessed = mimetypes.guess_type(name)[0]
    if guessed:
        return guessed
    if given and given != "application/octet-stream" and "/" in given:
        return given.split(";")[0].strip()
    return "application/octet-stream"
