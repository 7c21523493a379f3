"""JSON-RPC over a pair of byte streams, as `codex app-server` speaks it on stdio.

One JSON object per line, no `"jsonrpc"` field. Three kinds of inbound message: responses to our
requests (matched by id), notifications (`method`, no id) and the server's own requests (`method`
and an id from the server's id space), which we answer on the same connection. The reader never
waits on a handler: notifications are handled synchronously and must not block; each server
request runs in its own task, so a human deciding an approval holds nothing else up.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Awaitable, Callable
from typing import Any

from loguru import logger

NotificationHandler = Callable[[str, dict[str, Any]], None]
RequestHandler = Callable[[str, dict[str, Any], Any], Awaitable[dict[str, Any]]]  # method, params, id

MAX_LINE = 64 * 1024 * 1024  # a thread history with large tool outputs comes as one line


class RpcError(Exception):
    """The server answered a request with an error."""

    def __init__(self, method: str, code: int | None, message: str) -> None:
        super().__init__(f"{method}: {message}" + (f" (code {code})" if code is not None else ""))
        self.method = method
        self.code = code
        self.message = message

    @property
    def unsupported(self) -> bool:
        """The server does not know the method (an older or newer app-server)."""
        return "unknown variant" in self.message or "method not found" in self.message.lower()


class ConnectionClosed(Exception):
    """The connection ended (the process exited) before the answer came."""


class RpcTimeout(Exception):
    """No answer within the request's timeout (or the request could not even be written)."""


class RpcConnection:
    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *,
        on_notification: NotificationHandler, on_request: RequestHandler, name: str = "rpc",
        on_timeout: Callable[[str], None] | None = None,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._on_notification = on_notification
        self._on_request = on_request
        self._on_timeout = on_timeout  # told (synchronously) of each request that timed out
        self.name = name
        self._ids = itertools.count(1)
        self._pending: dict[int, tuple[str, asyncio.Future[Any]]] = {}
        self._server_requests: dict[Any, asyncio.Task[None]] = {}  # by the server's request id
        self._read_task: asyncio.Task[None] | None = None
        self.closed = asyncio.Event()
        self.close_reason = ""
        self.last_heard = asyncio.get_running_loop().time()  # when the peer last wrote a line

    def start(self) -> None:
        self._read_task = asyncio.create_task(self._read_loop(), name=f"{self.name}:read")

    async def request(self, method: str, params: dict[str, Any] | None = None, *, timeout: float = 30.0) -> Any:
        if self.closed.is_set():
            raise ConnectionClosed(f"{method}: connection closed ({self.close_reason})")
        request_id = next(self._ids)
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[request_id] = (method, future)
        try:
            # the write counts too: a peer that stopped reading blocks it once the pipe is full
            async with asyncio.timeout(timeout):
                await self._send({"id": request_id, "method": method, "params": params or {}})
                return await future
        except TimeoutError:
            reason = f"{method}: no answer within {timeout:g}s"
            if self._on_timeout is not None:
                self._on_timeout(reason)
            raise RpcTimeout(reason) from None
        finally:
            self._pending.pop(request_id, None)

    async def notify(self, method: str, params: dict[str, Any] | None = None) -> None:
        message: dict[str, Any] = {"method": method}
        if params is not None:
            message["params"] = params
        await self._send(message)

    async def _send(self, message: dict[str, Any]) -> None:
        if self.closed.is_set():
            raise ConnectionClosed(f"connection closed ({self.close_reason})")
        self._writer.write(json.dumps(message, separators=(",", ":")).encode() + b"\n")
        try:
            await self._writer.drain()
        except (ConnectionError, RuntimeError) as exc:
            self._close(f"write failed: {exc}")
            raise ConnectionClosed(str(exc)) from exc

    async def _read_loop(self) -> None:
        reason = "end of stream"
        try:
            while True:
                line = await self._reader.readline()
                if not line:
                    break
                self.last_heard = asyncio.get_running_loop().time()
                self._dispatch(line)
        except (ConnectionError, asyncio.IncompleteReadError, ValueError) as exc:
            reason = f"read failed: {exc}"
        finally:
            self._close(reason)

    def _dispatch(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except ValueError:
            logger.warning("{}: ignoring a line that is not JSON: {!r}", self.name, line[:200])
            return
        if not isinstance(message, dict):
            return
        method = message.get("method")
        if method is None:
            entry = self._pending.get(message.get("id"))  # type: ignore[arg-type]
            if entry is None:
                return  # an answer to a request that timed out
            name, future = entry
            if future.done():
                return
            error = message.get("error")
            if error is not None:
                future.set_exception(RpcError(name, error.get("code"), str(error.get("message", error))))
            else:
                future.set_result(message.get("result"))
        elif "id" in message:
            request_id = message["id"]
            task = asyncio.create_task(self._serve(request_id, method, message.get("params") or {}))
            key = request_id if isinstance(request_id, (int, str)) else repr(request_id)
            self._server_requests[key] = task
            task.add_done_callback(lambda done: self._server_requests.get(key) is done
                                   and self._server_requests.pop(key, None))
        else:
            try:
                self._on_notification(method, message.get("params") or {})
            except Exception:  # noqa: BLE001 - one bad handler must not stop the reader
                logger.exception("{}: handling {} failed", self.name, method)

    async def _serve(self, request_id: Any, method: str, params: dict[str, Any]) -> None:
        try:
            result = await self._on_request(method, params, request_id)
            reply: dict[str, Any] = {"id": request_id, "result": result}
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the server gets an error answer, never silence
            logger.exception("{}: answering {} failed", self.name, method)
            reply = {"id": request_id, "error": {"code": -32603, "message": str(exc)}}
        try:
            await self._send(reply)
        except ConnectionClosed:
            logger.warning("{}: could not answer {} (connection closed)", self.name, method)

    def _close(self, reason: str) -> None:
        if self.closed.is_set():
            return
        self.close_reason = reason
        self.closed.set()
        for method, future in self._pending.values():
            if not future.done():
                future.set_exception(ConnectionClosed(f"{method}: connection closed ({reason})"))
        for task in self._server_requests.values():
            task.cancel()

    def cancel_server_request(self, request_id: Any) -> bool:
        """The server settled its own request: stop handling it and send no answer. Registered
        as it is read, the request is found even if its handler has not started yet. True if it
        was still being handled."""
        task = self._server_requests.get(request_id if isinstance(request_id, (int, str)) else repr(request_id))
        if task is None or task.done():
            return False
        task.cancel()
        return True

    def abort(self, reason: str) -> None:
        """End the connection now: pending requests fail with ConnectionClosed."""
        self._close(reason)

    async def close(self) -> None:
        self._close("closed by us")
        if self._read_task is not None:
            self._read_task.cancel()
            await asyncio.gather(self._read_task, return_exceptions=True)
        if not self._writer.is_closing():
            self._writer.close()
