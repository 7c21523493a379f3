"""Sessions, control commands, the busy policy and access control, through the web chat API."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import subprocess
import sys
import time

from bridge.pipeline.sessions import CACHE_TTL
from tests.support.chat import final_texts

RULES = """
version: 1
preset: default
rules:
  - {name: tests may sleep, action: allow, command: ["sleep *"]}
"""


def has_final(*words):
    return lambda msgs: [t for t in final_texts(msgs) if all(w in t for w in words)]


def running(msgs):
    """The turn's message shows it working (a command with no output yet shows "Working…")."""
    return [m for m in msgs if "Working" in m["text"] or "running" in m["text"]]


def rules_env(tmp_path) -> dict[str, str]:
    path = tmp_path / "rules.yaml"
    path.write_text(RULES)
    return {"BRIDGE_APPROVAL_RULES": str(path)}


async def say(c, conv, text, user="alice"):
    status, _ = await c.post(conv, user, text)
    assert status == 202


async def test_new_sessions_switch_and_survive_a_restart(bridge, chat, tmp_path):
    proc = bridge()
    c = chat(proc)
    await say(c, "c-s", "echo first")
    await c.wait_for("c-s", has_final("first", "exit 0"))
    await say(c, "c-s", "/new experiment")
    await c.wait_for("c-s", has_final("New session `experiment`", "`main`"))
    await say(c, "c-s", "/sessions")
    listing = (await c.wait_for("c-s", has_final("Sessions:")))[0]
    assert "1. `main`" in listing and "▶️ 2. `experiment`" in listing
    await say(c, "c-s", "/switch 1")
    await c.wait_for("c-s", has_final("Switched to session `main`"))
    await say(c, "c-s", "/status")
    assert "Session `main`" in (await c.wait_for("c-s", has_final("Idle")))[0]
    proc.stop()
    proc.start()
    await say(c, "c-s", "/sessions")
    listings = await c.wait_for("c-s", lambda m: len(has_final("Sessions:")(m)) == 2 and has_final("Sessions:")(m))
    assert "▶️ 1. `main`" in listings[-1] and "2. `experiment`" in listings[-1]
    await say(c, "c-s", "/new experiment")
    await c.wait_for("c-s", has_final("Not created", "exists already"))


async def test_stop_ends_a_long_command_quickly_and_the_next_message_runs(bridge, chat, tmp_path):
    proc = bridge(**rules_env(tmp_path))
    c = chat(proc)
    await say(c, "c-stop", "sleep 30")
    await c.wait_for("c-stop", running, timeout=10)
    started = time.monotonic()
    await say(c, "c-stop", "/stop")
    await c.wait_for("c-stop", has_final("Stopped after"))
    assert time.monotonic() - started < 2.0
    await say(c, "c-stop", "echo after-stop")
    await c.wait_for("c-stop", has_final("after-stop", "exit 0"))


async def test_stop_all_drops_the_queue_and_queue_lists_it(bridge, chat, tmp_path):
    proc = bridge(**rules_env(tmp_path))
    c = chat(proc)
    await say(c, "c-q", "sleep 30")
    await c.wait_for("c-q", running, timeout=10)
    for n in range(3):
        await say(c, "c-q", f"echo queued-{n}")
    await c.wait_for("c-q", lambda msgs: len([m for m in msgs if m["text"].startswith("⏳ Queued")]) == 3)
    await say(c, "c-q", "/queue")
    listing = (await c.wait_for("c-q", has_final("Queued:")))[0]
    assert [f"echo queued-{n}" in listing for n in range(3)] == [True, True, True]
    await say(c, "c-q", "/stop all")
    await c.wait_for("c-q", has_final("3 queued message(s) dropped"))
    await c.wait_for("c-q", lambda msgs: len(has_final("Dropped by `/stop all`")(msgs)) == 3)
    await asyncio.sleep(1.0)
    assert not has_final("queued-0", "exit 0")(await c.bot_messages("c-q"))
    # again, with nothing left to stop: it says so
    await c.wait_for("c-q", has_final("Stopped"), timeout=10)
    await say(c, "c-q", "/stop all")
    await c.wait_for("c-q", has_final("Nothing is running and nothing is queued."))


async def test_a_burst_held_by_id_is_listed_dropped_and_told_once(bridge, chat, tmp_path):
    """With a burst threshold of 1 message/s, what queues behind a running turn is held by event
    id: /queue still lists the texts (from the inbox), /stop all still closes every one."""
    proc = bridge(BRIDGE_BURST_RATE="1", **rules_env(tmp_path))
    c = chat(proc)
    await say(c, "c-burst", "sleep 30")
    await c.wait_for("c-burst", running, timeout=10)
    await asyncio.gather(*(say(c, "c-burst", f"echo held-{n}") for n in range(25)))
    await say(c, "c-burst", "/queue")
    listing = (await c.wait_for("c-burst", has_final("Queued:")))[0]
    assert sum(f"echo held-{n}`" in listing for n in range(25)) == 20 and "… and 5 more" in listing
    await say(c, "c-burst", "/stop all")
    await c.wait_for("c-burst", has_final("25 queued message(s) dropped"))
    await c.wait_for("c-burst", lambda msgs: len(has_final("Dropped by `/stop all`")(msgs)) == 25, timeout=20)


async def test_interrupt_policy_stops_the_turn_for_the_new_message(bridge, chat, tmp_path):
    proc = bridge(BRIDGE_BUSY_POLICY="interrupt", **rules_env(tmp_path))
    c = chat(proc)
    await say(c, "c-int", "sleep 30")
    await c.wait_for("c-int", running, timeout=10)
    started = time.monotonic()
    await say(c, "c-int", "echo instead")
    await c.wait_for("c-int", has_final("instead", "exit 0"))
    assert time.monotonic() - started < 5.0
    assert has_final("Stopped after", "Stopped for your new message.")(await c.bot_messages("c-int"))


async def test_cwd_is_for_admins_inside_the_allowed_roots(bridge, chat, tmp_path):
    root = tmp_path / "projects"
    (root / "app").mkdir(parents=True)
    proc = bridge(BRIDGE_ADMINS="webchat:root", BRIDGE_ALLOWED_ROOTS=str(root))
    c = chat(proc)
    await say(c, "c-cwd", "/cwd /etc", user="mallory")
    await c.wait_for("c-cwd", has_final("Sorry", "/cwd", "admins"))
    await say(c, "c-cwd", "/cwd /etc", user="mallory")  # asked again: not answered twice within the minute
    await say(c, "c-cwd", "/resume t-1", user="mallory")  # another command: refused in its own words
    await c.wait_for("c-cwd", has_final("Sorry", "/resume", "admins"))
    await say(c, "c-cwd", "/cwd /etc", user="root")
    refused = (await c.wait_for("c-cwd", has_final("outside the allowed roots")))[0]
    assert str(root.resolve()) in refused
    await say(c, "c-cwd", f"/cwd {root / 'app'}", user="root")
    await c.wait_for("c-cwd", has_final("Workspace of session"))
    await say(c, "c-cwd", "pwd", user="root")
    await c.wait_for("c-cwd", has_final(str((root / "app").resolve()), "exit 0"))
    assert len(has_final("Sorry")(await c.bot_messages("c-cwd"))) == 2


async def test_mode_and_model_are_per_session_and_shown_in_status(bridge, chat, tmp_path):
    proc = bridge(BRIDGE_ADMINS="webchat:root")
    c = chat(proc)
    await say(c, "c-mode", "/mode strict")
    await c.wait_for("c-mode", has_final("Mode of session `main`: `strict`"))
    await say(c, "c-mode", "echo now-asks")  # read-only, but strict asks for everything
    await c.wait_card("c-mode", "pending")
    await say(c, "c-mode", "/mode trusted")
    await c.wait_for("c-mode", has_final("Sorry", "admins"))
    await say(c, "c-mode", "/model gpt-x")
    await c.wait_for("c-mode", has_final("Model of session `main`: `gpt-x`", "The shell runtime runs no model"))
    await say(c, "c-mode", "/status")
    status = (await c.wait_for("c-mode", has_final("Session `main`", "Waiting for approval")))[0]
    assert "mode `strict`" in status and "model `gpt-x`" in status and "echo now-asks" in status


async def test_unknown_commands_get_a_hint_and_help_is_a_card_with_command_buttons(bridge, chat):
    proc = bridge()
    c = chat(proc)
    await say(c, "c-h", "/frobnicate")
    await c.wait_for("c-h", has_final("Unknown command `/frobnicate`"))
    await say(c, "c-h", "/help")
    card = (await c.wait_for("c-h", lambda msgs: [m for m in msgs if m["card"] and m["card"]["kind"] == "help"]))[0]
    body = card["card"]["body"]
    assert all(cmd in body for cmd in ("/sessions", "/switch", "/steer", "/resume", "/cwd"))
    assert [a["id"] for a in card["card"]["actions"]] == ["cmd:status", "cmd:sessions", "cmd:queue", "cmd:new",
                                                          "cmd:stop"]
    status, body = await c.act("c-h", card["id"], "cmd:status", "alice")
    assert status == 200 and "/status" in body["toast"]
    await c.wait_for("c-h", has_final("Session `main`", "Idle"))
    status, _ = await c.act("c-h", card["id"], "cmd:nope", "alice")
    assert status == 400  # no such button on the card


def cli(proc, *argv: str) -> subprocess.CompletedProcess:
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")},
           "BRIDGE_DATA_DIR": str(proc.data_dir)}
    return subprocess.run([sys.executable, "-m", "bridge", *argv], capture_output=True, text=True, env=env,
                          cwd=proc.data_dir, timeout=60)


async def test_cli_lists_and_archives_sessions(bridge, chat):
    """(The handoff of a Codex thread to a chat is tested with the real codex, in test_codex.)"""
    proc = bridge()
    c = chat(proc)
    await say(c, "c-cli", "echo hi")
    await c.wait_for("c-cli", has_final("hi", "exit 0"))
    refused = cli(proc, "handoff", "thread-from-terminal", "--to", "webchat:c-cli")
    assert refused.returncode == 2 and "runs the shell runtime" in refused.stderr and "BRIDGE_RUNTIME=codex" in refused.stderr
    await say(c, "c-cli", "/new terminal")
    await c.wait_for("c-cli", has_final("New session `terminal`"))
    listing = cli(proc, "sessions", "list")
    assert "terminal" in listing.stdout and "main" in listing.stdout
    with sqlite3.connect(proc.data_dir / "bridge.db") as db:
        main_id = db.execute("SELECT id FROM sessions WHERE name = 'main'").fetchone()[0]
        active = db.execute("SELECT active_session_id FROM conversations WHERE key = 'webchat:c-cli'").fetchone()[0]
    assert active != main_id
    archived = cli(proc, "sessions", "archive", str(main_id))
    assert archived.returncode == 0 and archived.stdout.strip() == f"session {main_id} archived"
    again = cli(proc, "sessions", "archive", str(main_id))
    assert again.returncode == 0 and again.stdout.strip() == f"session {main_id} was archived already"
    refused = cli(proc, "sessions", "archive", str(active))
    assert refused.returncode == 1 and "active session" in refused.stderr
    await asyncio.sleep(CACHE_TTL + 0.5)  # the service picks up a binding changed from outside within the TTL
    await say(c, "c-cli", "/status")
    await c.wait_for("c-cli", has_final("Session `terminal`"), timeout=15)
    # the archived `main` keeps its number: `terminal` is still 2, and 1 says it is archived
    await say(c, "c-cli", "/sessions")
    listing = (await c.wait_for("c-cli", lambda m: [t for t in has_final("Sessions:")(m) if "terminal" in t]))[-1]
    assert "▶️ 2. `terminal`" in listing and "`main`" not in listing
    await say(c, "c-cli", "/switch 1")
    await c.wait_for("c-cli", has_final("Session 1 (`main`) is archived"))
