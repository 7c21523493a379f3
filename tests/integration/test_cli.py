"""The command line, run as a user runs it."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys

import bridge
from migrations import HEAD


def run(args, tmp_path, **env):
    base = {k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")}
    base.update({"BRIDGE_DATA_DIR": str(tmp_path / "data"), **env})
    return subprocess.run([sys.executable, "-m", "bridge", *args], env=base, cwd=tmp_path, capture_output=True,
                          text=True, timeout=60)


def test_version(tmp_path):
    result = run(["version"], tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == f"agent-bridge {bridge.__version__}"
    result = run(["--version"], tmp_path)
    assert result.returncode == 0 and result.stdout.strip() == f"agent-bridge {bridge.__version__}"


def test_a_one_shot_command_prints_its_result_and_not_the_stores_records(tmp_path):
    assert run(["db", "upgrade"], tmp_path).returncode == 0
    result = run(["outbox", "retry", "--all-dead"], tmp_path)  # writes through the store
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and result.stdout.strip()


def test_db_upgrade_creates_the_schema(tmp_path):
    result = run(["db", "upgrade"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert f"revision {HEAD}" in result.stdout
    with sqlite3.connect(tmp_path / "data" / "bridge.db") as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"inbound_events", "turns", "outbox", "approvals", "sessions", "conversations", "webchat_messages"} <= tables


def test_doctor_passes_on_defaults_and_fails_on_a_bad_store(tmp_path):
    ok = run(["doctor"], tmp_path)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    names = [line.split()[0] for line in ok.stdout.splitlines() if line.strip()]
    assert names == ["config", "store", "runtime", "workspace", "approval", "channel:webchat"]
    everywhere = run(["doctor"], tmp_path, BRIDGE_HOST="0.0.0.0")
    assert "http://127.0.0.1:8788/chat (listening on every interface)" in everywhere.stdout
    bad = run(["doctor"], tmp_path, BRIDGE_DATABASE_URL="postgresql+asyncpg://nobody@127.0.0.1:1/none")
    assert bad.returncode == 1
    store_line = next(line for line in bad.stdout.splitlines() if line.startswith("store"))
    assert "FAIL" in store_line and "cannot connect" in store_line
    rules = tmp_path / "rules.yaml"
    rules.write_text("preset: lax\n")
    broken = run(["doctor"], tmp_path, BRIDGE_APPROVAL_RULES=str(rules))
    rules_line = next(line for line in broken.stdout.splitlines() if line.startswith("approval rules"))
    assert broken.returncode == 1 and "FAIL" in rules_line and f"{rules}:1: preset" in rules_line
