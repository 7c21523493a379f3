import os
import subprocess
import sys
from pathlib import Path

import pytest

from bridge.config import ConfigError, load_settings


def test_defaults(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = load_settings()
    assert (s.host, s.port, s.runtime) == ("127.0.0.1", 8788, "shell")
    assert s.database_url == f"sqlite+aiosqlite:///{(tmp_path / 'data' / 'bridge.db').resolve()}"
    assert s.workspace == (tmp_path / "data" / "workspace").resolve()


def test_a_copy_of_env_example_starts_on_the_defaults(tmp_path, monkeypatch):
    """`.env.example` copied to `.env` as it says: its blank settings are the defaults (an empty
    path would be the current directory: the workspace, the routines, the rules file)."""
    for name in list(os.environ):
        if name.startswith(("BRIDGE_", "FEISHU_", "SLACK_", "CODEX_", "CLAUDE_")):
            monkeypatch.delenv(name)
    example = Path(__file__).resolve().parents[2] / ".env.example"
    (tmp_path / ".env").write_text(example.read_text())
    monkeypatch.chdir(tmp_path)
    s = load_settings()
    assert s.workspace == (tmp_path / "data" / "workspace").resolve()
    assert s.routines_dir == Path("data") / "routines"
    assert s.approval_rules is None
    assert s.database_url == f"sqlite+aiosqlite:///{(tmp_path / 'data' / 'bridge.db').resolve()}"


def test_http_workers(monkeypatch):
    monkeypatch.setenv("BRIDGE_HTTP_WORKERS", "3")
    assert load_settings().edge_workers == 3
    monkeypatch.setenv("BRIDGE_HTTP_WORKERS", "0")
    assert load_settings().edge_workers == 0
    monkeypatch.setenv("BRIDGE_HTTP_WORKERS", "auto")
    cpus = len(os.sched_getaffinity(0))
    assert load_settings().edge_workers == (1 if cpus >= 2 else 0)


def test_admins_are_split_and_qualified(monkeypatch):
    monkeypatch.setenv("BRIDGE_ADMINS", "webchat:alice, feishu:ou_1")
    s = load_settings()
    assert s.admins == ["webchat:alice", "feishu:ou_1"]
    assert s.is_admin("webchat", "alice") and not s.is_admin("webchat", "bob")
    monkeypatch.setenv("BRIDGE_ADMINS", "alice")
    with pytest.raises(ConfigError, match="BRIDGE_ADMINS"):
        load_settings()


@pytest.mark.parametrize("name,value", [
    ("BRIDGE_PORT", "eighty"), ("BRIDGE_PORT", "70000"), ("BRIDGE_RUNTIME", "gpt"), ("BRIDGE_RUNTIME", "claude"),
    ("BRIDGE_DATABASE_URL", "mysql://x"), ("BRIDGE_LOG_LEVEL", "loud"),
    ("BRIDGE_HTTP_WORKERS", "many"), ("BRIDGE_HTTP_WORKERS", "-1"), ("BRIDGE_HTTP_WORKERS", "33"),
    ("CODEX_BIN", "codex --profile \"unclosed"),
])
def test_invalid_setting_names_the_setting(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        load_settings()


def test_cli_exits_2_with_one_line(tmp_path):
    env = {"PATH": "/usr/bin:/bin", "BRIDGE_PORT": "nope", "BRIDGE_DATA_DIR": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "bridge", "serve"], env=env, capture_output=True, text=True,
                            cwd=tmp_path, timeout=30)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "BRIDGE_PORT" in lines[0]


def test_env_file_is_read(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    Path(".env").write_text("BRIDGE_PORT=9123\n")
    assert load_settings().port == 9123


def test_a_feishu_webhook_needs_something_to_check_requests_by(monkeypatch):
    monkeypatch.setenv("FEISHU_APP_ID", "cli_x")
    monkeypatch.setenv("FEISHU_APP_SECRET", "secret")
    with pytest.raises(ConfigError, match="FEISHU_VERIFICATION_TOKEN"):
        load_settings()
    monkeypatch.setenv("FEISHU_CONNECTION", "websocket")  # no webhook: nothing to check
    assert load_settings().feishu_enabled
    monkeypatch.setenv("FEISHU_CONNECTION", "webhook")
    monkeypatch.setenv("FEISHU_VERIFICATION_TOKEN", "t")
    assert load_settings().feishu_enabled


def test_a_setting_of_two_types_is_named_once(monkeypatch):
    monkeypatch.setenv("BRIDGE_HTTP_WORKERS", "x")
    with pytest.raises(ConfigError) as refused:
        load_settings()
    assert str(refused.value).count("BRIDGE_HTTP_WORKERS") == 1 and "'auto'" in str(refused.value)
