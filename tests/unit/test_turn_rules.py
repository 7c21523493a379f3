"""Which inbound events become turns, which get only a note, and which are stored closed."""

from __future__ import annotations

from bridge import presenter
from bridge.runtimes.base import InputFile
from bridge.store.turns import answerable_payload, runnable_payload

SAVED = {"name": "a.png", "path": "/data/attachments/a.png", "mime_type": "image/png"}
LOST = {"name": "b.pdf", "path": "", "mime_type": "application/pdf"}


def payload(text: str = "", *attachments: dict, bot: bool = False, stale: bool = False) -> dict:
    return {"text": text, "sender": {"id": "u", "is_bot": bot}, "attachments": list(attachments),
            **({"stale": True} if stale else {})}


def test_text_runs_and_a_downloaded_file_runs_where_files_are_taken():
    assert runnable_payload(payload("ls"))
    assert runnable_payload(payload("", SAVED))
    assert not runnable_payload(payload("", SAVED), accepts_files=False)
    assert runnable_payload(payload("ls", SAVED), accepts_files=False)
    assert not runnable_payload(payload("", LOST))  # nothing to give the runtime


def test_what_does_not_run_is_still_answered_unless_empty_or_a_bots():
    assert answerable_payload(payload("", LOST))
    assert answerable_payload(payload("", SAVED))
    assert answerable_payload(payload("", stale=True))
    assert not answerable_payload(payload("  "))
    assert not answerable_payload(payload("hello", bot=True))
    assert not runnable_payload(payload("ls", stale=True))


def test_the_note_names_lost_files_and_where_kept_files_are():
    files = [InputFile(**SAVED), InputFile(**LOST)]
    shell = presenter.files_not_run(files, runtime="shell", accepts_files=False).text
    assert "`b.pdf`" in shell and "could not download" in shell
    assert "`/data/attachments/a.png`" in shell and "takes text only" in shell
    codex = presenter.files_not_run([InputFile(**LOST)], runtime="codex", accepts_files=True).text
    assert "could not download" in codex and "takes text only" not in codex
