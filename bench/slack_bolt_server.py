"""The baseline of the Slack events benchmark: slack_bolt's AsyncApp mounted in aiohttp, with a
listener that only acks (request verification on, nothing stored). slack_bolt is not a
dependency of agent-bridge: `pip install slack_bolt` to run this.

    python -m bench.slack_bolt_server --port 9000 --signing-secret S --api-url http://127.0.0.1:P/api/
"""

from __future__ import annotations

import argparse

from aiohttp import web
from slack_bolt.adapter.aiohttp import to_aiohttp_response, to_bolt_request
from slack_bolt.async_app import AsyncApp
from slack_sdk.web.async_client import AsyncWebClient


def build(signing_secret: str, api_url: str) -> web.Application:
    bolt = AsyncApp(signing_secret=signing_secret, client=AsyncWebClient(token="xoxb-test", base_url=api_url),
                    ignoring_self_events_enabled=False)

    @bolt.event("message")
    async def on_message(ack) -> None:
        await ack()

    async def events(request: web.Request) -> web.Response:
        bolt_request = await to_bolt_request(request)
        return await to_aiohttp_response(await bolt.async_dispatch(bolt_request))

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.add_routes([web.post("/slack/events", events), web.get("/healthz", healthz)])
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--signing-secret", required=True)
    parser.add_argument("--api-url", required=True)
    args = parser.parse_args()
    web.run_app(build(args.signing_secret, args.api_url), host="127.0.0.1", port=args.port, access_log=None,
                print=None)


if __name__ == "__main__":
    main()
