import pytest

from bridge.runtimes.shell_policy import is_read_only


@pytest.mark.parametrize("command", [
    "ls", "ls -la /tmp", "pwd", "cat README.md", "head -n 5 a.txt", "tail -20 log", "wc -l a b",
    "echo hello world", "echo 'a > b'", "date", "whoami", "uname -a", "git status", "git log --oneline -5",
    "git diff HEAD~1", "git show HEAD", "cat a.txt | wc -l", "ls | head", "echo $HOME",
    "git log --grep '#12' --oneline", "echo issue#3", "date +%Y-%m-%d", "date -u", "date -d yesterday +%F",
    "date --iso-8601=seconds", "tail -n 5 log", "tail -5 log", "ls -la src/dev", "cat '/tmp/a b'", "cat /dev/null | wc -l",
])
def test_read_only(command):
    assert is_read_only(command)


@pytest.mark.parametrize("command", [
    "touch x", "rm -rf /", "echo hi > out.txt", "echo hi >> out.txt", "ls; rm x", "ls && rm x", "ls || rm x",
    "ls & rm x", "cat < /etc/passwd", "echo `rm x`", "echo $(rm x)", "cat <(rm x)", "ls\nrm x",
    "git push", "git commit -m x", "git", "git diff --output=/tmp/x", "git log -o x", "git -c a=b status",
    "date -s 2020-01-01", "date --set=2020", "ls | tee out", "ls | sh", "FOO=1 ls", "sudo ls", "echo 'unbalanced",
    "", "   ", "ls |", "| ls",
    # what shlex and bash read apart: a `#` inside a word, `$'...'` and `${...}` expansions, escapes
    "ls x#; touch pwned", "echo a#>pwned", "echo a#|tee pwned", "echo $'\\'' ;touch pwned; #'",
    "echo ${x:=\\$\\(touch\\ pwned\\)} ${x@P}", "echo a\\;touch x", "ls\rtouch x", "ls\x00x",
    # `date -s` in the spellings getopt accepts; options that hold the turn; globs that become options
    "date -s2000-01-01", "date -us 2000-01-01", "date --s=2000-01-01", "date --se 2000", "date -f dates",
    "tail -f log", "tail -F log", "tail -n5f log", "tail --follow=name log", "git diff *", "git log $X",
    # the service's own environment and devices
    "cat /proc/1/environ", "cat /proc/self/environ", "head -c 10 /dev/zero", "cat ../../../proc/1/environ",
    "wc --files0-from=/proc/1/environ", "cat //proc/./1/environ",
])
def test_needs_approval(command):
    assert not is_read_only(command)


def test_every_bypass_above_really_writes_under_bash(tmp_path):
    """The syntax cases are real: bash runs the hidden command (so refusing them matters)."""
    import subprocess

    for command in ("ls x#; touch pwned1", "echo a#>pwned2", "echo $'\\'' ;touch pwned3; #'"):
        subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, check=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pwned1", "pwned2", "pwned3"]
