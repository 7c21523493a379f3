"""Python load clients for bench/ingest.py, each run as its own process (pinned by the caller when asked).

  python -m bench.clients closed  --url URL --out FILE [--duration S | --requests N] ...
      Closed loop: C connections, each sends its next POST when the previous one is answered.
      Used for the exact no-loss accounting (records every acked client_msg_id) and as the
      fallback generator when `wrk` is not installed.

  python -m bench.clients replies --url URL --out FILE [--rate R --convs K --duration S]
      Open loop at R msg/s over K conversations; one SSE stream per conversation times when the
      bot's final reply with the echoed token appears. Afterwards the transcript of every
      conversation is read back to count missing and duplicated replies.

Every request goes to the given URL, which the caller points at 127.0.0.1. All loops are bounded
by a request count or a deadline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from pathlib import Path
from typing import Any

import aiohttp

POST_PATH = "/chat/api/messages"


def percentile(values: list[float], p: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[index]


def latency_summary(values_s: list[float]) -> dict[str, float | None]:
    ms = [v * 1000 for v in values_s]
    return {
        "count": len(ms),
        "p50": percentile(ms, 50), "p90": percentile(ms, 90), "p99": percentile(ms, 99),
        "max": max(ms) if ms else None, "mean": sum(ms) / len(ms) if ms else None,
    }


# -- closed loop --------------------------------------------------------------------------------


async def closed_loop(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    deadline = time.monotonic() + args.duration if args.duration else None
    limit = args.requests or None
    state = {"next": 0}
    acked: list[list[str]] = []  # [conversation_id, client_msg_id] of non-duplicate 2xx
    retried: list[dict[str, Any]] = []  # re-sends of acked ids: what the server said
    failed: list[dict[str, Any]] = []
    latencies: list[float] = []
    sent = 0

    def next_body() -> tuple[dict[str, Any], bool] | None:
        if deadline is not None and time.monotonic() >= deadline:
            return None
        if limit is not None and state["next"] >= limit:
            return None
        n = state["next"]
        state["next"] += 1
        if acked and rng.random() < args.dup_fraction:
            conv, cmid = rng.choice(acked)  # a platform-style redelivery: same id, same content
            text = f"echo {cmid.rsplit('-', 1)[1]}"
            return {"conversation_id": conv, "user_id": "bench", "text": text, "client_msg_id": cmid}, True
        conv = f"c{n % args.convs}"
        return {"conversation_id": conv, "user_id": "bench", "text": f"echo {n}",
                "client_msg_id": f"{args.prefix}-{n}"}, False

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal sent
        while (item := next_body()) is not None:
            body, is_retry = item
            sent += 1
            started = time.perf_counter()
            try:
                async with session.post(args.url + POST_PATH, json=body) as resp:
                    status = resp.status
                    data = await resp.json(content_type=None) if status < 500 else {}
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                failed.append({"id": body["client_msg_id"], "error": f"{type(exc).__name__}: {exc}"})
                continue
            latencies.append(time.perf_counter() - started)
            if not 200 <= status < 300:
                failed.append({"id": body["client_msg_id"], "status": status})
            elif is_retry:
                retried.append({"id": body["client_msg_id"], "duplicate": bool(data.get("duplicate"))})
            elif data.get("duplicate"):
                failed.append({"id": body["client_msg_id"], "status": status, "unexpected_duplicate": True})
            else:
                acked.append([body["conversation_id"], body["client_msg_id"]])

    connector = aiohttp.TCPConnector(limit=args.conns, force_close=False)
    timeout = aiohttp.ClientTimeout(total=30)
    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(session) for _ in range(args.conns)))
    elapsed = time.perf_counter() - started
    return {
        "mode": "closed", "elapsed_s": elapsed, "sent": sent, "accepted": len(acked),
        "retries": len(retried), "retries_reported_duplicate": sum(1 for r in retried if r["duplicate"]),
        "failed": len(failed), "failures": failed[:20], "latency_ms": latency_summary(latencies),
        "accepted_per_s": len(acked) / elapsed if elapsed else 0.0,
        "acked_ids": acked if args.record_ids else None,
        "retried_ids": retried if args.record_ids else None,
    }


# -- reply latency (open loop) --------------------------------------------------------------------


def final_token(text: str) -> str | None:
    """The echoed token of a final shell reply ("```\\n<token>\\n```\\nexit 0 · 0.0s"), else None."""
    if "_running…_" in text:
        return None
    lines = text.split("\n")
    if len(lines) < 4 or not lines[0].startswith("```") or not lines[-1].startswith("exit "):
        return None
    return lines[1]


async def sse_reader(session: aiohttp.ClientSession, url: str, conversation_id: str, seen: dict[str, float],
                     events: dict[str, int], stop: asyncio.Event) -> None:
    params = {"conversation_id": conversation_id, "after": "0"}
    async with session.get(url + "/chat/api/stream", params=params) as resp:
        resp.raise_for_status()
        data_lines: list[str] = []
        while not stop.is_set():
            raw = await resp.content.readline()
            if not raw:
                return
            line = raw.decode("utf-8").rstrip("\r\n")
            if line.startswith("data:"):
                data_lines.append(line[5:].lstrip())
            elif line == "" and data_lines:
                message = json.loads("\n".join(data_lines))
                data_lines = []
                events["count"] += 1
                if message.get("role") == "bot":
                    token = final_token(message.get("text") or "")
                    if token is not None:
                        key = f"{conversation_id}/{token}"
                        seen.setdefault(key, time.perf_counter())


async def replies(args: argparse.Namespace) -> dict[str, Any]:
    total = int(args.rate * args.duration)
    convs = [f"l{k}" for k in range(args.convs)]
    posted: dict[str, float] = {}  # "conv/token" -> perf_counter at POST start
    acks: list[float] = []
    post_failures: list[str] = []
    seen: dict[str, float] = {}
    events = {"count": 0}
    stop = asyncio.Event()
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10)
    sse_session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=timeout)
    post_session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64),
                                         timeout=aiohttp.ClientTimeout(total=30))
    readers = [asyncio.create_task(sse_reader(sse_session, args.url, c, seen, events, stop)) for c in convs]
    await asyncio.sleep(1.0)  # let every stream subscribe before the first message

    async def post(i: int) -> None:
        conv = convs[i % len(convs)]
        token = f"{args.prefix}{i}"
        body = {"conversation_id": conv, "user_id": "bench", "text": f"echo {token}", "client_msg_id": f"{args.prefix}-{i}"}
        started = time.perf_counter()
        posted[f"{conv}/{token}"] = started
        try:
            async with post_session.post(args.url + POST_PATH, json=body) as resp:
                await resp.read()
                if resp.status != 202:
                    post_failures.append(f"{token}: HTTP {resp.status}")
                    return
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            post_failures.append(f"{token}: {type(exc).__name__}")
            return
        acks.append(time.perf_counter() - started)

    t0 = time.perf_counter()
    tasks = []
    for i in range(total):
        delay = t0 + i / args.rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(post(i)))
    send_lag = time.perf_counter() - (t0 + (total - 1) / args.rate)
    await asyncio.gather(*tasks)
    sent_done = time.perf_counter()
    settle_deadline = sent_done + args.settle
    while time.perf_counter() < settle_deadline and not all(k in seen for k in posted):
        await asyncio.sleep(0.05)
    all_seen_after = time.perf_counter() - sent_done if all(k in seen for k in posted) else None
    stop.set()
    for task in readers:
        task.cancel()
    await asyncio.gather(*readers, return_exceptions=True)
    await sse_session.close()

    # Read every transcript back: one final reply per message, no more, no less.
    finals: dict[str, set[str]] = {}
    stray_bot = 0
    for conv in convs:
        async with post_session.get(args.url + POST_PATH, params={"conversation_id": conv, "after": "0"}) as resp:
            messages = (await resp.json())["messages"]
        for m in messages:
            if m["role"] != "bot":
                continue
            token = final_token(m["text"] or "")
            if token is None:
                stray_bot += 1
                continue
            finals.setdefault(f"{conv}/{token}", set()).add(m["id"])
    await post_session.close()

    lat = [seen[k] - posted[k] for k in posted if k in seen]
    missing_live = [k for k in posted if k not in seen]
    missing = [k for k in posted if k not in finals]
    duplicated = {k: len(v) for k, v in finals.items() if len(v) > 1}
    return {
        "mode": "replies", "rate": args.rate, "convs": args.convs, "duration_s": args.duration,
        "sent": total, "acked": len(acks), "post_failures": post_failures[:20],
        "schedule_lag_s": send_lag,
        "ack_latency_ms": latency_summary(acks), "reply_latency_ms": latency_summary(lat),
        "missing_on_stream": len(missing_live), "missing_in_transcript": len(missing),
        "missing_examples": missing[:10], "duplicated": len(duplicated), "duplicated_examples": dict(list(duplicated.items())[:10]),
        "non_final_bot_messages": stray_bot, "sse_events": events["count"],
        "all_replies_within_s_after_last_post": all_seen_after,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    c = sub.add_parser("closed", help="closed-loop POST load")
    c.add_argument("--url", required=True)
    c.add_argument("--out", required=True, type=Path)
    c.add_argument("--conns", type=int, default=32)
    c.add_argument("--convs", type=int, default=1000)
    c.add_argument("--duration", type=float, default=0.0, help="seconds (0: use --requests)")
    c.add_argument("--requests", type=int, default=0, help="request count (0: use --duration)")
    c.add_argument("--prefix", default="p")
    c.add_argument("--dup-fraction", type=float, default=0.0, help="share of requests re-sending an acked id")
    c.add_argument("--record-ids", action="store_true")
    c.add_argument("--seed", type=int, default=1)
    r = sub.add_parser("replies", help="open-loop message -> reply latency")
    r.add_argument("--url", required=True)
    r.add_argument("--out", required=True, type=Path)
    r.add_argument("--rate", type=float, default=50.0)
    r.add_argument("--convs", type=int, default=100)
    r.add_argument("--duration", type=float, default=10.0)
    r.add_argument("--settle", type=float, default=30.0, help="max seconds to wait for replies after the last post")
    r.add_argument("--prefix", default="t")
    args = parser.parse_args()
    if args.mode == "closed":
        if not args.duration and not args.requests:
            parser.error("closed: give --duration or --requests")
        if args.duration and args.duration > 600:
            parser.error("closed: --duration is capped at 600 s")
        result = asyncio.run(closed_loop(args))
    else:
        if args.duration > 600 or args.settle > 600:
            parser.error("replies: --duration and --settle are capped at 600 s")
        result = asyncio.run(replies(args))
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
