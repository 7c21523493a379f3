"""The store's copy of the files people attach, for several replicas with data dirs of their own
(`channels.files.SharedFiles`): the receiving replica puts a file here before the message is
acknowledged, the replica that runs its turn reads it. Copies older than the retention are
deleted by the attachments' retention (bridge/attachments.py)."""

from __future__ import annotations

import time

from sqlalchemy import delete, func, select

from bridge.store.dialect import upsert
from bridge.store.db import Database
from bridge.store.schema import shared_files

F = shared_files.c


class StoreFiles:
    def __init__(self, db: Database, *, keep_days: float) -> None:
        self.db = db
        self.keep_days = keep_days

    async def put(self, key: str, data: bytes) -> None:
        """Keep `data` under `key` (a key already kept keeps its first copy: keys name one file)."""

        async def _put(conn) -> None:
            stmt = upsert(conn, shared_files).values(key=key, data=data, size=len(data), created_at=time.time())
            await conn.execute(stmt.on_conflict_do_nothing(index_elements=["key"]))

        await self.db.write(_put)

    async def get(self, key: str) -> bytes | None:
        async def _get(conn) -> bytes | None:
            return (await conn.execute(select(F.data).where(F.key == key))).scalar_one_or_none()

        data = await self.db.read(_get, offload=True)  # megabytes, maybe
        return None if data is None else bytes(data)

    async def keys(self, prefix: str, *, kept_since: float = 0.0) -> list[str]:
        """The keys that start with `prefix` (at most 10), of copies kept at `kept_since` or later."""
        async def _keys(conn) -> list[str]:
            # a range, not LIKE: a prefix may hold `_` and `%`, and the primary key serves it
            stmt = select(F.key).where(F.key >= prefix, F.key < prefix + "\U0010ffff", F.created_at >= kept_since)
            return list((await conn.execute(stmt.order_by(F.key).limit(10))).scalars())

        return await self.db.read(_keys)

    async def sweep(self, now: float | None = None) -> int:
        """Delete the copies older than the retention; how many."""
        cutoff = (now if now is not None else time.time()) - self.keep_days * 86400

        async def _sweep(conn) -> int:
            return (await conn.execute(delete(shared_files).where(F.created_at < cutoff))).rowcount

        return await self.db.write(_sweep)

    async def stats(self) -> tuple[int, int]:
        """(files, bytes) kept now."""
        async def _stats(conn) -> tuple[int, int]:
            row = (await conn.execute(select(func.count(), func.coalesce(func.sum(F.size), 0)))).one()
            return int(row[0]), int(row[1])

        return await self.db.read(_stats)
