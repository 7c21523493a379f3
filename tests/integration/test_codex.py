"""The Codex runtime end to end: web chat -> the service -> the real `codex app-server` -> the
mock model on 127.0.0.1, and back. One service (one app-server) serves the module's scenarios,
each in its own conversation; scenarios that kill or restart processes get their own."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from tests.support.chat import final_texts
from tests.support.codex import codex_binary, codex_env, codex_home
from tests.support.mock_model import MockModel
from tests.support.service import BridgeProcess

pytestmark = pytest.mark.codex


def has_final(*words):
    return lambda msgs: [t for t in final_texts(msgs) if all(w in t for w in words)]


@pytest.fixture(scope="module")
def model():
    mock = MockModel().start()
    yield mock
    mock.stop()


@pytest.fixture(scope="module")
def codex_setup(tmp_path_factory, model):
    home, overrides = codex_home(tmp_path_factory.mktemp("codex"), model.base_url)
    env = {k: v for k, v in codex_env(home).items() if k in ("CODEX_HOME", "HOME")}
    env |= {"CODEX_BIN": codex_binary(), "BRIDGE_RUNTIME": "codex", "BRIDGE_CODEX_CONFIG": "\n".join(overrides)}
    return env


def start_bridge(data_dir: Path, codex_env_: dict[str, str], **extra: str) -> BridgeProcess:
    return BridgeProcess(data_dir, env={**codex_env_, **extra}).start()


@pytest.fixture(scope="module")
def service(tmp_path_factory, codex_setup):
    proc = start_bridge(tmp_path_factory.mktemp("svc"), codex_setup)
    yield proc
    proc.kill()


def card_text(message: dict) -> str:
    return json.dumps(message["card"], ensure_ascii=False)


def conv() -> str:
    return f"cx-{uuid.uuid4().hex[:8]}"


def readyz(proc: BridgeProcess) -> dict:
    try:
        with urllib.request.urlopen(f"{proc.url}/readyz", timeout=5) as resp:
            return json.load(resp)
    except urllib.error.HTTPError as exc:
        return json.load(exc)


async def wait_codex_ready(proc: BridgeProcess, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runtime = readyz(proc)["checks"]["runtime"]
        if runtime.get("ok"):
            return runtime
        await asyncio.sleep(0.1)
    raise AssertionError(f"codex never became ready: {readyz(proc)}")


async def test_a_message_gets_the_models_reply(service, chat, model):
    c, cid = chat(service), conv()
    status, _ = await c.post(cid, "alice", "hello codex")
    assert status == 202
    replies = await c.wait_for(cid, has_final("Mock reply: hello codex"), timeout=30)
    assert replies == ["Mock reply: hello codex"]
    assert "hello codex" in model.user_texts()
    health = readyz(service)["checks"]["runtime"]
    assert health["ok"] and health["version"] == "0.169.0"


async def test_progress_streams_before_the_final_reply(service, chat):
    c, cid = chat(service), conv()
    await c.post(cid, "alice", "SLOW 0.4: one two three four five six")
    seen = await c.wait_for(cid, lambda msgs: [m["text"] for m in msgs if "Codex is working" in m["text"]
                                               and "Mock reply" in m["text"]], timeout=30)
    assert "six" not in seen[0]  # a partial text, shown while the model was still writing
    await c.wait_for(cid, has_final("Mock reply: one two three four five six"), timeout=30)
    texts = [m["text"] for m in await c.bot_messages(cid)]
    assert texts == ["Mock reply: one two three four five six"]  # the progress message became the reply


async def test_escalated_command_asks_and_approve_runs_it(service, chat):
    c, cid = chat(service), conv()
    workspace = service.data_dir / "workspace"
    await c.post(cid, "alice", "ESCALATE: echo approved-run > approved.txt && cat approved.txt")
    card = await c.wait_card(cid, "pending", timeout=30)
    assert "echo approved-run > approved.txt && cat approved.txt" in card_text(card)
    assert "outside the sandbox" in card_text(card)  # the model's justification
    status, _ = await c.act(cid, card["id"], "approve", "alice")
    assert status == 200
    replies = await c.wait_for(cid, has_final("Command done", "approved-run"), timeout=30)
    assert "Ran 1 command" in replies[0]
    assert (workspace / "approved.txt").read_text().strip() == "approved-run"


async def test_deny_declines_and_the_command_does_not_run(service, chat):
    c, cid = chat(service), conv()
    workspace = service.data_dir / "workspace"
    await c.post(cid, "alice", "ESCALATE: echo nope > denied.txt")
    card = await c.wait_card(cid, "pending", timeout=30)
    await c.act(cid, card["id"], "deny", "alice")
    replies = await c.wait_for(cid, has_final("Command done"), timeout=30)
    assert "rejected" in replies[0]
    assert not (workspace / "denied.txt").exists()
    assert (await c.wait_card(cid, "denied"))["card"]["actions"] == []


async def test_approve_for_session_is_not_asked_again(service, chat):
    c, cid = chat(service), conv()
    command = "ESCALATE: echo again >> session.txt"
    await c.post(cid, "alice", command)
    card = await c.wait_card(cid, "pending", timeout=30)
    await c.act(cid, card["id"], "approve_session", "alice")
    await c.wait_for(cid, has_final("Command done"), timeout=30)
    await c.post(cid, "alice", command)
    await c.wait_for(cid, lambda msgs: len(has_final("Command done")(msgs)) == 2, timeout=30)
    cards = [m for m in await c.bot_messages(cid) if m["card"]]
    assert len(cards) == 1
    assert (service.data_dir / "workspace" / "session.txt").read_text().split() == ["again", "again"]


async def test_stop_on_the_card_cancels_the_turn(service, chat):
    c, cid = chat(service), conv()
    await c.post(cid, "alice", "ESCALATE: echo never > cancelled.txt")
    card = await c.wait_card(cid, "pending", timeout=30)
    await c.act(cid, card["id"], "stop", "alice")
    replies = await c.wait_for(cid, has_final("Stopped"), timeout=30)
    assert len(replies) == 1
    assert not (service.data_dir / "workspace" / "cancelled.txt").exists()


async def test_file_change_outside_the_workspace_shows_the_diff(service, chat, tmp_path):
    outside = Path("/var/tmp") / f"bridge-test-{uuid.uuid4().hex[:8]}"
    outside.mkdir()
    target = outside / "demo.txt"
    try:
        c, cid = chat(service), conv()
        await c.post(cid, "alice", f"PATCH: {target} hello-patch")
        card = await c.wait_card(cid, "pending", timeout=30)
        assert str(target) in card_text(card) and "hello-patch" in card_text(card)
        await c.act(cid, card["id"], "approve", "alice")
        replies = await c.wait_for(cid, has_final("Command done"), timeout=30)
        assert "Changed 1 file" in replies[0]
        assert target.read_text().strip() == "hello-patch"
    finally:
        for child in outside.iterdir():
            child.unlink()
        outside.rmdir()


async def test_stop_interrupts_a_running_command(service, chat):
    c, cid = chat(service), conv()
    await c.post(cid, "alice", "RUN: sleep 30")
    await c.wait_for(cid, lambda msgs: [m for m in msgs if "sleep 30" in m["text"]], timeout=30)
    started = time.monotonic()
    await c.post(cid, "alice", "/stop")
    replies = await c.wait_for(cid, has_final("Stopped"), timeout=15)
    assert time.monotonic() - started < 10
    assert len(replies) == 1


async def test_a_model_error_is_a_visible_failure(service, chat):
    c, cid = chat(service), conv()
    await c.post(cid, "alice", "FAIL")
    replies = await c.wait_for(cid, has_final("could not finish"), timeout=30)
    assert "mock failure" in replies[0]
    await c.post(cid, "alice", "after the failure")  # the session goes on
    await c.wait_for(cid, has_final("Mock reply: after the failure"), timeout=30)


async def test_twenty_sessions_run_concurrently_on_one_app_server(service, chat):
    c = chat(service)
    runtime = await wait_codex_ready(service)
    ids = [conv() for _ in range(20)]
    await asyncio.gather(*(c.post(cid, f"user{n}", f"SLOW 0.2: parallel {n} a b") for n, cid in enumerate(ids)))
    started = time.monotonic()
    for n, cid in enumerate(ids):
        assert await c.wait_for(cid, has_final(f"Mock reply: parallel {n} a b"), timeout=60)
    elapsed = time.monotonic() - started
    assert elapsed < 20  # serialized they would take 20 x (0.6 s of streaming + the turn's own time)
    assert readyz(service)["checks"]["runtime"]["pid"] == runtime["pid"]  # one app-server for all


async def test_a_thread_is_resumed_by_a_new_process(tmp_path, chat, codex_setup, model):
    proc = start_bridge(tmp_path / "data", codex_setup)
    try:
        c, cid = chat(proc), conv()
        await c.post(cid, "alice", "remember the word pelican")
        await c.wait_for(cid, has_final("Mock reply: remember the word pelican"), timeout=30)
        proc.stop()
        proc.start()
        before = len(model.requests)
        await c.post(cid, "alice", "what was the word")
        await c.wait_for(cid, has_final("Mock reply: what was the word"), timeout=30)
        seen = json.dumps(model.requests[before:])
        assert "remember the word pelican" in seen  # the resumed thread carried the history
        with sqlite3.connect(proc.data_dir / "bridge.db") as db:
            rows = db.execute("SELECT status FROM runtime_threads").fetchall()
        assert rows == [("active",)]
    finally:
        proc.kill()


async def test_a_thread_that_cannot_be_resumed_is_replaced_and_the_user_told(tmp_path, chat, codex_setup):
    proc = start_bridge(tmp_path / "data", codex_setup)
    try:
        c, cid = chat(proc), conv()
        await c.post(cid, "alice", "first")
        await c.wait_for(cid, has_final("Mock reply: first"), timeout=30)
        proc.stop()
        with sqlite3.connect(proc.data_dir / "bridge.db") as db:
            db.execute("UPDATE sessions SET runtime_thread_id = '00000000-0000-0000-0000-000000000000'")
            db.execute("UPDATE runtime_threads SET thread_id = '00000000-0000-0000-0000-000000000000'")
        proc.start()
        await c.post(cid, "alice", "second")
        await c.wait_for(cid, has_final("Mock reply: second"), timeout=30)
        texts = final_texts(await c.bot_messages(cid))
        assert any("could not be resumed" in t for t in texts)
        with sqlite3.connect(proc.data_dir / "bridge.db") as db:
            rows = db.execute("SELECT thread_id, status FROM runtime_threads ORDER BY id").fetchall()
        assert [s for _, s in rows] == ["lost", "active"]
    finally:
        proc.kill()


async def test_app_server_killed_mid_turn_gives_exactly_one_outcome(tmp_path, chat, codex_setup):
    proc = start_bridge(tmp_path / "data", codex_setup)
    try:
        c, cid = chat(proc), conv()
        first = await wait_codex_ready(proc)
        await c.post(cid, "alice", "RUN: sleep 20")
        await c.wait_for(cid, lambda msgs: [m for m in msgs if "sleep 20" in m["text"]], timeout=30)
        # kill -9 the native app-server (the npm wrapper's child), as a crash would end it
        children = Path(f"/proc/{first['pid']}/task/{first['pid']}/children").read_text().split()
        os.kill(int(children[0]) if children else first["pid"], signal.SIGKILL)
        replies = await c.wait_for(cid, has_final("restarted"), timeout=30)
        second = await wait_codex_ready(proc)
        assert second["pid"] != first["pid"] and second["restarts"] >= 1
        await asyncio.sleep(1.0)  # nothing else arrives for that turn
        assert len(final_texts(await c.bot_messages(cid))) == 1 == len(replies)
        # the conversation goes on, on the restarted app-server
        await c.post(cid, "alice", "still there?")
        await c.wait_for(cid, has_final("Mock reply: still there?"), timeout=30)
    finally:
        proc.kill()


async def test_stop_while_the_app_server_hangs_ends_the_turn_in_seconds(tmp_path, chat, codex_setup, model):
    """A /stop while the app-server is alive but not answering (SIGSTOP): `turn/interrupt` is not
    waited for past its own short timeout (not the 60 s of other requests, nor the heartbeat's
    30 s + 60 s); the process is taken as hung, killed and started again, and the turn says
    "Stopped" once."""
    proc = start_bridge(tmp_path / "data", codex_setup)
    first: dict = {}
    try:
        c, cid = chat(proc), conv()
        first = await wait_codex_ready(proc)
        asked = len(model.requests)
        await c.post(cid, "alice", "HANG")  # the model holds its answer: the turn stays in progress
        deadline = time.monotonic() + 30
        while "HANG" not in model.user_texts()[asked:]:
            assert time.monotonic() < deadline, "the turn never reached the model"
            await asyncio.sleep(0.05)
        os.killpg(first["pid"], signal.SIGSTOP)  # the npm wrapper leads the group, its native child in it
        started = time.monotonic()
        await c.post(cid, "alice", "/stop")
        replies = await c.wait_for(cid, has_final("Stopped"), timeout=30)
        assert time.monotonic() - started < 15
        assert "was not answering, so it was restarted" in replies[0]
        second = await wait_codex_ready(proc)
        assert second["pid"] != first["pid"] and second["hangs"] == 1 and second["restarts"] == 1
        await asyncio.sleep(1.0)  # nothing else arrives for that turn
        assert has_final("Stopped")(await c.bot_messages(cid)) == replies and len(replies) == 1
        assert not has_final("restarted", "did not finish")(await c.bot_messages(cid))
        # no turn is left running: the next message is a turn of its own on the new process
        await c.post(cid, "alice", "after the stop")
        await c.wait_for(cid, has_final("Mock reply: after the stop"), timeout=30)
    finally:
        proc.kill()
        if first:  # a stopped app-server the bridge did not kill (the test failed) must not outlive it
            with contextlib.suppress(ProcessLookupError):
                os.killpg(first["pid"], signal.SIGKILL)


async def test_missing_codex_is_a_clear_message_not_a_hang(tmp_path, chat, codex_setup):
    proc = start_bridge(tmp_path / "data", codex_setup, CODEX_BIN=str(tmp_path / "no-such-codex"))
    try:
        c, cid = chat(proc), conv()
        assert readyz(proc)["ok"] is False
        await c.post(cid, "alice", "hello")
        replies = await c.wait_for(cid, has_final("not available"), timeout=30)
        assert "no-such-codex" in replies[0]
    finally:
        proc.kill()


async def test_switching_back_to_a_session_keeps_its_codex_context(service, chat, model):
    c, cid = chat(service), conv()
    await c.post(cid, "alice", "remember the word walrus")
    await c.wait_for(cid, has_final("Mock reply: remember the word walrus"), timeout=30)
    await c.post(cid, "alice", "/new")
    await c.wait_for(cid, has_final("New session"))
    await c.post(cid, "alice", "a fresh start")
    await c.wait_for(cid, has_final("Mock reply: a fresh start"), timeout=30)
    assert "walrus" not in json.dumps(model.requests[-1]["input"])  # a new thread
    await c.post(cid, "alice", "/switch 1")
    await c.wait_for(cid, has_final("Switched to session `main`"))
    await c.post(cid, "alice", "which word?")
    await c.wait_for(cid, has_final("Mock reply: which word?"), timeout=30)
    assert "walrus" in json.dumps(model.requests[-1]["input"])  # the first thread again


async def test_in_a_group_codex_sees_who_said_it(service, chat, model):
    c, cid = chat(service), f"g-{uuid.uuid4().hex[:8]}"
    await c.post(cid, "alice", "hello from the group")
    await c.wait_for(cid, has_final("[alice] hello from the group"), timeout=30)
    assert "[alice] hello from the group" in model.user_texts()


async def test_with_the_steer_policy_messages_join_the_running_turn(tmp_path, chat, codex_setup, model):
    proc = start_bridge(tmp_path / "data", codex_setup, BRIDGE_BUSY_POLICY="steer")
    try:
        c, cid = chat(proc), conv()
        await c.post(cid, "alice", "RUN: sleep 3")
        await c.wait_for(cid, lambda msgs: [m for m in msgs if "sleep 3" in m["text"]], timeout=30)
        for n in range(3):
            await c.post(cid, "alice", f"also consider point {n}")
        await c.wait_for(cid, lambda msgs: len(has_final("Added to the running turn")(msgs)) == 3, timeout=15)
        await c.wait_for(cid, has_final("Ran 1 command"), timeout=30)
        seen = json.dumps(model.requests[-1]["input"])
        assert all(f"also consider point {n}" in seen for n in range(3))
        turns = [t for t in final_texts(await c.bot_messages(cid)) if "Ran 1 command" in t]
        assert len(turns) == 1  # one turn took all of it
    finally:
        proc.kill()


async def test_a_turn_over_its_time_limit_is_stopped_and_said_so(tmp_path, chat, codex_setup):
    proc = start_bridge(tmp_path / "data", codex_setup, BRIDGE_TURN_TIMEOUT="2")
    try:
        c, cid = chat(proc), conv()
        await c.post(cid, "alice", "RUN: sleep 30")
        started = time.monotonic()
        replies = await c.wait_for(cid, has_final("BRIDGE_TURN_TIMEOUT"), timeout=30)
        assert time.monotonic() - started < 20 and len(replies) == 1
        assert "ran longer than 2 s" in replies[0]
        await c.post(cid, "alice", "after the limit")  # the conversation goes on
        await c.wait_for(cid, has_final("Mock reply: after the limit"), timeout=30)
    finally:
        proc.stop()


async def test_a_turn_over_its_time_limit_on_a_hung_app_server_has_it_restarted(tmp_path, chat, codex_setup, model):
    """The turn's time limit cancels it in the bridge; interrupting it in codex finds the
    app-server hung (SIGSTOP), which is then killed and started again at once, not left for the
    heartbeat to find a minute later."""
    proc = start_bridge(tmp_path / "data", codex_setup, BRIDGE_TURN_TIMEOUT="3")
    first: dict = {}
    try:
        c, cid = chat(proc), conv()
        first = await wait_codex_ready(proc)
        asked = len(model.requests)
        await c.post(cid, "alice", "HANG")
        deadline = time.monotonic() + 30
        while "HANG" not in model.user_texts()[asked:]:
            assert time.monotonic() < deadline, "the turn never reached the model"
            await asyncio.sleep(0.05)
        os.killpg(first["pid"], signal.SIGSTOP)
        replies = await c.wait_for(cid, has_final("BRIDGE_TURN_TIMEOUT"), timeout=30)
        assert len(replies) == 1
        deadline = time.monotonic() + 15  # the limit (3 s) + the interrupt's timeout (5 s) + a start
        while (state := readyz(proc)["checks"]["runtime"]).get("pid") == first["pid"]:
            assert time.monotonic() < deadline, f"the hung app-server was not restarted: {state}"
            await asyncio.sleep(0.2)
        second = await wait_codex_ready(proc)
        assert second["hangs"] == 1 and second["restarts"] == 1
        await c.post(cid, "alice", "after the limit")
        await c.wait_for(cid, has_final("Mock reply: after the limit"), timeout=30)
    finally:
        proc.kill()
        if first:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(first["pid"], signal.SIGKILL)


async def test_a_thread_started_elsewhere_is_handed_off_to_a_chat_and_continues_there(
        tmp_path, chat, codex_setup, model, service):
    """`agent-bridge handoff`: a Codex thread begun outside this service (here by another one,
    sharing CODEX_HOME, as a terminal session would) becomes a conversation's active session; the
    next message there resumes it, with its history."""
    elsewhere = start_bridge(tmp_path / "elsewhere", codex_setup)
    try:
        c, cid = chat(elsewhere), conv()
        await c.post(cid, "alice", "remember the word heron")
        await c.wait_for(cid, has_final("Mock reply: remember the word heron"), timeout=30)
        with sqlite3.connect(elsewhere.data_dir / "bridge.db") as db:
            [(thread,)] = db.execute("SELECT runtime_thread_id FROM sessions").fetchall()
    finally:
        elsewhere.stop()
    target = conv()
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}, **codex_setup,
           "BRIDGE_DATA_DIR": str(service.data_dir)}
    out = subprocess.run([sys.executable, "-m", "bridge", "handoff", thread, "--to", f"webchat:{target}",
                          "--name", "terminal"], capture_output=True, text=True, env=env, cwd=service.data_dir,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    c = chat(service)
    await c.wait_for(target, has_final("Handed off from the terminal", thread))
    before = len(model.requests)
    await c.post(target, "bob", "what was the word")
    await c.wait_for(target, has_final("Mock reply: what was the word"), timeout=30)
    assert "remember the word heron" in json.dumps(model.requests[before:])  # the thread's history came along
    await c.post(target, "bob", "/status")
    await c.wait_for(target, has_final("Session `terminal`"))


def _start_overheads(proc: BridgeProcess) -> tuple[float, float]:
    """bridge_runtime_overhead_seconds{phase="start"}: (turns under 0.25 s, all turns)."""
    with urllib.request.urlopen(f"{proc.url}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith("bridge_runtime_overhead_seconds_") and 'phase="start"' in line:
            name, value = line.rsplit(" ", 1)
            values[name] = float(value)
    under = values['bridge_runtime_overhead_seconds_bucket{le="0.25",phase="start"}']
    return under, values['bridge_runtime_overhead_seconds_count{phase="start"}']


async def test_the_bridges_overhead_leaves_out_the_wait_behind_an_earlier_turn(tmp_path, chat, codex_setup):
    """A message queued behind its conversation's running turn (2 s here) waited: that is not
    the bridge's own time before the runtime, which the start overhead measures."""
    proc = start_bridge(tmp_path / "data", codex_setup)
    try:
        c, cid = chat(proc), conv()
        await c.post(cid, "alice", "SLOW 0.5: one two three four five")
        await c.post(cid, "alice", "queued behind it")
        await c.wait_for(cid, has_final("Mock reply: queued behind it"), timeout=30)
        assert _start_overheads(proc) == (2.0, 2.0)
    finally:
        proc.kill()
