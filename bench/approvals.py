"""Approval click latency while other turns run (on demand only; never run in CI).

Starts the real service with a rules file that lets `sleep` run, starts --busy long turns
(`sleep 60`, one per conversation), then --clicks times: post `touch f<i>` in a fresh
conversation, wait for its card, click Approve and time

- the click: POST /chat/api/actions until its 200 (a store write plus a wake-up), and
- click -> decision delivered: until the command's reply appears in the transcript, an upper
  bound on the decision reaching the runtime (it includes running `touch` and delivering the reply).

    python -m bench.approvals                 # 50 busy turns, 100 clicks
    python -m bench.approvals --busy 0        # the same on an idle service

Traffic goes to 127.0.0.1 only; every loop is bounded in count and time.
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

RULES = """
version: 1
preset: default
rules:
  - {name: bench-sleep, action: allow, command: ["sleep *"]}
"""


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def run(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="bench-approvals-"))
    rules = work / "rules.yaml"
    rules.write_text(RULES)
    proc = bridge_process(work / "data", cpu=args.server_cpu,
                          env={"BRIDGE_APPROVAL_RULES": str(rules), "BRIDGE_MAX_CONCURRENT_TURNS": "200"}).start()
    click_ms: list[float] = []
    decided_ms: list[float] = []
    try:
        async with aiohttp.ClientSession() as http:
            chat = ChatClient(http, proc.url)
            for n in range(args.busy):
                await chat.post(f"busy-{n}", "bench", "sleep 60")
            deadline = time.monotonic() + 30
            while args.busy and time.monotonic() < deadline:
                running = await _metric(http, proc.url, "bridge_turns_running")
                if running >= args.busy:
                    break
                await asyncio.sleep(0.1)
            busy_seen = await _metric(http, proc.url, "bridge_turns_running")
            for i in range(args.clicks):
                conv = f"click-{i}"
                await chat.post(conv, "bench", f"touch f{i}")
                card = await chat.wait_card(conv, "pending", timeout=20)
                started = time.perf_counter()
                status, _ = await chat.act(conv, card["id"], "approve", "bench")
                click_ms.append((time.perf_counter() - started) * 1000)
                assert status == 200
                while not [t for t in final_texts(await chat.bot_messages(conv)) if "exit 0" in t]:
                    await asyncio.sleep(0.002)
                decided_ms.append((time.perf_counter() - started) * 1000)
    finally:
        proc.stop()
    return {
        "busy_turns": args.busy, "busy_running_seen": busy_seen, "clicks": len(click_ms),
        "click_ms": {"p50": statistics.median(click_ms), "p99": pct(click_ms, 0.99), "max": max(click_ms)},
        "click_to_reply_ms": {"p50": statistics.median(decided_ms), "p99": pct(decided_ms, 0.99),
                              "max": max(decided_ms)},
    }


async def _metric(http: aiohttp.ClientSession, url: str, name: str) -> float:
    async with http.get(url + "/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
    return 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--busy", type=int, default=50, help="long turns running meanwhile (default 50)")
    parser.add_argument("--clicks", type=int, default=100, help="approvals clicked (default 100)")
    parser.add_argument("--server-cpu", type=int, default=None, help="pin the service to this CPU")
    result = asyncio.run(run(parser.parse_args()))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
