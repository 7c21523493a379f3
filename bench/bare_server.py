"""The baseline server: plain aiohttp, same event loop policy as the service, no access log.

Its POST handler only reads the request body and returns 200, so it measures what one core spends
on HTTP alone. Run: `python -m bench.bare_server --port 8799` (binds 127.0.0.1 only).
"""

from __future__ import annotations

import argparse

from aiohttp import web

BODY = b'{"accepted": true, "duplicate": false}'


async def post(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=BODY, content_type="application/json")


async def healthz(_request: web.Request) -> web.Response:
    return web.Response(body=b'{"ok": true}', content_type="application/json")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    app = web.Application(client_max_size=1024 * 1024)
    app.add_routes([web.post("/chat/api/messages", post), web.get("/healthz", healthz)])
    web.run_app(app, host="127.0.0.1", port=args.port, access_log=None, print=None, handler_cancellation=False)


if __name__ == "__main__":
    main()
