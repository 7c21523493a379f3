"""Running shell commands recorded on disk, and what the next start does with the records a killed
process left: it kills what is still that command's, and nothing else (a pid given to another
process since, the commands of a process that still runs)."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from dataclasses import asdict
from pathlib import Path

import pytest
from loguru import logger

from bridge.runtimes.shell_records import MARK_VARIABLE, CommandRecords, Record, new_mark, start_time
from tests.support.commands import running

BOOT = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
GONE = (os.getpid(), 0)  # a recorder that is no longer running: this pid, started at another time


def left_behind(directory: Path, pid: int | None, mark: str, *, started: int | None = None, boot: str = BOOT,
                owner: tuple[int, int] = GONE) -> Record:
    """A record as a killed process leaves it (`pid` None: killed before the fork returned)."""
    if pid is not None and started is None:
        started = start_time(pid)
    record = Record(pid=pid, started=started, boot=boot, mark=mark, owner=owner, session=7, turn=9)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{mark}.json").write_text(json.dumps(asdict(record)))
    return record


def spawn(script: str, mark: str | None = None) -> subprocess.Popen[bytes]:
    """bash in a session of its own, as the shell runtime starts it (with its mark, if given)."""
    env = {**os.environ, MARK_VARIABLE: mark} if mark else {k: v for k, v in os.environ.items() if k != MARK_VARIABLE}
    return subprocess.Popen(["bash", "-c", script], stdout=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            start_new_session=True, env=env)


async def gone(pid: int, timeout: float = 5.0) -> bool:
    async with asyncio.timeout(timeout):
        while running(pid):
            await asyncio.sleep(0.02)
    return True


@pytest.fixture
def warnings():
    seen: list[dict] = []
    sink = logger.add(lambda m: seen.append(m.record), level="WARNING")
    yield seen
    logger.remove(sink)


@pytest.fixture
def processes():
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for process in started:
        try:
            os.killpg(process.pid, 9)
        except ProcessLookupError:
            pass
        process.wait()
        process.stdout.close()


async def test_a_group_left_running_is_killed_whole_at_start_and_says_whose_it_was(tmp_path, processes, warnings):
    mark = new_mark()
    bash = spawn("sleep 300 & echo $!; wait", mark)
    processes.append(bash)
    child = int(bash.stdout.readline())
    left_behind(tmp_path, bash.pid, mark)
    assert await asyncio.to_thread(CommandRecords(tmp_path).end_left_behind) == 1
    assert not running(bash.pid) and await gone(child)
    assert list(tmp_path.iterdir()) == []
    said = [w for w in warnings if "killed process group" in w["message"]]
    assert len(said) == 1 and (said[0]["extra"]["session"], said[0]["extra"]["turn"]) == (7, 9)


async def test_a_recorded_pid_that_another_process_has_now_is_not_killed(tmp_path, processes):
    """The same pid, started at another time (the command ended, the pid was given out again),
    leading a group of its own: neither it nor its group is touched. Nor one of another boot."""
    other = spawn("exec sleep 300")  # no mark: not a command of ours
    processes.append(other)
    started = start_time(other.pid)
    left_behind(tmp_path, other.pid, new_mark(), started=started - 1)
    left_behind(tmp_path, other.pid, new_mark(), boot="another-boot")
    assert await asyncio.to_thread(CommandRecords(tmp_path).end_left_behind) == 0
    await asyncio.sleep(0.2)
    assert running(other.pid) and start_time(other.pid) == started
    assert list(tmp_path.iterdir()) == []  # the records are dropped all the same


async def test_what_a_command_left_after_its_bash_went_is_found_by_its_mark(tmp_path, processes, warnings):
    """bash exited (its children hold on), or a child left the group: the mark in their
    environment says whose they are."""
    mark = new_mark()
    bash = spawn("sleep 300 >/dev/null 2>&1 & echo $!; setsid sleep 301 >/dev/null 2>&1 & echo $!", mark)
    processes.append(bash)
    children = [int(bash.stdout.readline()), int(bash.stdout.readline())]
    record = left_behind(tmp_path, bash.pid, mark)
    bash.wait()  # bash is gone and reaped: its pid leads nothing
    stranger = spawn("exec sleep 302", new_mark())  # another command's mark
    processes.append(stranger)
    assert await asyncio.to_thread(CommandRecords(tmp_path).end_left_behind) == 1
    assert all([await gone(pid) for pid in children])
    assert running(stranger.pid)
    said = [w for w in warnings if "outside its process group" in w["message"]]
    assert len(said) == 2
    assert all((w["extra"]["session"], w["extra"]["turn"]) == (record.session, record.turn) for w in said)


async def test_a_command_recorded_just_before_its_fork_is_found_by_its_mark(tmp_path, processes, warnings):
    """The service killed between the record's first write and the fork's return: the record has
    the mark only, and that is enough."""
    mark = new_mark()
    bash = spawn("sleep 303 & echo $!; wait", mark)
    processes.append(bash)
    child = int(bash.stdout.readline())
    left_behind(tmp_path, None, mark, owner=(os.getpid(), start_time(bash.pid) - 1))  # started just before
    assert await asyncio.to_thread(CommandRecords(tmp_path).end_left_behind) == 1
    assert await gone(bash.pid) and await gone(child)
    assert list(tmp_path.iterdir()) == []
    assert len([w for w in warnings if "its pid not recorded yet" in w["message"]]) == 2


async def test_the_commands_of_a_process_that_still_runs_are_left_alone(tmp_path, processes):
    """Another process on the same data dir (`agent-bridge routines run` beside the service) is
    running its command: its start ends nothing of it."""
    mark = new_mark()
    bash = spawn("exec sleep 300", mark)
    processes.append(bash)
    left_behind(tmp_path, bash.pid, mark, owner=(os.getpid(), start_time(os.getpid())))
    assert await asyncio.to_thread(CommandRecords(tmp_path).end_left_behind) == 0
    assert running(bash.pid) and (tmp_path / f"{mark}.json").exists()
