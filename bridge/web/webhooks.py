"""A channel's `Webhook` served over HTTP: read the body (413 past the limit), run the check,
then `accept` it in this process, or (in an HTTP edge worker) hand it to the service over the
edge link. Both ways answer the same bytes for the same request."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiohttp import web

from bridge.web.http import MAX_BODY
from channels.base import Answer, Forward, WebhookCheck
from channels.http import failed, refusal

TOO_LARGE = refusal(413, f"request body too large (limit {MAX_BODY} bytes)")


async def read_body(request: web.Request) -> bytes | Answer:
    if request.content_length is not None and request.content_length > MAX_BODY:
        return TOO_LARGE
    try:
        body = await request.read()  # the app's client_max_size also stops a chunked body
    except web.HTTPRequestEntityTooLarge:
        return TOO_LARGE
    return TOO_LARGE if len(body) > MAX_BODY else body


def respond(answer: Answer) -> web.Response:
    return web.Response(body=answer.body, status=answer.status, content_type="application/json")


def route(check: WebhookCheck, accept: Callable[[Forward], Awaitable[Answer]]) -> web.RouteDef:
    """The POST route of a webhook: the channel's own `accept` in the service, the edge link's
    forwarding in an edge worker."""
    run_check = check.check

    async def handle(request: web.Request) -> web.Response:
        body = await read_body(request)
        if type(body) is Answer:
            return respond(body)
        verdict = run_check(body, request.headers)  # type: ignore[arg-type]
        if type(verdict) is Answer:
            return respond(verdict)
        try:
            answer = await accept(verdict)  # type: ignore[arg-type]
        except Exception as exc:  # noqa: BLE001 - answered, never a bare traceback page
            answer = failed(exc, f"http: {request.method} {request.path}")
        return respond(answer)

    return web.post(check.path, handle)
