"""The service's processes as the benchmarks measure them: the service itself plus its HTTP edge
workers (`python -m bridge.edge`, named `bridge-edge`), read from /proc. Memory is reported two ways: the sum of their
RSS (counts pages they share, such as the interpreter and libraries, once per process) and the
sum of their PSS (each shared page split between the processes that map it: the total the
service really holds)."""

from __future__ import annotations

import os
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


def children(pid: int) -> list[int]:
    out: list[int] = []
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            out.extend(int(c) for c in (task / "children").read_text().split())
    except OSError:
        pass
    return out


def _ours(pid: int) -> bool:
    try:
        comm = Path(f"/proc/{pid}/comm").read_bytes().strip()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return comm == b"bridge-edge" or b"bridge.edge" in cmdline


def service_pids(pid: int) -> list[int]:
    """The service and its edge workers (not the commands its turns run)."""
    pids = [pid]
    pending = children(pid)
    while pending:
        child = pending.pop()
        if _ours(child):
            pids.append(child)
            pending.extend(children(child))
    return pids


def proc_times(pid: int) -> tuple[float, float, float] | None:
    """(own CPU s incl. threads, reaped children's CPU s, own system-mode CPU s) of a process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return None
    own = (int(fields[11]) + int(fields[12])) / TICK
    reaped = (int(fields[13]) + int(fields[14])) / TICK
    return own, reaped, int(fields[12]) / TICK


def tree_times(pids: list[int]) -> tuple[float, float, float] | None:
    """proc_times summed over processes (None when the first is gone)."""
    first = proc_times(pids[0])
    if first is None:
        return None
    own, reaped, system = first
    for pid in pids[1:]:
        t = proc_times(pid)
        if t is not None:
            own, reaped, system = own + t[0], reaped + t[1], system + t[2]
    return own, reaped, system


def rss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def pss_kb(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def memory_kb(pids: list[int]) -> tuple[int, int] | None:
    """(sum of RSS, sum of PSS) in KiB over the processes (None when the first is gone)."""
    rss, pss = rss_kb(pids[0]), pss_kb(pids[0])
    if rss is None or pss is None:
        return None
    for pid in pids[1:]:
        rss += rss_kb(pid) or 0
        pss += pss_kb(pid) or 0
    return rss, pss
