"""The bridge's own overhead around Codex turns (on demand only; never run in CI).

Starts the mock model (tests/support/mock_model.py) and the real service with the Codex runtime
(the pinned `codex app-server` from node_modules), then --sessions conversations each send
--turns messages one after another (the next when the previous reply arrived), all sessions at
once on the one app-server. Per turn the service logs its own overhead (JSON log records):

- start:  message accepted -> `turn/start` written to the app-server, less the time spent waiting
          on the app-server itself (`thread/start` / `thread/resume` on a session's first turn);
- finish: `turn/completed` received -> the final reply committed to the outbox.

    python -m bench.codex_turns                       # 20 sessions x 10 turns
    python -m bench.codex_turns --sessions 1 --turns 50

Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.launcher import bridge_process
from tests.support.chat import ChatClient, final_texts
from tests.support.codex import codex_binary, codex_env, codex_home
from tests.support.mock_model import MockModel


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def follow(http: aiohttp.ClientSession, url: str, conversation: str, finals: asyncio.Queue[str]) -> None:
    """The conversation's live stream, as the web page reads it (no polling load on the service):
    every final bot reply goes into `finals`."""
    params = {"conversation_id": conversation, "after": "0"}
    async with http.get(url + "/chat/api/stream", params=params, timeout=aiohttp.ClientTimeout(total=None)) as resp:
        resp.raise_for_status()
        data: list[str] = []
        async for raw in resp.content:
            line = raw.decode().rstrip("\r\n")
            if line.startswith("data:"):
                data.append(line[5:].lstrip())
            elif not line and data:
                message = json.loads("\n".join(data))
                data = []
                if message["role"] == "bot":
                    for text in final_texts([message]):
                        finals.put_nowait(text)


async def session(chat: ChatClient, conversation: str, turns: int, walls: list[float]) -> None:
    finals: asyncio.Queue[str] = asyncio.Queue()
    reader = asyncio.create_task(follow(chat.http, chat.base, conversation, finals))
    try:
        await asyncio.sleep(0.2)  # subscribed before the first message
        for n in range(turns):
            text = f"turn {n} of {conversation}"
            started = time.monotonic()
            await chat.post(conversation, "bench", text)
            async with asyncio.timeout(60):
                while text not in await finals.get():
                    pass
            walls.append(time.monotonic() - started)
    finally:
        reader.cancel()


async def run(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-codex-"))
    model = MockModel().start()
    home, overrides = codex_home(work, model.base_url)
    env = {k: v for k, v in codex_env(home).items() if k in ("CODEX_HOME", "HOME")}
    env |= {"CODEX_BIN": codex_binary(), "BRIDGE_RUNTIME": "codex", "BRIDGE_CODEX_CONFIG": "\n".join(overrides),
            "BRIDGE_LOG_LEVEL": "INFO", "BRIDGE_LOG_FORMAT": "json"}
    proc = bridge_process(work / "data", cpu=None, env=env).start()
    walls: list[float] = []
    try:
        async with aiohttp.ClientSession() as http:
            chat = ChatClient(http, proc.url)
            started = time.monotonic()
            await asyncio.gather(*(session(chat, f"bench-{s}", args.turns, walls) for s in range(args.sessions)))
            elapsed = time.monotonic() - started
    finally:
        proc.stop()
        model.stop()
    start_ms, finish_ms, total_ms = [], [], []
    for line in proc.log_path.read_text().splitlines():
        try:
            extra = json.loads(line)["record"]["extra"]
        except (ValueError, KeyError):
            continue
        if "overhead_start_ms" in extra:
            start_ms.append(extra["overhead_start_ms"])
            finish_ms.append(extra["overhead_finish_ms"])
            total_ms.append(extra["overhead_start_ms"] + extra["overhead_finish_ms"])
    Path("/tmp/codex_log.txt").write_text(proc.log_path.read_text())
    assert len(total_ms) == args.sessions * args.turns, f"{len(total_ms)} overhead records"

    def summary(values: list[float]) -> dict:
        return {"median": round(statistics.median(values), 2), "p90": round(pct(values, 0.9), 2),
                "p99": round(pct(values, 0.99), 2), "max": round(max(values), 2)}

    return {
        "sessions": args.sessions, "turns": len(total_ms), "elapsed_s": round(elapsed, 2),
        "overhead_start_ms": summary(start_ms), "overhead_finish_ms": summary(finish_ms),
        "overhead_total_ms": summary(total_ms),
        "turn_wall_ms": summary([w * 1000 for w in walls]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sessions", type=int, default=20)
    parser.add_argument("--turns", type=int, default=10)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args)), indent=2))


if __name__ == "__main__":
    main()
