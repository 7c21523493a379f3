"""The baseline of the Feishu webhook benchmark: lark-oapi's own EventDispatcherHandler in an
aiohttp app, doing what the SDK does (verify the token and signature, decrypt, dispatch to a
handler that does nothing) and storing nothing. Headers are given in the exact case the SDK
looks up. `--executor` runs the dispatcher in a thread pool instead of on the loop.

    python -m bench.feishu_sdk_server --port 9000 --encrypt-key K --token T
"""

from __future__ import annotations

import argparse
import asyncio

import lark_oapi as lark
from aiohttp import web

CANONICAL = {h.lower(): h for h in ("X-Lark-Request-Timestamp", "X-Lark-Request-Nonce", "X-Lark-Signature",
                                    "Content-Type", "X-Request-Id")}


def build(encrypt_key: str, token: str, executor: bool) -> web.Application:
    handler = (lark.EventDispatcherHandler.builder(encrypt_key, token)
               .register_p2_im_message_receive_v1(lambda data: None).build())

    async def events(request: web.Request) -> web.Response:
        raw = lark.RawRequest()
        raw.uri = request.path
        raw.body = await request.read()
        raw.headers = {CANONICAL.get(k.lower(), k): v for k, v in request.headers.items()}
        if executor:
            resp = await asyncio.get_running_loop().run_in_executor(None, handler.do, raw)
        else:
            resp = handler.do(raw)
        return web.Response(status=resp.status_code, body=resp.content, content_type="application/json")

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    app = web.Application()
    app.add_routes([web.post("/feishu/events", events), web.get("/healthz", healthz)])
    return app


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--encrypt-key", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--executor", action="store_true")
    args = parser.parse_args()
    web.run_app(build(args.encrypt_key, args.token, args.executor), host="127.0.0.1", port=args.port,
                access_log=None, print=None)


if __name__ == "__main__":
    main()
