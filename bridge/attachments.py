"""How long the files people attach are kept. Hourly, from the start: the files on this
replica's disk (`<data dir>/attachments`: downloads, web chat uploads, copies fetched from the
store) older than BRIDGE_ATTACHMENTS_KEEP_DAYS (0: kept for good), and, with several replicas, the
store's copies older than BRIDGE_SHARED_FILES_DAYS. Unsent web chat uploads go sooner, by their
own sweep (channels/webchat)."""

from __future__ import annotations

import asyncio
import time

from loguru import logger

from bridge.logs import FailureStreak
from bridge.store.files import StoreFiles
from channels import files
from channels.files import FileKeeper

INTERVAL = 3600.0


class AttachmentRetention:
    def __init__(self, keeper: FileKeeper, *, keep_days: float, store: StoreFiles | None = None) -> None:
        self.keeper = keeper
        self.keep_days = keep_days
        self.store = store
        self._task: asyncio.Task[None] | None = None

    async def sweep(self, now: float | None = None) -> tuple[int, int]:
        """One round: (files deleted from disk, copies deleted from the store)."""
        now = now if now is not None else time.time()
        on_disk = 0
        if self.keep_days > 0:
            on_disk = await asyncio.to_thread(files.sweep, self.keeper.root, now - self.keep_days * 86400)
        in_store = await self.store.sweep(now) if self.store is not None else 0
        return on_disk, in_store

    def start(self) -> None:
        if self._task is None and (self.keep_days > 0 or self.store is not None):
            self._task = asyncio.create_task(self._loop(), name="attachments:retention")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None

    async def _loop(self) -> None:
        streak = FailureStreak("attachments: the retention sweep", every=24)
        while True:
            try:
                on_disk, in_store = await self.sweep()
            except Exception as exc:  # noqa: BLE001 - a disk or store error: the next round tries again
                streak.failed(exc)
            else:
                streak.ok()
                if on_disk or in_store:
                    logger.info("attachments: {} file(s) past {:g} days deleted from disk, {} from the store",
                                on_disk, self.keep_days, in_store)
            await asyncio.sleep(INTERVAL)
