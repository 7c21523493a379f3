"""The service's aiohttp application: health, readiness, metrics, plus each channel's routes."""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from loguru import logger

from bridge.metrics import Metrics
from bridge.web.http import MAX_BODY

HealthCheck = Callable[[], Awaitable[dict[str, Any]]]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
CHECK_TIMEOUT = 3.0


def json_errors(handler: Handler) -> Handler:
    """Uncaught errors become a JSON 500 and a log record, never a bare traceback page; a body
    over the limit gets a JSON 413. Wraps each route's handler (rather than being a middleware,
    which costs every request two more coroutine frames and a lookup)."""

    @functools.wraps(handler)
    async def guarded(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status == 413:
                return web.json_response({"error": f"request body too large (limit {MAX_BODY} bytes)"}, status=413)
            raise
        except Exception:
            logger.exception("http: {} {} failed", request.method, request.path)
            return web.json_response({"error": "internal error"}, status=500)

    return guarded


def build_app(metrics: Metrics, checks: dict[str, HealthCheck], routes: list[web.RouteDef],
              refresh_metrics: Callable[[], Awaitable[None]]) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY)

    async def healthz(_request: web.Request) -> web.Response:
        return web.json_response({"ok": True})

    async def readyz(_request: web.Request) -> web.Response:
        detail: dict[str, Any] = {}

        async def run(name: str, check: HealthCheck) -> None:
            try:
                async with asyncio.timeout(CHECK_TIMEOUT):
                    detail[name] = await check()
            except Exception as exc:  # noqa: BLE001 - a failing check is reported, not raised
                detail[name] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}

        await asyncio.gather(*(run(n, c) for n, c in checks.items()))
        ok = all(bool(d.get("ok")) for d in detail.values())
        return web.json_response({"ok": ok, "checks": detail}, status=200 if ok else 503)

    async def metrics_view(_request: web.Request) -> web.Response:
        await refresh_metrics()
        return web.Response(body=metrics.render(), headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})

    own = [web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/metrics", metrics_view)]
    app.add_routes([web.RouteDef(r.method, r.path, json_errors(r.handler), r.kwargs) for r in [*own, *routes]])
    return app
