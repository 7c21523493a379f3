"""Waiting in tests for what another process or thread will do."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any


async def wait_until(predicate: Callable[[], Any], timeout: float = 15.0, what: str = "") -> Any:
    """Poll `predicate()` until it is truthy; return its value, or fail naming `what`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        result = predicate()
        if result:
            return result
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what or predicate}")


def wait_ready(url: str, timeout: float = 30.0) -> None:
    """Block until the service's /readyz answers 200 (every check ready), or fail."""
    import urllib.request

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} did not become ready within {timeout:g}s")
