"""`python -m bridge.edge <link fd> <listening fds> <service pid>`: one HTTP edge worker, started by the
service, which inherits the link and the port's listening sockets (comma-separated)."""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import sys

PR_SET_NAME, PR_SET_PDEATHSIG = 15, 1


def main(argv: list[str]) -> int:
    link_fd, listening, service_pid = int(argv[0]), [int(fd) for fd in argv[1].split(",")], int(argv[2])
    # Die with the service, whatever kills it (kill -9 included): a worker must never outlive it
    # and keep answering on its port.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    libc.prctl(PR_SET_NAME, ctypes.c_char_p(b"bridge-edge"), 0, 0, 0)  # `ps -o comm`, top
    if os.getppid() != service_pid:
        return 1  # it died before we asked
    from bridge.edge.worker import serve

    return asyncio.run(serve(link_fd, listening))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
