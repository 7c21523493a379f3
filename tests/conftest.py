from __future__ import annotations

import aiohttp
import pytest

from tests.support.chat import ChatClient
from tests.support.service import BridgeProcess


@pytest.fixture
def bridge(tmp_path):
    """A running service (subprocess) on the embedded defaults: SQLite, web chat, shell runtime."""
    started: list[BridgeProcess] = []

    def _start(**env: str) -> BridgeProcess:
        proc = BridgeProcess(tmp_path / "data", env=env).start()
        started.append(proc)
        return proc

    yield _start
    for proc in started:
        proc.kill()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        yield session


@pytest.fixture
def chat(http):
    def _for(proc: BridgeProcess) -> ChatClient:
        return ChatClient(http, proc.url)

    return _for
