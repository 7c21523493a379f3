"""Which shell commands are read-only enough to run without asking.

A command runs at once only if every pipeline segment starts with an allowlisted program and the
line has no shell operator that could write or chain (`>`, `;`, `&&`, `||`, `&`, `<`, backticks,
`$(`, process substitution, newlines). Anything else goes to the human gate.

The check reads the line with `shlex`, which agrees with bash on plain words, quotes and
operators but not on everything bash expands. So a line is read-only only when it stays inside
what both read alike: no backslash, no `$` other than a plain `$NAME`, no control characters;
`#` is kept as part of a word (bash starts a comment only at a word's start, shlex anywhere), so
whatever follows it is checked too. Beyond the syntax, what is run must not write, hang or read
the service's own secrets: options that write (`git diff --output`, `date -s` in any spelling)
or follow (`tail -f`) ask, and so do paths into `/proc`, `/sys` and `/dev` (the service's
environment is readable at `/proc/<pid>/environ`) and globs handed to programs whose options
write (a file named `--output=x` is an option once expanded).
"""

from __future__ import annotations

import posixpath
import re
import shlex

READ_ONLY_PROGRAMS = frozenset({"ls", "pwd", "cat", "head", "tail", "wc", "echo", "date", "whoami", "uname"})
READ_ONLY_GIT = frozenset({"status", "log", "diff", "show"})
# Shell operators as shlex splits them off (a newline separates commands, as `;` does)
OPERATOR_CHARS = "();<>|&\n"
FORBIDDEN_SUBSTRINGS = ("`", "$(", "<(", ">(", "\\")
# any `$` not starting a plain variable name: `${...}`, `$'...'`, `$"..."`, `$[`, `$((`, `$$` ...
_ODD_DOLLAR = re.compile(r"\$(?![A-Za-z_])")
CONTROL_CHARS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # a tab is fine; a newline or CR is not
_GLOB = re.compile(r"[*?\[]")
# Options that make otherwise read-only programs write somewhere (prefixes of the argument)
WRITING_OPTIONS = {
    "git": ("--output", "-o", "--ext-diff", "-c", "--exec-path", "--git-dir", "--work-tree"),
}
# Programs whose expanded arguments could become such options: no globs, no variables
STRICT_ARGUMENTS = frozenset({"git", "date", "tail"})
# `date` only displays: a format, the zone, the output style, a date to show (never `-s`, which
# getopt also accepts as `-us`, `-s2000` or `--s`)
_DATE_FLAGS = frozenset({"-u", "--utc", "--universal", "-R", "--rfc-email", "-I", "--iso-8601"})
_DATE_PREFIXES = ("-I", "--iso-8601=", "--rfc-3339=", "--date=")
_DATE_WITH_VALUE = frozenset({"-d", "--date"})
SYSTEM_TREES = frozenset({"proc", "sys", "dev"})


def is_operator(token: str) -> bool:
    return bool(token) and all(ch in OPERATOR_CHARS for ch in token)


def tokenize(line: str, *, comments: bool = False) -> list[str] | None:
    """A shell line's words and operators (`|`, `&&`, `>`, a newline ... as their own tokens), or
    None when it does not parse (an unclosed quote).

    By default `#` stays in the words (see the module): this reads every word bash could run,
    and more. With `comments`, an unquoted `#` ends the line's current line, even inside a
    word, where bash would go on: this reads no word bash would not run, but may miss some."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=OPERATOR_CHARS)
    lexer.whitespace_split = True
    lexer.whitespace = " \t\r"
    lexer.commenters = "#" if comments else ""
    try:
        return list(lexer)
    except ValueError:
        return None


def split_pipeline(command: str) -> list[list[str]] | None:
    """Tokens of each `|` segment, or None when the line has any other operator, anything the
    check does not read as bash does, or won't parse."""
    if (any(s in command for s in FORBIDDEN_SUBSTRINGS) or CONTROL_CHARS.search(command)
            or _ODD_DOLLAR.search(command)):
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


def _into_system_tree(arg: str) -> bool:
    """`/proc/...`, `//dev/./zero`, `--files0-from=/proc/...`, `../../sys/...`: a path that is, or
    may climb to, one of the system trees (`src/dev` does not)."""
    for path in (arg, arg.split("=", 1)[1]) if "=" in arg else (arg,):
        parts = path.split("/")
        if path.startswith("/"):
            absolute = posixpath.normpath(path).lstrip("/")
            if absolute != "dev/null" and absolute.split("/")[0] in SYSTEM_TREES:
                return True
        if ".." in parts and any(part in SYSTEM_TREES for part in parts):
            return True
    return False


def _date_args_display_only(args: list[str]) -> bool:
    expect_value = False
    for arg in args:
        if expect_value:
            expect_value = False
        elif arg in _DATE_WITH_VALUE:
            expect_value = True
        elif not (arg.startswith("+") or arg in _DATE_FLAGS or arg.startswith(_DATE_PREFIXES)):
            return False
    return True


def _follows(arg: str) -> bool:
    """`tail -f`, `-F`, `-n5f`, `--follow`, `--retry`: waits for more, so holds the turn."""
    if arg.startswith("--"):
        return arg.startswith(("--follow", "--retry", "--pid"))
    return arg.startswith("-") and ("f" in arg or "F" in arg)


def _segment_is_read_only(tokens: list[str]) -> bool:
    program, args = tokens[0], tokens[1:]
    if program == "git":
        if not args or args[0] not in READ_ONLY_GIT:
            return False
    elif program not in READ_ONLY_PROGRAMS:
        return False
    if any(_into_system_tree(arg) for arg in args):
        return False
    if program in STRICT_ARGUMENTS and any(_GLOB.search(arg) or "$" in arg for arg in args):
        return False
    if program == "date":
        return _date_args_display_only(args)
    if program == "tail" and any(_follows(arg) for arg in args):
        return False
    for arg in args:
        for bad in WRITING_OPTIONS.get(program, ()):
            if arg == bad or arg.startswith(bad + "=") or (bad.startswith("--") and arg.startswith(bad)):
                return False
    return True


def is_read_only(command: str) -> bool:
    segments = split_pipeline(command.strip())
    return segments is not None and all(_segment_is_read_only(seg) for seg in segments)
