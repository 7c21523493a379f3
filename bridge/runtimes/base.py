"""The runtime contract. A runtime runs one turn of a session and reports through a TurnContext;
it knows nothing of channels, and the pipeline knows nothing of how a runtime works."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol


class Decision(enum.Enum):
    APPROVE = "approved"
    APPROVE_SESSION = "approved_for_session"
    DENY = "denied"
    STOP = "stopped"
    EXPIRED = "expired"
    INTERRUPTED = "interrupted"

    @property
    def allows(self) -> bool:
        return self in (Decision.APPROVE, Decision.APPROVE_SESSION)


@dataclass(frozen=True, slots=True)
class Approval:
    """The gate's answer: the decision, and why (a deny rule's message, the rule that allowed)."""

    decision: Decision
    reason: str = ""
    answer: str | None = None  # for a question: the chosen option or the free-text reply

    @property
    def allows(self) -> bool:
        return self.decision.allows


@dataclass(frozen=True, slots=True)
class InputFile:
    """A file that came with the message, saved on this machine by the channel. `path` is empty
    when the channel could not download it."""

    name: str
    path: str
    mime_type: str = "application/octet-stream"

    @property
    def is_image(self) -> bool:
        return self.mime_type.startswith("image/")


@dataclass(frozen=True, slots=True)
class TurnRequest:
    turn_id: int
    session_id: int
    runtime_thread_id: str | None
    workspace: str
    text: str
    sender_id: str
    sender_name: str
    is_group: bool
    settings: dict[str, Any] = field(default_factory=dict)  # the session's: "model", "mode"
    # the message's downloaded attachments: input for a runtime that takes files; the shell
    # runtime hands their paths to the command ($BRIDGE_FILES)
    files: tuple[InputFile, ...] = ()


@dataclass(frozen=True, slots=True)
class ApprovalRequest:
    kind: Literal["command", "file_change", "question", "permission"]
    summary: str
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class TurnOutcome:
    status: Literal["completed", "failed", "stopped", "interrupted"]
    text: str  # markdown shown to the user as the final reply
    output: str | None = None  # the full output, kept in the store
    error: str | None = None
    # wall-clock marks a runtime may report: `sent_at` (the turn handed to the runtime's process),
    # `waited` (seconds spent before that waiting on the runtime itself, e.g. starting a thread),
    # `done_at` (the runtime reported the turn finished); the runner turns them into overhead metrics
    timing: dict[str, float] | None = None


def storable(text: str) -> str:
    """Text as the store can keep it: PostgreSQL refuses NUL in text, which a command's output
    (`head -c9 /dev/zero`) or a model's can carry, and neither store takes half of a UTF-16
    surrogate pair (a JSON "\\ud83d" alone decodes to one)."""
    if "\x00" in text:
        text = text.replace("\x00", "\ufffd")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        text = text.encode("utf-8", "replace").decode("utf-8")
    return text


class TurnContext(Protocol):
    async def progress(self, text: str) -> None:
        """The turn's current state as markdown (replaces the previous progress)."""

    async def ask_approval(self, request: ApprovalRequest) -> Approval:
        """Ask the human gate (its rules, or a person); returns when decided, expired or interrupted."""

    async def bind_thread(self, thread_id: str, *, lost: str | None = None, reason: str | None = None) -> None:
        """Persist the session's runtime thread (`lost`: the thread it replaces, which could not be resumed)."""

    async def notice(self, text: str) -> None:
        """Post a message to the conversation now, apart from the turn's reply."""


class Runtime(Protocol):
    name: str
    accepts_files: bool  # attachments are input (a file alone is a turn); otherwise text only

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def health(self) -> dict[str, Any]: ...

    async def run_turn(self, request: TurnRequest, ctx: TurnContext) -> TurnOutcome: ...

    async def interrupt(self, session_id: int) -> bool:
        """Stop the session's running turn; True if there was one."""
