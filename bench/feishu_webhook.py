"""Feishu webhook benchmark (on demand only; never run in CI). Results: docs/benchmarks.md.

Compares, on one pinned core each and in alternating runs:

- bridge: the real service with Feishu on (webhook, encrypt key and token set) handling
  `POST /feishu/events`: signature, timestamp window, decryption, token, normalization and the
  inbox insert committed before the 200 (group commit). Each event is a direct message that only
  @mentions the bot: stored like any other, but its turn is skipped (no runtime, no reply), so
  the figure is the ack path, as in the SDK baseline. Reactions are off.
- sdk: lark-oapi's EventDispatcherHandler in an aiohttp app (bench/feishu_sdk_server.py):
  token, signature, decryption and dispatch to a handler that does nothing; nothing is stored.

Every request is a distinct, freshly signed and encrypted event (wrk replays a file of them).
After each bridge run the inbox is counted: every 200 must have its row.
Also measured: the bridge's start-up time and idle RSS with Feishu enabled.

    python -m bench.feishu_webhook                 # 3 reps x 10 s each
    python -m bench.feishu_webhook --reps 1 --duration 3

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
from tests.support import feishu_payloads as fp
from tests.support.feishu_emulator import FeishuEmulator

LUA = Path(__file__).with_name("feishu_post.lua")
TOKEN = "bench-token"
KEY = "bench-encrypt-key"
BOT = "ou_bot"


def write_requests(path: Path, count: int) -> None:
    """`count` distinct signed, encrypted events, four lines each, for the Lua driver."""
    mention = [fp.mention("@_user_1", BOT, "Bot")]
    with path.open("w") as out:
        for n in range(count):
            event = fp.message_event(token=TOKEN, text="@_user_1", chat_id=f"oc_b{n % 1000}", chat_type="p2p",
                                     mentions=mention, sender_open_id="ou_bench")
            headers, body = fp.webhook_request(event, encrypt_key=KEY, nonce=uuid.uuid4().hex[:16])
            out.write(f"{headers['X-Lark-Request-Timestamp']}\n{headers['X-Lark-Request-Nonce']}\n"
                      f"{headers['X-Lark-Signature']}\n{body.decode()}\n")


def run_wrk(url: str, requests: Path, *, duration: float, conns: int, threads: int, cpu: int | None) -> dict:
    argv = pin_prefix(cpu) + ["wrk", f"-t{threads}", f"-c{conns}", f"-d{max(1, round(duration))}s",
                              "--timeout", "10s", "-s", str(LUA), url + "/feishu/events"]
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


def sdk_process(work: Path, cpu: int | None) -> ServerProcess:
    port = free_port()
    return ServerProcess(
        [sys.executable, "-m", "bench.feishu_sdk_server", "--port", str(port), "--encrypt-key", KEY, "--token", TOKEN],
        port=port, health_path="/healthz", log_path=work / f"sdk-{port}.log", cwd=work,
        env={**os.environ, "PYTHONPATH": str(ROOT)}, cpu=cpu)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--conns", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--server-cpu", type=int, default=1)
    parser.add_argument("--client-cpu", type=int, default=0)
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-feishu-"))
    emulator = FeishuEmulator(app_id=f"cli_bench{uuid.uuid4().hex[:6]}", app_secret="secret", bot_open_id=BOT).start()
    env = {"FEISHU_APP_ID": emulator.app_id, "FEISHU_APP_SECRET": "secret", "FEISHU_VERIFICATION_TOKEN": TOKEN,
           "FEISHU_ENCRYPT_KEY": KEY, "FEISHU_DOMAIN": emulator.url, "FEISHU_REACTIONS": "false"}
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
                    proc = sdk_process(work, args.server_cpu).start()
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
