"""The shell runtime: each message is a bash command run in the session's workspace.

ChatOps and the zero-credential first run. Every command goes to the human gate, whose rules let
read-only commands run at once (by default), refuse dangerous ones, and ask a person for the rest. Each command runs in its own process group so `/stop`
and the timeout kill everything it started. Output streams into the reply as a code block; long
output is cut to its tail in chat and kept whole (up to `KEEP_BYTES`) in the turn ledger.
While a command runs it is recorded in the data dir (bridge/runtimes/shell_records.py): a service
killed outright cannot end it, so the next start does, before recovery says the turn was
interrupted.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from loguru import logger

from bridge.markdown import code, fence
from bridge.processes import exited
from bridge.runtimes.base import (
    Approval,
    ApprovalRequest,
    Decision,
    TurnContext,
    TurnOutcome,
    TurnRequest,
    storable,
)
from bridge.runtimes.shell_records import MARK_VARIABLE, CommandRecords, Record, new_mark

KEEP_BYTES = 4 * 1024 * 1024
SECRET_ENV_PREFIXES = ("BRIDGE_", "FEISHU_", "SLACK_", "OPENAI_", "ANTHROPIC_", "CODEX_")
KILL_GRACE = 0.5


# The files that came with the message, one path a line (a file's name is the one it was sent
# with, in a folder of its own): `cat "$BRIDGE_FILES"` for one, `xargs -d '\n' wc -l < <(...)` etc.
FILES_VARIABLE = "BRIDGE_FILES"


def _file_paths(request: TurnRequest) -> str:
    return "\n".join(f.path for f in request.files if f.path)


def _clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(SECRET_ENV_PREFIXES)}


class _Run:
    """A session's command from the moment it is asked for: `/stop` before its process exists
    (while its approval is decided, or it waits for a slot or the spawner) still stops it."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.stopped = False


class ShellRuntime:
    name = "shell"
    # a message is a command line (a file alone is not a turn); the files that come with a command
    # stay where the channel saved them, their paths in $BRIDGE_FILES
    accepts_files = False

    def __init__(self, *, timeout: float, output_limit: int, bash: str = "bash",
                 records: CommandRecords | None = None) -> None:
        self.timeout = timeout
        self.output_limit = output_limit
        self.bash = bash
        self.records = records  # None: not recorded (a process killed outright leaves its commands running)
        self._runs: dict[int, _Run] = {}
        self._ending: set[asyncio.Task[None]] = set()  # commands whose turn was gone before they started
        self._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="shell-spawn")

    async def start(self) -> None:
        """Kill what the last run of this process left running (it was killed, or crashed): before
        recovery tells the chat those turns were interrupted, they are no longer running."""
        if self.records is not None:
            await asyncio.to_thread(self.records.end_left_behind)

    async def stop(self) -> None:
        """Every command still running is ended (its whole process group), and waited for."""
        runs = list(self._runs.values())
        for run in runs:
            run.stopped = True
        await asyncio.gather(*(_terminate(run.process) for run in runs if run.process is not None),
                             *self._ending)
        self._spawner.shutdown(wait=False)

    async def health(self) -> dict[str, Any]:
        from shutil import which

        path = which(self.bash)
        return {"ok": path is not None, "bash": path, "running": len(self._runs)}

    async def interrupt(self, session_id: int) -> bool:
        run = self._runs.get(session_id)
        if run is None or run.stopped:
            return False
        run.stopped = True
        if run.process is not None:
            _stop_soon(run.process)
        return True

    async def run_turn(self, request: TurnRequest, ctx: TurnContext) -> TurnOutcome:
        command = request.text.strip()
        if not command:
            return TurnOutcome("completed", "Send a shell command, e.g. `ls` or `git status`.")
        run = self._runs[request.session_id] = _Run()
        try:
            # The gate's rules decide what runs at once (by default: read-only commands), what is
            # refused, and what asks a person.
            approval = await ctx.ask_approval(
                ApprovalRequest(
                    kind="command",
                    summary=f"Run {code(command)}" if len(command) < 200 else "Run a shell command",
                    detail={"command": command, "cwd": request.workspace},
                )
            )
            if not approval.allows:
                return self._not_run(command, approval)
            if run.stopped:
                return self._not_run(command, Approval(Decision.STOP, "Stopped before it started."))
            return await self._execute(request, command, ctx, run)
        finally:
            if self._runs.get(request.session_id) is run:
                del self._runs[request.session_id]

    @staticmethod
    def _not_run(command: str, approval: Approval) -> TurnOutcome:
        why = {
            Decision.DENY: "denied",
            Decision.STOP: "stopped",
            Decision.EXPIRED: "the approval expired",
            Decision.INTERRUPTED: "the approval was interrupted",
        }.get(approval.decision, approval.decision.value)
        status = "stopped" if approval.decision is Decision.STOP else "completed"
        reason = f"\n{approval.reason}" if approval.reason else ""
        return TurnOutcome(status, f"Not run ({why}): {code(command)}{reason}")

    async def _spawn(self, request: TurnRequest, command: str
                     ) -> tuple[subprocess.Popen[bytes], Record | None, asyncio.StreamReader]:
        """Start bash in its own process group, recorded. The fork happens on the spawner thread (it
        releases the GIL), so a burst of commands never stalls the event loop that acknowledges
        messages."""
        loop = asyncio.get_running_loop()
        spawning = loop.run_in_executor(self._spawner, self._start_recorded, request, command)
        try:
            process, record = await asyncio.shield(spawning)
        except asyncio.CancelledError:
            # The turn is gone (shutdown) while bash was being forked: it starts all the same, so it
            # is ended as soon as it exists rather than left to run unwatched.
            spawning.add_done_callback(
                lambda f: f.cancelled() or f.exception() is not None or self._end_unwatched(*f.result()))
            raise
        try:
            reader = asyncio.StreamReader(limit=KEEP_BYTES)
            await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), process.stdout)
        except BaseException:
            self._end_unwatched(process, record)
            raise
        return process, record, reader

    def _start_recorded(self, request: TurnRequest, command: str) -> tuple[subprocess.Popen[bytes], Record | None]:
        """On the spawner thread: the command recorded, bash started, and its pid recorded, so a
        service killed at any point leaves a record that finds it. A command that cannot be
        recorded does not run: nothing would end it after a crash."""
        mark = new_mark()
        record = None if self.records is None else self.records.add(
            mark, session=request.session_id, turn=request.turn_id)
        try:
            process = subprocess.Popen(
                [self.bash, "-c", command], cwd=request.workspace, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT, start_new_session=True,
                env={**_clean_env(), MARK_VARIABLE: mark, FILES_VARIABLE: _file_paths(request)},
            )
        except BaseException:
            self._forget(record)
            raise
        if self.records is None or record is None:
            return process, None
        try:
            return process, self.records.started(record, process.pid)
        except OSError:
            _signal_group(process, signal.SIGKILL)
            process.wait()
            process.stdout.close()  # type: ignore[union-attr]
            self._forget(record)
            raise

    def _end_unwatched(self, process: subprocess.Popen[bytes], record: Record | None) -> None:
        """End, in the background, a command that started for a turn no longer there to watch it."""
        async def end() -> None:
            process.stdout.close()  # type: ignore[union-attr]
            await _terminate(process)
            self._forget(record)

        task = asyncio.ensure_future(end())
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    def _forget(self, record: Record | None) -> None:
        if record is not None and self.records is not None:
            self.records.remove(record)

    async def _execute(self, request: TurnRequest, command: str, ctx: TurnContext, run: _Run) -> TurnOutcome:
        os.makedirs(request.workspace, exist_ok=True)
        process, record, reader = await self._spawn(request, command)
        run.process = process
        started = time.monotonic()
        buffer = bytearray()
        dropped = 0
        timed_out = False
        log = logger.bind(session=request.session_id, turn=request.turn_id)
        log.debug("shell: started pid {}", process.pid)
        try:
            if run.stopped:  # stopped while it was being spawned
                _stop_soon(process)
            async with asyncio.timeout(self.timeout):
                while chunk := await reader.read(65536):
                    buffer += chunk
                    if len(buffer) > KEEP_BYTES:
                        cut = len(buffer) - KEEP_BYTES
                        del buffer[:cut]
                        dropped += cut
                    await ctx.progress(self._render(command, buffer, dropped, running=True))
                await exited(process)
        except TimeoutError:
            timed_out = True
        finally:
            # a timeout, a stop (bash may be gone, what it started not), or the turn cancelled
            # (shutdown): the whole group goes, and is waited for, so nothing outlives the turn
            try:
                if process.returncode is None or timed_out or run.stopped:
                    await asyncio.shield(_terminate(process))
            finally:
                self._forget(record)  # ended, or exited: nothing for the next start to end
        elapsed = time.monotonic() - started
        output = storable(buffer.decode("utf-8", errors="replace"))
        if dropped:
            output = f"[first {dropped} bytes not kept]\n" + output
        if run.stopped:
            note = f"Stopped after {elapsed:.1f}s."
            return TurnOutcome("stopped", self._render(command, buffer, dropped, note=note), output=output)
        if timed_out:
            note = f"Timed out after {self.timeout:g}s; the process group was killed."
            return TurnOutcome("failed", self._render(command, buffer, dropped, note=note), output=output,
                               error="timeout")
        code = process.returncode
        note = f"exit {code} · {elapsed:.1f}s"
        attached = sum(1 for f in request.files if f.path)
        if attached:  # where the message's files were for the command (their names stay theirs)
            note += f" · 📎 {attached} file{'s' if attached != 1 else ''} in `${FILES_VARIABLE}`"
        return TurnOutcome("completed", self._render(command, buffer, dropped, note=note), output=output)

    def _render(self, command: str, data: bytes | bytearray, dropped: int = 0, *, running: bool = False,
                note: str = "") -> str:
        """The reply: the output's end (at most `output_limit` characters), and how much is not
        shown. Only the end is decoded (a character is at most 4 bytes), so a command that pours
        out megabytes costs the loop the same per chunk as one that prints a line."""
        start = max(0, len(data) - self.output_limit * 4)
        text = bytes(data[start:]).decode("utf-8", errors="replace")
        hidden = dropped + start
        if len(text) > self.output_limit:
            hidden += len(text[:-self.output_limit].encode("utf-8", errors="replace"))
            text = text[-self.output_limit:]
        text = storable(text).rstrip("\n")
        cut_note = ""
        if hidden:
            cut_note = f"\n_Output truncated: the first {hidden} bytes are not shown; `/output` shows more of it._"
        status = "_running…_" if running else note
        return f"{fence(text)}{cut_note}\n{status}".strip()


def _signal_group(process: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def _stop_soon(process: subprocess.Popen[bytes]) -> None:
    """`/stop`: SIGTERM to the group now, SIGKILL after KILL_GRACE (the turn's loop, which reads
    the output to its end, then finishes it)."""
    _signal_group(process, signal.SIGTERM)
    asyncio.get_running_loop().call_later(KILL_GRACE, _signal_group, process, signal.SIGKILL)


async def _terminate(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM to the command's process group, SIGKILL after KILL_GRACE if bash is still there,
    and bash reaped. SIGKILL goes to the group even when bash left at once: what it started may
    have stayed (a trapped TERM, a child of its own)."""
    _signal_group(process, signal.SIGTERM)
    try:
        async with asyncio.timeout(KILL_GRACE):
            await exited(process)
    except TimeoutError:
        pass
    _signal_group(process, signal.SIGKILL)
    await exited(process)
