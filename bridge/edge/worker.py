"""An HTTP edge worker: a process of its own that serves the public port beside its siblings, so
HTTP parsing, signature checks and decryption use the machine's other cores. The service listens
on the port and every worker accepts from that one socket, inherited: the port stays the
service's alone.

- A webhook route (`channels.base.Webhook`: the web chat's posts, Feishu's and Slack's events)
  runs its check here; what passes goes over the edge link to the service, which persists it
  and answers; the answer goes back to the platform only then (persist before ack holds).
- Every other route (pages, reads, the live stream, uploads, health, metrics) is passed through
  to the service's own HTTP server on a local socket, streaming both ways.

It holds no state: killed, it is started again by the service, and the platform retries what
was in flight (the inbox dedupes). When the service goes, so does the worker (the link closes;
the kernel also kills it, PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import asyncio
import os
import pickle
import signal
import socket
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from loguru import logger
from yarl import URL

from bridge import logs
from bridge.edge.link import WorkerEnd
from bridge.web.http import MAX_BODY
from bridge.web.webhooks import respond, route
from channels.base import WebhookCheck
from channels.http import refusal

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te", "trailer",
                        "trailers", "transfer-encoding", "upgrade"})
UNREACHABLE = refusal(503, "the service is not reachable; try again")
BACKLOG = 1024  # the port's accept queue: the service listens with it, and each worker again (listen() sets it)


@dataclass(frozen=True)
class EdgeConfig:
    """What the service tells a worker (over the link, never on the command line)."""

    index: int
    host: str
    port: int
    service_socket: str  # where the service's own HTTP server listens (a Unix socket)
    checks: list[WebhookCheck] = field(repr=False)
    log_level: str = "INFO"
    log_format: str = "text"
    shutdown_timeout: float = 20.0
    forward_timeout: float = 25.0


class PassThrough:
    """Everything that is not a webhook goes to the service's own server, as it came."""

    def __init__(self, service_socket: str) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.UnixConnector(path=service_socket, limit=0),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=5),
            auto_decompress=False, cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Accept", "Content-Type"),
        )

    async def handle(self, request: web.Request) -> web.StreamResponse:
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP]
        try:
            upstream = await self.session.request(
                request.method, URL("http://service" + request.raw_path, encoded=True), headers=headers,
                data=request.content if request.body_exists else None, allow_redirects=False,
            )
        except (aiohttp.ClientError, OSError) as exc:
            logger.warning("edge: the service is not reachable: {}", exc)
            return respond(UNREACHABLE)
        async with upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in upstream.headers.items():
                if name.lower() not in HOP_BY_HOP:
                    response.headers.add(name, value)
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
            except (ConnectionResetError, aiohttp.ClientError):
                pass  # the client went away, or the service closed the stream (it is stopping)
        return response

    async def close(self) -> None:
        await self.session.close()


async def serve(link_fd: int, listening: list[int]) -> int:
    loop = asyncio.get_running_loop()
    _, link = await loop.create_connection(WorkerEnd, sock=socket.socket(fileno=link_fd))
    config: EdgeConfig = pickle.loads(await link.config)
    link.timeout = config.forward_timeout
    logs.setup(config.log_level, config.log_format)
    logger.configure(extra={"edge": config.index})

    passthrough = PassThrough(config.service_socket)
    app = web.Application(client_max_size=MAX_BODY)
    app.add_routes([route(check, link.forwarder(i)) for i, check in enumerate(config.checks)])
    app.router.add_route("*", "/{tail:.*}", passthrough.handle)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=False, shutdown_timeout=2.0)
    await runner.setup()
    sites = [web.SockSite(runner, socket.socket(fileno=fd), backlog=BACKLOG) for fd in listening]
    for site in sites:
        await site.start()

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    link.ready()
    logger.debug("edge {}: listening on {}:{} (pid {})", config.index, config.host, config.port, os.getpid())
    stopping = asyncio.ensure_future(stop.wait())
    await asyncio.wait([stopping, link.closed], return_when=asyncio.FIRST_COMPLETED)
    if link.closed.done():
        logger.error("edge {}: the service is gone; exiting", config.index)
        return 1
    # Graceful: no new connections; what was forwarded is answered; then long streams end.
    for site in sites:
        await site.stop()  # this worker's copy of the socket; the port goes with the last one
    try:
        async with asyncio.timeout(config.shutdown_timeout):
            while link.in_flight:
                await asyncio.sleep(0.02)
    except TimeoutError:
        logger.warning("edge {}: {} requests unanswered at shutdown", config.index, link.in_flight)
    await passthrough.close()
    await runner.cleanup()
    link.close()
    return 0
