"""The shell runtime on its own, with real bash: stops that come before the process exists,
process groups that must not outlive their turn, the records that let the next start end them
after a crash, output the store can keep, the reply's note."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path

from bridge.runtimes.base import Approval, ApprovalRequest, Decision, TurnRequest
from bridge.runtimes.shell import ShellRuntime
from bridge.runtimes.shell_records import CommandRecords, Record, start_time



class Context:
    """The pipeline's side of a turn: approves (when `approved` is set) and records progress."""

    def __init__(self) -> None:
        self.approved = asyncio.Event()
        self.approved.set()
        self.asked: list[ApprovalRequest] = []
        self.progressed: list[str] = []
        self.started = asyncio.Event()

    async def progress(self, text: str) -> None:
        self.progressed.append(text)
        self.started.set()

    async def ask_approval(self, request: ApprovalRequest) -> Approval:
        self.asked.append(request)
        await self.approved.wait()  # as after a person's click, while the turn waits for a slot
        return Approval(Decision.APPROVE)

    async def bind_thread(self, thread_id: str, **_kw) -> None:
        return None

    async def notice(self, text: str) -> None:
        return None


def request(workspace: Path, text: str, session_id: int = 1) -> TurnRequest:
    return TurnRequest(turn_id=1, session_id=session_id, runtime_thread_id=None, workspace=str(workspace), text=text,
                       sender_id="webchat:alice", sender_name="alice", is_group=False)


def alive(pid: int) -> bool:
    """Running, as opposed to gone or a zombie waiting for a parent that may never reap it."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


async def pid_from(ctx: Context) -> int:
    async with asyncio.timeout(10):
        while True:
            for text in ctx.progressed:
                for word in text.split():
                    if word.startswith("pid=") and word[4:].isdigit():
                        return int(word[4:])
            await asyncio.sleep(0.02)


async def test_a_stop_between_the_approval_and_the_process_keeps_the_command_from_running(tmp_path):
    runtime = ShellRuntime(timeout=30, output_limit=1000)
    ctx = Context()
    ctx.approved.clear()
    turn = asyncio.create_task(runtime.run_turn(request(tmp_path, "touch made"), ctx))
    async with asyncio.timeout(5):
        while not ctx.asked:
            await asyncio.sleep(0.01)
    assert await runtime.interrupt(1) is True  # the card was approved; the turn waits for a slot
    ctx.approved.set()
    outcome = await asyncio.wait_for(turn, 10)
    assert outcome.status == "stopped" and "Not run" in outcome.text
    assert not (tmp_path / "made").exists()
    assert await runtime.interrupt(1) is False  # nothing left to stop
    await runtime.stop()


async def test_stop_ends_what_ignores_sigterm_and_what_the_command_started(tmp_path):
    runtime = ShellRuntime(timeout=60, output_limit=1000)
    ctx = Context()
    turn = asyncio.create_task(runtime.run_turn(
        request(tmp_path, "trap '' TERM; sleep 300 & echo pid=$!; wait"), ctx))
    child = await pid_from(ctx)
    assert alive(child)
    assert await runtime.interrupt(1) is True
    outcome = await asyncio.wait_for(turn, 10)
    assert outcome.status == "stopped"
    async with asyncio.timeout(5):
        while alive(child):
            await asyncio.sleep(0.05)
    await runtime.stop()


async def test_shutdown_leaves_no_process_behind(tmp_path):
    """The turn cancelled (the dispatcher's close), then the runtime stopped, at once: a command
    that ignores SIGTERM is killed and reaped all the same."""
    runtime = ShellRuntime(timeout=60, output_limit=1000)
    ctx = Context()
    turn = asyncio.create_task(runtime.run_turn(request(tmp_path, "trap '' TERM; echo pid=$$; exec sleep 1234"), ctx))
    pid = await pid_from(ctx)
    turn.cancel()
    await asyncio.gather(turn, return_exceptions=True)
    await runtime.stop()
    assert not alive(pid)


async def test_output_with_nul_bytes_is_kept_as_text_the_store_takes(tmp_path):
    runtime = ShellRuntime(timeout=30, output_limit=1000)
    outcome = await runtime.run_turn(request(tmp_path, "head -c 4 /dev/zero; echo end"), Context())
    assert outcome.status == "completed"
    assert "\x00" not in outcome.text and "\x00" not in (outcome.output or "")
    assert "\ufffd" * 4 + "end" in outcome.output
    await runtime.stop()


async def test_the_reply_says_how_much_it_does_not_show(tmp_path):
    runtime = ShellRuntime(timeout=30, output_limit=100)
    short = await runtime.run_turn(request(tmp_path, "echo hello"), Context())
    assert "hello" in short.text and "truncated" not in short.text
    ctx = Context()
    long = await runtime.run_turn(request(tmp_path, "seq 1 100000"), ctx)
    total = len("".join(f"{i}\n" for i in range(1, 100001)).encode())
    shown = long.text.split("```")[1].strip("\n")
    assert shown.endswith("100000") and len(shown) <= 100
    assert f"the first {total - len(shown) - 1} bytes are not shown" in long.text  # the last newline is not shown
    assert len(long.output.splitlines()) == 100000
    assert all(len(p.split("```")[1]) <= 110 for p in ctx.progressed)
    await runtime.stop()


async def test_a_command_is_recorded_while_it_runs_and_not_after(tmp_path):
    records = tmp_path / "records"
    runtime = ShellRuntime(timeout=30, output_limit=1000, records=CommandRecords(records))
    ctx = Context()
    turn = asyncio.create_task(runtime.run_turn(request(tmp_path, "echo pid=$$; echo $AGENT_BRIDGE_RUN; sleep 0.5"), ctx))
    pid = await pid_from(ctx)
    [path] = records.iterdir()
    saved = json.loads(path.read_text())
    assert saved["pid"] == pid and saved["started"] == start_time(pid) and saved["owner"][0] == os.getpid()
    assert (saved["session"], saved["turn"]) == (1, 1)
    outcome = await asyncio.wait_for(turn, 10)
    assert outcome.status == "completed" and saved["mark"] in outcome.text
    assert list(records.iterdir()) == []
    # stopped, it goes too
    ctx = Context()
    turn = asyncio.create_task(runtime.run_turn(request(tmp_path, "echo pid=$$; exec sleep 300"), ctx))
    await pid_from(ctx)
    assert len(list(records.iterdir())) == 1
    await runtime.interrupt(1)
    assert (await asyncio.wait_for(turn, 10)).status == "stopped"
    assert list(records.iterdir()) == []
    await runtime.stop()


class Watched(CommandRecords):
    """Records that also remember every pid they were given."""

    def __init__(self, directory: Path) -> None:
        super().__init__(directory)
        self.pids: list[int] = []

    def started(self, record: Record, pid: int) -> Record:
        self.pids.append(pid)
        return super().started(record, pid)


async def test_a_command_whose_turn_is_cancelled_while_bash_is_forked_is_ended_when_it_exists(tmp_path):
    """The turn is cancelled (shutdown) while its spawn waits on the spawner thread: bash starts
    all the same, and is ended at once rather than left to run unwatched."""
    records = Watched(tmp_path / "records")
    runtime = ShellRuntime(timeout=30, output_limit=1000, records=records)
    loop = asyncio.get_running_loop()
    release = asyncio.Event()
    busy = loop.run_in_executor(runtime._spawner, lambda: asyncio.run_coroutine_threadsafe(release.wait(), loop).result())
    turn = asyncio.create_task(runtime.run_turn(request(tmp_path, "trap '' TERM; exec sleep 1235"), Context()))
    await asyncio.sleep(0.1)  # the turn waits for the spawner
    turn.cancel()
    await asyncio.gather(turn, return_exceptions=True)
    release.set()
    await busy
    await loop.run_in_executor(runtime._spawner, lambda: None)  # the spawn has run
    assert len(records.pids) == 1
    try:
        await runtime.stop()  # waits for it to be ended
        assert not alive(records.pids[0])
        assert list(records.directory.iterdir()) == []
    finally:
        if alive(records.pids[0]):
            os.killpg(records.pids[0], 9)
