"""What the signed-webhook benchmarks share (bench/feishu_webhook.py, bench/slack_events.py).

A `Webhook` says how to sign requests for one platform, which path takes them, how to start the
baseline server and how to configure the bridge; `compare()` runs the two servers in alternating
reps (unpinned by default, or each on one core with `--server-cpu`), with wrk
(bench/signed_post.lua) replaying distinct signed events after --warmup seconds of other events
to the same chats (both servers alike), counts the bridge's inbox after each run (every 200 must have its row), and prints one JSON line
per run and a summary.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sqlite3
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.launcher import ServerProcess, bridge_process, pin_prefix
from bench.procs import memory_kb, proc_times, service_pids
from tests.support.waiting import wait_ready

LUA = Path(__file__).with_name("signed_post.lua")


@dataclass(frozen=True)
class Webhook:
    path: str  # e.g. /slack/events
    headers: tuple[str, str, str]  # the three signed headers the request file holds, in order
    write_requests: Callable[..., None]  # (file, count, prefix=""): count distinct signed requests
    baseline: Callable[[Path, int | None], ServerProcess]  # (work dir, cpu) -> the SDK's server
    bridge_env: dict[str, str]


def parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--duration", type=float, default=10.0)
    p.add_argument("--warmup", type=float, default=2.0,
                   help="seconds of load (other events, same chats) before each measured run")
    p.add_argument("--conns", type=int, default=32)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--server-cpu", type=int, default=None,
                   help="pin the servers to this CPU (default: not pinned; the service's edge workers use the "
                        "other cores, and a pinned service runs with none: BRIDGE_HTTP_WORKERS=auto)")
    p.add_argument("--client-cpu", type=int, default=None, help="pin wrk to this CPU (default: not pinned)")
    p.add_argument("--http-workers", default=None,
                   help="BRIDGE_HTTP_WORKERS for the benchmarked service (default: the service's own, auto)")
    return p


def request_lines(headers: dict[str, str], names: tuple[str, str, str], body: bytes) -> str:
    values = [headers.get(name, "-") for name in names]
    return "\n".join([*values, body.decode()]) + "\n"


def run_wrk(url: str, hook: Webhook, requests: Path, *, duration: float, conns: int, threads: int,
            cpu: int | None) -> dict[str, Any]:
    argv = pin_prefix(cpu) + ["wrk", f"-t{threads}", f"-c{conns}", f"-d{max(1, round(duration))}s",
                              "--timeout", "10s", "-s", str(LUA), url + hook.path]
    env = {**os.environ, "BENCH_REQUESTS": str(requests), "BENCH_THREADS": str(threads), "BENCH_PATH": hook.path,
           "BENCH_HEADERS": ",".join(hook.headers)}
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


def memory_mb(pid: int) -> tuple[float, float]:
    """(RSS, PSS) of the service's processes, summed, in MB."""
    rss, pss = memory_kb(service_pids(pid)) or (0, 0)
    return rss / 1024, pss / 1024


def _stored(data: Path) -> int:
    with sqlite3.connect(data / "bridge.db") as db:
        return db.execute("SELECT count(*) FROM inbound_events").fetchone()[0]


def compare(hook: Webhook, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    runs: list[dict[str, Any]] = []
    startup: list[float] = []
    idle_rss: list[float] = []
    idle_pss: list[float] = []
    env = dict(hook.bridge_env)
    if args.http_workers is not None:
        env["BRIDGE_HTTP_WORKERS"] = str(args.http_workers)
    for rep in range(args.reps):
        for kind in ("sdk", "bridge"):
            requests = work / f"requests-{rep}-{kind}.txt"
            hook.write_requests(requests, int(args.duration * 25_000) + 10_000)  # never replayed
            data = work / f"data-{rep}"
            if kind == "bridge":
                proc = bridge_process(data, cpu=args.server_cpu, env=env)
                started = time.monotonic()
                proc.start()
                startup.append(time.monotonic() - started)  # until /healthz answers
                wait_ready(proc.url)  # the channel's client loaded and its identity read
                time.sleep(0.5)
                rss, pss = memory_mb(proc.pid)
                idle_rss.append(rss)
                idle_pss.append(pss)
            else:
                proc = hook.baseline(work, args.server_cpu).start()
            try:
                if args.warmup > 0:
                    # same treatment for both servers: lazy set-up done, the chats' conversations exist
                    warm = work / f"warmup-{rep}-{kind}.txt"
                    hook.write_requests(warm, int(args.warmup * 25_000) + 2_000, prefix="w")
                    run_wrk(proc.url, hook, warm, duration=args.warmup, conns=args.conns, threads=args.threads,
                            cpu=args.client_cpu)
                    warmed = _stored(data) if kind == "bridge" else 0
                pids = service_pids(proc.pid)
                cpu0, t0 = [proc_times(pid) for pid in pids], time.monotonic()
                result = run_wrk(proc.url, hook, requests, duration=args.duration, conns=args.conns,
                                 threads=args.threads, cpu=args.client_cpu)
                cpu1, wall = [proc_times(pid) for pid in pids], time.monotonic() - t0
                # CPU % of each of the service's processes (the service first, then its edge workers)
                result["cpu_pct"] = [round(100 * (b[0] - a[0]) / wall) if a and b else None for a, b in zip(cpu0, cpu1)]
                result["rss_mb_after"], result["pss_mb_after"] = memory_mb(proc.pid)
                result["processes"] = len(service_pids(proc.pid))
            finally:
                proc.stop()
            if kind == "bridge":
                stored = _stored(data) - (warmed if args.warmup > 0 else 0)
                # wrk does not count requests still in flight when it stops: stored may exceed it
                result["stored"] = stored
                result["lost"] = max(0, result["accepted"] - stored)
            runs.append({"kind": kind, "rep": rep, **result})
            print(json.dumps(runs[-1]), flush=True)

    def med(kind: str, key: str) -> float:
        return statistics.median(r[key] for r in runs if r["kind"] == kind)

    return {
        "machine": f"{platform.node()} {platform.machine()} {os.cpu_count()} cpus, Python {platform.python_version()}",
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "duration_s": args.duration, "warmup_s": args.warmup, "reps": args.reps, "conns": args.conns,
        "sdk_per_s": round(med("sdk", "per_s")), "sdk_p99_ms": round(med("sdk", "p99_ms"), 1),
        "bridge_per_s": round(med("bridge", "per_s")), "bridge_p99_ms": round(med("bridge", "p99_ms"), 1),
        "ratio": round(med("bridge", "per_s") / med("sdk", "per_s"), 2),
        "bridge_lost": sum(r.get("lost", 0) for r in runs if r["kind"] == "bridge"),
        # requests wrk sent again after the file ran out (duplicates: cheaper): must be 0
        "wrapped": sum(r["wrapped"] for r in runs),
        "bridge_processes": max(r.get("processes", 1) for r in runs if r["kind"] == "bridge"),
        "startup_s": round(statistics.median(startup), 2),
        "idle_rss_mb": round(statistics.median(idle_rss), 1), "idle_pss_mb": round(statistics.median(idle_pss), 1),
        "bridge_rss_mb_after_load": round(med("bridge", "rss_mb_after"), 1),
        "bridge_pss_mb_after_load": round(med("bridge", "pss_mb_after"), 1),
    }
