import pytest

from bridge.runtimes.shell_policy import is_read_only


@pytest.mark.parametrize("command", [
    "ls", "ls -la /tmp", "pwd", "cat README.md", "head -n 5 a.txt", "tail -20 log", "wc -l a b",
    "echo hello world", "echo 'a > b'", "date", "whoami", "uname -a", "git status", "git log --oneline -5",
    "git diff HEAD~1", "git show HEAD", "cat a.txt | wc -l", "ls | head", "echo $HOME",
])
def test_read_only(command):
    assert is_read_only(command)


@pytest.mark.parametrize("command", [
    "touch x", "rm -rf /", "echo hi > out.txt", "echo hi >> out.txt", "ls; rm x", "ls && rm x", "ls || rm x",
    "ls & rm x", "cat < /etc/passwd", "echo `rm x`", "echo $(rm x)", "cat <(rm x)", "ls\nrm x",
    "git push", "git commit -m x", "git", "git diff --output=/tmp/x", "git log -o x", "git -c a=b status",
    "date -s 2020-01-01", "date --set=2020", "ls | tee out", "ls | sh", "FOO=1 ls", "sudo ls", "echo 'unbalanced",
    "", "   ", "ls |", "| ls",
])
def test_needs_approval(command):
    assert not is_read_only(command)
