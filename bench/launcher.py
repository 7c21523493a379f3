"""Start servers for the benchmark as subprocesses, optionally pinned to one CPU with `taskset`.

The process handling itself is tests/support/process.py's `ServerProcess`, shared with the tests.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tests.support.process import ServerProcess, free_port, pin_prefix  # noqa: F401 (re-exported)

ROOT = Path(__file__).resolve().parents[1]


def bridge_process(data_dir: Path, *, cpu: int | None, env: dict[str, str] | None = None,
                   source: Path = ROOT) -> ServerProcess:
    """The real service (`python -m bridge serve`) on a fresh port, data dir as cwd (no stray .env).

    `source` is the tree holding the `bridge`, `channels` and `migrations` packages to run; it goes
    first on PYTHONPATH, ahead of the venv's editable install of this checkout.
    """
    data_dir = Path(data_dir)
    port = free_port()
    full_env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")},
        "PYTHONPATH": str(source),
        "BRIDGE_DATA_DIR": str(data_dir),
        "BRIDGE_PORT": str(port),
        "BRIDGE_HOST": "127.0.0.1",
        "BRIDGE_LOG_LEVEL": "WARNING",
        **(env or {}),
    }
    return ServerProcess(
        [sys.executable, "-m", "bridge", "serve"], port=port, health_path="/healthz",
        log_path=data_dir.parent / f"{data_dir.name}-service.log", cwd=data_dir, env=full_env, cpu=cpu,
    )


def bare_process(work_dir: Path, *, cpu: int | None) -> ServerProcess:
    """The baseline: a bare aiohttp app that reads the body and returns 200."""
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return ServerProcess(
        [sys.executable, "-m", "bench.bare_server", "--port", str(port)], port=port, health_path="/healthz",
        log_path=work_dir / f"bare-{port}.log", cwd=work_dir, env=env, cpu=cpu,
    )


def group_commit_process(data_dir: Path, *, cpu: int | None) -> ServerProcess:
    """The yardstick: aiohttp and one group-committing SQLite writer, nothing else."""
    data_dir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return ServerProcess(
        [sys.executable, "-m", "bench.group_commit_server", "--port", str(port), "--data", str(data_dir)],
        port=port, health_path="/healthz", log_path=data_dir / "server.log", cwd=data_dir, env=env, cpu=cpu,
    )
