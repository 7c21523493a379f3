"""The smallest durable ingest: the yardstick between the bare handler and the service.

aiohttp, one `sqlite3` connection (WAL, synchronous=NORMAL, as the service's), and one writer
task that commits whatever requests are queued in one transaction and only then answers them:
each request's JSON body is parsed and inserted as one row, with a unique key on its client id.
No pipeline, no transcript, no turns. `bench/ingest.py --yardstick` runs it beside the bare
handler and the service, so one run shows how much of the gap to the bare handler is SQLite's
and how much is the service's own. Run: `python -m bench.group_commit_server --port 8799
--data DIR` (binds 127.0.0.1 only).
"""

from __future__ import annotations

import argparse
import asyncio
import sqlite3
import time
from pathlib import Path

import orjson
from aiohttp import web

ACK = b'{"accepted": true, "duplicate": false}'
DUP = b'{"accepted": true, "duplicate": true}'


class Writer:
    def __init__(self, path: Path) -> None:
        self.db = sqlite3.connect(path, isolation_level=None)
        for pragma in ("journal_mode=WAL", "synchronous=NORMAL", "temp_store=MEMORY"):
            self.db.execute(f"PRAGMA {pragma}")
        self.db.execute("CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY, key TEXT NOT NULL UNIQUE, "
                        "conversation TEXT NOT NULL, body TEXT NOT NULL, received_at REAL NOT NULL)")
        self.queue: list[tuple[tuple[str, str, str, float], asyncio.Future[bool]]] = []
        self.wake = asyncio.Event()

    def submit(self, row: tuple[str, str, str, float]) -> asyncio.Future[bool]:
        future = asyncio.get_running_loop().create_future()
        self.queue.append((row, future))
        self.wake.set()
        return future

    async def run(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            batch, self.queue = self.queue, []
            if not batch:
                continue
            self.db.execute("BEGIN IMMEDIATE")
            fresh = []
            for row, _ in batch:
                fresh.append(self.db.execute(
                    "INSERT INTO events (key, conversation, body, received_at) VALUES (?, ?, ?, ?) "
                    "ON CONFLICT DO NOTHING", row).rowcount == 1)
            self.db.execute("COMMIT")
            for (_, future), new in zip(batch, fresh):
                future.set_result(new)
            await asyncio.sleep(0)


WRITER = web.AppKey("writer", Writer)
TASK = web.AppKey("writer_task", asyncio.Task)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--data", type=Path, required=True)
    args = parser.parse_args()
    args.data.mkdir(parents=True, exist_ok=True)

    async def post(request: web.Request) -> web.Response:
        raw = await request.read()
        try:
            body = orjson.loads(raw)
            row = (f"{body['conversation_id']}/{body['client_msg_id']}", str(body["conversation_id"]),
                   raw.decode(), time.time())
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return web.Response(status=400, body=b'{"error": "bad body"}', content_type="application/json")
        new = await request.app[WRITER].submit(row)
        return web.Response(status=202, body=ACK if new else DUP, content_type="application/json")

    async def healthz(_request: web.Request) -> web.Response:
        return web.Response(body=b'{"ok": true}', content_type="application/json")

    async def start(app: web.Application) -> None:
        app[WRITER] = Writer(args.data / "events.db")
        app[TASK] = asyncio.create_task(app[WRITER].run())

    app = web.Application(client_max_size=1024 * 1024)
    app.on_startup.append(start)
    app.add_routes([web.post("/chat/api/messages", post), web.get("/healthz", healthz)])
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None, handler_cancellation=False)


if __name__ == "__main__":
    main()
