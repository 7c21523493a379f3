"""A server subprocess on 127.0.0.1 with a health URL, optionally pinned to one CPU with
`taskset` (which execs the command, so the Popen pid is the server's own). Used by the test
harness and by the benchmarks."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def pin_prefix(cpu: int | None) -> list[str]:
    """`taskset -c CPU` when pinning is wanted and possible, else nothing."""
    if cpu is None:
        return []
    taskset = shutil.which("taskset")
    if taskset is None or cpu >= (os.cpu_count() or 1):
        return []
    return [taskset, "-c", str(cpu)]


class ServerProcess:
    """A server subprocess on 127.0.0.1 with a health URL."""

    def __init__(self, argv: list[str], *, port: int, health_path: str, log_path: Path, cwd: Path,
                 env: dict[str, str], cpu: int | None = None) -> None:
        self.argv = argv
        self.port = port
        self.health_path = health_path
        self.log_path = log_path
        self.cwd = cwd
        self.env = env
        self.cpu = cpu
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def pinned(self) -> bool:
        return bool(pin_prefix(self.cpu))

    def start(self, timeout: float = 30.0) -> "ServerProcess":
        self.cwd.mkdir(parents=True, exist_ok=True)
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            pin_prefix(self.cpu) + self.argv, cwd=str(self.cwd), env=self.env, stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.argv} exited with {self.proc.returncode}:\n{self.log()}")
            try:
                with urllib.request.urlopen(self.url + self.health_path, timeout=1) as resp:
                    if resp.status == 200:
                        return self
            except OSError:
                time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"{self.argv} did not become healthy:\n{self.log()}")

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM, wait up to `timeout`, then SIGKILL."""
        if self.proc is None:
            return 0
        if self.proc.poll() is not None:
            return self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-20000:]
        except OSError:
            return ""
