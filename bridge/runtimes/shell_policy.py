"""Which shell commands are read-only enough to run without asking.

A command runs at once only if every pipeline segment starts with an allowlisted program and the
line has no shell operator that could write or chain (`>`, `;`, `&&`, `||`, `&`, `<`, backticks,
`$(`, process substitution, newlines). Anything else goes to the human gate.
"""

from __future__ import annotations

import shlex

READ_ONLY_PROGRAMS = frozenset({"ls", "pwd", "cat", "head", "tail", "wc", "echo", "date", "whoami", "uname"})
READ_ONLY_GIT = frozenset({"status", "log", "diff", "show"})
FORBIDDEN_SUBSTRINGS = ("`", "$(", "<(", ">(", "\n", "\r")
# Options that make otherwise read-only programs write somewhere.
WRITING_OPTIONS = {
    "date": ("-s", "--set"),
    "git": ("--output", "-o", "--ext-diff", "-c", "--exec-path", "--git-dir", "--work-tree"),
}


def is_operator(token: str) -> bool:
    return bool(token) and all(ch in "();<>|&" for ch in token)


def tokenize(line: str) -> list[str] | None:
    """A shell line's words and operators (`|`, `&&`, `>` ... as their own tokens), or None when
    it does not parse (an unclosed quote)."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    try:
        return list(lexer)
    except ValueError:
        return None


def split_pipeline(command: str) -> list[list[str]] | None:
    """Tokens of each `|` segment, or None when the line has any other operator or won't parse."""
    if any(s in command for s in FORBIDDEN_SUBSTRINGS):
        return None
    tokens = tokenize(command)
    if tokens is None:
        return None
    segments: list[list[str]] = [[]]
    for token in tokens:
        if token == "|":
            segments.append([])
        elif is_operator(token):
            return None
        else:
            segments[-1].append(token)
    if any(not seg for seg in segments):
        return None
    return segments


def _segment_is_read_only(tokens: list[str]) -> bool:
    program, args = tokens[0], tokens[1:]
    if program == "git":
        if not args or args[0] not in READ_ONLY_GIT:
            return False
    elif program not in READ_ONLY_PROGRAMS:
        return False
    for arg in args:
        for bad in WRITING_OPTIONS.get(program, ()):
            if arg == bad or arg.startswith(bad + "=") or (bad.startswith("--") and arg.startswith(bad)):
                return False
    return True


def is_read_only(command: str) -> bool:
    segments = split_pipeline(command.strip())
    return segments is not None and all(_segment_is_read_only(seg) for seg in segments)
