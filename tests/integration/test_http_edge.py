"""HTTP edge workers: processes that serve the port, check webhooks and hand them to the service
over a private link, and pass everything else through to the service's own server."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time

import aiohttp
import pytest

from tests.support.chat import final_texts
from tests.support.service import BridgeProcess


async def _workers(http: aiohttp.ClientSession, proc, *, settled: bool = True) -> list[dict]:
    """The workers as /readyz reports them. `/healthz` answers as soon as one worker listens,
    while the others may still be starting: `settled` waits (up to 10 s) for start-up to end."""
    deadline = time.monotonic() + 10
    while True:
        async with http.get(proc.url + "/readyz") as r:
            body = await r.json()
        workers = body["checks"]["http"]["edge_workers"]
        if not settled or all(w["up"] for w in workers) or time.monotonic() > deadline:
            return workers
        await asyncio.sleep(0.05)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


async def test_the_port_is_served_by_edge_workers_and_everything_passes_through(bridge, chat, http):
    proc = bridge(BRIDGE_HTTP_WORKERS="2")
    workers = await _workers(http, proc)
    assert [w["index"] for w in workers] == [0, 1] and all(w["up"] for w in workers)
    assert proc.pid not in {w["pid"] for w in workers}
    c = chat(proc)
    # the live stream (SSE) passes through the worker while a webhook is forwarded by it
    events: list[str] = []

    async def listen() -> None:
        async with http.get(proc.url + "/chat/api/stream", params={"conversation_id": "c-edge"}) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
            async for line in r.content:
                if line.startswith(b"data:") and b"through the edge" in line:
                    events.append(line.decode())
                    return

    listener = asyncio.create_task(listen())
    await asyncio.sleep(0.3)
    status, body = await c.post("c-edge", "alice", "echo through the edge")
    assert (status, body) == (202, {"accepted": True, "duplicate": False})
    async with asyncio.timeout(15):
        await listener
    assert events
    texts = await c.wait_for("c-edge", final_texts)
    assert "through the edge" in texts[0]
    # pages, metrics and unknown paths come from the service itself
    async with http.get(proc.url + "/chat") as r:
        assert r.status == 200 and "text/html" in r.headers["Content-Type"]
    async with http.get(proc.url + "/metrics") as r:
        assert 'bridge_inbound_events_total{channel="webchat",kind="message"} 1.0' in await r.text()
    async with http.get(proc.url + "/no/such/page") as r:
        assert r.status == 404
    async with http.get(proc.url + "/chat/api/actions") as r:
        assert r.status == 405  # a webhook's path, with another method: the service's answer


async def test_a_killed_worker_is_started_again(bridge, chat, http):
    proc = bridge(BRIDGE_HTTP_WORKERS="1")
    c = chat(proc)
    [worker] = await _workers(http, proc)
    os.kill(worker["pid"], signal.SIGKILL)
    while _alive(worker["pid"]):
        await asyncio.sleep(0.01)
    # No worker now, but the port is still the service's: a connection made meanwhile waits in
    # its queue and is answered by the new worker, not refused.
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                     timeout=aiohttp.ClientTimeout(total=30)) as fresh:
        async with fresh.get(proc.url + "/healthz") as r:
            assert r.status == 200

    async def replaced() -> bool:
        [now] = await _workers(http, proc, settled=False)
        return now["up"] and now["pid"] != worker["pid"] and now["restarts"] == 1

    deadline = time.monotonic() + 15
    while not await replaced():
        assert time.monotonic() < deadline, "the killed worker was not replaced"
        await asyncio.sleep(0.1)
    status, _ = await c.post("c-again", "alice", "echo after a restart")
    assert status == 202
    assert "after a restart" in (await c.wait_for("c-again", final_texts))[0]
    assert "HTTP edge worker 0" in proc.log() and "starting it again" in proc.log()


async def test_workers_go_with_the_service_even_on_kill_minus_nine(bridge, http):
    proc = bridge(BRIDGE_HTTP_WORKERS="2")
    pids = [w["pid"] for w in await _workers(http, proc)]
    proc.kill()
    deadline = time.monotonic() + 5
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert not any(_alive(pid) for pid in pids)
    # nothing listens on the port any more (no worker answering for a service that is gone)
    with socket.socket() as sock, pytest.raises(ConnectionRefusedError):
        sock.connect(("127.0.0.1", proc.port))


async def test_sigterm_stops_the_workers_then_the_service(bridge, http):
    proc = bridge(BRIDGE_HTTP_WORKERS="1")
    [worker] = await _workers(http, proc)
    assert proc.stop() == 0
    assert not _alive(worker["pid"])
    assert "exited with" not in proc.log()  # a worker stopped on purpose is not reported as a crash


async def test_in_process_http_when_workers_are_off(bridge, chat, http):
    proc = bridge(BRIDGE_HTTP_WORKERS="0")
    async with http.get(proc.url + "/readyz") as r:
        assert "http" not in (await r.json())["checks"]
    status, _ = await chat(proc).post("c-solo", "alice", "echo alone")
    assert status == 202
    assert "alone" in (await chat(proc).wait_for("c-solo", final_texts))[0]


def test_a_port_in_use_stops_start_up_with_a_clear_message(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = BridgeProcess(tmp_path / "data", env={"BRIDGE_HTTP_WORKERS": "1"}, port=port)
        run = subprocess.run([sys.executable, "-m", "bridge", "serve"], env=proc.env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=60)
    assert run.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in run.stderr


async def test_a_second_service_on_the_same_port_refuses_to_start_and_the_first_keeps_it(bridge, tmp_path):
    first = bridge(BRIDGE_HTTP_WORKERS="2")
    # a new connection for every request, so the kernel would spread them over every listener
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                     timeout=aiohttp.ClientTimeout(total=30)) as fresh:
        mine = {w["pid"] for w in await _workers(fresh, first)}
        second = BridgeProcess(tmp_path / "second", env={"BRIDGE_HTTP_WORKERS": "2"}, port=first.port)
        second.data_dir.mkdir()
        run = subprocess.Popen([sys.executable, "-m", "bridge", "serve"], env=second.env, cwd=second.data_dir,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        try:
            _, stderr = await asyncio.to_thread(run.communicate, timeout=20)
        except subprocess.TimeoutExpired:
            run.kill()
            _, stderr = run.communicate()
            pytest.fail(f"a second service started on port {first.port}, which the first one serves:\n{stderr}")
        assert run.returncode == 1, stderr
        assert f"cannot listen on 127.0.0.1:{first.port}" in stderr and "in use" in stderr, stderr
        # every request still reaches the first service's own workers
        for _ in range(10):
            assert {w["pid"] for w in await _workers(fresh, first, settled=False)} == mine
    assert first.proc is not None and first.proc.poll() is None
