"""The built-in web chat page (/chat) in a real headless Chromium, against the real service.

Needs Debian's `chromium` package (/usr/bin/chromium, or $CHROMIUM_EXECUTABLE) and the Python
`playwright` package, used only as a driver: the browser Playwright downloads itself is never used
(do not run `playwright install`). A missing browser fails these tests instead of skipping them:
CI installs it, and a browser suite that quietly skips tests nothing.
"""

from __future__ import annotations

import errno
import os
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.browser

CHROMIUM = os.environ.get("CHROMIUM_EXECUTABLE", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]
INSTALL_HINT = ("install it with `apt-get install -y chromium` and `pip install playwright` "
                "(never `playwright install`: the tests use the system Chromium)")
TIMEOUT_MS = 10_000
SCREENSHOT = Path("/tmp/webchat.png")


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not os.path.exists(CHROMIUM):
        pytest.fail(f"the browser tests need headless Chromium, but {CHROMIUM} is missing; {INSTALL_HINT}",
                    pytrace=False)
    try:
        from playwright.sync_api import expect, sync_playwright
    except ImportError:
        pytest.fail(f"the browser tests need the `playwright` Python package; {INSTALL_HINT}", pytrace=False)
    expect.set_options(timeout=TIMEOUT_MS)
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield browser
        finally:
            browser.close()


@pytest.fixture
def service(bridge):
    proc = bridge()
    (proc.data_dir / "workspace").mkdir(parents=True, exist_ok=True)
    return proc


@pytest.fixture
def open_chat(browser, service):
    """`open_chat(user, conversation)` opens the page in a fresh browser context and waits until its
    live stream is connected. Any page error, console error or failed HTTP request fails the test."""
    contexts = []
    problems: list[str] = []

    def _open(user: str = "alice", conversation: str = "c-1"):
        context = browser.new_context(viewport={"width": 1000, "height": 700})
        contexts.append(context)
        page = context.new_page()
        page.set_default_timeout(TIMEOUT_MS)
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        page.on("console", lambda msg: problems.append(f"console {msg.type}: {msg.text}")
                if msg.type == "error" else None)
        page.on("response", lambda resp: problems.append(f"HTTP {resp.status}: {resp.request.method} {resp.url}")
                if resp.status >= 400 else None)
        page.goto(f"{service.url}/chat?user={user}&conversation={conversation}")
        expect(page.locator("#user")).to_have_value(user)
        expect(page.locator("#conversation")).to_have_value(conversation)
        expect(page.locator("#status")).to_have_text("live")
        return page

    yield _open
    for context in contexts:
        context.close()
    assert not problems, "\n".join(problems)


def expect(target):
    from playwright.sync_api import expect as _expect

    return _expect(target)


def send(page, text: str, *, button: bool = False) -> None:
    page.locator("#text").fill(text)
    if button:
        page.locator("#send").click()
    else:
        page.locator("#text").press("Enter")


def code_block(page, content: str):
    """A code block whose whole text is `content`."""
    return page.locator("pre", has_text=re.compile(rf"^{re.escape(content)}$"))


def bot_reply(page, output: str):
    """Bot messages showing `output` as a code block (a command's output)."""
    return page.locator(".msg.bot", has=code_block(page, output))


def bot_outputs(page) -> list[str]:
    return page.locator(".msg.bot .text pre").all_inner_texts()


def release_fifo(path: Path, data: bytes, timeout: float = 10.0) -> None:
    """Write `data` to a FIFO once a reader has it open, then close it (the reader sees EOF)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
            break
        except OSError as exc:
            if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def test_echo_reply_appears(open_chat):
    page = open_chat()
    send(page, "echo hello")
    expect(page.locator("#text")).to_have_value("")
    expect(page.locator(".msg.user")).to_have_count(1)
    expect(page.locator(".msg.user")).to_contain_text("echo hello")
    expect(bot_reply(page, "hello")).to_have_count(1)
    expect(bot_reply(page, "hello")).to_contain_text("exit 0")


def test_approve_runs_the_command(open_chat, service):
    page = open_chat()
    target = service.data_dir / "workspace" / "x"
    send(page, "touch x", button=True)
    card = page.locator(".card[data-kind=approval]")
    expect(card).to_have_count(1)
    expect(card).to_have_attribute("data-status", "pending")
    expect(card).to_contain_text("touch x")
    assert not target.exists(), "the command ran before anyone approved it"
    card.locator("button[data-action=approve]").click()
    expect(card).to_have_attribute("data-status", "approved")
    expect(card.locator("button[data-action]")).to_have_count(0)
    reply = page.locator(".msg.bot", has_text="exit 0")
    expect(reply).to_have_count(1)
    # `touch` prints nothing: an empty code block, not literal backticks
    expect(reply.locator("pre.empty")).to_have_count(1)
    expect(reply).not_to_contain_text("```")
    assert target.exists()
    page.screenshot(path=str(SCREENSHOT), full_page=True)


def test_deny_does_not_run_the_command(open_chat, service):
    page = open_chat()
    send(page, "touch y")
    card = page.locator(".card[data-kind=approval]")
    expect(card).to_have_attribute("data-status", "pending")
    card.locator("button[data-action=deny]").click()
    expect(card).to_have_attribute("data-status", "denied")
    expect(card.locator("button[data-action]")).to_have_count(0)
    expect(page.locator(".msg.bot", has_text="Not run (denied)")).to_have_count(1)
    assert not (service.data_dir / "workspace" / "y").exists()


def test_commands_with_backticks_and_marks_are_shown_as_typed(open_chat):
    """A person's message is shown as typed, never as markdown; a command quoted in a reply keeps
    its backticks and stars (its code span is delimited by more backticks than it holds)."""
    page = open_chat()
    command = "touch `date` **bold** _x_"
    send(page, command)
    mine = page.locator(".msg.user .text")
    expect(mine).to_have_text(command)
    expect(mine.locator("strong, em, code")).to_have_count(0)
    card = page.locator(".card[data-kind=approval]")
    expect(card).to_have_attribute("data-status", "pending")
    card.locator("button[data-action=deny]").click()
    denied = page.locator(".msg.bot", has_text="Not run (denied)")
    expect(denied).to_have_count(1)
    expect(denied.locator("code")).to_have_text(command)
    expect(denied.locator("strong")).to_have_count(0)


def test_the_help_card_lists_its_commands_as_a_list(open_chat):
    page = open_chat()
    send(page, "/help")
    card = page.locator(".card[data-kind=help]")
    expect(card.locator("ul > li").first).to_contain_text("Each message is a shell command")
    assert card.locator("ul > li").count() >= 8
    assert not [t for t in card.locator("p").all_inner_texts() if t.startswith("- ")]


def test_enter_in_the_conversation_field_switches_to_it(open_chat, service):
    page = open_chat()
    send(page, "echo in-the-first")
    expect(bot_reply(page, "in-the-first")).to_have_count(1)
    page.locator("#conversation").fill("c-second")
    page.locator("#conversation").press("Enter")
    expect(page.locator("#text")).to_be_focused()
    expect(page.locator(".msg")).to_have_count(0)  # the other conversation's page is empty
    send(page, "echo in-the-second")
    expect(bot_reply(page, "in-the-second")).to_have_count(1)
    expect(bot_reply(page, "in-the-first")).to_have_count(0)


def test_quick_messages_keep_their_order(open_chat):
    page = open_chat()
    send(page, "echo one")
    send(page, "echo two")
    expect(bot_reply(page, "one")).to_contain_text("exit 0")
    expect(bot_reply(page, "two")).to_contain_text("exit 0")
    assert page.locator(".msg.user .text").all_inner_texts() == ["echo one", "echo two"]
    assert bot_outputs(page) == ["one", "two"]


def test_message_sent_while_the_first_runs_waits_and_keeps_its_order(open_chat, service):
    """The first command blocks on a FIFO until the test releases it, so the second one is surely
    sent while the first runs: it is queued, and its reply still comes after the first one's."""
    fifo = service.data_dir / "workspace" / "gate"
    os.mkfifo(fifo)
    page = open_chat()
    send(page, "cat gate")
    send(page, "echo two")
    expect(page.locator(".msg.bot", has_text="Queued (position 1)")).to_have_count(1)
    expect(bot_reply(page, "two")).to_have_count(0)
    release_fifo(fifo, b"one\n")
    expect(bot_reply(page, "one")).to_contain_text("exit 0")
    expect(bot_reply(page, "two")).to_contain_text("exit 0")
    expect(page.locator(".msg.bot", has_text="Queued")).to_have_count(0)
    expect(page.locator(".msg.bot", has_text="Started: echo two")).to_have_count(1)
    assert page.locator(".msg.user .text").all_inner_texts() == ["cat gate", "echo two"]
    assert bot_outputs(page) == ["one", "two"]
    # a reload shows the same conversation in the same order
    page.reload()
    expect(page.locator("#status")).to_have_text("live")
    expect(page.locator(".msg")).to_have_count(5)
    assert page.locator(".msg.user .text").all_inner_texts() == ["cat gate", "echo two"]
    assert bot_outputs(page) == ["one", "two"]


def test_output_with_fences_and_html_renders_as_one_code_block(open_chat, service):
    (service.data_dir / "workspace" / "notes.md").write_text("intro\n```\n<b>not bold</b>\n```\nend\n")
    page = open_chat()
    send(page, "cat notes.md")
    expect(bot_reply(page, "intro\n```\n<b>not bold</b>\n```\nend")).to_contain_text("exit 0")
    expect(page.locator(".msg.bot b")).to_have_count(0)


def test_a_file_is_attached_and_sent_with_the_message(open_chat, service, tmp_path):
    """Attach picks a file; Send uploads it and sends the message naming it; the person's message
    shows the file and the command sees it (the shell runtime runs the text beside the file)."""
    picked = tmp_path / "report.txt"
    picked.write_bytes(b"attached from the page\n")
    page = open_chat(conversation="c-attach")
    page.locator("#files").set_input_files(str(picked))
    expect(page.locator("#chosen")).to_contain_text("report.txt")
    send(page, "echo sent-with-a-file", button=True)
    expect(page.locator("#chosen")).to_have_text("")
    expect(page.locator(".msg.user .files")).to_contain_text("report.txt")
    expect(bot_reply(page, "sent-with-a-file")).to_have_count(1)
    kept = list((service.data_dir / "attachments" / "webchat" / "c-attach").glob("*/report.txt"))
    assert [p.read_bytes() for p in kept] == [b"attached from the page\n"]
    # a file alone: sent without text, answered with where it was saved
    page.locator("#files").set_input_files(str(picked))
    send(page, "", button=True)
    expect(page.locator(".msg.bot", has_text="takes text only")).to_have_count(1)
    expect(page.locator(".msg.user .files")).to_have_count(2)
