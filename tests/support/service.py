"""Run the real service as a subprocess (`python -m bridge serve`) for tests."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from tests.support.process import ServerProcess, free_port


class BridgeProcess(ServerProcess):
    def __init__(self, data_dir: Path, env: dict[str, str] | None = None, port: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        port = port or free_port()
        full_env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")},
            "BRIDGE_DATA_DIR": str(self.data_dir),
            "BRIDGE_PORT": str(port),
            "BRIDGE_HOST": "127.0.0.1",
            "BRIDGE_LOG_LEVEL": "DEBUG",
            **(env or {}),
        }
        super().__init__(
            [sys.executable, "-m", "bridge", "serve"], port=port, health_path="/healthz",
            log_path=self.data_dir / f"service-{port}.log", cwd=self.data_dir, env=full_env,
        )
