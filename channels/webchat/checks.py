"""The web chat's POST bodies and their checks. The web chat has no signatures; what keeps other
web pages from posting through a visitor's browser is the request's origin and its Content-Type
(see `foreign_origin`). Light on purpose: an HTTP edge worker imports this module, not the
adapter."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Annotated

from pydantic import AfterValidator, BaseModel, Field, ValidationError, model_validator

from bridge.web.http import validation_message
from channels.base import Answer, Forward
from channels.http import refusal

ID_PATTERN = r"^[A-Za-z0-9_.@-]{1,128}$"
ID_RULE = "1 to 128 letters, digits, or _ . @ - (no spaces)"
MAX_FILES = 10  # files one message may carry
# How the service and its edge workers are reached: plain HTTP (neither terminates TLS; a proxy
# in front that does says so with X-Forwarded-Proto).
SCHEME = "http"
DEFAULT_PORTS = {"http": ":80", "https": ":443"}


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

    @model_validator(mode="after")
    def _says_something(self) -> "PostMessage":
        # a message with nothing in it would be kept and never answered: refused instead
        if not self.file_ids and not self.text.strip():
            raise ValueError("text must not be empty (or send file_ids)")
        return self


class PostAction(BaseModel):
    conversation_id: str = Field(pattern=ID_PATTERN)
    message_id: Text = Field(min_length=1, max_length=64)
    action_id: Text = Field(min_length=1, max_length=64)
    user_id: str = Field(pattern=ID_PATTERN)


def foreign_origin(headers: Mapping[str, str]) -> str | None:
    """Why a POST from a browser must be refused as cross-site, or None. A browser names the page
    that sent a POST in `Origin`; when it is not this service's own origin (the scheme and the
    Host the request came to), another site's page is posting through the visitor's browser,
    which a plain form or a "simple" fetch can do without asking first. A request without
    `Origin` (curl, scripts, servers) is not a browser's cross-site request: it passes."""
    origin = headers.get("Origin")
    if origin is None:
        return None
    scheme = (headers.get("X-Forwarded-Proto") or SCHEME).split(",")[0].strip().lower()
    host = headers.get("Host", "").strip().lower()
    if host and _origin(origin.strip().lower()) == _origin(f"{scheme}://{host}"):
        return None
    return f"cross-origin request refused: Origin {origin!r} is not this service's origin"


def _origin(origin: str) -> str:
    """An origin with its scheme's default port left out, as browsers write it."""
    scheme = origin.split("://", 1)[0]
    default = DEFAULT_PORTS.get(scheme)
    return origin[:-len(default)] if default and origin.endswith(default) else origin


def _not_json(headers: Mapping[str, str]) -> str | None:
    given = headers.get("Content-Type", "")
    if given.split(";", 1)[0].strip().lower() == "application/json":
        return None
    return f"Content-Type must be application/json (got {given!r})" if given else \
        "Content-Type must be application/json"


@dataclass(frozen=True, slots=True)
class ModelCheck:
    """A JSON body from this service's own pages or from a script: another site's page refused
    (403), a body that is not declared JSON refused (415), then validated against `model` (400
    saying what is wrong), or passed on."""

    path: str
    model: type[BaseModel]

    def check(self, body: bytes, headers: Mapping[str, str]) -> Forward | Answer:
        refused = foreign_origin(headers)
        if refused is not None:
            return refusal(403, refused)
        refused = _not_json(headers)
        if refused is not None:
            return refusal(415, refused)
        try:
            return Forward(body, self.model.model_validate_json(body))
        except ValidationError as exc:
            first = exc.errors()[0]
            if first.get("type") == "string_pattern_mismatch" and first.get("ctx", {}).get("pattern") == ID_PATTERN:
                return refusal(400, f"{'.'.join(map(str, first['loc']))}: use {ID_RULE}")
            return refusal(400, validation_message(exc))

    def parsed(self, forward: Forward) -> BaseModel:
        """The validated body: as checked in this process, or again from what an edge worker
        checked (pydantic-core validates such a body in about a microsecond)."""
        if forward.parsed is not None:
            return forward.parsed
        return self.model.model_validate_json(forward.body)


MESSAGES = ModelCheck("/chat/api/messages", PostMessage)
ACTIONS = ModelCheck("/chat/api/actions", PostAction)
