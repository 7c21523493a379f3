"""Web chat ingest benchmark (on demand only; never run in CI). Results: docs/benchmarks.md.

Phases, each against a fresh service (`python -m bridge serve`, new data dir, BRIDGE_LOG_LEVEL=WARNING):

1. Ingest: closed loop of POST /chat/api/messages (unique client_msg_id, ~1000 conversations,
   text "echo <n>") for --duration seconds after a --warmup, alternating with a bare aiohttp
   server (reads the body, returns 200). Unpinned by default (the service's edge worker takes
   the second core); with --server-cpu / --client-cpu the servers and the load generator (wrk,
   or the Python client) run under `taskset -c`. Per run: accepted/s, ack latency, peak memory of
   the service's processes (RSS and PSS summed, sampled every 0.25 s), CPU of server, of its
   bash children, of the generator, host steal. After each bridge run the turn backlog is watched
   for --drain-watch seconds, then the DB is checked: every acked message must have its row in
   inbound_events.
2. Exact accounting: --exact requests (default 3000) from the Python client, 5 % of them re-sends of acked ids;
   every acked id must have exactly one row, every re-send must be reported as a duplicate.
3. Reply latency: open loop at --latency-rate msg/s over --latency-convs conversations; SSE
   streams time the bot's final reply to each "echo <token>"; missing and duplicated replies
   are counted from the transcripts.
4. Optional (--profile): one extra, uncounted bridge ingest run with py-spy attached.

Writes bench/results/ingest-<UTC time>.json and prints Markdown tables. Traffic goes to 127.0.0.1
only; every loop is bounded by count and time.

    python -m bench.ingest                       # defaults: 3 reps x 10 s, wrk if installed
    python -m bench.ingest --reps 1 --duration 3 --exact 2000 --latency-duration 3   # smoke
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench.launcher import ROOT, ServerProcess, bare_process, bridge_process, group_commit_process, pin_prefix
from bench.procs import memory_kb, service_pids, tree_times

LUA = Path(__file__).with_name("chat_post.lua")
RESULTS = Path(__file__).with_name("results")

TEXT_LABEL = '"echo <n>"'  # every message runs `echo` in bash (the web chat refuses a blank one)
TARGETS = {"accepted_per_s": 6000.0, "ack_p99_ms": 15.0, "ratio_vs_bare": 0.4, "peak_rss_mb": 100.0}


# -- /proc helpers --------------------------------------------------------------------------------


def cpu_stat() -> dict[str, list[int]]:
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu"):
                name, *vals = line.split()
                out[name] = [int(v) for v in vals[:8]]
    return out


def cpu_usage(before: dict[str, list[int]], after: dict[str, list[int]], name: str) -> dict[str, float]:
    """busy / steal / other-than-idle percentages of one /proc/stat line between two snapshots."""
    d = [b - a for a, b in zip(before[name], after[name])]
    total = sum(d) or 1
    user, nice, system, idle, iowait, irq, softirq, steal = d
    return {
        "busy_pct": 100 * (total - idle - iowait - steal) / total,
        "steal_pct": 100 * steal / total,
        "softirq_pct": 100 * (irq + softirq) / total,
    }


class Sampler(threading.Thread):
    """Samples the memory of a service (its processes: bench/procs.py) every `interval` seconds
    (bounded by `max_s`): the sum of their RSS and the sum of their PSS."""

    def __init__(self, pid: int, interval: float = 0.25, max_s: float = 900.0) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.interval = interval
        self.max_s = max_s
        self.samples: list[tuple[float, int, int]] = []
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def run(self) -> None:
        deadline = time.monotonic() + self.max_s
        while not self._halt.is_set() and time.monotonic() < deadline:
            value = memory_kb(service_pids(self.pid))
            if value is not None:
                with self._lock:
                    self.samples.append((time.monotonic(), *value))
            self._halt.wait(self.interval)

    def peak_kb(self, since: float = 0.0, until: float = float("inf"), *, pss: bool = False) -> int | None:
        with self._lock:
            values = [(p if pss else r) for t, r, p in self.samples if since <= t <= until]
        return max(values) if values else None

    def stop(self) -> None:
        self._halt.set()
        self.join(2)


def wait_for_quiet(max_s: float, threshold_pct: float = 15.0) -> dict[str, Any]:
    """Wait (at most max_s) for a 1-second window where every CPU is below threshold_pct busy.

    The machine is shared; this only avoids starting a run in the middle of someone else's burst.
    """
    started = time.monotonic()
    last: dict[str, float] = {}
    while True:
        before = cpu_stat()
        time.sleep(1.0)
        after = cpu_stat()
        last = {name: cpu_usage(before, after, name)["busy_pct"] for name in after if name != "cpu"}
        if all(v < threshold_pct for v in last.values()) or time.monotonic() - started >= max_s:
            return {"waited_s": round(time.monotonic() - started, 1), "busy_pct_before": last}


# -- which code is measured ------------------------------------------------------------------------

CODE_DIRS = ("bridge", "channels", "migrations", "templates")  # what `serve` reads


def code_fingerprint(source: Path) -> str:
    """sha256 over the service's source files, to tell if the code changed during a session."""
    digest = hashlib.sha256()
    for top in CODE_DIRS:
        for path in sorted((source / top).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(source)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def git(*argv: str) -> str:
    """A read-only git query on this checkout ('' when git is unavailable)."""
    try:
        out = subprocess.run(["git", "-C", str(ROOT), *argv], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def export_rev(rev: str, dest: Path) -> str:
    """Extract the service packages of commit `rev` into dest (git archive: reads the repo, writes nothing in it)."""
    commit = git("rev-parse", "--verify", f"{rev}^{{commit}}")
    if not commit:
        raise SystemExit(f"unknown revision {rev!r}")
    dest.mkdir(parents=True, exist_ok=True)
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", commit, *CODE_DIRS], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(dest)], input=archive.stdout, check=True)
    return commit


# -- the load generators ---------------------------------------------------------------------------


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_wrk(url: str, *, duration: float, conns: int, threads: int, convs: int, prefix: str,
            cpu: int | None) -> dict[str, Any]:
    argv = pin_prefix(cpu) + [
        "wrk", f"-t{threads}", f"-c{conns}", f"-d{max(1, round(duration))}s", "--timeout", "10s",
        "-s", str(LUA), url + "/chat/api/messages",
    ]
    env = {**os.environ, "BENCH_PREFIX": prefix, "BENCH_CONVS": str(convs)}
    cpu0 = children_cpu()
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=duration + 60)
    wall = time.monotonic() - started
    gen_cpu = children_cpu() - cpu0
    line = next((l for l in proc.stdout.splitlines() if l.startswith("BENCH_JSON ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {proc.stdout[-2000:]} {proc.stderr[-2000:]}")
    raw = json.loads(line[len("BENCH_JSON "):])
    dur = raw["duration_us"] / 1e6
    lat = raw["latency_us"]
    errors = raw["errors"]
    return {
        "generator": "wrk", "prefix": prefix, "duration_s": dur, "sent": raw["sent"], "completed": raw["requests"],
        "accepted": raw["accepted"], "duplicate": raw["duplicate"], "failed": raw["failed"],
        "socket_errors": errors["connect"] + errors["read"] + errors["write"] + errors["timeout"],
        "accepted_per_s": raw["accepted"] / dur,
        "p50_ms": lat["p50"] / 1000, "p90_ms": lat["p90"] / 1000, "p99_ms": lat["p99"] / 1000,
        "max_ms": lat["max"] / 1000, "mean_ms": lat["mean"] / 1000,
        "gen_cpu_s": gen_cpu, "gen_wall_s": wall, "gen_cpu_pct": 100 * gen_cpu / wall,
        "id_format": "{prefix}-{tid}-{n}", "threads": raw["threads"],
    }


def run_python_client(mode_args: list[str], *, cpu: int | None, timeout: float) -> tuple[dict[str, Any], float, float]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        out = Path(tmp.name)
    argv = pin_prefix(cpu) + [sys.executable, "-m", "bench.clients", *mode_args, "--out", str(out)]
    cpu0 = children_cpu()
    started = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=str(ROOT), timeout=timeout,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    wall = time.monotonic() - started
    gen_cpu = children_cpu() - cpu0
    if proc.returncode != 0:
        raise RuntimeError(f"bench.clients failed ({proc.returncode}): {proc.stderr[-3000:]}")
    try:
        return json.loads(out.read_text()), gen_cpu, wall
    finally:
        out.unlink(missing_ok=True)


def run_python_closed(url: str, *, duration: float, conns: int, convs: int, prefix: str,
                      cpu: int | None) -> dict[str, Any]:
    raw, gen_cpu, wall = run_python_client(
        ["closed", "--url", url, "--duration", str(duration), "--conns", str(conns), "--convs", str(convs),
         "--prefix", prefix], cpu=cpu, timeout=duration + 60)
    lat = raw["latency_ms"]
    return {
        "generator": "python", "prefix": prefix, "duration_s": raw["elapsed_s"], "sent": raw["sent"],
        "completed": raw["accepted"] + raw["retries"] + raw["failed"], "accepted": raw["accepted"], "duplicate": 0,
        "failed": raw["failed"], "socket_errors": 0, "accepted_per_s": raw["accepted_per_s"],
        "p50_ms": lat["p50"], "p90_ms": lat["p90"], "p99_ms": lat["p99"], "max_ms": lat["max"], "mean_ms": lat["mean"],
        "gen_cpu_s": gen_cpu, "gen_wall_s": wall, "gen_cpu_pct": 100 * gen_cpu / wall, "id_format": "{prefix}-{n}",
    }


def generate(args: argparse.Namespace, url: str, duration: float, prefix: str) -> dict[str, Any]:
    if args.generator == "wrk":
        return run_wrk(url, duration=duration, conns=args.conns, threads=args.wrk_threads, convs=args.convs,
                       prefix=prefix, cpu=args.client_cpu)
    return run_python_closed(url, duration=duration, conns=args.conns, convs=args.convs, prefix=prefix,
                             cpu=args.client_cpu)


# -- the service's database -----------------------------------------------------------------------


def db_path(data_dir: Path) -> Path:
    return data_dir / "bridge.db"


def db_connect(path: Path, *, read_only: bool) -> sqlite3.Connection:
    if read_only:
        return sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    return sqlite3.connect(str(path), timeout=5)


def backlog(path: Path) -> dict[str, Any]:
    """Statuses of inbound events, turns and outbox operations (read-only; safe while the service runs)."""
    conn = db_connect(path, read_only=True)
    try:
        inbound = dict(conn.execute("SELECT status, count(*) FROM inbound_events GROUP BY status").fetchall())
        outbox = dict(conn.execute("SELECT status, count(*) FROM outbox GROUP BY status").fetchall())
        turns = dict(conn.execute("SELECT status, count(*) FROM turns GROUP BY status").fetchall())
    finally:
        conn.close()
    open_inbound = inbound.get("accepted", 0) + inbound.get("processing", 0)
    return {
        "inbound": inbound, "outbox": outbox, "turns": turns, "open_inbound": open_inbound,
        "outbox_pending": outbox.get("pending", 0),
        "finished_inbound": sum(v for k, v in inbound.items() if k not in ("accepted", "processing")),
    }


def quantiles_ms(values_s: list[float]) -> dict[str, float | None]:
    if not values_s:
        return {"count": 0, "p50": None, "p99": None, "max": None}
    ordered = sorted(values_s)

    def q(p: float) -> float:
        return 1000 * ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]

    return {"count": len(ordered), "p50": q(50), "p99": q(99), "max": 1000 * ordered[-1]}


def verify_ingest(path: Path, runs: list[dict[str, Any]], load_end_epoch: float) -> dict[str, Any]:
    """After the service stopped: every acked message of each generator run must have its row."""
    conn = db_connect(path, read_only=False)
    try:
        keys = [k for (k,) in conn.execute("SELECT dedupe_key FROM inbound_events")]
        user_rows = conn.execute("SELECT count(*) FROM webchat_messages WHERE role = 'user'").fetchone()[0]
        turn_delays = [d for (d,) in conn.execute(
            "SELECT finished_at - received_at FROM turns WHERE finished_at IS NOT NULL")]
        last_delivery = conn.execute("SELECT max(delivered_at) FROM outbox WHERE status = 'delivered'").fetchone()[0]
        last_finished = conn.execute("SELECT max(finished_at) FROM turns").fetchone()[0]
        integrity = conn.execute("PRAGMA quick_check").fetchone()[0]
    finally:
        conn.close()
    pattern = re.compile(r"^webchat:c\d+/([A-Za-z0-9]+)-(\d+)-(\d+)$|^webchat:c\d+/([A-Za-z0-9]+)-(\d+)$")
    per_prefix: dict[str, int] = {}
    out_of_range = 0
    sent_by = {r["prefix"]: r for r in runs}
    unexpected = 0
    for key in keys:
        m = pattern.match(key)
        if not m or (m.group(1) or m.group(4)) not in sent_by:
            unexpected += 1
            continue
        prefix = m.group(1) or m.group(4)
        per_prefix[prefix] = per_prefix.get(prefix, 0) + 1
        run = sent_by[prefix]
        if m.group(1):  # wrk: per-thread counters
            sent_t = next((t["sent"] for t in run.get("threads", []) if t["tid"] == int(m.group(2))), 0)
            if int(m.group(3)) >= sent_t:
                out_of_range += 1
        elif int(m.group(5)) >= run["sent"]:
            out_of_range += 1
    checks = []
    for r in runs:
        rows = per_prefix.get(r["prefix"], 0)
        checks.append({
            "prefix": r["prefix"], "sent": r["sent"], "acked": r["accepted"], "rows": rows,
            "acked_without_row_lower_bound": max(0, r["accepted"] - rows),
            "rows_not_acked": rows - r["accepted"],  # in flight when the generator stopped: <= connections
            "duplicates_reported": r["duplicate"],
        })
    acked = sum(r["accepted"] for r in runs)
    ok = (all(c["acked_without_row_lower_bound"] == 0 and c["rows"] <= c["sent"] for c in checks)
          and unexpected == 0 and out_of_range == 0 and integrity == "ok")
    return {
        "ok": ok, "rows": len(keys), "acked": acked, "user_transcript_rows": user_rows,
        "unexpected_keys": unexpected, "ids_never_sent": out_of_range, "integrity": integrity, "runs": checks,
        "turn_delay_ms": quantiles_ms(turn_delays),
        "last_reply_delivered_s_after_load": (last_delivery - load_end_epoch) if last_delivery else None,
        "last_turn_finished_s_after_load": (last_finished - load_end_epoch) if last_finished else None,
    }


# -- phases ----------------------------------------------------------------------------------------


def bridge_env(args: argparse.Namespace) -> dict[str, str]:
    env = {"BRIDGE_LOG_LEVEL": "WARNING", "BRIDGE_SHUTDOWN_TIMEOUT": str(args.shutdown_timeout)}
    if args.http_workers is not None:
        env["BRIDGE_HTTP_WORKERS"] = str(args.http_workers)
    return env


def start_server(kind: str, args: argparse.Namespace, workdir: Path, name: str) -> tuple[ServerProcess, Path | None]:
    if kind == "bridge":
        data_dir = workdir / name
        return bridge_process(data_dir, cpu=args.server_cpu, env=bridge_env(args), source=args.source).start(), data_dir
    if kind == "yardstick":
        return group_commit_process(workdir / name, cpu=args.server_cpu).start(), None
    return bare_process(workdir, cpu=args.server_cpu).start(), None


def ingest_run(kind: str, rep: int, args: argparse.Namespace, workdir: Path, *, profile: bool = False
               ) -> dict[str, Any]:
    quiet = wait_for_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
    name = f"{kind}-{rep}{'-profile' if profile else ''}"
    server, data_dir = start_server(kind, args, workdir, name)
    sampler = Sampler(server.pid)
    sampler.start()
    result: dict[str, Any] = {"kind": kind, "rep": rep, "quiet": quiet, "pinned": server.pinned,
                              "code": code_fingerprint(args.source) if kind == "bridge" else None}
    try:
        idle = memory_kb(service_pids(server.pid)) or (0, 0)
        result["rss_idle_mb"], result["pss_idle_mb"] = idle[0] / 1024, idle[1] / 1024
        result["processes"] = len(service_pids(server.pid))
        warm = generate(args, server.url, args.warmup, f"w{rep}{kind[0]}") if args.warmup > 0 else None
        result["warmup"] = warm
        if data_dir is not None:
            result["backlog_before_load"] = backlog(db_path(data_dir))
        prof = start_profiler(args, server.pid, name) if profile else None
        t_load = time.monotonic()
        pids = service_pids(server.pid)
        st0, pt0 = cpu_stat(), tree_times(pids)
        load = generate(args, server.url, args.duration, f"m{rep}{kind[0]}")
        st1, pt1 = cpu_stat(), tree_times(pids)
        t_end, load_end_epoch = time.monotonic(), time.time()
        result["load"] = load
        wall = t_end - t_load
        result["server_cpu_pct"] = 100 * (pt1[0] - pt0[0]) / wall if pt0 and pt1 else None
        result["server_children_cpu_pct"] = 100 * (pt1[1] - pt0[1]) / wall if pt0 and pt1 else None
        result["server_sys_cpu_pct"] = 100 * (pt1[2] - pt0[2]) / wall if pt0 and pt1 else None
        # the server's own CPU (user + sys, bash children not included) per accepted request
        result["server_cpu_us_per_request"] = (
            1e6 * (pt1[0] - pt0[0]) / load["accepted"] if pt0 and pt1 and load["accepted"] else None)
        server_core = f"cpu{args.server_cpu}" if args.server_cpu is not None else "cpu"
        client_core = f"cpu{args.client_cpu}" if args.client_cpu is not None else "cpu"
        result["server_core"] = cpu_usage(st0, st1, server_core)
        result["client_core"] = cpu_usage(st0, st1, client_core)
        result["host"] = cpu_usage(st0, st1, "cpu")
        if result["server_cpu_pct"] is not None:
            # Everything else that ran on the server's core: other people's processes on this shared host.
            result["other_on_server_core_pct"] = max(0.0, result["server_core"]["busy_pct"] - result["server_cpu_pct"]
                                                     - result["server_children_cpu_pct"])
        result["other_on_client_core_pct"] = max(0.0, result["client_core"]["busy_pct"] - load["gen_cpu_pct"])
        result["peak_rss_mb_load"] = (sampler.peak_kb(t_load, t_end) or 0) / 1024
        result["peak_pss_mb_load"] = (sampler.peak_kb(t_load, t_end, pss=True) or 0) / 1024
        if prof is not None:
            result["profile"] = finish_profiler(prof)
        if data_dir is not None:
            result.update(watch_backlog(db_path(data_dir), args.drain_watch))
            before = result["backlog_before_load"]["finished_inbound"]
            result["turns_finished_during_load_per_s"] = (
                result["backlog_at_load_end"]["finished_inbound"] - before) / wall
        result["peak_rss_mb_all"] = (sampler.peak_kb() or 0) / 1024
    finally:
        stop_started = time.monotonic()
        result["stop_rc"] = server.stop(timeout=args.shutdown_timeout + 30)
        result["stop_s"] = time.monotonic() - stop_started
        sampler.stop()
    if data_dir is not None and "load" in result:
        runs = [r for r in (result.get("warmup"), result.get("load")) if r]
        result["db_check"] = verify_ingest(db_path(data_dir), runs, load_end_epoch)
        if not args.keep:
            shutil.rmtree(data_dir, ignore_errors=True)
    return result


def watch_backlog(path: Path, watch_s: float) -> dict[str, Any]:
    """The turn backlog at the end of the load, then once a second until drained or watch_s passes."""
    at_end = backlog(path)
    series = [{"t": 0.0, "open_inbound": at_end["open_inbound"], "outbox_pending": at_end["outbox_pending"],
               "finished_inbound": at_end["finished_inbound"]}]
    started = time.monotonic()
    drained_at = 0.0 if at_end["open_inbound"] == 0 and at_end["outbox_pending"] == 0 else None
    while drained_at is None and time.monotonic() - started < watch_s:
        time.sleep(1.0)
        b = backlog(path)
        t = time.monotonic() - started
        series.append({"t": round(t, 2), "open_inbound": b["open_inbound"], "outbox_pending": b["outbox_pending"],
                       "finished_inbound": b["finished_inbound"]})
        if b["open_inbound"] == 0 and b["outbox_pending"] == 0:
            drained_at = t
    last = series[-1]
    span = last["t"] or 1.0
    drain_rate = (last["finished_inbound"] - series[0]["finished_inbound"]) / span if len(series) > 1 else None
    return {
        "backlog_at_load_end": at_end, "backlog_series": series, "drained_after_load_s": drained_at,
        "drain_rate_per_s": drain_rate,
        "estimated_drain_s": (last["open_inbound"] / drain_rate + last["t"]) if drained_at is None and drain_rate else None,
    }


def exact_phase(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    quiet = wait_for_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
    data_dir = workdir / "exact"
    server = bridge_process(data_dir, cpu=args.server_cpu, env=bridge_env(args), source=args.source).start()
    fingerprint = code_fingerprint(args.source)
    try:
        raw, gen_cpu, wall = run_python_client(
            ["closed", "--url", server.url, "--requests", str(args.exact), "--conns", str(args.conns),
             "--convs", str(args.convs), "--prefix", "x", "--dup-fraction", "0.05", "--record-ids"],
            cpu=args.client_cpu, timeout=600)
    finally:
        server.stop(timeout=args.shutdown_timeout + 30)
    conn = db_connect(db_path(data_dir), read_only=False)
    try:
        keys = {k for (k,) in conn.execute("SELECT dedupe_key FROM inbound_events")}
        # each acked message's transcript row: the exact phase's texts are unique per message
        user_rows = Counter(conn.execute("SELECT conversation_id, text FROM webchat_messages WHERE role = 'user'"))
        integrity = conn.execute("PRAGMA quick_check").fetchone()[0]
    finally:
        conn.close()
    acked = {f"webchat:{conv}/{cmid}" for conv, cmid in raw["acked_ids"]}
    retried = raw["retried_ids"]
    missing = sorted(acked - keys)
    extra = sorted(keys - acked)
    transcript_missing = sorted(f"webchat:{conv}/{cmid}" for conv, cmid in raw["acked_ids"]
                                if user_rows[(conv, f"echo {cmid.rsplit('-', 1)[1]}")] != 1)
    if not args.keep:
        shutil.rmtree(data_dir, ignore_errors=True)
    ok = (not missing and not extra and not transcript_missing and raw["failed"] == 0
          and all(r["duplicate"] for r in retried) and integrity == "ok")
    return {
        "ok": ok, "quiet": quiet, "code": fingerprint, "requests": args.exact, "acked": len(acked), "acked_responses": raw["accepted"],
        "retries": len(retried), "retries_reported_duplicate": sum(1 for r in retried if r["duplicate"]),
        "failed": raw["failed"], "failures": raw["failures"], "rows": len(keys),
        "acked_without_row": len(missing), "missing_examples": missing[:10],
        "rows_without_ack": len(extra), "acked_without_transcript_row": len(transcript_missing),
        "integrity": integrity, "accepted_per_s_python_client": raw["accepted_per_s"],
        "latency_ms": raw["latency_ms"], "gen_cpu_pct": 100 * gen_cpu / wall,
    }


def latency_phase(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    quiet = wait_for_quiet(args.wait_quiet) if args.wait_quiet > 0 else None
    data_dir = workdir / "latency"
    server = bridge_process(data_dir, cpu=args.server_cpu, env=bridge_env(args), source=args.source).start()
    fingerprint = code_fingerprint(args.source)
    sampler = Sampler(server.pid)
    sampler.start()
    try:
        pids = service_pids(server.pid)
        pt0, st0 = tree_times(pids), cpu_stat()
        raw, gen_cpu, wall = run_python_client(
            ["replies", "--url", server.url, "--rate", str(args.latency_rate), "--convs", str(args.latency_convs),
             "--duration", str(args.latency_duration), "--settle", str(args.latency_settle)],
            cpu=args.client_cpu, timeout=args.latency_duration + args.latency_settle + 120)
        pt1, st1 = tree_times(pids), cpu_stat()
        status = backlog(db_path(data_dir))
        core = f"cpu{args.server_cpu}" if args.server_cpu is not None else "cpu"
        server_core = cpu_usage(st0, st1, core)
    finally:
        server.stop(timeout=args.shutdown_timeout + 30)
        sampler.stop()
    if not args.keep:
        shutil.rmtree(data_dir, ignore_errors=True)
    raw.update({
        "quiet": quiet, "code": fingerprint, "gen_cpu_pct": 100 * gen_cpu / wall, "peak_rss_mb": (sampler.peak_kb() or 0) / 1024,
        "server_cpu_pct": 100 * (pt1[0] - pt0[0]) / wall if pt0 and pt1 else None,
        "server_children_cpu_pct": 100 * (pt1[1] - pt0[1]) / wall if pt0 and pt1 else None,
        "backlog_at_end": status, "server_core": server_core,
    })
    return raw


# -- profiling -------------------------------------------------------------------------------------


def start_profiler(args: argparse.Namespace, pid: int, name: str) -> dict[str, Any] | None:
    py_spy = args.py_spy or shutil.which("py-spy")
    if not py_spy:
        print("py-spy not found: skipping the profile (pip install py-spy, or pass --py-spy PATH)", file=sys.stderr)
        return None
    RESULTS.mkdir(exist_ok=True)
    stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    raw = RESULTS / f"profile-{stamp}.txt"
    svg = RESULTS / f"profile-{stamp}.svg"
    seconds = str(max(1, int(args.duration) - 1))
    common = ["record", "--pid", str(pid), "--duration", seconds, "--rate", "100"]
    procs = [  # raw: only the thread holding the GIL (where Python CPU goes); svg: every non-idle thread
        subprocess.Popen(pin_prefix(args.client_cpu) + [py_spy, *common, "--gil", "--threads", "--format", "raw",
                                                        "-o", str(raw)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE),
        subprocess.Popen(pin_prefix(args.client_cpu) + [py_spy, *common, "--format", "flamegraph", "-o", str(svg)],
                         stdout=subprocess.DEVNULL, stderr=subprocess.PIPE),
    ]
    return {"procs": procs, "raw": raw, "svg": svg}


WRITER_EXECUTE = "Database._execute (bridge/store/db.py)"
FRAME = re.compile(r"^(?P<fn>.*?) \((?P<file>[^():]*?)(?::\d+)?\)$")


def _frame_name(frame: str) -> str:
    m = FRAME.match(frame)
    if not m:
        return frame
    path = m.group("file")
    for marker in ("site-packages/", "lib/python3", "/work/main/"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{m.group('fn')} ({path})"


def finish_profiler(prof: dict[str, Any], top: int = 25) -> dict[str, Any]:
    errors = []
    for p in prof["procs"]:
        try:
            _, err = p.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
            _, err = p.communicate()
        if p.returncode != 0:
            errors.append(err.decode(errors="replace")[-500:])
    self_time: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    threads: dict[str, int] = {}
    tasks: dict[str, int] = {}
    units: dict[str, int] = {}  # inside the store writer: which write unit (what the group commit spends on)
    total = 0
    try:
        lines = prof["raw"].read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        stack, _, count_s = line.rpartition(" ")
        if not stack or not count_s.isdigit():
            continue
        count = int(count_s)
        frames = stack.split(";")
        thread, frames = frames[0], frames[1:]
        thread_name = thread.split(":", 1)[1].strip() if ":" in thread else thread
        thread_name = re.sub(r"-\d+$", "", re.sub(r"^Thread-\d+ ", "Thread-N ", thread_name))
        threads[thread_name] = threads.get(thread_name, 0) + count
        total += count
        if not frames:
            continue
        names = [_frame_name(f) for f in frames]
        self_time[names[-1]] = self_time.get(names[-1], 0) + count
        for n in set(names):
            inclusive[n] = inclusive.get(n, 0) + count
        task = _task_root(thread_name, names)
        tasks[task] = tasks.get(task, 0) + count
        if WRITER_EXECUTE in names:
            i = names.index(WRITER_EXECUTE)
            unit = names[i + 1] if i + 1 < len(names) else "Database._execute itself"
            units[unit] = units.get(unit, 0) + count

    def table(d: dict[str, int]) -> list[dict[str, Any]]:
        return [{"function": k, "samples": v, "pct": 100 * v / total if total else 0.0}
                for k, v in sorted(d.items(), key=lambda kv: -kv[1])[:top]]

    return {
        "raw": str(prof["raw"].relative_to(ROOT)), "svg": str(prof["svg"].relative_to(ROOT)),
        "samples": total, "errors": errors,
        "threads": {k: {"samples": v, "pct": 100 * v / total if total else 0.0} for k, v in threads.items()},
        "by_task": table(tasks), "writer_units": table(units), "top_self": table(self_time), "top_inclusive": table(inclusive),
    }


def _task_root(thread: str, names: list[str]) -> str:
    """Which asyncio task (its outermost coroutine) or thread a sample belongs to.

    SQLAlchemy's async layer runs the sync Core code in a greenlet; those samples show up with
    the greenlet's own stack (rooted at Connection.execute etc.), detached from the calling task.
    """
    if thread != "MainThread":
        return f"thread {thread}"
    for i, n in enumerate(names):
        if n.startswith("Handle._run "):
            return names[i + 1] if i + 1 < len(names) else "event loop callbacks"
    if not names[0].startswith("_run_module_as_main"):
        return f"greenlet (SQLAlchemy sync code): {names[0]}"
    return f"event loop itself: {names[-1]}"


# -- reporting -------------------------------------------------------------------------------------


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def summarize(ingest: list[dict[str, Any]]) -> dict[str, Any]:
    bridge = [r for r in ingest if r["kind"] == "bridge"]
    bare = [r for r in ingest if r["kind"] == "bare"]
    yardstick = [r for r in ingest if r["kind"] == "yardstick"]
    ratios = []
    for b in bridge:
        pair = next((x for x in bare if x["rep"] == b["rep"]), None)
        if pair and pair["load"]["accepted_per_s"]:
            ratios.append(b["load"]["accepted_per_s"] / pair["load"]["accepted_per_s"])

    def med(rows, fn):
        return median([fn(r) for r in rows])

    out = {}
    for name, rows in (("bridge", bridge), ("bare", bare), ("yardstick", yardstick)):
        if not rows:
            continue
        out[name] = {
            "accepted_per_s": med(rows, lambda r: r["load"]["accepted_per_s"]),
            "p50_ms": med(rows, lambda r: r["load"]["p50_ms"]),
            "p99_ms": med(rows, lambda r: r["load"]["p99_ms"]),
            "peak_rss_mb_load": med(rows, lambda r: r["peak_rss_mb_load"]),
            "peak_pss_mb_load": med(rows, lambda r: r.get("peak_pss_mb_load")),
            "processes": max((r.get("processes") or 1 for r in rows), default=None),
            "peak_rss_mb_all": max((r.get("peak_rss_mb_all") or 0 for r in rows), default=None),
            "server_cpu_pct": med(rows, lambda r: r["server_cpu_pct"]),
            "server_cpu_us_per_request": med(rows, lambda r: r.get("server_cpu_us_per_request")),
            "gen_cpu_pct": med(rows, lambda r: r["load"]["gen_cpu_pct"]),
            "gen_cpu_pct_max": max((r["load"]["gen_cpu_pct"] for r in rows), default=None),
        }
    out["ratio_per_rep"] = ratios
    out["ratio_median"] = median(ratios)
    if yardstick:
        out["yardstick_ratio_per_rep"] = [
            y["load"]["accepted_per_s"] / pair["load"]["accepted_per_s"] for y in yardstick
            if (pair := next((x for x in bare if x["rep"] == y["rep"]), None)) and pair["load"]["accepted_per_s"]]
        out["yardstick_ratio_median"] = median(out["yardstick_ratio_per_rep"])
    b = out["bridge"]
    out["targets"] = {
        "accepted_per_s": {"target": ">= 6000/s", "value": b["accepted_per_s"],
                           "met": (b["accepted_per_s"] or 0) >= TARGETS["accepted_per_s"]},
        "ack_p99_ms": {"target": "<= 15 ms", "value": b["p99_ms"],
                       "met": b["p99_ms"] is not None and b["p99_ms"] <= TARGETS["ack_p99_ms"]},
        "ratio_vs_bare": {"target": ">= 0.4x", "value": out["ratio_median"],
                          "met": (out["ratio_median"] or 0) >= TARGETS["ratio_vs_bare"]},
        "peak_rss_mb": {"target": "<= 100 MB (sum over the service's processes)", "value": b["peak_rss_mb_load"],
                        "met": b["peak_rss_mb_load"] is not None and b["peak_rss_mb_load"] <= TARGETS["peak_rss_mb"]},
    }
    return out


def fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "–"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    if isinstance(v, int):
        return f"{v:,}"
    return str(v)


def markdown(result: dict[str, Any]) -> str:
    code = result.get("code", {})
    what = f"commit {code['commit'][:12]} (--rev {code['rev']})" if code.get("commit") else (
        f"working tree of {code.get('checkout_head', '?')[:12]}"
        + (f" with {len(code.get('checkout_changes', []))} changed service file(s)" if code.get("checkout_changes") else ""))
    lines = [f"Code measured: {what}; fingerprint {code.get('fingerprint_at_start')}"
             + (" — WARNING: changed during the session" if code.get("changed_during_session") else ""), ""]
    ingest = result["ingest"]
    if ingest:
        lines += [f"### Ingest runs (closed loop, {result['config']['conns']} connections, "
                  f"{result['config']['duration']:g} s each, generator {result['config']['generator']}, "
                  f"text {TEXT_LABEL})", "",
                  "| rep | server | accepted/s | ack p50 ms | ack p99 ms | acked | peak RSS MB | server CPU % (sys) "
                  "| bash children CPU % | other procs on server core % | steal % | generator CPU % "
                  "| other procs on generator core % | server CPU µs/request | x/bare |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        ratios = {}
        for r in ingest:
            if r["kind"] != "bare":
                pair = next((x for x in ingest if x["kind"] == "bare" and x["rep"] == r["rep"]), None)
                if pair:
                    ratios[r["rep"], r["kind"]] = r["load"]["accepted_per_s"] / pair["load"]["accepted_per_s"]
        for r in ingest:
            load = r["load"]
            lines.append(
                f"| {r['rep']} | {r['kind']} | {fmt(load['accepted_per_s'], 0)} | {fmt(load['p50_ms'], 2)} "
                f"| {fmt(load['p99_ms'], 2)} | {fmt(load['accepted'])} | {fmt(r['peak_rss_mb_load'])} "
                f"| {fmt(r['server_cpu_pct'], 0)} ({fmt(r.get('server_sys_cpu_pct'), 0)}) "
                f"| {fmt(r['server_children_cpu_pct'], 0)} "
                f"| {fmt(r.get('other_on_server_core_pct'), 0)} | {fmt(r['server_core']['steal_pct'], 0)} "
                f"| {fmt(load['gen_cpu_pct'], 0)} | {fmt(r.get('other_on_client_core_pct'), 0)} "
                f"| {fmt(r.get('server_cpu_us_per_request'), 1)} "
                f"| {fmt(ratios.get((r['rep'], r['kind'])), 3) if r['kind'] != 'bare' else ''} |")
        s = result["summary"]
        lines += ["", "### Medians and targets", "",
                  "| metric | bridge | bare | target | met |", "|---|---|---|---|---|"]
        t = s["targets"]
        lines.append(f"| accepted messages/s | {fmt(s['bridge']['accepted_per_s'], 0)} | {fmt(s['bare']['accepted_per_s'], 0)} "
                     f"| ≥ 6,000 | {fmt(t['accepted_per_s']['met'])} |")
        lines.append(f"| ack latency p50 ms | {fmt(s['bridge']['p50_ms'], 2)} | {fmt(s['bare']['p50_ms'], 2)} | | |")
        lines.append(f"| ack latency p99 ms | {fmt(s['bridge']['p99_ms'], 2)} | {fmt(s['bare']['p99_ms'], 2)} "
                     f"| ≤ 15 | {fmt(t['ack_p99_ms']['met'])} |")
        lines.append(f"| bridge/bare (median of per-rep ratios) | {fmt(s['ratio_median'], 3)} | | ≥ 0.4 "
                     f"| {fmt(t['ratio_vs_bare']['met'])} |")
        lines.append(f"| processes (service + edge workers) | {fmt(s['bridge']['processes'])} | {fmt(s['bare']['processes'])} | | |")
        lines.append(f"| peak RSS MB under load (sum over processes) | {fmt(s['bridge']['peak_rss_mb_load'])} "
                     f"| {fmt(s['bare']['peak_rss_mb_load'])} | ≤ 100 | {fmt(t['peak_rss_mb']['met'])} |")
        lines.append(f"| peak PSS MB under load (sum over processes) | {fmt(s['bridge']['peak_pss_mb_load'])} "
                     f"| {fmt(s['bare']['peak_pss_mb_load'])} | | |")
        lines.append(f"| generator CPU % (max over runs) | {fmt(s['bridge']['gen_cpu_pct_max'], 0)} "
                     f"| {fmt(s['bare']['gen_cpu_pct_max'], 0)} | | |")
        lines.append(f"| server CPU µs per request | {fmt(s['bridge']['server_cpu_us_per_request'])} "
                     f"| {fmt(s['bare']['server_cpu_us_per_request'])} | | |")
        if "yardstick" in s:
            lines.append(f"| yardstick (group_commit_server): accepted/s, CPU µs per request, x/bare "
                         f"| {fmt(s['yardstick']['accepted_per_s'], 0)}, {fmt(s['yardstick']['server_cpu_us_per_request'])}, "
                         f"{fmt(s['yardstick_ratio_median'], 3)} | | | |")
        lines += ["", "### No loss (inbound_events rows vs acked 202s, per bridge run, warm-up included)", "",
                  "| rep | acked | rows | acked without row (lower bound) | rows not acked (in flight at stop) "
                  "| duplicates reported | integrity | ok |", "|---|---|---|---|---|---|---|---|"]
        for r in ingest:
            if r["kind"] != "bridge":
                continue
            c = r["db_check"]
            lines.append(f"| {r['rep']} | {fmt(c['acked'])} | {fmt(c['rows'])} "
                         f"| {fmt(sum(x['acked_without_row_lower_bound'] for x in c['runs']))} "
                         f"| {fmt(sum(x['rows_not_acked'] for x in c['runs']))} "
                         f"| {fmt(sum(x['duplicates_reported'] for x in c['runs']))} | {c['integrity']} | {fmt(c['ok'])} |")
        lines += ["", "### Turn backlog after each bridge run (every accepted message runs `echo` in bash)", "",
                  "| rep | open events at load end | outbox pending at load end | drain rate /s | drained after s "
                  "| last reply delivered s after load | turn delay p50 / p99 / max s | stop s |",
                  "|---|---|---|---|---|---|---|---|"]
        for r in ingest:
            if r["kind"] != "bridge":
                continue
            c = r["db_check"]
            td = c["turn_delay_ms"]
            drained = r.get("drained_after_load_s")
            est = r.get("estimated_drain_s")
            drained_s = fmt(drained) if drained is not None else (f"not within watch (est. {fmt(est, 0)})" if est else "no")
            lines.append(
                f"| {r['rep']} | {fmt(r['backlog_at_load_end']['open_inbound'])} | {fmt(r['backlog_at_load_end']['outbox_pending'])} "
                f"| {fmt(r.get('drain_rate_per_s'), 0)} | {drained_s} | {fmt(c['last_reply_delivered_s_after_load'])} "
                f"| {fmt((td['p50'] or 0) / 1000, 2)} / {fmt((td['p99'] or 0) / 1000, 2)} / {fmt((td['max'] or 0) / 1000, 2)} "
                f"| {fmt(r['stop_s'])} |")
    ex = result.get("exact")
    if ex:
        lines += ["", "### Exact accounting (Python client, 32 concurrent, 5 % re-sends of acked ids)", "",
                  "| requests | acked | re-sends (reported duplicate) | failed | rows | acked without row | rows without ack "
                  "| acked without transcript row | ok |", "|---|---|---|---|---|---|---|---|---|",
                  f"| {fmt(ex['requests'])} | {fmt(ex['acked'])} | {fmt(ex['retries'])} ({fmt(ex['retries_reported_duplicate'])}) "
                  f"| {fmt(ex['failed'])} | {fmt(ex['rows'])} | {fmt(ex['acked_without_row'])} | {fmt(ex['rows_without_ack'])} "
                  f"| {fmt(ex['acked_without_transcript_row'])} | {fmt(ex['ok'])} |"]
    lat = result.get("latency")
    if lat:
        rl, al = lat["reply_latency_ms"], lat["ack_latency_ms"]
        lines += ["", f"### Message → reply latency (open loop, {fmt(lat['rate'], 0)} msg/s over {lat['convs']} "
                      f"conversations for {fmt(lat['duration_s'], 0)} s, shell runtime `echo`)", "",
                  "| sent | acked | replies seen | reply p50 ms | reply p90 ms | reply p99 ms | reply max ms | ack p50 / p99 ms "
                  "| missing | duplicated | peak RSS MB |", "|---|---|---|---|---|---|---|---|---|---|---|",
                  f"| {lat['sent']} | {lat['acked']} | {rl['count']} | {fmt(rl['p50'])} | {fmt(rl['p90'])} | {fmt(rl['p99'])} "
                  f"| {fmt(rl['max'])} | {fmt(al['p50'], 2)} / {fmt(al['p99'], 2)} | {lat['missing_in_transcript']} "
                  f"| {lat['duplicated']} | {fmt(lat['peak_rss_mb'])} |"]
    prof = result.get("profile")
    if prof and prof.get("profile"):
        p = prof["profile"]
        lines += ["", f"### Profile (extra bridge run, {fmt(prof['load']['accepted_per_s'], 0)} accepted/s while sampled; "
                      f"{p['samples']} samples; flamegraph {p['svg']})", "",
                  "Threads (GIL holder): " + ", ".join(f"{k} {v['pct']:.1f} %" for k, v in p["threads"].items()), "",
                  "| by task (outermost coroutine) | % |", "|---|---|",
                  *[f"| `{t['function']}` | {t['pct']:.1f} |" for t in p["by_task"][:15]], "",
                  "| inside the store writer, by write unit | % |", "|---|---|",
                  *[f"| `{t['function']}` | {t['pct']:.1f} |" for t in p.get("writer_units", [])[:10]], "",
                  "| top self | % | | top inclusive | % |", "|---|---|---|---|---|"]
        for a, b in zip(p["top_self"][:20], p["top_inclusive"][:20]):
            lines.append(f"| `{a['function']}` | {a['pct']:.1f} | | `{b['function']}` | {b['pct']:.1f} |")
    return "\n".join(lines)


def machine() -> dict[str, Any]:
    model = ""
    try:
        model = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "")
    except OSError:
        pass
    info = {
        "nproc": os.cpu_count(), "cpu_model": model, "kernel": platform.release(), "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
    }
    try:
        import aiohttp
        import sqlalchemy

        info["aiohttp"] = aiohttp.__version__
        info["sqlalchemy"] = sqlalchemy.__version__
    except ImportError:
        pass
    if shutil.which("wrk"):
        out = subprocess.run(["wrk", "--version"], capture_output=True, text=True)
        info["wrk"] = (out.stdout or out.stderr).splitlines()[0] if (out.stdout or out.stderr) else "?"
    return info


# -- main ------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.ingest", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--duration", type=float, default=10.0, help="measured seconds per ingest run (default 10)")
    p.add_argument("--warmup", type=float, default=2.0, help="warm-up seconds before each run (default 2)")
    p.add_argument("--reps", type=int, default=3, help="alternating bridge/bare repetitions (default 3)")
    p.add_argument("--conns", type=int, default=32, help="concurrent connections (default 32)")
    p.add_argument("--convs", type=int, default=1000, help="conversations the ingest load spreads over (default 1000)")
    p.add_argument("--generator", choices=("auto", "wrk", "python"), default="auto",
                   help="load generator: wrk (if installed) or the aiohttp client (default auto)")
    p.add_argument("--wrk-threads", type=int, default=1)
    p.add_argument("--server-cpu", type=int, default=None,
                   help="pin the servers to this CPU (default: not pinned; the service's edge workers use the "
                        "other cores, and a pinned service runs with none: BRIDGE_HTTP_WORKERS=auto)")
    p.add_argument("--client-cpu", type=int, default=None, help="pin the load generator to this CPU (default: not pinned)")
    p.add_argument("--no-pin", action="store_true", help="do not use taskset even when CPUs are given")
    p.add_argument("--http-workers", default=None,
                   help="BRIDGE_HTTP_WORKERS for the benchmarked service (default: the service's own, auto)")
    p.add_argument("--drain-watch", type=float, default=15.0,
                   help="seconds to watch the turn backlog drain after each bridge run (default 15)")
    p.add_argument("--shutdown-timeout", type=float, default=5.0,
                   help="BRIDGE_SHUTDOWN_TIMEOUT for the benchmarked service (default 5)")
    p.add_argument("--exact", type=int, default=3000, help="requests in the exact-accounting phase (default 3000; 0 skips)")
    p.add_argument("--latency-rate", type=float, default=50.0, help="reply-latency phase: msg/s (default 50)")
    p.add_argument("--latency-convs", type=int, default=100, help="reply-latency phase: conversations (default 100)")
    p.add_argument("--latency-duration", type=float, default=10.0, help="reply-latency phase: seconds (0 skips)")
    p.add_argument("--latency-settle", type=float, default=30.0, help="max wait for the last replies (default 30)")
    p.add_argument("--profile", action="store_true", help="one extra uncounted bridge run under py-spy")
    p.add_argument("--py-spy", default=None, help="path of py-spy (default: from PATH)")
    p.add_argument("--wait-quiet", type=float, default=10.0,
                   help="before each run wait up to this many seconds for the CPUs to be idle (0: don't)")
    p.add_argument("--rev", default=None,
                   help="benchmark this commit of the checkout (exported with git archive to a temp dir) instead "
                        "of the working tree; recommended while others edit the tree")
    p.add_argument("--source", type=Path, default=ROOT,
                   help="tree holding bridge/, channels/, migrations/ to run (default: this checkout)")
    p.add_argument("--yardstick", action="store_true",
                   help="add to each rep a run of bench/group_commit_server.py: the smallest durable ingest "
                        "(one table, one group-committing writer, no pipeline), to show how much of the gap "
                        "to the bare handler is SQLite's")
    p.add_argument("--skip-ingest", action="store_true", help="skip the alternating ingest runs")
    p.add_argument("--keep", action="store_true", help="keep the temporary data dirs")
    p.add_argument("--out", type=Path, default=None, help="result JSON (default bench/results/ingest-<time>.json)")
    args = p.parse_args(argv)
    if args.duration > 120 or args.warmup > 30 or args.reps > 10 or args.drain_watch > 300:
        p.error("bounded on purpose: --duration <= 120, --warmup <= 30, --reps <= 10, --drain-watch <= 300")
    if args.conns < 1 or args.convs < 1 or args.reps < 0:
        p.error("--conns, --convs must be >= 1")
    if args.generator == "auto":
        args.generator = "wrk" if shutil.which("wrk") else "python"
    elif args.generator == "wrk" and not shutil.which("wrk"):
        p.error("wrk is not installed (Debian: apt-get install -y wrk)")
    if args.no_pin or (os.cpu_count() or 1) < 2 or not shutil.which("taskset"):
        args.server_cpu = args.client_cpu = None
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.client_cpu is not None:
        os.sched_setaffinity(0, {args.client_cpu})  # the orchestrator stays off the server's core
    started = datetime.now(timezone.utc)
    result: dict[str, Any] = {
        "started_at": started.isoformat(timespec="seconds"), "command": " ".join(["python -m bench.ingest", *(argv or sys.argv[1:])]),
        "machine": machine(), "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "ingest": [], "targets": TARGETS,
    }
    workdir = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    code: dict[str, Any] = {"checkout_head": git("rev-parse", "HEAD"),
                            "checkout_changes": git("status", "--porcelain", "--", *CODE_DIRS).splitlines()}
    if args.rev:
        args.source = workdir / "src"
        code["rev"] = args.rev
        code["commit"] = export_rev(args.rev, args.source)
    code["source"] = str(args.source)
    code["fingerprint_at_start"] = code_fingerprint(args.source)
    result["code"] = code
    result["config"]["source"] = str(args.source)
    t0 = time.monotonic()
    try:
        if not args.skip_ingest:
            for rep in range(1, args.reps + 1):
                order = ("bridge", "bare") if rep % 2 else ("bare", "bridge")
                if args.yardstick:
                    order = (*order, "yardstick")
                for kind in order:
                    print(f"[{time.monotonic() - t0:6.1f}s] ingest rep {rep}: {kind} ...", file=sys.stderr, flush=True)
                    run = ingest_run(kind, rep, args, workdir)
                    result["ingest"].append(run)
                    print(f"          {run['load']['accepted_per_s']:,.0f} accepted/s, p99 {run['load']['p99_ms']:.1f} ms, "
                          f"peak RSS {run['peak_rss_mb_load']:.0f} MB, generator CPU {run['load']['gen_cpu_pct']:.0f} %",
                          file=sys.stderr, flush=True)
            result["summary"] = summarize(result["ingest"])
        if args.exact > 0:
            print(f"[{time.monotonic() - t0:6.1f}s] exact accounting ({args.exact} requests) ...", file=sys.stderr, flush=True)
            result["exact"] = exact_phase(args, workdir)
        if args.latency_duration > 0 and args.latency_rate > 0:
            print(f"[{time.monotonic() - t0:6.1f}s] reply latency ...", file=sys.stderr, flush=True)
            result["latency"] = latency_phase(args, workdir)
        if args.profile:
            print(f"[{time.monotonic() - t0:6.1f}s] profile run (py-spy) ...", file=sys.stderr, flush=True)
            result["profile"] = ingest_run("bridge", 0, args, workdir, profile=True)
    finally:
        fingerprints = {r.get("code") for r in result["ingest"] + [result.get("exact") or {}, result.get("latency") or {},
                                                                    result.get("profile") or {}] if r.get("code")}
        code["fingerprints_seen"] = sorted(fingerprints)
        code["changed_during_session"] = len(fingerprints | {code["fingerprint_at_start"]}) > 1
        if code["changed_during_session"]:
            print("WARNING: the service code changed during the session; runs measured different code "
                  "(see code.fingerprints_seen and each run's 'code'); use --rev", file=sys.stderr)
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)
        result["wall_s"] = time.monotonic() - t0
        out = args.out or RESULTS / f"ingest-{started.strftime('%Y%m%dT%H%M%SZ')}.json"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=1, default=str))
        print(f"results: {out}", file=sys.stderr)
    print(markdown(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
