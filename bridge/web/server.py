"""The service's aiohttp application: health, readiness, metrics, plus each channel's routes."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from loguru import logger

from bridge.metrics import Metrics
from bridge.web.http import MAX_BODY

HealthCheck = Callable[[], Awaitable[dict[str, Any]]]
CHECK_TIMEOUT = 3.0


@web.middleware
async def json_errors(request: web.Request, handler):
    """Uncaught errors become a JSON 500 and a log record, never a bare traceback page."""
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status == 413:
            return web.json_response({"error": f"request body too large (limit {MAX_BODY} bytes)"}, status=413)
        raise
    except Exception:
        logger.exception("http: {} {} failed", request.method, request.path)
        return web.json_response({"error": "internal error"}, status=500)


def build_app(metrics: Metrics, checks: dict[str, HealthCheck], routes: list[web.RouteDef],
              refresh_metrics: Callable[[], Awaitable[None]]) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY, middlewares=[json_errors])

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

    app.add_routes([web.get("/healthz", healthz), web.get("/readyz", readyz), web.get("/metrics", metrics_view)])
    app.add_routes(routes)
    return app
