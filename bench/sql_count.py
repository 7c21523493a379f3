"""Count the SQL statements and commits the service runs per web chat message (on demand, not CI).

Runs the service in this process (its own temp data dir, 127.0.0.1, ephemeral port), hooks
SQLAlchemy's `before_cursor_execute` / `commit` events on the writer and reader engines, posts
--messages messages one at a time (each to its own conversation, waiting for the bot's reply, so
nothing queues) and prints statements per message by engine and by statement shape.

    python -m bench.sql_count                  # "echo <n>" messages (a shell turn each)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import sqlite3
import tempfile
import time
from collections import Counter
from pathlib import Path

import aiohttp
from sqlalchemy import event


def shape(statement: str) -> str:
    s = re.sub(r"\s+", " ", statement.strip())
    m = re.match(r"(SELECT .*? FROM \w+|INSERT (?:OR \w+ )?INTO \w+|UPDATE \w+ SET \w+|DELETE FROM \w+|\w+)", s)
    return m.group(1) if m else s[:60]


async def run(args: argparse.Namespace) -> dict:
    from bridge import logs
    from bridge.app import Service
    from bridge.config import load_settings

    logs.setup("WARNING")
    data_dir = Path(tempfile.mkdtemp(prefix="bench-sqlcount-"))
    settings = load_settings(data_dir=data_dir, host="127.0.0.1", port=0, log_level="WARNING")
    service = Service(settings)
    counting = {"on": False}
    stats = {name: {"statements": Counter(), "executemany": 0, "commits": 0} for name in ("writer", "reader")}

    def hook(name: str, engine) -> None:
        def before(_conn, _cursor, statement, _params, _ctx, executemany):
            if counting["on"]:
                stats[name]["statements"][shape(statement)] += 1
                stats[name]["executemany"] += int(bool(executemany))

        def commit(_conn):
            if counting["on"]:
                stats[name]["commits"] += 1

        event.listen(engine.sync_engine, "before_cursor_execute", before)
        event.listen(engine.sync_engine, "commit", commit)

    hook("writer", service.db.writer_engine)
    hook("reader", service.db.reader)
    await service.start()
    base = f"http://127.0.0.1:{service.port}"
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
            counting["on"] = True
            for i in range(args.messages):
                conv = f"s{i}"
                text = f"echo {i}"
                body = {"conversation_id": conv, "user_id": "bench", "text": text, "client_msg_id": f"s-{i}"}
                async with http.post(base + "/chat/api/messages", json=body) as resp:
                    assert resp.status == 202, await resp.text()
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:  # bounded wait for the turn to finish and its reply to land
                    await asyncio.sleep(0.05)
                    row, pending = _poll(data_dir / "bridge.db", f"webchat:{conv}/s-{i}")
                    if row not in (None, "accepted", "processing") and pending == 0:
                        break
            await asyncio.sleep(1.2)  # one delivery sweep (it runs every second) falls in the window
            counting["on"] = False
    finally:
        await service.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
    n = args.messages
    return {
        "text": "echo <n>", "messages": n,
        "per_message": {
            name: {
                "statements": round(sum(s["statements"].values()) / n, 2),
                "commits": round(s["commits"] / n, 2),
                "by_shape": {k: round(v / n, 2) for k, v in s["statements"].most_common()},
            }
            for name, s in stats.items()
        },
        "note": "reader counts include the delivery sweeper's query (once a second)",
    }


def _poll(db: Path, event_key: str) -> tuple[str | None, int]:
    """The event's status and the pending outbox count, read with a separate (unhooked) sqlite3 connection."""
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    try:
        row = conn.execute("SELECT status FROM inbound_events WHERE dedupe_key = ?", (event_key,)).fetchone()
        pending = conn.execute("SELECT count(*) FROM outbox WHERE status = 'pending'").fetchone()[0]
    finally:
        conn.close()
    return (row[0] if row else None), pending


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.sql_count", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=50, help="messages to post, one at a time (max 1000)")
    args = parser.parse_args()
    if not 1 <= args.messages <= 1000:
        parser.error("--messages must be 1..1000")
    print(json.dumps(asyncio.run(run(args)), indent=1))


if __name__ == "__main__":
    main()
