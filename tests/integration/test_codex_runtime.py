"""The Codex runtime and its JSON-RPC client, driven directly: steering, capability checks, and the
client's framing and error handling against a scripted peer."""

from __future__ import annotations

import asyncio
import dataclasses
import json

import pytest

from bridge.runtimes.base import Approval, ApprovalRequest, Decision, InputFile, TurnRequest
from bridge.runtimes.codex.appserver import AppServerConfig, version_of
from bridge.runtimes.codex.rpc import ConnectionClosed, RpcConnection, RpcError, RpcTimeout
from bridge.runtimes.codex.runtime import CodexOptions, CodexRuntime
from tests.support.codex import codex_binary, codex_env, codex_home
from tests.support.mock_model import MockModel

pytestmark = pytest.mark.codex


class Recorder:
    """The pipeline's side of a turn, reduced to what these tests look at: progress and a fixed
    answer to every approval."""

    def __init__(self, decision: Decision = Decision.APPROVE) -> None:
        self.progress_texts: list[str] = []
        self.asked: list[ApprovalRequest] = []
        self.decision = decision
        self.thread: str | None = None
        self.notices: list[str] = []

    async def progress(self, text: str) -> None:
        self.progress_texts.append(text)

    async def ask_approval(self, request: ApprovalRequest) -> Approval:
        self.asked.append(request)
        return Approval(self.decision)

    async def bind_thread(self, thread_id: str, *, lost: str | None = None, reason: str | None = None) -> None:
        self.thread = thread_id

    async def notice(self, text: str) -> None:
        self.notices.append(text)


@pytest.fixture
async def runtime(tmp_path, request):
    model = MockModel().start()
    home, overrides = codex_home(tmp_path, model.base_url)
    workspace = tmp_path / "ws"
    workspace.mkdir()
    extra = getattr(request, "param", {})  # AppServerConfig fields, through indirect parametrization
    rt = CodexRuntime(AppServerConfig(binary=codex_binary(), overrides=overrides, cwd=str(workspace),
                                      env=codex_env(home), **extra), CodexOptions())
    await rt.start()
    rt.model = model  # type: ignore[attr-defined]
    rt.workspace = str(workspace)  # type: ignore[attr-defined]
    yield rt
    await rt.stop()
    model.stop()


def request(rt, text: str, session: int = 1, thread: str | None = None) -> TurnRequest:
    return TurnRequest(turn_id=1, session_id=session, runtime_thread_id=thread, workspace=rt.workspace, text=text,
                       sender_id="alice", sender_name="Alice", is_group=False)


async def test_steer_adds_input_to_the_running_turn(runtime):
    ctx = Recorder()
    turn = asyncio.create_task(runtime.run_turn(request(runtime, "RUN: sleep 2"), ctx))
    for _ in range(200):
        if any("sleep 2" in t for t in ctx.progress_texts):
            break
        await asyncio.sleep(0.05)
    assert await runtime.steer(1, "and then say steered")
    outcome = await asyncio.wait_for(turn, 60)
    assert outcome.status == "completed"
    assert "and then say steered" in json.dumps(runtime.model.requests[-1]["input"])
    assert not await runtime.steer(1, "no turn runs now")


async def test_unsupported_methods_degrade_with_a_warning(runtime):
    await runtime.server.wait_ready(30)
    assert await runtime._call("thread/noSuchMethod", {}, optional=True) is None
    assert "thread/noSuchMethod" in runtime.unsupported
    with pytest.raises(RpcError) as info:
        await runtime._call("thread/noSuchMethod", {})
    assert info.value.unsupported
    assert (await runtime.health())["unsupported"] == ["thread/noSuchMethod"]
    assert runtime.server.info.version == "0.169.0"


async def test_declined_approval_reaches_codex_as_decline(runtime):
    ctx = Recorder(Decision.DENY)
    outcome = await runtime.run_turn(request(runtime, "ESCALATE: echo x > declined.txt"), ctx)
    assert [r.kind for r in ctx.asked] == ["command"]
    assert ctx.asked[0].detail["command"] == "echo x > declined.txt"
    assert outcome.status == "completed" and "rejected" in outcome.text
    assert ctx.thread is not None


def _png(path) -> None:
    """A real 2x2 PNG (Codex decodes what it sends to the model)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\xff\x00\x00" * 2 for _ in range(2))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b""))


async def test_attachments_reach_the_model(runtime, tmp_path):
    """An image goes to the model as an image; every downloaded file is named with its path; one
    the channel could not download is mentioned as such."""
    image, report = tmp_path / "shot.png", tmp_path / "report.txt"
    _png(image)
    report.write_text("numbers")
    files = (InputFile("shot.png", str(image), "image/png"), InputFile("report.txt", str(report), "text/plain"),
             InputFile("gone.pdf", "", "application/pdf"))
    turn = dataclasses.replace(request(runtime, "what is in these?"), files=files)
    outcome = await runtime.run_turn(turn, Recorder())
    assert outcome.status == "completed"
    sent = json.dumps(runtime.model.requests[-1]["input"])
    assert '"input_image"' in sent and "data:image/png;base64," in sent
    assert f"report.txt: {report}" in sent and f"shot.png: {image}" in sent
    assert "not downloaded: gone.pdf" in sent


def test_version_is_read_from_the_user_agent():
    assert version_of("agent_bridge/0.169.0 (Debian 12.0.0; x86_64) xterm") == "0.169.0"
    assert version_of("") == ""


# -- the JSON-RPC client against a scripted peer on a pipe pair


class Peer:
    """The far side of the stdio pipes: reads what the client writes, writes what the test says."""

    def __init__(self, to_client: asyncio.StreamWriter, from_client: asyncio.StreamReader) -> None:
        self.to_client = to_client
        self.from_client = from_client

    async def read(self) -> dict:
        return json.loads(await asyncio.wait_for(self.from_client.readline(), 5))

    def write(self, message: dict | bytes) -> None:
        data = message if isinstance(message, bytes) else json.dumps(message).encode() + b"\n"
        self.to_client.write(data)


async def _pipe() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    import os

    loop = asyncio.get_running_loop()
    read_fd, write_fd = os.pipe()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), os.fdopen(read_fd, "rb"))
    transport, protocol = await loop.connect_write_pipe(asyncio.streams.FlowControlMixin, os.fdopen(write_fd, "wb"))
    writer = asyncio.StreamWriter(transport, protocol, None, loop)
    return reader, writer


@pytest.fixture
async def wired():
    client_in, peer_out = await _pipe()
    peer_in, client_out = await _pipe()
    notes: list[tuple[str, dict]] = []
    gate = asyncio.Event()

    async def on_request(method, params, request_id):
        await gate.wait()  # a human deciding
        return {"decision": "accept", "for": request_id}

    conn = RpcConnection(client_in, client_out, on_notification=lambda m, p: notes.append((m, p)),
                         on_request=on_request, name="test")
    conn.start()
    yield conn, Peer(peer_out, peer_in), notes, gate
    await conn.close()
    peer_out.close()


async def test_rpc_correlates_answers_and_survives_garbage(wired):
    conn, peer, notes, _ = wired
    first = asyncio.create_task(conn.request("a", {"n": 1}))
    second = asyncio.create_task(conn.request("b", {"n": 2}))
    req_a, req_b = await peer.read(), await peer.read()
    assert "jsonrpc" not in req_a and req_a["method"] == "a"
    peer.write(b"this is not json\n")
    peer.write({"method": "note/one", "params": {"x": 1}})
    peer.write({"id": req_b["id"], "result": {"b": True}})
    peer.write({"id": req_a["id"], "error": {"code": -32600, "message": "Invalid request: unknown variant `a`"}})
    assert await second == {"b": True}
    with pytest.raises(RpcError) as info:
        await first
    assert info.value.unsupported and info.value.code == -32600
    assert notes == [("note/one", {"x": 1})]


async def test_a_server_request_waiting_on_a_human_does_not_block_the_reader(wired):
    conn, peer, notes, gate = wired
    peer.write({"id": 0, "method": "item/commandExecution/requestApproval", "params": {"threadId": "t"}})
    call = asyncio.create_task(conn.request("ping", {}))
    ping = await peer.read()
    peer.write({"id": ping["id"], "result": "pong"})
    assert await asyncio.wait_for(call, 5) == "pong"  # answered while the approval still waits
    gate.set()
    answer = await peer.read()
    assert answer == {"id": 0, "result": {"decision": "accept", "for": 0}}


async def test_a_server_request_settled_before_its_handler_starts_is_never_answered():
    """The request and its `serverRequest/resolved` come in one read: the handler never runs (no
    card for a person), nothing is answered, and the connection goes on."""
    client_in, peer_out = await _pipe()
    peer_in, client_out = await _pipe()
    peer = Peer(peer_out, peer_in)
    handled: list[str] = []

    async def on_request(method, params, request_id):
        handled.append(method)
        return {"decision": "accept"}

    def on_notification(method, params):
        if method == "serverRequest/resolved":
            assert conn.cancel_server_request(params["requestId"])

    conn = RpcConnection(client_in, client_out, on_notification=on_notification, on_request=on_request, name="test")
    conn.start()
    try:
        peer.write(json.dumps({"id": 7, "method": "item/commandExecution/requestApproval",
                               "params": {"threadId": "t"}}).encode() + b"\n"
                   + json.dumps({"method": "serverRequest/resolved",
                                 "params": {"threadId": "t", "requestId": 7}}).encode() + b"\n")
        call = asyncio.create_task(conn.request("ping", {}))
        ping = await peer.read()
        assert ping["method"] == "ping"  # no answer to request 7 came before it
        peer.write({"id": ping["id"], "result": "pong"})
        assert await asyncio.wait_for(call, 5) == "pong"
        await asyncio.sleep(0.1)
        assert handled == []
        assert not conn.cancel_server_request(7)  # settled once
    finally:
        await conn.close()
        peer_out.close()


async def test_a_peer_that_stops_reading_times_the_request_out(wired):
    """The write is inside the timeout: once the pipe is full, a peer that reads nothing more
    blocks it, and the request must still end (then the app-server is taken as hung)."""
    client_in, _peer_out = await _pipe()
    _peer_in, client_out = await _pipe()  # nobody ever reads this side
    hung: list[str] = []

    async def on_request(method, params, request_id):
        return {}

    conn = RpcConnection(client_in, client_out, on_notification=lambda m, p: None, on_request=on_request,
                         name="test", on_timeout=hung.append)
    conn.start()
    try:
        with pytest.raises(RpcTimeout):
            await asyncio.wait_for(conn.request("big", {"text": "x" * (4 << 20)}, timeout=0.5), 5)
        assert hung == ["big: no answer within 0.5s"]
    finally:
        await conn.close()


async def test_requests_time_out_and_fail_when_the_peer_goes_away(wired):
    conn, peer, _, _ = wired
    with pytest.raises(RpcTimeout):
        await conn.request("slow", {}, timeout=0.2)
    pending = asyncio.create_task(conn.request("never", {}))
    await peer.read()
    await peer.read()
    peer.to_client.close()
    with pytest.raises(ConnectionClosed):
        await asyncio.wait_for(pending, 5)
    with pytest.raises(ConnectionClosed):
        await conn.request("after", {})


# -- a turn given up on by the bridge


async def _until(predicate, timeout: float = 30.0) -> None:
    for _ in range(int(timeout / 0.05)):
        if predicate():
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the condition never held")


async def _turn_statuses(rt, thread_id: str) -> list[str]:
    history = await rt._call("thread/turns/list", {"threadId": thread_id, "limit": 10})
    return [t.get("status") for t in history.get("data", [])]


async def _settled_statuses(runtime, thread: str) -> list[str]:
    """The thread's turns' statuses once none is in progress any more (or after 5 s)."""
    statuses: list[str] = []
    for _ in range(100):
        statuses = await _turn_statuses(runtime, thread)
        if statuses and "inProgress" not in statuses:
            break
        await asyncio.sleep(0.05)
    return statuses


async def test_a_cancelled_turn_is_interrupted_in_codex(runtime):
    ctx = Recorder()
    turn = asyncio.create_task(runtime.run_turn(request(runtime, "RUN: sleep 30"), ctx))
    await _until(lambda: any("sleep 30" in t for t in ctx.progress_texts))
    turn.cancel()  # a routine's time limit, the service's shutdown
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(turn, 10)
    assert await _settled_statuses(runtime, ctx.thread) == ["interrupted"]  # not left running in codex, unseen
    # the thread takes a new turn (one still running would take the message as a steer)
    outcome = await asyncio.wait_for(runtime.run_turn(request(runtime, "next one", thread=ctx.thread), ctx), 30)
    assert outcome.status == "completed" and "Mock reply: next one" in outcome.text


async def test_a_turn_cancelled_before_turn_start_answers_is_interrupted_too(runtime):
    ctx = Recorder()
    call, sent = runtime._call, asyncio.Event()

    async def slow_to_answer(method, params, **kw):
        result = await call(method, params, **kw)
        if method == "turn/start":
            sent.set()
            await asyncio.sleep(1.0)  # codex has the turn; its answer is still on its way
        return result

    runtime._call = slow_to_answer
    turn = asyncio.create_task(runtime.run_turn(request(runtime, "RUN: sleep 30"), ctx))
    await asyncio.wait_for(sent.wait(), 30)
    turn.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(turn, 10)
    runtime._call = call
    assert await _settled_statuses(runtime, ctx.thread) == ["interrupted"]


# -- /stop before codex has answered turn/start


async def test_a_stop_while_turn_start_is_unanswered_stops_the_turn(runtime):
    ctx = Recorder()
    call = runtime._call
    stopped: list[bool] = []

    async def stop_meanwhile(method, params, **kw):
        answer = asyncio.ensure_future(call(method, params, **kw))
        if method == "turn/start":
            stopped.append(await runtime.interrupt(1))  # /stop, before the turn has an id
        return await answer

    runtime._call = stop_meanwhile
    started = asyncio.get_running_loop().time()
    outcome = await asyncio.wait_for(runtime.run_turn(request(runtime, "RUN: sleep 30"), ctx), 20)
    runtime._call = call
    assert stopped == [True]
    assert outcome.status == "stopped" and "Stopped" in outcome.text
    assert asyncio.get_running_loop().time() - started < 10
    assert await _turn_statuses(runtime, ctx.thread) == ["interrupted"]


async def test_a_stop_before_the_turn_is_started_keeps_it_from_starting(runtime):
    ctx = Recorder()
    thread_for = runtime._thread_for
    stopped: list[bool] = []

    async def stop_meanwhile(*args):
        stopped.append(await runtime.interrupt(1))  # /stop while the thread is being started
        return await thread_for(*args)

    runtime._thread_for = stop_meanwhile
    before = len(runtime.model.requests)
    outcome = await asyncio.wait_for(runtime.run_turn(request(runtime, "RUN: sleep 30"), ctx), 20)
    assert stopped == [True]
    assert outcome.status == "stopped"
    assert len(runtime.model.requests) == before  # the model was never asked
    assert not await runtime.interrupt(1)  # nothing runs any more


# -- an app-server that is alive but does not answer


@pytest.mark.parametrize("size", ["small", "large"])
async def test_a_hung_app_server_is_killed_and_started_again(runtime, size):
    """SIGSTOP makes the real app-server hang on demand. The next request times out; the process
    is killed and started again, the turn recovers on the new one, and later turns work. A large
    message also fills the pipe (the write itself blocks)."""
    import os
    import signal

    runtime.options = CodexOptions(request_timeout=2.0)
    ctx = Recorder()
    assert (await runtime.run_turn(request(runtime, "hello"), ctx)).status == "completed"
    hung_pid = runtime.server.pid
    os.killpg(hung_pid, signal.SIGSTOP)
    text = "are you there" + (" padding" * 300_000 if size == "large" else "")
    started = asyncio.get_running_loop().time()
    outcome = await asyncio.wait_for(runtime.run_turn(request(runtime, text, thread=ctx.thread), ctx), 60)
    assert outcome.status == "interrupted" and "restarted" in outcome.text
    assert asyncio.get_running_loop().time() - started < 30
    health = await runtime.health()
    assert health["ok"] and health["pid"] != hung_pid and health["restarts"] == 1 and health["hangs"] == 1
    after = await asyncio.wait_for(runtime.run_turn(request(runtime, "after the hang", thread=ctx.thread), ctx), 30)
    assert after.status == "completed" and "Mock reply: after the hang" in after.text


# -- approvals codex settled itself


class Undecided(Recorder):
    """A person who has not decided yet; the gate marks the card interrupted when the wait is
    cancelled, so a cancelled wait is what a card not left pending looks like here."""

    def __init__(self) -> None:
        super().__init__()
        self.waiting = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def ask_approval(self, request: ApprovalRequest) -> Approval:
        self.asked.append(request)
        self.waiting.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise
        raise AssertionError("unreachable")


async def test_an_approval_codex_settled_after_its_turn_ended_is_not_left_waiting(runtime):
    from pathlib import Path

    ctx = Undecided()
    turn = asyncio.create_task(runtime.run_turn(request(runtime, "ESCALATE: echo late > late.txt"), ctx))
    await asyncio.wait_for(ctx.waiting.wait(), 30)
    turn.cancel()  # turn/interrupt; codex then settles the approval, after the turn ended here
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(turn, 10)
    await asyncio.wait_for(ctx.cancelled.wait(), 5)  # the card does not stay pending
    # a late answer (a person who clicked just then) is harmless to codex
    await runtime.server.connection._send({"id": 0, "result": {"decision": "accept"}})
    after = await asyncio.wait_for(runtime.run_turn(request(runtime, "after", thread=ctx.thread), Recorder()), 30)
    assert after.status == "completed" and "Mock reply: after" in after.text
    assert not (Path(runtime.workspace) / "late.txt").exists()


async def test_a_stop_while_codex_is_starting_starts_no_thread(runtime):
    ctx = Recorder()
    wait_ready = runtime.server.wait_ready
    stopped: list[bool] = []

    async def stop_meanwhile(timeout):
        if not stopped:
            stopped.append(await runtime.interrupt(1))  # /stop while the app-server (re)starts
        return await wait_ready(timeout)

    runtime.server.wait_ready = stop_meanwhile
    outcome = await asyncio.wait_for(runtime.run_turn(request(runtime, "hello"), ctx), 20)
    assert stopped == [True] and outcome.status == "stopped"
    assert ctx.thread is None  # no thread was started for it


@pytest.mark.parametrize("runtime", [{"heartbeat_interval": 0.5, "heartbeat_timeout": 1.0}], indirect=True)
async def test_a_hang_while_a_turn_only_waits_for_events_is_found_by_the_heartbeat(runtime):
    """No request is on its way while a command runs: the heartbeat on the silent connection
    finds the hang, and the turn recovers on a new process."""
    import os
    import signal

    ctx = Recorder()
    turn = asyncio.create_task(runtime.run_turn(request(runtime, "RUN: sleep 30"), ctx))
    await _until(lambda: any("sleep 30" in t for t in ctx.progress_texts))
    hung_pid = runtime.server.pid
    os.killpg(hung_pid, signal.SIGSTOP)
    outcome = await asyncio.wait_for(turn, 20)
    assert outcome.status == "interrupted" and "restarted" in outcome.text
    health = await runtime.health()
    assert health["pid"] != hung_pid and health["hangs"] == 1
