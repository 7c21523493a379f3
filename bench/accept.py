"""The service's own cost per webhook request (on demand only; never run in CI): what the
service process spends on a request that an HTTP edge worker already checked, measured in one
process without HTTP, so that changes to the ingest path can be compared without the machine's
noise between processes. Results: docs/benchmarks.md.

For each channel: a fresh data dir, the real Service (SQLite, shell runtime, the channel on
against its emulator on 127.0.0.1), then `--events` checked requests handed to the webhook's
`accept` (or `accept_many`, when the webhook has it) in batches of `--batch`, as the service
sees the requests of one read from an edge worker's link, after
`--warmup` others. Printed per channel: CPU microseconds per request (process time, median of
`--reps`), wall time, the writer's commits and events per commit.

    python -m bench.accept                         # web chat (empty and echo), Slack, Feishu
    python -m bench.accept --channels slack --reps 5
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import orjson

from channels.base import Forward

BOT_SLACK = "UBOT"
BOT_FEISHU = "ou_bot"
TOKEN = "bench-token"


def webchat_bodies(n: int, prefix: str, text: str) -> list[bytes]:
    return [orjson.dumps({"conversation_id": f"c{i % 1000}", "user_id": "bench",
                          "text": f"{text} {i}" if text else "", "client_msg_id": f"{prefix}-{i}"})
            for i in range(n)]


def slack_bodies(n: int, prefix: str) -> list[bytes]:
    from tests.support import slack_payloads as sp

    base = 1_600_000_000 if prefix == "w" else 1_700_000_000
    return [orjson.dumps(sp.event_callback(sp.message_event(
        text=f"<@{BOT_SLACK}>", channel=f"D{i % 1000}", channel_type="im", user="UBENCH",
        ts=f"{base + i}.{i % 1_000_000:06d}"), event_id=f"Ev{uuid.uuid4().hex}")) for i in range(n)]


def feishu_bodies(n: int, prefix: str) -> list[bytes]:
    from tests.support import feishu_payloads as fp

    out = []
    for i in range(n):
        mention = fp.mention("@_user_1", BOT_FEISHU, "bot")
        event = fp.message_event(token=TOKEN, text="@_user_1", chat_id=f"oc_{i % 1000}", chat_type="p2p",
                                 message_id=f"om_{prefix}{uuid.uuid4().hex}", event_id=uuid.uuid4().hex,
                                 mentions=[mention], sender_open_id="ou_bench")
        out.append(orjson.dumps(event))
    return out


async def measure(channel: str, args: argparse.Namespace, text: str = "") -> dict[str, Any]:
    from bridge.app import Service
    from bridge.config import load_settings

    data = Path(tempfile.mkdtemp(prefix=f"bench-accept-{channel}-"))
    env = {"BRIDGE_DATA_DIR": str(data), "BRIDGE_HTTP_WORKERS": "0", "BRIDGE_LOG_LEVEL": "WARNING"}
    emulator = None
    if channel == "slack":
        from tests.support.slack_emulator import SlackEmulator

        emulator = SlackEmulator(bot_token="xoxb-test", bot_user_id=BOT_SLACK).start()
        emulator.seed_user("UBENCH", "bench")
        env.update(SLACK_BOT_TOKEN="xoxb-test", SLACK_SIGNING_SECRET="s", SLACK_API_URL=emulator.api_url,
                   SLACK_REACTIONS="false")
    elif channel == "feishu":
        from tests.support.feishu_emulator import FeishuEmulator

        emulator = FeishuEmulator(app_id=f"cli_{uuid.uuid4().hex[:6]}", app_secret="secret",
                                  bot_open_id=BOT_FEISHU).start()
        env.update(FEISHU_APP_ID=emulator.app_id, FEISHU_APP_SECRET="secret", FEISHU_VERIFICATION_TOKEN=TOKEN,
                   FEISHU_DOMAIN=emulator.url, FEISHU_REACTIONS="false")
    os.environ.update(env)
    from bridge import logs

    logs.setup("WARNING")
    service = Service(load_settings(port=0))
    await service.start()
    try:
        await asyncio.wait_for(asyncio.gather(*(ch.loaded() for ch in service.channels.values())), 60)
        name = "webchat" if channel == "webchat" else channel
        hook = next(h for h in service.webhooks
                    if h.check.path == {"webchat": "/chat/api/messages", "slack": "/slack/events",
                                        "feishu": "/feishu/events"}[name])

        def bodies(n: int, prefix: str) -> list[bytes]:
            if channel == "webchat":
                return webchat_bodies(n, prefix, text)
            return slack_bodies(n, prefix) if channel == "slack" else feishu_bodies(n, prefix)

        async def run(items: list[bytes]) -> None:
            # as the edge link hands them over: a read's requests to accept_many when the webhook
            # has it, else one task each
            for start in range(0, len(items), args.batch):
                chunk = [Forward(b) for b in items[start:start + args.batch]]
                if hook.accept_many is not None:
                    answers = await hook.accept_many(chunk)
                else:
                    answers = await asyncio.gather(*(hook.accept(f) for f in chunk))
                assert all(a.status < 300 for a in answers), answers[0]

        await run(bodies(args.warmup, "w"))
        samples = []
        for rep in range(args.reps):
            items = bodies(args.events, f"m{rep}")
            commits0, units0 = service.db.stats.commits, service.db.stats.units
            c0, t0 = time.process_time(), time.perf_counter()
            await run(items)
            c1, t1 = time.process_time(), time.perf_counter()
            samples.append({"cpu_us": 1e6 * (c1 - c0) / len(items), "wall_us": 1e6 * (t1 - t0) / len(items),
                            "commits": service.db.stats.commits - commits0,
                            "units": service.db.stats.units - units0})
        return {"channel": channel + (f" ({text or 'empty'})" if channel == "webchat" else ""),
                "cpu_us": round(statistics.median(s["cpu_us"] for s in samples), 1),
                "cpu_us_all": [round(s["cpu_us"], 1) for s in samples],
                "wall_us": round(statistics.median(s["wall_us"] for s in samples), 1),
                "events_per_commit": round(statistics.median(s["units"] / max(1, s["commits"]) for s in samples), 1)}
    finally:
        await service.stop()
        if emulator is not None:
            emulator.stop()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--channels", default="webchat,slack,feishu")
    p.add_argument("--events", type=int, default=20_000)
    p.add_argument("--warmup", type=int, default=20_000)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--reps", type=int, default=3)
    args = p.parse_args()
    results = []
    for channel in args.channels.split(","):
        texts = ["", "echo"] if channel == "webchat" else [""]
        for text in texts:
            results.append(asyncio.run(measure(channel, args, text)))
            print(json.dumps(results[-1]), flush=True)
    print(f"machine: {os.uname().nodename} {os.uname().machine}, {os.cpu_count()} cpus, Python {sys.version.split()[0]}")


if __name__ == "__main__":
    main()
