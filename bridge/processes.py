"""Child processes, waited for without a thread."""

from __future__ import annotations

import asyncio
import os
import subprocess


async def exited(process: subprocess.Popen[bytes]) -> int:
    """The exit code of a child, once it exits: its pidfd becomes readable then."""
    if process.poll() is not None:
        return process.returncode
    loop = asyncio.get_running_loop()
    fd = os.pidfd_open(process.pid)
    done = loop.create_future()
    loop.add_reader(fd, lambda: done.done() or done.set_result(None))
    try:
        if process.poll() is None:
            await done
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return process.wait()
