"""Supervision of one `codex app-server` process: spawn, handshake, stderr to the log, restart.

The supervisor owns the current connection. When the process exits it is started again with
exponential backoff; each successful start bumps `generation` and calls `on_connected`, each loss
calls `on_lost`, so the runtime can tell the conversations that were mid-turn and recover them.
A process that leaves a request unanswered past its timeout is taken as hung (alive, but not
serving): it is killed, and so lost and started again like one that exited. A heartbeat request
on a silent connection finds a hang while nothing else is asked (a turn waiting for its events).
"""

from __future__ import annotations

import asyncio
import os
import random
import shlex
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from bridge import __version__
from bridge.runtimes.codex.rpc import (
    ConnectionClosed, NotificationHandler, RequestHandler, RpcConnection, RpcError, RpcTimeout,
)

INITIALIZE_TIMEOUT = 30.0
STOP_GRACE = 3.0
HEARTBEAT_METHOD = "thread/loaded/list"  # answered from memory; an error answer proves life too


@dataclass(frozen=True, slots=True)
class AppServerConfig:
    binary: str = "codex"
    overrides: Sequence[str] = ()  # `key=value` pairs, each passed as `-c key=value`
    cwd: str | None = None
    env: dict[str, str] | None = None  # None: this process's environment
    restart_base_delay: float = 0.5
    restart_max_delay: float = 30.0
    # a connection silent this long gets a cheap request, which must be answered within the
    # timeout, or the process is taken as hung (0: no heartbeat)
    heartbeat_interval: float = 30.0
    heartbeat_timeout: float = 60.0

    def argv(self) -> list[str]:
        argv = [*shlex.split(self.binary), "app-server"]
        for override in self.overrides:
            argv += ["-c", override]
        return argv


@dataclass(slots=True)
class ServerInfo:
    user_agent: str = ""
    version: str = ""
    codex_home: str = ""
    raw: dict[str, Any] = field(default_factory=dict)


def version_of(user_agent: str) -> str:
    """`bridge/0.169.0 (Debian 12; x86_64) ...` -> `0.169.0`."""
    first = user_agent.split(" ", 1)[0]
    return first.split("/", 1)[1] if "/" in first else ""


class AppServer:
    def __init__(
        self, config: AppServerConfig, *,
        on_notification: NotificationHandler, on_request: RequestHandler,
        on_connected: Callable[[int], Awaitable[None]], on_lost: Callable[[int, str], Awaitable[None]],
    ) -> None:
        self.config = config
        self._on_notification = on_notification
        self._on_request = on_request
        self._on_connected = on_connected
        self._on_lost = on_lost
        self.generation = 0
        self.info = ServerInfo()
        self.connection: RpcConnection | None = None
        self.process: asyncio.subprocess.Process | None = None
        self.restarts = 0
        self.hangs = 0
        self.last_error = ""
        self._hung = ""  # why the current process was killed as hung
        self._ready = asyncio.Event()
        self._ran_long = False
        self._stopping = False
        self._task: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    async def start(self, *, wait: bool = True) -> None:
        self._task = asyncio.create_task(self._supervise(), name="codex:supervise")
        if wait:
            await self.wait_ready(INITIALIZE_TIMEOUT)

    async def wait_ready(self, timeout: float) -> RpcConnection:
        """The live connection, waiting for a (re)start up to `timeout` seconds."""
        try:
            async with asyncio.timeout(timeout):
                await self._ready.wait()
        except TimeoutError:
            raise ConnectionClosed(f"codex app-server is not running ({self.last_error or 'starting'})") from None
        assert self.connection is not None
        return self.connection

    async def _supervise(self) -> None:
        failures = 0
        while not self._stopping:
            try:
                await self._run_once()
                failures = 0 if self.generation and self._ran_long else failures + 1
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - a failed start is retried like an exit
                self.last_error = f"{type(exc).__name__}: {exc}"
                logger.error("codex: app-server failed to start: {}", self.last_error)
                failures += 1
            if self._stopping:
                break
            self.restarts += 1
            ceiling = min(self.config.restart_max_delay, self.config.restart_base_delay * 2 ** max(0, failures - 1))
            delay = random.uniform(ceiling / 2, ceiling)
            logger.warning("codex: restarting app-server in {:.1f}s (restart {})", delay, self.restarts)
            await asyncio.sleep(delay)

    async def _run_once(self) -> None:
        self._ran_long = False
        env = dict(os.environ if self.config.env is None else self.config.env)
        process = await asyncio.create_subprocess_exec(
            *self.config.argv(), stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE, cwd=self.config.cwd, env=env, limit=64 * 1024 * 1024,
            start_new_session=True,
        )
        self.process = process
        assert process.stdout is not None and process.stdin is not None and process.stderr is not None
        stderr_task = asyncio.create_task(self._pump_stderr(process.stderr, process.pid))
        self._hung = ""
        connection = RpcConnection(
            process.stdout, process.stdin,  # type: ignore[arg-type]
            on_notification=self._on_notification, on_request=self._on_request, name=f"codex[{process.pid}]",
            on_timeout=lambda reason: self._kill_hung(connection, process.pid, reason),
        )
        connection.start()
        generation = self.generation + 1
        try:
            result = await connection.request("initialize", {
                "clientInfo": {"name": "agent_bridge", "title": "agent-bridge", "version": __version__},
                "capabilities": {"experimentalApi": True},
            }, timeout=INITIALIZE_TIMEOUT)
            await connection.notify("initialized")
        except BaseException:
            await connection.close()
            await self._terminate(process)
            stderr_task.cancel()
            raise
        result = result or {}
        self.info = ServerInfo(
            user_agent=result.get("userAgent", ""), version=version_of(result.get("userAgent", "")),
            codex_home=result.get("codexHome", ""), raw=result,
        )
        self.generation = generation
        self.connection = connection
        self.last_error = ""
        logger.info("codex: app-server {} ready (pid {}, generation {})", self.info.version or "?", process.pid,
                    generation)
        self._ready.set()
        await self._on_connected(generation)
        loop = asyncio.get_running_loop()
        started = loop.time()
        heartbeat = asyncio.create_task(self._heartbeat(connection), name="codex:heartbeat")
        # The connection ends when nothing holds the app-server's stdout any more: the npm wrapper
        # exits when its native child does, and a child whose wrapper died still serves the pipes.
        try:
            await connection.closed.wait()
        finally:
            heartbeat.cancel()
        self._ready.clear()
        if self._stopping:
            return  # stop() shuts the process down cleanly
        self._kill_group(process.pid)  # whatever is left of it
        code = await process.wait()
        self._ran_long = loop.time() - started > 10.0
        await asyncio.gather(stderr_task, return_exceptions=True)
        self.last_error = f"killed as hung ({self._hung})" if self._hung else f"exited with code {code}"
        logger.error("codex: app-server (pid {}) {}", process.pid, self.last_error)
        await self._on_lost(generation, self.last_error)

    async def _heartbeat(self, connection: RpcConnection) -> None:
        """Ask a silent connection something cheap; a request that times out kills the process
        (`_kill_hung`, through the connection's `on_timeout`)."""
        loop = asyncio.get_running_loop()
        while not connection.closed.is_set():
            interval = self.config.heartbeat_interval
            if interval <= 0:
                return
            silent = loop.time() - connection.last_heard
            if silent < interval:
                await asyncio.sleep(interval - silent)
                continue
            try:
                await connection.request(HEARTBEAT_METHOD, {}, timeout=self.config.heartbeat_timeout)
            except RpcError:
                pass  # it answered: alive
            except (ConnectionClosed, RpcTimeout):
                return

    def _kill_hung(self, connection: RpcConnection, pid: int, reason: str) -> None:
        """A request went unanswered past its timeout: the process is taken as hung. It is killed
        and its connection ended, so the supervisor starts a new one and the turns that were
        running on it recover (thread/resume) as after a crash."""
        if connection.closed.is_set() or self._stopping:
            return
        self.hangs += 1
        self._hung = reason
        logger.error("codex: app-server (pid {}) is not answering ({}); killing it to start it again", pid, reason)
        self._ready.clear()
        self._kill_group(pid)
        connection.abort(f"app-server hung: {reason}")

    @staticmethod
    def _kill_group(pgid: int) -> None:
        try:
            os.killpg(pgid, 9)
        except (ProcessLookupError, PermissionError):
            pass

    async def _pump_stderr(self, stream: asyncio.StreamReader, pid: int) -> None:
        while True:
            line = await stream.readline()
            if not line:
                return
            text = line.decode(errors="replace").rstrip()
            if text:
                logger.bind(codex_pid=pid).info("codex stderr: {}", text)

    async def _terminate(self, process: asyncio.subprocess.Process) -> None:
        if process.returncode is not None:
            return
        if process.stdin is not None and not process.stdin.is_closing():
            process.stdin.close()  # closing stdin is codex's clean shutdown
        try:
            async with asyncio.timeout(STOP_GRACE):
                await process.wait()
            return
        except TimeoutError:
            pass
        self._kill_group(process.pid)
        await process.wait()

    async def stop(self) -> None:
        self._stopping = True
        self._ready.clear()
        if self.connection is not None:
            await self.connection.close()
        if self.process is not None:
            await self._terminate(self.process)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
