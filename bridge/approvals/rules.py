"""Approval rules: what runs at once, what is refused, what asks a person.

A YAML file (default: `templates/approval-rules.yaml`) holds ordered rules at three scopes:
global, per workspace and per conversation. For a request, the conversation's rules are tried
first, then the workspace's, then the global ones; the first rule that matches decides (`allow`,
`deny` with a message, or `ask`). When none matches, the preset of the most specific scope that
sets one decides:

- `strict`: ask for everything;
- `default`: allow read-only commands (see `shell_policy`), ask for the rest;
- `trusted`: allow commands that stay inside the workspace, ask for the rest.

Command patterns match the parsed argv of each command in a line (`;`, `&&`, `|` ... split it):
words are shell-style globs, and a last word `*` also matches "any further arguments". A `deny`
rule matches when any command of the line matches; an `allow` rule only when every command does.
A file with an error stops start-up naming the file, the line and the reason.
"""

from __future__ import annotations

import fnmatch
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from bridge.runtimes.shell_policy import CONTROL_CHARS, is_operator, is_read_only, tokenize

Action = Literal["allow", "deny", "ask"]
Preset = Literal["strict", "default", "trusted"]
DEFAULT_FILE = Path(__file__).resolve().parents[2] / "templates" / "approval-rules.yaml"
_GLOB = re.compile(r"[*?\[]")


class RulesError(Exception):
    """The rules file is unusable; the message names the file, the line and the reason."""


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = ""
    action: Action
    command: list[str] = Field(default_factory=list)
    paths: list[str] = Field(default_factory=list)
    runtime: list[str] = Field(default_factory=list)
    message: str = ""

    @field_validator("command", "paths", "runtime", mode="before")
    @classmethod
    def _one_or_many(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("command")
    @classmethod
    def _parsable(cls, value: list[str]) -> list[str]:
        for pattern in value:
            try:
                if not shlex.split(pattern):
                    raise ValueError("an empty command pattern")
            except ValueError as exc:
                raise ValueError(f"command pattern {pattern!r}: {exc}") from None
        return value


class Scope(BaseModel):
    model_config = ConfigDict(extra="forbid")

    preset: Preset | None = None
    rules: list[Rule] = Field(default_factory=list)


class RulesFile(Scope):
    version: Literal[1] = 1
    workspaces: dict[str, Scope] = Field(default_factory=dict)
    conversations: dict[str, Scope] = Field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    rule: str  # the rule's name, or "preset:<name>"
    message: str = ""


@dataclass(frozen=True, slots=True)
class RequestFacts:
    kind: str
    command: str | None
    paths: tuple[str, ...]
    runtime: str
    workspace: str
    conversation: str
    mode: str | None = None  # the session's `/mode`: overrides the files' presets
    cwd: str | None = None  # where the command runs, when the runtime says (else the workspace)



def _chains(operator: str) -> bool:
    """Whether an operator token (shlex runs adjacent ones together: `;\n`, `)|`) ends a command,
    rather than redirecting one (`>`, `2>&1`'s `>&`, `&>`). `>|` counts as a chain: the word after
    it then stands as a command of its own, which can only make an allow rule miss."""
    return any(ch in operator for ch in ";\n|()") or operator == "&" or "&&" in operator


def split_commands(line: str, *, comments: bool = False) -> list[list[str]] | None:
    """The argv of each command in a shell line, or None when it cannot be parsed. `comments`:
    as `shell_policy.tokenize` has it (off: every word bash could run, and perhaps more)."""
    tokens = tokenize(line, comments=comments)
    if tokens is None:
        return None
    commands: list[list[str]] = [[]]
    for token in tokens:
        if is_operator(token):
            if _chains(token):
                commands.append([])
            continue  # redirections: the words around them still count
        commands[-1].append(token)
    return [c for c in commands if c]


def _word_matches(word: str, pattern: str) -> bool:
    """A shell-style glob; in a path-like pattern `*` stays within one path segment."""
    if "/" not in pattern:
        return fnmatch.fnmatchcase(word, pattern)
    parts, wanted = word.split("/"), pattern.split("/")
    return len(parts) == len(wanted) and all(fnmatch.fnmatchcase(a, p) for a, p in zip(parts, wanted))


def _argv_matches(pattern: list[str], argv: list[str]) -> bool:
    if pattern and argv and not _GLOB.search(pattern[0]) and pattern[0] != argv[0]:
        return False  # the program named literally, and another one: no glob to try
    if pattern and pattern[-1] == "*" and len(argv) >= len(pattern) - 1:
        head = pattern[:-1]
        return all(_word_matches(a, p) for p, a in zip(head, argv))
    return len(pattern) == len(argv) and all(_word_matches(a, p) for p, a in zip(pattern, argv))


class Rules:
    def __init__(self, parsed: RulesFile, source: str) -> None:
        self.parsed = parsed
        self.source = source
        self._patterns = {
            id(rule): [shlex.split(p) for p in rule.command]
            for scope in self._all_scopes() for rule in scope.rules
        }
        # the workspace scopes' roots, longest first (resolved once: the file names them)
        roots = [(Path(k).expanduser().resolve(), scope) for k, scope in parsed.workspaces.items()]
        self._roots = sorted(roots, key=lambda item: len(str(item[0])), reverse=True)

    def _all_scopes(self) -> list[Scope]:
        return [self.parsed, *self.parsed.workspaces.values(), *self.parsed.conversations.values()]

    def _scopes_for(self, facts: RequestFacts) -> list[Scope]:
        scopes: list[Scope] = []
        conversation = self.parsed.conversations.get(facts.conversation)
        if conversation is not None:
            scopes.append(conversation)
        if self._roots:
            workspace = Path(facts.workspace).resolve()
            for root, scope in self._roots:
                if workspace == root or root in workspace.parents:
                    scopes.append(scope)
        scopes.append(self.parsed)
        return scopes

    def decide(self, facts: RequestFacts) -> Verdict:
        scopes = self._scopes_for(facts)
        views = _views(facts.command) if facts.command is not None else None
        for scope in scopes:
            for rule in scope.rules:
                if self._matches(rule, facts, views):
                    return Verdict(rule.action, rule.name or rule.action, rule.message)
        preset = facts.mode or next((s.preset for s in scopes if s.preset), "default")
        return Verdict(self._preset(preset, facts), f"preset:{preset}")

    def _matches(self, rule: Rule, facts: RequestFacts, views: tuple[list[list[str]], ...] | None) -> bool:
        if rule.runtime and facts.runtime not in rule.runtime:
            return False
        if rule.paths:
            if not facts.paths or not any(
                fnmatch.fnmatchcase(path, pattern) for path in facts.paths for pattern in rule.paths
            ):
                return False
            if not rule.command:
                return True
        if not rule.command:
            return not rule.paths and bool(rule.runtime)  # a rule on the runtime alone
        if not views:
            return False
        patterns = self._patterns[id(rule)]
        if rule.action == "deny":  # any command of either reading of the line
            return any(any(_argv_matches(p, argv) for p in patterns) for commands in views for argv in commands)
        # allow and ask: every command of every word bash could run (the reading without comments)
        return all(any(_argv_matches(p, argv) for p in patterns) for argv in views[0])

    @staticmethod
    def _preset(preset: str, facts: RequestFacts) -> Action:
        if preset == "strict":
            return "ask"
        if facts.kind == "command" and facts.command is not None:
            if is_read_only(facts.command) and _reads_inside(facts.command, facts.workspace, facts.cwd):
                return "allow"
            if preset == "trusted" and _stays_inside(facts.command, facts.workspace, facts.cwd):
                return "allow"
            return "ask"
        if facts.kind == "file_change" and preset == "trusted" and facts.paths:
            root = Path(facts.workspace).resolve()
            inside = all(_within((root / p).resolve(), root) for p in facts.paths)
            return "allow" if inside else "ask"
        return "ask"


def _views(command: str) -> tuple[list[list[str]], ...] | None:
    """A line's commands as bash could run them (every word, `#` kept), then, when it differs,
    as read with comments: a deny rule matches either, so `rm -rf / # gone` is still refused."""
    every = split_commands(command)
    if not every:
        return None
    commented = split_commands(command, comments=True) if "#" in command else None
    return (every,) if not commented or commented == every else (every, commented)


# what bash would expand into a path the checks below cannot see (`$HOME/`, `~`, a backslash ...)
UNSEEN = ("`", "$", "~", "\\")


def _stays_inside(command: str, workspace: str, cwd: str | None = None) -> bool:
    """The command runs inside the workspace and no argument leaves it: no absolute path outside
    it, no `..` above it, no `cd`, and nothing bash would expand into a path the check cannot see.
    Relative paths are taken from where the command runs."""
    commands = split_commands(command)
    if commands is None or any(s in command for s in UNSEEN) or CONTROL_CHARS.search(command):
        return False
    return _args_inside(commands, workspace, cwd)


# read-only programs that open no file named by their arguments
READS_NO_FILE = frozenset({"echo", "pwd", "date", "whoami", "uname"})


def _reads_inside(command: str, workspace: str, cwd: str | None = None) -> bool:
    """A read-only line reads nothing outside the workspace: no file of the host (its secrets,
    the service's own settings and database) is shown to whoever can post in a chat without a
    person approving it. Programs that read no file pass (and /dev/null reads nothing); the
    others' arguments must stay inside the workspace, as for `_stays_inside`."""
    commands = split_commands(command)
    if commands is None:
        return False
    readers = [[arg for arg in argv if arg != "/dev/null"] for argv in commands
               if argv and argv[0] not in READS_NO_FILE]
    if not readers:
        return True
    if any(CONTROL_CHARS.search(arg) or any(s in arg for s in UNSEEN) for argv in readers for arg in argv):
        return False
    return _args_inside(readers, workspace, cwd)


def _args_inside(commands: list[list[str]], workspace: str, cwd: str | None) -> bool:
    """Each command runs inside the workspace and none of its arguments names a path outside it."""
    root = Path(workspace).resolve()
    here = Path(workspace, cwd).resolve() if cwd else root  # an absolute cwd replaces the workspace
    if not _within(here, root):
        return False
    for argv in commands:
        if argv[0] in ("cd", "pushd", "sudo", "su", "chroot"):
            return False
        for arg in argv[1:]:
            value = arg.split("=", 1)[1] if arg.startswith("-") and "=" in arg else arg
            if "/" not in value and value != "..":
                continue
            if not _within((here / value).resolve(), root):
                return False
    return True


def _within(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def load(path: str | Path | None = None) -> Rules:
    """Parse and check a rules file; RulesError names the file, the line and the reason."""
    file = Path(path) if path else DEFAULT_FILE
    try:
        text = file.read_text(encoding="utf-8")
    except OSError as exc:
        raise RulesError(f"{file}: cannot read the approval rules: {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text) or {}
        root = yaml.compose(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise RulesError(f"{file}{line}: {exc.problem or exc}") from None
    try:
        return Rules(RulesFile.model_validate(data), str(file))
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = tuple(err.get("loc", ()))
        where = ".".join(str(p) for p in loc) or "(top level)"
        line = _line_of(root, loc)
        raise RulesError(f"{file}{f':{line}' if line else ''}: {where}: {err.get('msg')}") from None


def _line_of(node: Any, loc: tuple[Any, ...]) -> int | None:
    """The 1-based line of the YAML node at `loc` (or of its nearest parent that exists)."""
    line = node.start_mark.line + 1 if node is not None else None
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            child = next((v for k, v in node.value if k.value == str(part)), None)
            key = next((k for k, v in node.value if k.value == str(part)), None)
            if child is None:
                return line
            node, line = child, (key.start_mark.line + 1)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line
