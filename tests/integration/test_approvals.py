"""The human gate's decisions, retries, shortcuts and audit, through the web chat API."""

from __future__ import annotations

import asyncio
import sqlite3

from tests.support.chat import final_texts


def audit_events(proc) -> list[tuple[str, str | None]]:
    with sqlite3.connect(proc.data_dir / "bridge.db") as conn:
        return conn.execute("SELECT event, actor FROM approval_audit ORDER BY id").fetchall()


def has_final(*words):
    return lambda msgs: [t for t in final_texts(msgs) if all(w in t for w in words)]


async def test_approve_for_session_covers_the_same_command_only(bridge, chat):
    proc = bridge()
    c = chat(proc)
    await c.post("c-s", "alice", "touch one.txt")
    card = await c.wait_card("c-s", "pending")
    status, body = await c.act("c-s", card["id"], "approve_session", "alice")
    assert status == 200 and "session" in body["toast"]
    assert (await c.wait_card("c-s", "approved_for_session"))["card"]["actions"] == []
    await c.wait_for("c-s", has_final("exit 0"))
    # the same command again: no new card
    await c.post("c-s", "alice", "touch one.txt")
    await c.wait_for("c-s", lambda msgs: len([t for t in final_texts(msgs) if "exit 0" in t]) == 2)
    cards = [m for m in await c.bot_messages("c-s") if m["card"]]
    assert len(cards) == 1
    # a different command still asks
    await c.post("c-s", "alice", "touch two.txt")
    await c.wait_card("c-s", "pending")
    assert ("auto_approved", None) in audit_events(proc)


async def test_stop_button_ends_the_turn_without_running(bridge, chat):
    proc = bridge()
    c = chat(proc)
    await c.post("c-stopb", "alice", "touch nope.txt")
    card = await c.wait_card("c-stopb", "pending")
    status, _ = await c.act("c-stopb", card["id"], "stop", "alice")
    assert status == 200
    await c.wait_card("c-stopb", "stopped")
    await c.wait_for("c-stopb", has_final("Not run (stopped)"))
    assert not (proc.data_dir / "workspace" / "nope.txt").exists()


async def test_retry_after_a_restart_asks_again_and_runs(bridge, chat):
    proc = bridge()
    c = chat(proc)
    await c.post("c-r", "alice", "touch retried.txt")
    await c.wait_card("c-r", "pending")
    proc.kill()
    proc.start()
    interrupted = await c.wait_card("c-r", "interrupted")
    notice = (await c.wait_for("c-r", has_final("Interrupted: the service restarted")))[0]
    assert "Retry on its approval card asks again." in notice and "Send it again" not in notice
    status, body = await c.act("c-r", interrupted["id"], "retry", "alice")
    assert (status, body["toast"]) == (200, "Retrying.")
    fresh = await c.wait_for("c-r", lambda msgs: [m for m in msgs if m["card"] and m["card"]["status"] == "pending"
                                                  and m["id"] != interrupted["id"]])
    old = next(m for m in await c.bot_messages("c-r") if m["id"] == interrupted["id"])
    assert old["card"]["actions"] == [] and "Retried by alice" in old["card"]["body"]
    status, _ = await c.act("c-r", interrupted["id"], "retry", "alice")
    assert status == 409  # once per card
    await c.post("c-r", "alice", "/status")
    said = (await c.wait_for("c-r", has_final("Waiting for approval (see the card above)")))[0]
    assert said.count("Waiting for approval") == 1 and "Now:" not in said
    await c.act("c-r", fresh[0]["id"], "approve", "alice")
    await c.wait_for("c-r", has_final("exit 0"))
    assert (proc.data_dir / "workspace" / "retried.txt").exists()
    events = [e for e, _ in audit_events(proc)]
    assert events[:3] == ["requested", "interrupted", "retried"] and events.count("requested") == 2


async def test_slash_retry_after_expiry(bridge, chat):
    proc = bridge(BRIDGE_APPROVAL_TIMEOUT="1")
    c = chat(proc)
    await c.post("c-rx", "alice", "touch late.txt")
    await c.wait_card("c-rx", "expired", timeout=10)
    await c.post("c-rx", "alice", "/retry")
    await c.wait_for("c-rx", has_final("Retrying"))
    await c.wait_for("c-rx", lambda msgs: len([m for m in msgs if m["card"]]) == 2)
    await c.post("c-rx", "alice", "/retry")  # the first card was retried; the second may not have expired
    await c.wait_for("c-rx", lambda msgs: len([t for t in final_texts(msgs) if "Retrying" in t or "Nothing to retry"
                                               in t]) == 2)


async def test_y_answers_the_single_pending_approval(bridge, chat):
    proc = bridge()
    c = chat(proc)
    await c.post("c-y", "alice", "touch y.txt")
    await c.wait_card("c-y", "pending")
    await c.post("c-y", "alice", "y")
    await c.wait_card("c-y", "approved")
    await c.wait_for("c-y", has_final("exit 0"))
    assert (proc.data_dir / "workspace" / "y.txt").exists()
    # with nothing pending, "y" is an ordinary message: here a shell command, which asks first
    await c.post("c-y", "alice", "y")
    card = await c.wait_card("c-y", "pending")
    assert card["card"]["title"] == "Waiting for approval: Run `y`"


async def test_y_with_two_pending_hints_and_approve_all_decides_both(bridge, chat):
    proc = bridge()
    c = chat(proc)
    await c.post("g-two", "alice", "touch a1.txt")
    await c.post("g-two2", "alice", "touch a2.txt")
    await c.wait_card("g-two", "pending")
    await c.wait_card("g-two2", "pending")
    # two conversations, one approval each: "y" decides only its own conversation's approval
    await c.post("g-two", "alice", "y")
    await c.wait_card("g-two", "approved")
    assert (await c.wait_card("g-two2", "pending"))
    await c.post("g-two2", "bob", "approve all")  # bob asked nothing and is no admin: decides nothing
    await c.wait_for("g-two2", has_final("Nothing is waiting"))
    await c.post("g-two2", "alice", "n")
    await c.wait_card("g-two2", "denied")


async def test_group_member_cannot_decide_and_is_audited(bridge, chat):
    proc = bridge()
    c = chat(proc)
    await c.post("g-aud", "alice", "touch g.txt")
    card = await c.wait_card("g-aud", "pending")
    status, body = await c.act("g-aud", card["id"], "approve", "mallory")
    assert status == 403
    await c.act("g-aud", card["id"], "deny", "alice")
    await c.wait_card("g-aud", "denied")
    await asyncio.sleep(0.2)
    assert audit_events(proc) == [("requested", "alice"), ("refused", "mallory"), ("decided", "alice")]


async def test_cli_lists_approvals_and_the_audit_trail(bridge, chat, tmp_path):
    import os
    import subprocess
    import sys

    proc = bridge()
    c = chat(proc)
    await c.post("c-cli", "alice", "touch listed.txt")
    card = await c.wait_card("c-cli", "pending")
    await c.post("c-cli2", "bob", "touch waiting.txt")
    await c.wait_card("c-cli2", "pending")
    await c.act("c-cli", card["id"], "deny", "alice")
    await c.wait_card("c-cli", "denied")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    env["BRIDGE_DATA_DIR"] = str(proc.data_dir)

    def run(*args):
        out = subprocess.run([sys.executable, "-m", "bridge", *args], env=env, capture_output=True, text=True,
                             timeout=60, cwd=tmp_path)
        assert out.returncode == 0, out.stderr
        return out.stdout

    pending = run("approvals", "list", "--pending")
    assert "touch waiting.txt" in pending and "touch listed.txt" not in pending
    everything = run("approvals", "list")
    assert "denied" in everything and "pending" in everything
    audit = run("approvals", "audit", "--since", "1h")
    lines = [line for line in audit.splitlines() if line.strip()]
    assert [line.split()[2] for line in lines] == ["requested", "requested", "decided"]
    newest = [line for line in run("approvals", "audit", "--since", "1h", "--limit", "2").splitlines() if line.strip()]
    assert newest[0] == "the newest 2 of 3 audit records in that period (--limit)"
    assert [line.split()[2] for line in newest[1:]] == ["requested", "decided"]  # the newest two, oldest first
    assert "nothing" not in run("approvals", "audit", "--since", "2000-01-01")
    assert "no audit records" in run("approvals", "audit", "--since", "2999-01-01")


async def test_rm_rf_root_is_refused_with_the_rules_message(bridge, chat):
    proc = bridge()
    c = chat(proc)
    await c.post("c-rm", "alice", "rm -rf /")
    texts = await c.wait_for("c-rm", has_final("Not run (denied)"))
    assert "never allowed" in texts[0]
    assert not [m for m in await c.bot_messages("c-rm") if m["card"]]
    assert ("rule_deny", None) in audit_events(proc)


async def test_git_status_runs_without_a_card(bridge, chat):
    proc = bridge()
    c = chat(proc)
    await c.post("c-gs", "alice", "git status")
    await c.wait_for("c-gs", has_final("exit"))
    assert not [m for m in await c.bot_messages("c-gs") if m["card"]]


def test_a_rules_file_with_an_error_stops_serve(tmp_path):
    import os
    import subprocess
    import sys

    bad = tmp_path / "rules.yaml"
    bad.write_text("rules:\n  - action: allow\n    command: [unclosed\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    env.update(BRIDGE_DATA_DIR=str(tmp_path / "data"), BRIDGE_APPROVAL_RULES=str(bad), BRIDGE_PORT="0")
    out = subprocess.run([sys.executable, "-m", "bridge", "serve"], env=env, capture_output=True, text=True,
                         timeout=60, cwd=tmp_path)
    assert out.returncode == 2
    assert f"{bad}:4:" in out.stderr
