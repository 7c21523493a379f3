"""The human gate: a runtime's approval request becomes a durable pending approval with a card;
a click is a conditional store write plus a wake-up, never a wait on the running turn.

Decisions: approve once, approve for the session (later identical requests in the same session
pass without a card), deny (the turn goes on with the denial), stop (the turn ends). Every
request, decision, expiry, interruption and refused click is written to the audit trail.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import json
import time
import uuid
from dataclasses import dataclass
from typing import Any, Literal

from loguru import logger

from bridge import presenter
from bridge.delivery.outbox import Outbox
from bridge.metrics import Metrics
from bridge.approvals.rules import RequestFacts, Rules
from bridge.runtimes.base import Approval, ApprovalRequest, Decision
from bridge.store import approvals as approvals_repo
from bridge.store import conversations
from bridge.store.db import Database
from channels.base import ActionResult, ConversationKey, InboundAction, Reply

POLL_INTERVAL = 2.0  # a decision taken by another replica is noticed within this

ACTION_DECISIONS = {  # card buttons; a question's options are `option:<n>`
    "approve": Decision.APPROVE,
    "approve_session": Decision.APPROVE_SESSION,
    "deny": Decision.DENY,
    "stop": Decision.STOP,
}


@dataclass(frozen=True, slots=True)
class TurnScope:
    """What the gate needs to know about the turn that asks."""

    turn_id: int
    conversation_id: int
    session_id: int
    conversation_key: str
    channel: str
    requested_by: str
    is_group: bool
    inbound_event_id: int | None = None
    runtime: str = ""
    workspace: str = ""
    reply_to: str | None = None  # the platform message that started the turn
    mode: str | None = None  # the session's approval mode (`/mode`): the preset when no rule matches


def match_key(req: ApprovalRequest) -> str:
    """What "approve for session" matches: the kind and the exact request (command, cwd, ...)."""
    canonical = json.dumps({"kind": req.kind, "detail": req.detail}, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:32]


class HumanGate:
    def __init__(self, db: Database, outbox: Outbox, metrics: Metrics, *, rules: Rules, timeout: float,
                 admins: list[str], on_expiry: Literal["decline", "interrupt"] = "decline") -> None:
        self.db = db
        self.rules = rules
        self.outbox = outbox
        self.metrics = metrics
        self.timeout = timeout
        self.on_expiry = on_expiry
        self.admins = set(admins)
        self._waiters: dict[str, asyncio.Future[Approval]] = {}
        self._waiting_turn: dict[str, int] = {}  # approval id -> the turn waiting on it here
        # this process's pending approvals per conversation, with their kind
        self._pending_by_conversation: dict[str, dict[str, str]] = {}

    # -- the runtime's side ----------------------------------------------------------------

    async def by_rules(self, scope: TurnScope, req: ApprovalRequest) -> Approval | None:
        """The rules' verdict when it is allow or deny (None: a person must decide). A preset's
        allow (a read-only command) costs no store access; a named rule's verdict is audited."""
        detail = req.detail or {}
        paths = detail.get("paths") or ([detail["path"]] if detail.get("path") else [])
        verdict = self.rules.decide(RequestFacts(
            kind=req.kind, command=detail.get("command"), paths=tuple(paths), runtime=scope.runtime,
            workspace=scope.workspace or detail.get("cwd", ""), conversation=scope.conversation_key,
            mode=scope.mode, cwd=detail.get("cwd") or None,
        ))
        if verdict.action == "ask":
            return None
        if not verdict.rule.startswith("preset:"):
            await self.db.execute([approvals_repo.audit_op(
                "-", f"rule_{verdict.action}", scope.conversation_key, actor=None,
                detail={"rule": verdict.rule, "turn": scope.turn_id, "summary": req.summary})])
            logger.bind(conversation=scope.conversation_key, session=scope.session_id, turn=scope.turn_id).info(
                "gate: rule {!r} {} {}", verdict.rule, "allowed" if verdict.action == "allow" else "denied", req.summary)
        if verdict.action == "allow":
            return Approval(Decision.APPROVE, f"allowed by rule {verdict.rule!r}")
        self.metrics.approvals.labels("rule_denied").inc()
        return Approval(Decision.DENY, verdict.message or f"Refused by rule {verdict.rule!r}.")

    async def request(self, scope: TurnScope, req: ApprovalRequest) -> Approval:
        """Ask a person: a card, then the decision (or expiry). An earlier "approve for session"
        of the same request in the same session answers at once."""
        key = match_key(req)
        log = logger.bind(conversation=scope.conversation_key, session=scope.session_id, turn=scope.turn_id)
        grant = await self.db.read(lambda c: approvals_repo.session_grant(c, scope.session_id, key))
        if grant is not None:
            await self.db.execute([approvals_repo.audit_op(
                grant.id, "auto_approved", scope.conversation_key, detail={"turn": scope.turn_id, "summary": req.summary})])
            log.info("gate: {} approved for this session by {}", req.summary, grant.decided_by)
            self.metrics.approvals.labels("auto_approved").inc()
            return Approval(Decision.APPROVE_SESSION, f"approved for this session by {grant.decided_by}")
        approval_id = uuid.uuid4().hex
        now = time.time()
        row = {
            "status": "pending", "kind": req.kind, "summary": req.summary, "detail": req.detail, "requested_by": scope.requested_by,
            "requested_at": now, "expires_at": now + self.timeout,
        }
        card = presenter.approval_card(row, approval_id=approval_id)
        if scope.reply_to:
            card = dataclasses.replace(card, reply_to=scope.reply_to)
        ref = self.outbox.new_ref()
        waiter: asyncio.Future[Approval] = asyncio.get_running_loop().create_future()
        self._waiters[approval_id] = waiter
        self._pending_by_conversation.setdefault(scope.conversation_key, {})[approval_id] = req.kind

        async def _create(conn) -> None:
            await approvals_repo.create(
                conn, approval_id=approval_id, conversation_id=scope.conversation_id, session_id=scope.session_id,
                turn_id=scope.turn_id, kind=req.kind, summary=req.summary, detail=req.detail,
                requested_by=scope.requested_by, expires_at=row["expires_at"], card_ref=ref, match_key=key,
                inbound_event_id=scope.inbound_event_id,
            )
            await approvals_repo.audit(conn, approval_id, "requested", scope.conversation_key,
                                       actor=scope.requested_by, detail={"summary": req.summary, **req.detail})
            await self.outbox.send_in(conn, scope.channel, scope.conversation_key, card, ref=ref)

        try:
            await self.db.write(_create)
            self.outbox.kick(scope.conversation_key)
            log.info("gate: approval {} requested: {}", approval_id, req.summary)
            self._waiting_turn[approval_id] = scope.turn_id  # its card is out: only a person moves it now
            outcome = await self._await(approval_id, waiter, row["expires_at"], scope)
        finally:
            self._waiters.pop(approval_id, None)
            self._waiting_turn.pop(approval_id, None)
            pending = self._pending_by_conversation.get(scope.conversation_key)
            if pending is not None:
                pending.pop(approval_id, None)
                if not pending:
                    del self._pending_by_conversation[scope.conversation_key]
        self.metrics.approvals.labels(outcome.decision.value).inc()
        log.info("gate: approval {} -> {}", approval_id, outcome.decision.value)
        if outcome.decision is Decision.EXPIRED and self.on_expiry == "interrupt":
            return Approval(Decision.STOP, "The approval expired; the turn was stopped.")
        return outcome

    def waiting_turns(self) -> int:
        """How many turns of this process wait for a person's decision now."""
        return len(set(self._waiting_turn.values()))

    def has_pending(self, conversation_key: str) -> bool:
        """Whether a turn of this process waits for a decision in that conversation."""
        return bool(self._pending_by_conversation.get(conversation_key))

    def has_question(self, conversation_key: str) -> bool:
        return "question" in self._pending_by_conversation.get(conversation_key, {}).values()

    def intercepts(self, conversation_key: str, text: str) -> bool:
        """Whether a message answers the gate rather than starting a turn: any reply while a
        question waits, a shortcut ("y", "n", "approve all") while an approval waits."""
        from bridge.pipeline import commands

        if self.has_question(conversation_key):
            return True
        return self.has_pending(conversation_key) and commands.shortcut(text) is not None

    async def _await(
        self, approval_id: str, waiter: asyncio.Future[Approval], expires_at: float, scope: TurnScope
    ) -> Approval:
        while True:
            remaining = expires_at - time.time()
            if remaining <= 0:
                if await self._finish_without_decision(approval_id, "expired", scope):
                    return Approval(Decision.EXPIRED)
            try:
                async with asyncio.timeout(max(0.0, min(POLL_INTERVAL, remaining))):
                    return await asyncio.shield(waiter)
            except TimeoutError:
                try:
                    row = await self.db.read(lambda c: approvals_repo.get(c, approval_id))
                except Exception as exc:  # noqa: BLE001 - the store is away: keep waiting, look again later
                    logger.bind(conversation=scope.conversation_key, turn=scope.turn_id).warning(
                        "approvals: cannot look at approval {} ({}); still waiting", approval_id, type(exc).__name__)
                    continue
                if row is not None and row.status != "pending":
                    return Approval(Decision(row.status), answer=row.answer)
            except asyncio.CancelledError:
                # The turn was cancelled (shutdown): the card must not stay actionable.
                await asyncio.shield(self._finish_without_decision(approval_id, "interrupted", scope))
                raise

    async def _finish_without_decision(self, approval_id: str, status: str, scope: TurnScope) -> bool:
        async def _mark(conn) -> bool:
            if not await approvals_repo.decide(conn, approval_id, status=status, decided_by=None):
                return False
            await approvals_repo.audit(conn, approval_id, status, scope.conversation_key)
            await self.queue_card(conn, approval_id)
            return True

        changed = await self.db.write(_mark)
        self.outbox.kick(scope.conversation_key)
        return changed

    async def queue_card(self, conn, approval_id: str, *, retried_by: str | None = None) -> str:
        """Queue the card's current state; returns the conversation key."""
        conversation_key, _ = await self._queue_card(conn, approval_id, retried_by=retried_by)
        return conversation_key

    async def _queue_card(self, conn, approval_id: str, *, retried_by: str | None = None) -> tuple[str, Reply]:
        row = await approvals_repo.get(conn, approval_id)
        card = presenter.approval_card(dict(row._mapping), approval_id=approval_id, retried_by=retried_by)
        conversation_key = await conversations.key_of(conn, row.conversation_id)
        channel = ConversationKey.parse(conversation_key).channel
        await self.outbox.update_in(conn, channel, conversation_key, card, ref=row.card_ref)
        return conversation_key, card

    async def stop_turn(self, turn_id: int, user_id: str) -> int:
        """Decide the turn's pending approvals as `stopped` (the `/stop` command); how many."""
        pending = await self.db.read(lambda c: approvals_repo.pending_for_turns(c, [turn_id]))
        stopped = 0
        for approval in pending:
            if await self._decide(approval, Decision.STOP, user_id) is not None:
                stopped += 1
        return stopped

    # -- the person's side -----------------------------------------------------------------

    def may_decide_as_admin(self, channel: str, user_id: str) -> bool:
        return f"{channel}:{user_id}" in self.admins

    def may_decide(self, approval: Any, channel: str, user_id: str) -> bool:
        return user_id == approval.requested_by or f"{channel}:{user_id}" in self.admins

    async def act(self, action: InboundAction) -> ActionResult:
        approval_id = str(action.value.get("approval_id", ""))
        approval = await self.db.read(lambda c: approvals_repo.get(c, approval_id)) if approval_id else None
        if approval is None:
            return ActionResult("not_found", "This approval no longer exists.")
        answer = None
        if action.action_id.startswith("option:"):
            options = (approval.detail or {}).get("options") or []
            index = action.action_id.partition(":")[2]
            if not index.isdigit() or int(index) >= len(options):
                return ActionResult("not_found", "Unknown option.")
            decision, answer = Decision.APPROVE, str(options[int(index)])
        elif action.action_id in ACTION_DECISIONS:
            decision = ACTION_DECISIONS[action.action_id]
        else:
            return ActionResult("not_found", "Unknown action.")
        return await self.decide(approval, decision, action.actor.id, action.conversation, answer=answer)

    async def answer_text(self, conversation: ConversationKey, user_id: str, text: str) -> ActionResult:
        """A free-text reply to the conversation's pending question."""
        key = str(conversation)
        ids = [i for i, kind in self._pending_by_conversation.get(key, {}).items() if kind == "question"]
        if not ids:
            return ActionResult("not_found", "No question is waiting for an answer.")
        approval = await self.db.read(lambda c: approvals_repo.get(c, ids[0]))
        return await self.decide(approval, Decision.APPROVE, user_id, conversation, answer=text)

    async def decide(self, approval: Any, decision: Decision, user_id: str, conversation: ConversationKey,
                     *, answer: str | None = None) -> ActionResult:
        """Authorize and apply one person's decision on one approval."""
        if not self.may_decide(approval, conversation.channel, user_id):
            await self.db.execute([approvals_repo.audit_op(
                approval.id, "refused", str(conversation), actor=user_id, detail={"wanted": decision.value})])
            logger.bind(conversation=str(conversation), turn=approval.turn_id).warning(
                "gate: {} may not decide approval {}", user_id, approval.id)
            return ActionResult("forbidden", f"Only {approval.requested_by} (who asked) or an admin can decide this.")
        card = await self._decide(approval, decision, user_id, answer=answer)
        if card is None:
            current = await self.db.read(lambda c: approvals_repo.get(c, approval.id))
            label = presenter.APPROVAL_STATUS_LABEL.get(current.status, current.status)
            return ActionResult("conflict", f"Already decided: {label.lower()}.")
        if answer is not None:
            return ActionResult("ok", f"Answered: {answer[:80]}", card=card)
        return ActionResult("ok", presenter.DECISION_TOAST[decision], card=card)

    async def _decide(self, approval: Any, decision: Decision, user_id: str, *,
                      answer: str | None = None) -> Reply | None:
        """Apply the decision; the card in its new state, or None when it was already decided."""

        async def _write(conn) -> tuple[str, Reply] | None:
            if not await approvals_repo.decide(conn, approval.id, status=decision.value, decided_by=user_id,
                                               answer=answer):
                return None
            key, card = await self._queue_card(conn, approval.id)
            detail = {"decision": decision.value} | ({"answer": answer} if answer is not None else {})
            await approvals_repo.audit(conn, approval.id, "decided", key, actor=user_id, detail=detail)
            return key, card

        written = await self.db.write(_write, urgent=True)
        if written is None:
            return None
        key, card = written
        self.outbox.kick(key)
        waiter = self._waiters.get(approval.id)
        if waiter is not None and not waiter.done():
            waiter.set_result(Approval(decision, answer=answer))
        logger.bind(conversation=key, turn=approval.turn_id).info(
            "gate: {} {} approval {}", user_id, decision.value, approval.id)
        return card
