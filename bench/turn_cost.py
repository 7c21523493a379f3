"""CPU the service spends on one message at a steady, low rate, with its `echo` turn. On demand
only; results in docs/benchmarks.md. (Until 2026-12-07 it also ran empty messages, stored and
skipped without a turn, as the ingest path alone; the web chat now refuses a blank message.)

Starts a fresh service (`python -m bridge serve`, one process: BRIDGE_HTTP_WORKERS=0, SQLite,
shell runtime), posts --messages messages open loop at --rate over --convs conversations, waits
until every one is answered (the turns counter), then reads
the service process's CPU from /proc: its own (all threads; the main thread apart) and its reaped
bash children's, each divided by the messages. Before posting, the service's idle CPU is read over
as long as the run takes; `less_idle_ms_per_msg` subtracts it. With --py-spy the threads holding
the GIL are sampled during the run.

    python -m bench.turn_cost                      # 2 runs
    python -m bench.turn_cost --runs 1 --py-spy .venv/bin/py-spy
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import re
import subprocess
import tempfile
import time
from pathlib import Path

import aiohttp

from bench.launcher import ROOT, bridge_process
from bench.procs import TICK, proc_times

_COUNTER = re.compile(r'^(bridge_turns_total|bridge_inbound_events_total)\{([^}]*)\} ([0-9.e+]+)$', re.M)


def _threads(pid: int) -> dict[str, float]:
    """CPU seconds of a process's main thread (the event loop) and of its other threads together
    (the store's driver thread, the shell runtime's spawner, executors)."""
    times: dict[str, float] = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = "main" if task.name == str(pid) else "others"
            fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        times[name] = times.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / TICK
    return times


async def _counts(session: aiohttp.ClientSession, url: str) -> tuple[float, float]:
    """(turns finished, inbound messages accepted) from /metrics."""
    async with session.get(url + "/metrics") as resp:
        text = await resp.text()
    turns = inbound = 0.0
    for name, labels, value in _COUNTER.findall(text):
        if name == "bridge_turns_total":
            turns += float(value)
        elif 'kind="message"' in labels:
            inbound += float(value)
    return turns, inbound


async def _drive(url: str, *, messages: int, rate: float, convs: int, text: str, tag: str) -> float:
    """Post open loop; return seconds until every message was answered."""
    async with aiohttp.ClientSession() as session:
        started = time.monotonic()
        posts = []
        for n in range(messages):
            due = started + n / rate
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            body = {"conversation_id": f"{tag}-c{n % convs}", "user_id": "bench", "client_msg_id": f"{tag}-{n}",
                    "text": text.format(n=n)}
            posts.append(asyncio.create_task(session.post(url + "/chat/api/messages", json=body)))
        for resp in await asyncio.gather(*posts):
            assert resp.status == 202, resp.status
            resp.release()
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            turns, inbound = await _counts(session, url)
            if turns >= messages:
                return time.monotonic() - started
            await asyncio.sleep(0.05)
        raise RuntimeError(f"not answered in time: turns {turns}, inbound {inbound}")


def run_one(args: argparse.Namespace, text: str, workdir: Path, spy: bool) -> dict:
    data = workdir / f"data-{len(list(workdir.iterdir()))}"
    server = bridge_process(data, cpu=None, env={"BRIDGE_HTTP_WORKERS": "0"}).start()
    profile = None
    try:
        time.sleep(1.0)  # start-up work settles
        # the service's own background work (timers, sweeps) over as long as the run will take,
        # with nothing posted: subtracted from the run's CPU to give the messages' own cost
        quiet = args.messages / args.rate
        idle_before = proc_times(server.pid)
        time.sleep(quiet)
        idle = (proc_times(server.pid)[0] - idle_before[0]) / quiet  # CPU s per s
        before = proc_times(server.pid)
        threads_before = _threads(server.pid)
        spy_proc = None
        if spy:
            profile = workdir / f"profile-echo-{time.monotonic_ns()}.txt"
            spy_proc = subprocess.Popen([args.py_spy, "record", "--pid", str(server.pid), "--format", "raw",
                                         "--rate", "1000", "--gil", "--output", str(profile), "--nonblocking"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)
        took = asyncio.run(_drive(server.url, messages=args.messages, rate=args.rate, convs=args.convs, text=text,
                                  tag=data.name))
        after = proc_times(server.pid)
        threads_after = _threads(server.pid)
        if spy_proc is not None:
            spy_proc.send_signal(2)
            spy_proc.wait(30)
    finally:
        server.stop()
    own = after[0] - before[0]
    bash = after[1] - before[1]
    return {"text": "echo", "messages": args.messages, "seconds": round(took, 2),
            "service_cpu_ms_per_msg": round(own * 1000 / args.messages, 3),
            "idle_cpu_ms_per_s": round(idle * 1000, 2),
            "less_idle_ms_per_msg": round((own - idle * took) * 1000 / args.messages, 3),
            "bash_cpu_ms_per_msg": round(bash * 1000 / args.messages, 3),
            "threads_cpu_ms_per_msg": {name: round((spent - threads_before.get(name, 0.0)) * 1000 / args.messages, 3)
                                       for name, spent in threads_after.items()
                                       if spent - threads_before.get(name, 0.0) > 0},
            "profile": str(profile) if profile else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=400)
    parser.add_argument("--rate", type=float, default=40.0, help="messages a second, open loop (default 40)")
    parser.add_argument("--convs", type=int, default=200)
    parser.add_argument("--runs", type=int, default=2, help="runs, each on a fresh service (default 2)")
    parser.add_argument("--py-spy", help="py-spy binary: sample the service's threads in each run (raw stacks)")
    parser.add_argument("--out", type=Path, help="result file (default bench/results/turn-cost-<time>.json)")
    args = parser.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="turn-cost-") as tmp:
        workdir = Path(tmp)
        for _ in range(args.runs):
            result = run_one(args, "echo {n}", workdir, bool(args.py_spy))
            if result["profile"]:
                kept = ROOT / "bench" / "results" / Path(result["profile"]).name
                kept.parent.mkdir(exist_ok=True)
                kept.write_bytes(Path(result["profile"]).read_bytes())
                result["profile"] = str(kept)
            print(json.dumps(result))
            results.append(result)
    out = args.out or ROOT / "bench" / "results" / time.strftime("turn-cost-%Y%m%dT%H%M%SZ.json", time.gmtime())
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps({"machine": platform.uname()._asdict(), "args": vars(args) | {"out": str(out)},
                               "results": results}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
