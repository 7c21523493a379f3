"""The web chat's POST checks, as an HTTP edge worker or the service runs them: another site's
page refused, a body not declared JSON refused, then the schema."""

from __future__ import annotations

import json

from multidict import CIMultiDict

from channels.base import Forward
from channels.webchat.checks import MESSAGES, foreign_origin

BODY = json.dumps({"conversation_id": "c1", "user_id": "alice", "text": "hi", "client_msg_id": "1"}).encode()


def headers(**given: str) -> CIMultiDict[str]:
    return CIMultiDict({k.replace("_", "-"): v for k, v in given.items()})


def test_an_origin_passes_only_when_it_is_the_requests_own():
    own = [
        headers(Host="127.0.0.1:8788", Origin="http://127.0.0.1:8788"),
        headers(Host="Chat.Example:80", Origin="http://chat.example"),  # default port, any case
        headers(Host="chat.example", Origin="http://chat.example:80"),
        headers(Host="chat.example", Origin="https://chat.example", X_Forwarded_Proto="https"),
        headers(Host="chat.example", Origin="https://chat.example:443", X_Forwarded_Proto="https, http"),
        headers(Host="[::1]:8788", Origin="http://[::1]:8788"),
        headers(Host="127.0.0.1:8788"),  # no Origin: not a browser's cross-site request
    ]
    assert [foreign_origin(h) for h in own] == [None] * len(own)
    foreign = [
        headers(Host="127.0.0.1:8788", Origin="http://evil.example"),
        headers(Host="127.0.0.1:8788", Origin="null"),  # a sandboxed frame, a file: page
        headers(Host="127.0.0.1:8788", Origin="https://127.0.0.1:8788"),  # another scheme
        headers(Host="127.0.0.1:8788", Origin="http://127.0.0.1:8789"),  # another port
        headers(Host="127.0.0.1:8788", Origin="http://127.0.0.1"),
        headers(Host="chat.example:8080", Origin="http://chat.example"),
        headers(Host="chat.example", Origin="http://chat.example.evil.example"),
        headers(Origin="http://127.0.0.1:8788"),  # no Host to compare with
    ]
    assert all("cross-origin request refused" in (foreign_origin(h) or "") for h in foreign)


def test_a_post_is_refused_for_its_origin_then_its_content_type_then_its_body():
    def status(h: CIMultiDict[str], body: bytes = BODY) -> int:
        verdict = MESSAGES.check(body, h)
        return 202 if isinstance(verdict, Forward) else verdict.status

    assert status(headers(Host="h", Content_Type="application/json")) == 202
    assert status(headers(Host="h", Content_Type="Application/JSON; charset=utf-8")) == 202
    assert status(headers(Host="h", Origin="http://h", Content_Type="application/json")) == 202
    assert status(headers(Host="h", Origin="http://evil", Content_Type="text/plain")) == 403
    assert status(headers(Host="h", Origin="http://evil", Content_Type="application/json")) == 403
    assert status(headers(Host="h", Content_Type="text/plain")) == 415
    assert status(headers(Host="h", Content_Type="application/x-www-form-urlencoded")) == 415
    assert status(headers(Host="h")) == 415
    assert status(headers(Host="h", Content_Type="application/json"), b"{") == 400
    refused = MESSAGES.check(BODY, headers(Host="h", Content_Type="text/plain; charset=utf-8"))
    assert json.loads(refused.body) == {"error": "Content-Type must be application/json (got 'text/plain; charset=utf-8')"}


def test_a_bad_id_is_told_in_words_a_person_can_follow():
    body = json.dumps({"conversation_id": "team chat", "user_id": "alice", "text": "hi", "client_msg_id": "1"})
    refused = MESSAGES.check(body.encode(), headers(Host="h", Content_Type="application/json"))
    assert refused.status == 400
    assert json.loads(refused.body) == {"error": "conversation_id: use 1 to 128 letters, digits, or _ . @ - (no spaces)"}
