"""Slack events benchmark (on demand only; never run in CI). Results: docs/benchmarks.md.

Compares, on one pinned core each and in alternating runs:

- bridge: the real service with Slack on (HTTP mode) handling `POST /slack/events`: v0
  signature and window, normalization and the inbox insert committed before the 200. Each event
  is a DM that only mentions the bot: stored like any other, but its turn is skipped (no runtime,
  no reply), so the figure is the ack path. Reactions are off.
- sdk: slack_bolt's AsyncApp in aiohttp (bench/slack_bolt_server.py) with a listener that only
  acks; nothing is stored. Needs `pip install slack_bolt` (not a dependency of agent-bridge).

Every request is a distinct, freshly signed event (wrk replays a file of them). After each
bridge run the inbox is counted: every 200 must have its row.

    python -m bench.slack_events                 # 3 reps x 10 s each
    python -m bench.slack_events --reps 1 --duration 3

Traffic goes to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.launcher import ROOT, ServerProcess, bridge_process, free_port, pin_prefix
from tests.support import slack_payloads as sp
from tests.support.slack_emulator import SlackEmulator

LUA = Path(__file__).with_name("slack_post.lua")
SECRET = "bench-signing-secret"
BOT = "UBOT"


def write_requests(path: Path, count: int) -> None:
    """`count` distinct signed events, four lines each, for the Lua driver."""
    with path.open("w") as out:
        for n in range(count):
            event = sp.message_event(text=f"<@{BOT}>", channel=f"D{n % 1000}", channel_type="im", user="UBENCH",
                                     ts=f"{1_700_000_000 + n}.{n % 1_000_000:06d}")
            body = json.dumps(sp.event_callback(event, event_id=f"Ev{uuid.uuid4().hex}")).encode()
            headers = sp.signed_request(body, signing_secret=SECRET)
            out.write(f"{headers['X-Slack-Request-Timestamp']}\n-\n{headers['X-Slack-Signature']}\n{body.decode()}\n")


def run_wrk(url: str, requests: Path, *, duration: float, conns: int, threads: int, cpu: int | None) -> dict:
    argv = pin_prefix(cpu) + ["wrk", f"-t{threads}", f"-c{conns}", f"-d{max(1, round(duration))}s",
                              "--timeout", "10s", "-s", str(LUA), url + "/slack/events"]
    env = {**os.environ, "BENCH_REQUESTS": str(requests), "BENCH_THREADS": str(threads)}
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=duration + 60)
    line = next((l for l in proc.stdout.splitlines() if l.startswith("BENCH_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    raw = json.loads(line[len("BENCH_JSON "):])
    seconds = raw["duration_us"] / 1e6
    lat = raw["latency_us"]
    return {"accepted": raw["accepted"], "failed": raw["failed"], "wrapped": raw["wrapped"],
            "errors": raw["errors"], "per_s": raw["accepted"] / seconds, "p50_ms": lat["p50"] / 1000,
            "p90_ms": lat["p90"] / 1000, "p99_ms": lat["p99"] / 1000, "max_ms": lat["max"] / 1000}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def sdk_process(work: Path, cpu: int | None, api_url: str) -> ServerProcess:
    port = free_port()
    return ServerProcess(
        [sys.executable, "-m", "bench.slack_bolt_server", "--port", str(port), "--signing-secret", SECRET,
         "--api-url", api_url],
        port=port, health_path="/healthz", log_path=work / f"bolt-{port}.log", cwd=work,
        env={**os.environ, "PYTHONPATH": str(ROOT), "HTTPS_PROXY": "", "HTTP_PROXY": ""}, cpu=cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--conns", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--server-cpu", type=int, default=1)
    parser.add_argument("--client-cpu", type=int, default=0)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-slack-"))
    emulator = SlackEmulator(bot_token="xoxb-test", bot_user_id=BOT).start()
    emulator.seed_user("UBENCH", "bench")
    env = {"SLACK_BOT_TOKEN": "xoxb-test", "SLACK_SIGNING_SECRET": SECRET, "SLACK_API_URL": emulator.api_url,
           "SLACK_REACTIONS": "false", "HTTPS_PROXY": "", "HTTP_PROXY": ""}
    runs: list[dict[str, Any]] = []
    startup: list[float] = []
    idle_rss: list[float] = []
    try:
        for rep in range(args.reps):
            for kind in ("sdk", "bridge"):
                requests = work / f"requests-{rep}-{kind}.txt"
                write_requests(requests, int(args.duration * 12_000) + 10_000)  # never replayed
                if kind == "bridge":
                    data = work / f"data-{rep}"
                    proc = bridge_process(data, cpu=args.server_cpu, env=env)
                    started = time.monotonic()
                    proc.start()
                    startup.append(time.monotonic() - started)
                    time.sleep(1.0)
                    idle_rss.append(rss_mb(proc.proc.pid))  # type: ignore[union-attr]
                else:
                    proc = sdk_process(work, args.server_cpu, emulator.api_url).start()
                try:
                    result = run_wrk(proc.url, requests, duration=args.duration, conns=args.conns,
                                     threads=args.threads, cpu=args.client_cpu)
                    result["peak_rss_mb"] = rss_mb(proc.proc.pid)  # type: ignore[union-attr]
                finally:
                    proc.stop()
                if kind == "bridge":
                    with sqlite3.connect(data / "bridge.db") as db:
                        stored = db.execute("SELECT count(*) FROM inbound_events").fetchone()[0]
                    result["stored"] = stored
                    result["lost"] = result["accepted"] - stored
                runs.append({"kind": kind, "rep": rep, **result})
                print(json.dumps(runs[-1]), flush=True)
    finally:
        emulator.stop()

    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["kind"] == kind)

    summary = {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "duration_s": args.duration, "reps": args.reps, "conns": args.conns,
        "sdk_per_s": round(med("sdk", "per_s")), "sdk_p99_ms": round(med("sdk", "p99_ms"), 1),
        "bridge_per_s": round(med("bridge", "per_s")), "bridge_p99_ms": round(med("bridge", "p99_ms"), 1),
        "ratio": round(med("bridge", "per_s") / med("sdk", "per_s"), 2),
        "bridge_lost": sum(r.get("lost", 0) for r in runs if r["kind"] == "bridge"),
        "startup_s": round(statistics.median(startup), 2), "idle_rss_mb": round(statistics.median(idle_rss), 1),
        "bridge_peak_rss_mb": round(med("bridge", "peak_rss_mb"), 1),
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
