"""Gate requests the shell runtime never makes but other runtimes do (several approvals in one
turn, questions with options), entering the real gate of a real in-process service the way a
runtime's TurnContext does, and answered through the web chat API."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest

from bridge.app import Service
from bridge.approvals.gate import TurnScope
from bridge.config import load_settings
from bridge.runtimes.base import ApprovalRequest, Decision
from bridge.store import turns
from tests.support.chat import ChatClient, final_texts


@pytest.fixture
async def service(tmp_path):
    svc = Service(load_settings(data_dir=tmp_path / "data", port=0, shutdown_timeout=1))
    await svc.start()
    try:
        yield svc
    finally:
        await svc.stop()


@pytest.fixture
def ask(service):
    """Ask the gate as a runtime would; requests still waiting at the end are cancelled."""
    tasks: list[asyncio.Task] = []

    def _ask(scope: TurnScope, request: ApprovalRequest) -> asyncio.Task:
        tasks.append(asyncio.create_task(service.gate.request(scope, request)))
        return tasks[-1]

    yield _ask
    for task in tasks:
        task.cancel()


@pytest.fixture
async def client(service):
    async with aiohttp.ClientSession() as http:
        yield ChatClient(http, f"http://127.0.0.1:{service.port}")


async def waiting_turn(service, client, conv: str) -> TurnScope:
    """A turn of `conv` waiting on an approval (for `touch first.txt`), as the scope it asks with."""
    await client.post(conv, "alice", "touch first.txt")
    await client.wait_card(conv, "pending")
    turn = (await service.db.read(turns.list_active))[0]
    return TurnScope(turn_id=turn.id, conversation_id=turn.conversation_id, session_id=turn.session_id,
                     conversation_key=f"webchat:{conv}", channel="webchat", requested_by="alice", is_group=True,
                     inbound_event_id=turn.inbound_event_id, runtime="shell", workspace="/tmp")


def pending_cards(msgs):
    return [m for m in msgs if m["card"] and m["card"]["status"] == "pending"]


async def test_y_with_two_pending_hints_and_decides_nothing_then_approve_all(service, client, ask):
    scope = await waiting_turn(service, client, "g-two")
    second = ask(scope, ApprovalRequest(
        "command", "Run `touch second.txt`", {"command": "touch second.txt", "cwd": "/tmp"}))
    await client.wait_for("g-two", lambda msgs: len(pending_cards(msgs)) == 2)
    await client.post("g-two", "alice", "y")
    await client.wait_for("g-two", lambda msgs: [t for t in final_texts(msgs) if "2 approvals are waiting" in t])
    assert len(pending_cards(await client.bot_messages("g-two"))) == 2
    await client.post("g-two", "bob", "approve all")  # bob may decide none of them
    await client.wait_for("g-two", lambda msgs: [t for t in final_texts(msgs) if "Nothing is waiting" in t])
    await client.post("g-two", "alice", "approve all")
    assert (await asyncio.wait_for(second, 10)).decision is Decision.APPROVE
    await client.wait_for("g-two", lambda msgs: [t for t in final_texts(msgs) if "exit 0" in t])
    assert not pending_cards(await client.bot_messages("g-two"))


async def test_question_with_options_and_a_free_text_answer(service, client, ask):
    scope = await waiting_turn(service, client, "c-q")
    asked = ask(scope, ApprovalRequest(
        "question", "Which branch?", {"question": "Deploy which branch?", "options": ["main", "dev"]}))
    card = await client.wait_for("c-q", lambda msgs: [m for m in pending_cards(msgs) if m["card"]["title"].startswith("Question")])
    assert [a["id"] for a in card[0]["card"]["actions"]] == ["option:0", "option:1", "stop"]
    assert [a["label"] for a in card[0]["card"]["actions"]][:2] == ["main", "dev"]
    status, body = await client.act("c-q", card[0]["id"], "option:1", "alice")
    assert status == 200 and "dev" in body["toast"]
    answered = await asyncio.wait_for(asked, 10)
    assert (answered.decision, answered.answer) == (Decision.APPROVE, "dev")
    done = (await client.wait_for("c-q", lambda msgs: [m for m in msgs if m["id"] == card[0]["id"]
                                                       and m["card"]["status"] == "approved"]))[0]
    assert done["card"]["actions"] == [] and "Answered by alice" in done["card"]["body"] and "dev" in done["card"]["body"]

    free = ask(scope, ApprovalRequest(
        "question", "Anything else?", {"question": "Anything else before I start?", "options": ["no"]}))
    await client.wait_for("c-q", lambda msgs: [m for m in pending_cards(msgs) if "Anything else" in m["card"]["title"]])
    await client.post("c-q", "alice", "use the staging database")
    assert (await asyncio.wait_for(free, 10)).answer == "use the staging database"


async def test_a_long_diff_is_collapsed_on_the_card(service, client, ask):
    scope = await waiting_turn(service, client, "c-diff")
    diff = "".join(f"+line {i}\n" for i in range(100))
    ask(scope, ApprovalRequest(
        "file_change", "Edit app.py", {"paths": ["app.py"], "diff": diff}))
    card = await client.wait_for("c-diff", lambda msgs: [m for m in pending_cards(msgs) if "app.py" in m["card"]["title"]])
    body = card[0]["card"]["body"]
    assert "+line 39" in body and "+line 40" not in body and "60 more lines" in body
