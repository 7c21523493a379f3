"""The web chat's POST bodies and their checks (schema only: the web chat has no signatures).
Light on purpose: an HTTP edge worker imports this module, not the adapter."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated

from pydantic import AfterValidator, BaseModel, Field, ValidationError

from bridge.web.http import validation_message
from channels.base import Answer, Forward
from channels.http import refusal

ID_PATTERN = r"^[A-Za-z0-9_.@-]{1,128}$"
MAX_FILES = 10  # files one message may carry


def _no_nul(value: str) -> str:
    if "\x00" in value:
        raise ValueError("must not contain NUL characters")
    return value


# free text the store keeps (PostgreSQL refuses NUL in text): refused with a 400 rather than a 500
Text = Annotated[str, AfterValidator(_no_nul)]


class PostMessage(BaseModel):
    conversation_id: str = Field(pattern=ID_PATTERN)
    user_id: str = Field(pattern=ID_PATTERN)
    text: Text = Field(max_length=100_000)
    client_msg_id: Text = Field(min_length=1, max_length=128)
    # files uploaded before (POST /chat/api/files) in this conversation; optional
    file_ids: list[str] = Field(default_factory=list, max_length=MAX_FILES)


class PostAction(BaseModel):
    conversation_id: str = Field(pattern=ID_PATTERN)
    message_id: Text = Field(min_length=1, max_length=64)
    action_id: Text = Field(min_length=1, max_length=64)
    user_id: str = Field(pattern=ID_PATTERN)


@dataclass(frozen=True, slots=True)
class ModelCheck:
    """A JSON body validated against `model`: 400 saying what is wrong, or passed on."""

    path: str
    model: type[BaseModel]

    def check(self, body: bytes, headers: Mapping[str, str]) -> Forward | Answer:
        try:
            return Forward(body, self.model.model_validate_json(body))
        except ValidationError as exc:
            return refusal(400, validation_message(exc))

    def parsed(self, forward: Forward) -> BaseModel:
        """The validated body: as checked in this process, or again from what an edge worker
        checked (pydantic-core validates such a body in about a microsecond)."""
        if forward.parsed is not None:
            return forward.parsed
        return self.model.model_validate_json(forward.body)


MESSAGES = ModelCheck("/chat/api/messages", PostMessage)
ACTIONS = ModelCheck("/chat/api/actions", PostAction)
