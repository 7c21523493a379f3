"""The "working on it" mark (a reaction) a channel puts on a person's message while its turn runs."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable
from typing import Any


class WorkingMarks:
    """Marks being added or added, by message id: the task adding each (its result is what
    taking the mark off needs, e.g. the reaction's id; None when it was not added). The turn's end
    waits for that task, so a turn that ends before the platform answered the reaction still
    takes the right mark off, instead of racing it. Held in memory only: a mark put on by another
    process (a replica, or this service before a restart) is for the channel to find (Feishu looks
    its reactions up; Slack removes a reaction by name)."""

    def __init__(self, limit: int = 50_000) -> None:
        self._limit = limit
        self._marks: OrderedDict[str, asyncio.Future[Any]] = OrderedDict()

    def add(self, message_id: str, adding: Awaitable[Any]) -> None:
        self._marks[message_id] = asyncio.ensure_future(adding)
        if len(self._marks) > self._limit:
            _, oldest = self._marks.popitem(last=False)
            oldest.cancel()

    async def take(self, message_id: str) -> Any:
        """Forget the message's mark; what adding it returned (None: unknown, not added, failed)."""
        task = self._marks.pop(message_id, None)
        if task is None:
            return None
        await asyncio.wait([task])
        if task.cancelled() or task.exception() is not None:
            return None
        return task.result()

    def cancel_all(self) -> None:
        for task in self._marks.values():
            task.cancel()
        self._marks.clear()
