"""The service's side of the HTTP edge workers: listen on the port, start them, give each its link
and the listening socket, watch them, start a dead one again (with backoff), stop them first at
shutdown."""

from __future__ import annotations

import asyncio
import os
import pickle
import random
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from loguru import logger

from bridge.edge.link import ServiceEnd
from bridge.edge.worker import BACKLOG, EdgeConfig
from bridge.processes import exited
from channels.base import Webhook

START_TIMEOUT = 20.0
BACKOFF_FIRST, BACKOFF_MAX, STABLE_AFTER = 0.5, 30.0, 60.0


class EdgeStartError(RuntimeError):
    """The edge workers could not start (a worker died at start-up, or did not serve in time)."""


@dataclass
class _Worker:
    index: int
    process: subprocess.Popen[bytes] | None = None
    link: ServiceEnd | None = None
    started_at: float = 0.0
    restarts: int = 0
    backoff: float = BACKOFF_FIRST
    watcher: asyncio.Task[None] | None = None
    exits: list[int] = field(default_factory=list)


class EdgeWorkers:
    def __init__(self, *, count: int, host: str, port: int, webhooks: Sequence[Webhook], service_socket: str,
                 log_level: str, log_format: str, shutdown_timeout: float) -> None:
        self.count = count
        self.host = host
        self.port = port
        self.webhooks = list(webhooks)
        self.config = EdgeConfig(index=0, host=host, port=port, service_socket=service_socket,
                                 checks=[hook.check for hook in self.webhooks], log_level=log_level,
                                 log_format=log_format, shutdown_timeout=shutdown_timeout)
        self._workers = [_Worker(i) for i in range(count)]
        self._stopping = False
        self._respawns: set[asyncio.Task[None]] = set()
        self._sockets: list[socket.socket] = []  # the port's listening sockets, open while workers may start

    async def start(self) -> int:
        """Listen on the port, start every worker on that socket and wait until each serves it; the
        port they serve (BRIDGE_PORT, or the one the system chose for port 0)."""
        self._sockets = self._listen()
        try:
            self.port = self._sockets[0].getsockname()[1]
            self.config = replace(self.config, port=self.port)
            for worker in self._workers:
                await self._spawn(worker)
            try:
                async with asyncio.timeout(START_TIMEOUT):
                    for worker in self._workers:
                        assert worker.link is not None
                        done, _ = await asyncio.wait([worker.link.ready, worker.link.closed],
                                                     return_when=asyncio.FIRST_COMPLETED)
                        if not worker.link.ready.done():
                            raise EdgeStartError(f"HTTP edge worker {worker.index} exited at start-up;"
                                                 " see the log above")
            except TimeoutError:
                raise EdgeStartError(f"HTTP edge workers did not listen within {START_TIMEOUT:.0f}s") from None
        except BaseException:
            await self.stop(timeout=2.0)
            raise
        logger.info("{} HTTP edge worker(s) on {}:{}", self.count, self.host, self.port)
        return self.port

    def _listen(self) -> list[socket.socket]:
        """Bind and listen on the port here, once, as the service would without workers: the port
        is this service's alone (no SO_REUSEPORT), so a port in use fails here with a clear
        message, and port 0 becomes a real one. Every worker serves these same sockets (one per
        address the host resolves to), inherited: a worker started again takes them up, and what
        waits to be accepted stays queued for the others meanwhile."""
        infos = socket.getaddrinfo(self.host or None, self.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
        sockets: list[socket.socket] = []
        port, seen = self.port, set()
        try:
            for family, kind, proto, _, address in infos:
                address = (address[0], port, *address[2:])  # port 0: every address on the port of the first
                if (family, address) in seen:
                    continue
                seen.add((family, address))
                sock = socket.socket(family, kind, proto)
                sockets.append(sock)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # not held up by TIME_WAIT
                if family == socket.AF_INET6:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)  # 0.0.0.0 has its own
                try:
                    sock.bind(address)
                except OSError as exc:
                    raise OSError(exc.errno, f"cannot listen on {self.host}:{port}: {exc.strerror}") from None
                sock.listen(BACKLOG)
                port = sock.getsockname()[1]
        except BaseException:
            for sock in sockets:
                sock.close()
            raise
        return sockets

    async def _spawn(self, worker: _Worker) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        listening = [sock.fileno() for sock in self._sockets]
        try:
            worker.process = subprocess.Popen(
                [sys.executable, "-m", "bridge.edge", str(theirs.fileno()), ",".join(map(str, listening)),
                 str(os.getpid())],
                pass_fds=(theirs.fileno(), *listening), stdin=subprocess.DEVNULL,
            )
        finally:
            theirs.close()
        worker.started_at = time.monotonic()
        _, worker.link = await loop.create_connection(lambda: ServiceEnd(self.webhooks, f"edge {worker.index}"),
                                                      sock=ours)
        worker.link.configure(pickle.dumps(replace(self.config, index=worker.index)))
        worker.watcher = asyncio.ensure_future(self._watch(worker))

    async def _watch(self, worker: _Worker) -> None:
        process = worker.process
        assert process is not None
        code = await exited(process)
        worker.exits.append(code)
        if self._stopping:
            return
        lived = time.monotonic() - worker.started_at
        if lived > STABLE_AFTER:
            worker.backoff = BACKOFF_FIRST
        delay = worker.backoff * random.uniform(0.8, 1.2)
        worker.backoff = min(BACKOFF_MAX, worker.backoff * 2)
        logger.error("HTTP edge worker {} (pid {}) exited with {} after {:.1f}s; starting it again in {:.1f}s",
                     worker.index, process.pid, code, lived, delay)
        task = asyncio.ensure_future(self._respawn(worker, delay))
        self._respawns.add(task)
        task.add_done_callback(self._respawns.discard)

    async def _respawn(self, worker: _Worker, delay: float) -> None:
        await asyncio.sleep(delay)
        if self._stopping:
            return
        worker.restarts += 1
        try:
            await self._spawn(worker)
        except OSError as exc:
            logger.error("HTTP edge worker {} could not be started: {}", worker.index, exc)
            task = asyncio.ensure_future(self._respawn(worker, worker.backoff))
            self._respawns.add(task)
            task.add_done_callback(self._respawns.discard)

    async def stop(self, timeout: float) -> None:
        """SIGTERM each worker: it stops accepting, waits for the answers to what it forwarded (this
        service still gives them), ends its streams and exits; SIGKILL at the deadline. This
        service lets go of the port first, so it closes with the last worker's copy, and
        connections still queued then are reset rather than left waiting."""
        self._stopping = True
        for task in list(self._respawns):
            task.cancel()
        for sock in self._sockets:
            sock.close()
        alive = [w for w in self._workers if w.process is not None and w.process.poll() is None]
        for worker in alive:
            assert worker.process is not None
            worker.process.send_signal(signal.SIGTERM)
        watchers = [w.watcher for w in alive if w.watcher is not None]
        if watchers:
            _, pending = await asyncio.wait(watchers, timeout=max(0.1, timeout))
            for worker in alive:
                if worker.watcher in pending and worker.process is not None:
                    logger.warning("HTTP edge worker {} did not stop in time; killing it", worker.index)
                    worker.process.kill()
            if pending:
                await asyncio.wait(pending, timeout=5.0)
        for worker in self._workers:
            if worker.link is not None:
                await worker.link.drain()
                worker.link.close()

    async def health(self) -> dict[str, Any]:
        workers = [{
            "index": w.index,
            "pid": w.process.pid if w.process else None,
            "up": bool(w.process and w.process.poll() is None and w.link and w.link.ready.done()
                       and not w.link.closed.done()),
            "restarts": w.restarts,
        } for w in self._workers]
        return {"ok": all(w["up"] for w in workers), "edge_workers": workers}
