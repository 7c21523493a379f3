"""Running shell commands, recorded on disk, so the next start ends what a killed service left.

The shell runtime ends a command's process group when its turn is stopped, times out or is
cancelled. A service killed outright (SIGKILL, the OOM killer, a crash) does none of that: bash is
adopted by init and runs on, while the next start tells the chat the turn was interrupted, and a
person who sends it again runs it twice at once. So each command leaves a small file here until
its turn has ended it, and the runtime's start kills every command still recorded, before
recovery says anything.

The record is written before the fork, with the command's mark: a variable in its environment
(`AGENT_BRIDGE_RUN`), which bash and what it starts inherit. Right after the fork it is written
again with bash's pid, which is its process group's id (bash leads a session of its own), and
what tells that process from a later one given the same pid: its start time (/proc/<pid>/stat
field 22, clock ticks since boot) and the boot's id. So a service killed at any moment leaves a
record that finds its command: the group is killed whole when its bash is still the recorded
process, and every process carrying the mark is killed too, which reaches what is left when bash
is gone already (a child holding the output pipe) or a process that left the group (`setsid`).
Only a process that cleared its environment outside the group escapes.

A record also names the process that wrote it: while that one runs (another process on the same
data dir: `agent-bridge routines run` beside the service), its records are its own business. Each
replica has a data dir of its own, so a replica only ever ends its own commands.

Not fsynced: a killed process loses nothing the kernel has taken, and a machine that goes down
takes the commands with it (the boot id tells the next start so).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from loguru import logger

MARK_VARIABLE = "AGENT_BRIDGE_RUN"
GONE_WAIT = 2.0  # seconds to wait for what was killed to be gone, before recovery speaks


@dataclass(frozen=True, slots=True)
class Record:
    pid: int | None  # bash's, and its process group's id (None until the fork has returned)
    started: int | None  # the pid's start time, in clock ticks since boot
    boot: str
    mark: str
    owner: tuple[int, int]  # the recording process: pid, start time
    session: int
    turn: int


def new_mark() -> str:
    return secrets.token_hex(8)


def start_time(pid: int) -> int | None:
    """When the process started (clock ticks since boot), or None when there is no such process.
    A zombie has one still: until it is reaped its pid is not given out again."""
    fields = _stat(pid)
    return None if fields is None else int(fields[19])


def running(pid: int, started: int) -> bool:
    """The process that started at `started` is there and not a zombie."""
    fields = _stat(pid)
    return fields is not None and fields[0] != "Z" and int(fields[19]) == started


def _stat(pid: int) -> list[str] | None:
    """/proc/<pid>/stat's fields from the third (state) on: the command name before them may hold
    spaces and parentheses, so the split is at its last ')'."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:  # gone (ENOENT, ESRCH)
        return None
    return data.rsplit(b")", 1)[1].decode().split()


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class CommandRecords:
    """One file per running command, under `directory` (the data dir's `running-commands`)."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self._boot = _boot_id()
        self._owner = (os.getpid(), start_time(os.getpid()) or 0)

    def add(self, mark: str, *, session: int, turn: int) -> Record:
        """Before the fork (on the spawner thread): the command's mark, so that a process killed at
        any moment from now on leaves a record that finds it. OSError when it cannot be written."""
        record = Record(None, None, self._boot, mark, self._owner, session, turn)
        self._write(record)
        return record

    def started(self, record: Record, pid: int) -> Record:
        """Right after the fork: bash's pid and start time, for the group kill."""
        started = start_time(pid)  # a child not waited for yet is there, if only as a zombie
        if started is None:
            raise FileNotFoundError(f"/proc/{pid}/stat")
        record = replace(record, pid=pid, started=started)
        self._write(record)
        return record

    def _write(self, record: Record) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self._path(record.mark)
        partial = path.with_suffix(".partial")
        partial.write_text(json.dumps(asdict(record)))
        os.replace(partial, path)  # the next start reads a whole record or none

    def remove(self, record: Record) -> None:
        """The command's turn has ended it (or it exited): its record goes."""
        try:
            self._path(record.mark).unlink()
        except FileNotFoundError:
            pass

    def end_left_behind(self) -> int:
        """At start: kill every recorded command whose recorder is gone (SIGKILL to its process
        group and to every process carrying its mark), wait until they are gone, and drop their
        records. Blocking (it reads /proc): run it on a thread. The number of commands that were
        still running."""
        records = [r for r in self._read_all() if not self._recorder_runs(r)]
        ours = [r for r in records if r.boot == self._boot]  # the others went down with their machine
        # the processes are listed before any is killed: a killed one may be gone from /proc already
        found = self._find(ours) if ours else []
        killed: dict[int, int] = {}  # pid -> start time, to see each one go
        groups: set[int] = set()
        ended: set[str] = set()
        for record in ours:
            if record.pid is not None and start_time(record.pid) == record.started:  # bash there, if only as a zombie
                _kill(os.killpg, record.pid)
                groups.add(record.pid)
                killed[record.pid] = record.started
                ended.add(record.mark)
                logger.bind(session=record.session, turn=record.turn).warning(
                    "shell: killed process group {}, a command the last run left running", record.pid)
        for pid, started, group, record in found:
            if group in groups:  # killed with its group
                killed[pid] = started
            elif record is not None:
                _kill(os.kill, pid)
                killed[pid] = started
                ended.add(record.mark)
                logger.bind(session=record.session, turn=record.turn).warning(
                    "shell: killed process {}, left running by a command of the last run ({})", pid,
                    "its pid not recorded yet" if record.pid is None else f"outside its process group {record.pid}")
        _wait_gone(killed, GONE_WAIT)
        for record in records:
            self.remove(record)
        return len(ended)

    def _path(self, mark: str) -> Path:
        return self.directory / f"{mark}.json"

    def _read_all(self) -> list[Record]:
        try:
            paths = sorted(self.directory.glob("*.json"))
        except OSError:
            return []
        records = []
        for path in paths:
            try:
                data = json.loads(path.read_text())
                data["owner"] = tuple(data["owner"])
                records.append(Record(**data))
            except (OSError, ValueError, TypeError, KeyError):
                logger.warning("shell: {} is not a command record; removed", path.name)
                path.unlink(missing_ok=True)
        for partial in self.directory.glob("*.partial"):  # a recorder killed while writing one
            try:
                if time.time() - partial.stat().st_mtime > 60:  # not one being written now
                    partial.unlink()
            except FileNotFoundError:
                pass
        return records

    def _recorder_runs(self, record: Record) -> bool:
        """The process that wrote the record still runs (this one, or another on the same data dir)."""
        pid, started = record.owner
        return record.boot == self._boot and running(pid, started)

    def _find(self, records: list[Record]) -> list[tuple[int, int, int, Record | None]]:
        """The live processes of the records' commands: in one of their process groups, or carrying
        one of their marks in the environment (then the record is given). Each as (pid, start time,
        process group, record or None). Processes that started before the oldest command (or its
        recorder, when the fork's pid did not make it to the record) are not looked at."""
        oldest = min(r.owner[1] if r.started is None else r.started for r in records)
        groups = {r.pid for r in records if r.pid is not None}
        marks = {f"{MARK_VARIABLE}={r.mark}".encode(): r for r in records}
        found: list[tuple[int, int, int, Record | None]] = []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) == os.getpid():
                continue
            fields = _stat(int(entry))
            if fields is None or fields[0] == "Z" or int(fields[19]) < oldest:
                continue
            try:
                with open(f"/proc/{entry}/environ", "rb") as f:
                    variables = f.read().split(b"\0")
            except OSError:  # gone, or not ours to read (another user's)
                variables = []
            record = next((marks[v] for v in variables if v in marks), None)
            group = int(fields[2])
            if record is not None or group in groups:
                found.append((int(entry), int(fields[19]), group, record))
        return found


def _kill(how, pid: int) -> None:
    try:
        how(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _wait_gone(processes: dict[int, int], timeout: float) -> None:
    """Until every one of the processes (pid -> start time) is gone or a zombie, or `timeout`."""
    deadline = time.monotonic() + timeout
    left = dict(processes)
    while left and time.monotonic() < deadline:
        left = {pid: started for pid, started in left.items() if running(pid, started)}
        if left:
            time.sleep(0.01)
    if left:
        logger.error("shell: processes {} were killed but are still there after {:g}s", sorted(left), timeout)
