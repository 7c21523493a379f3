"""A fake Feishu Open Platform for tests.

The emulator is an aiohttp app that runs in its own thread with its own event loop. The real lark-oapi
client fetches tenant tokens with blocking ``requests`` even on its ``a*`` code paths, so a fake that
shared the test's loop would deadlock. Every public method may be called from any thread. Shared state
sits behind one ``threading.Lock``; handlers never await while they hold it.

It covers what the bridge uses: the tenant token, im/v1 messages (send, reply, patch, update, get,
recall), reactions, resource download, uploads, bot info, contact users, and the long connection
(endpoint discovery plus a websocket speaking the SDK's protobuf frames). Test controls are plain
Python methods: ``messages()``, ``requests()``, ``fault()``, ``configure()``, ``push_ws()`` and so on.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import hashlib
import json
import math
import re
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable, Coroutine, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar

from aiohttp import WSCloseCode, WSMsgType, web
from lark_oapi.ws.pb.pbbp2_pb2 import Frame

__all__ = ["FeishuEmulator"]

JSONDict = dict[str, Any]
_T = TypeVar("_T")

TEXT_LIMIT = 150 * 1024
CARD_LIMIT = 30 * 1024
SIZE_LIMITS = {"text": TEXT_LIMIT, "post": CARD_LIMIT, "interactive": CARD_LIMIT}
RECEIVE_ID_TYPES = frozenset({"open_id", "union_id", "user_id", "email", "chat_id"})
MSG_TYPES = frozenset({"text", "post", "image", "file", "audio", "media", "sticker", "interactive",
                       "share_chat", "share_user", "system"})
UUID_TTL_S = 3600.0
DEFAULT_TOKEN_EXPIRE = 7200
DEFAULT_WS_CLIENT_CONFIG: dict[str, int] = {
    "ReconnectCount": -1, "ReconnectInterval": 2, "ReconnectNonce": 1, "PingInterval": 5}
TENANT_KEY = "tenant_test"
SEED_CHAT_ID = "oc_chat1"
"""Chat given to inbound messages that a reply or reaction seeds on demand (see ``seed_message``)."""

AUTHED_PREFIXES = ("/open-apis/im/", "/open-apis/contact/", "/open-apis/bot/")
RATE_LIMITED_PREFIX = "/open-apis/"
TOKEN_PREFIX = "/open-apis/auth/"

# Feishu error codes used here.
E_APP_SECRET = 10014
E_TOKEN_MISSING = 99991661
E_TOKEN_INVALID = 99991663
E_APP_RATE_LIMIT = 99991400
E_FIELD_VALIDATION = 99992402
E_BAD_PARAM = 230001
E_RECALLED = 230011
E_IM_RATE_LIMIT = 230020
E_TOO_LONG = 230025
E_NO_PERMISSION = 230027
E_RESOURCE_MISSING = 234003
E_NO_USER = 41050
E_WS_AUTH = 514

# Long-connection frame vocabulary, as in lark_oapi/ws/const.py and enum.py.
FRAME_CONTROL = 0
FRAME_DATA = 1
WS_SERVICE_ID = 1


class _ApiError(Exception):
    """Raised by handlers; the middleware turns it into a Feishu-style JSON error."""

    def __init__(self, code: int, msg: str, status: int = 400, headers: dict[str, str] | None = None) -> None:
        super().__init__(f"{code} {msg}")
        self.code, self.msg, self.status, self.headers = code, msg, status, headers or {}

    def response(self) -> web.Response:
        return web.json_response({"code": self.code, "msg": self.msg, "data": {}},
                                 status=self.status, headers=self.headers)


@dataclass
class _Message:
    message_id: str
    chat_id: str
    msg_type: str
    content: str
    sender_type: str  # "app" (sent through the API) or "user" (an inbound message seeded for tests)
    sender_id: str
    create_time: int  # ms
    parent_id: str | None = None
    root_id: str | None = None
    thread_id: str | None = None
    uuid: str | None = None
    receive_id: str | None = None
    receive_id_type: str | None = None
    reply_in_thread: bool = False
    deleted: bool = False
    updated: bool = False
    update_time: int = 0
    history: list[str] = field(default_factory=list)

    def record(self) -> JSONDict:
        """A detached dict for test assertions."""
        return {
            "message_id": self.message_id, "chat_id": self.chat_id, "msg_type": self.msg_type,
            "content": self.content, "parent_id": self.parent_id, "root_id": self.root_id,
            "thread_id": self.thread_id, "uuid": self.uuid, "deleted": self.deleted, "updated": self.updated,
            "history": list(self.history), "sender_type": self.sender_type, "sender_id": self.sender_id,
            "receive_id": self.receive_id, "receive_id_type": self.receive_id_type,
            "reply_in_thread": self.reply_in_thread, "create_time": self.create_time,
            "update_time": self.update_time,
        }

    def api(self) -> JSONDict:
        """The message object as the im/v1 API returns it."""
        sender = ({"id": self.sender_id, "id_type": "app_id", "sender_type": "app", "tenant_key": TENANT_KEY}
                  if self.sender_type == "app" else
                  {"id": self.sender_id, "id_type": "open_id", "sender_type": "user", "tenant_key": TENANT_KEY})
        out: JSONDict = {
            "message_id": self.message_id, "msg_type": self.msg_type, "create_time": str(self.create_time),
            "update_time": str(self.update_time), "deleted": self.deleted, "updated": self.updated,
            "chat_id": self.chat_id, "sender": sender, "body": {"content": self.content},
        }
        for key in ("root_id", "parent_id", "thread_id"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        return out


@dataclass
class _Fault:
    method: str
    path_re: re.Pattern[str]
    status: int | None
    code: int | None
    msg: str
    headers: dict[str, str]
    raw_body: str | None
    delay: float
    times: int

    def matches(self, method: str, path: str) -> bool:
        return self.method in ("*", method.upper()) and self.path_re.search(path) is not None


class _Window:
    """Request times in the last second, for a QPS limit."""

    def __init__(self) -> None:
        self._times: deque[float] = deque()

    def admit(self, limit: int, now: float) -> float | None:
        """Record a request and return None, or return the seconds until one more would fit."""
        while self._times and now - self._times[0] >= 1.0:
            self._times.popleft()
        if len(self._times) >= limit:
            return 1.0 - (now - self._times[0])
        self._times.append(now)
        return None


def _now_ms() -> int:
    return int(time.time() * 1000)


def _header(frame: Frame, key: str) -> str | None:
    for h in frame.headers:
        if h.key == key:
            return h.value
    return None


def _frame(method: int, headers: dict[str, str], payload: bytes = b"", seq_id: int = 0) -> Frame:
    frame = Frame()
    frame.SeqID = seq_id
    frame.LogID = seq_id
    frame.service = WS_SERVICE_ID
    frame.method = method
    for key, value in headers.items():
        h = frame.headers.add()
        h.key, h.value = key, value
    if payload:
        frame.payload = payload
    return frame


class FeishuEmulator:
    """A fake Feishu Open Platform on ``127.0.0.1``, served from its own thread."""

    def __init__(self, app_id: str = "cli_test", app_secret: str = "secret_test",
                 bot_open_id: str = "ou_bot", bot_name: str = "Bridge Bot") -> None:
        self.app_id = app_id
        self.app_secret = app_secret
        self.bot_open_id = bot_open_id
        self.bot_name = bot_name
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._port = 0
        # Issued tokens outlive reset(), so a client's cached token keeps working between tests.
        self._tokens: dict[str, float] = {}
        # Long-connection state (the websocket objects are only touched on the emulator loop).
        self._ws: web.WebSocketResponse | None = None
        self._ws_open: set[web.WebSocketResponse] = set()  # only touched on the emulator loop
        self._ws_connections = 0
        self._ws_pings = 0
        self._ws_seq = 0
        self._acks: dict[str, tuple[web.WebSocketResponse, asyncio.Future[Frame]]] = {}
        self._clear_state()

    def _clear_state(self) -> None:
        self._messages: dict[str, _Message] = {}
        self._uuids: dict[str, tuple[str, float]] = {}
        self._reactions: dict[str, JSONDict] = {}
        self._resources: dict[tuple[str, str], tuple[bytes, str, str]] = {}
        self._uploads: list[JSONDict] = []
        self._users: dict[str, str] = {}
        self._requests: list[JSONDict] = []
        self._faults: list[_Fault] = []
        self._token_calls = 0
        self._token_expire = DEFAULT_TOKEN_EXPIRE
        self._app_qps = 0
        self._chat_qps = 0
        self._patch_qps = 0
        self._ws_client_config = dict(DEFAULT_WS_CLIENT_CONFIG)
        self._app_window = _Window()
        self._chat_windows: dict[str, _Window] = {}
        self._patch_windows: dict[str, _Window] = {}
        self._endpoint_calls = 0

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FeishuEmulator:
        """Serve on a free port of 127.0.0.1; return once the server accepts connections."""
        if self._thread is not None:
            raise RuntimeError("emulator already started")
        ready = threading.Event()
        errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._serve, args=(ready, errors),
                                        name="feishu-emulator", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("emulator did not start within 10 s")
        if errors:
            self._thread.join(5)
            self._thread = None
            raise errors[0]
        return self

    def stop(self) -> None:
        """Close the long connection, stop serving and join the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._close_all_ws(), loop).result(5)
            finally:
                loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._thread = self._loop = None

    def __enter__(self) -> FeishuEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """Base URL, to pass as the SDK's ``domain``."""
        if not self._port:
            raise RuntimeError("emulator not started")
        return f"http://127.0.0.1:{self._port}"

    def _serve(self, ready: threading.Event, errors: list[BaseException]) -> None:
        loop = asyncio.new_event_loop()
        asyncio.set_event_loop(loop)
        runner = web.AppRunner(self._build_app(), access_log=None, handle_signals=False, shutdown_timeout=1.0)
        try:
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, "127.0.0.1", 0)
            loop.run_until_complete(site.start())
            self._port = runner.addresses[0][1]
        except BaseException as exc:  # reported to start()
            errors.append(exc)
            loop.run_until_complete(runner.cleanup())
            loop.close()
            ready.set()
            return
        self._loop = loop
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

    def _call(self, coro: Coroutine[Any, Any, _T], timeout: float | None = None) -> _T:
        """Run a coroutine on the emulator loop from another thread and wait for its result."""
        loop = self._loop
        if loop is None:
            coro.close()
            raise RuntimeError("emulator not started")
        if threading.current_thread() is self._thread:
            coro.close()
            raise RuntimeError("blocking emulator call from the emulator's own thread")
        return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)

    # ------------------------------------------------------------------ test controls

    def reset(self) -> None:
        """Forget messages, reactions, resources, users, uploads, the request log, faults and config.

        Issued tokens stay valid (so SDK-cached tokens keep working); the long connection stays open.
        """
        with self._lock:
            self._clear_state()

    def configure(self, *, token_expire: int | None = None, app_qps: int | None = None,
                  chat_qps: int | None = None, message_patch_qps: int | None = None,
                  ws_client_config: dict[str, int] | None = None) -> None:
        """Change settings; None leaves one unchanged, 0 turns a QPS limit off (all are off by default).

        ``ws_client_config`` is merged into the ClientConfig sent by the ws endpoint and in pongs.
        """
        with self._lock:
            if token_expire is not None:
                self._token_expire = token_expire
            if app_qps is not None:
                self._app_qps = app_qps
            if chat_qps is not None:
                self._chat_qps = chat_qps
            if message_patch_qps is not None:
                self._patch_qps = message_patch_qps
            if ws_client_config is not None:
                self._ws_client_config.update(ws_client_config)

    def fault(self, method: str, path_regex: str, *, status: int | None = 500, code: int | None = None,
              msg: str = "", headers: dict[str, str] | None = None, raw_body: str | None = None,
              delay: float = 0.0, times: int = 1) -> None:
        """Answer the next ``times`` requests matching ``method`` ("*" = any) and ``path_regex`` (searched
        in the path) with ``status``. The body is ``raw_body`` as-is (text/html unless ``headers`` set a
        Content-Type) or JSON ``{"code": code (default: status), "msg", "data": {}}``. ``delay`` sleeps
        first; with ``status=None`` the request is then served normally. A negative ``times`` never expires.
        """
        if times == 0:
            return
        with self._lock:
            self._faults.append(_Fault(method.upper(), re.compile(path_regex), status, code, msg,
                                       dict(headers or {}), raw_body, delay, times))

    def revoke_tokens(self) -> None:
        """Invalidate every issued tenant token (the next API call gets 99991663)."""
        with self._lock:
            self._tokens.clear()

    def seed_resource(self, message_id: str, key: str, data: bytes, content_type: str = "image/png",
                      filename: str = "a.png") -> None:
        """Make ``GET …/messages/{message_id}/resources/{key}`` return ``data``."""
        with self._lock:
            self._resources[(message_id, key)] = (bytes(data), content_type, filename)

    def seed_user(self, open_id: str, name: str) -> None:
        """Make ``GET /open-apis/contact/v3/users/{open_id}`` find this user."""
        with self._lock:
            self._users[open_id] = name

    def seed_message(self, message_id: str, *, chat_id: str = SEED_CHAT_ID, msg_type: str = "text",
                     content: str = '{"text":""}', sender_open_id: str = "ou_alice",
                     root_id: str | None = None, parent_id: str | None = None,
                     thread_id: str | None = None) -> None:
        """Register an inbound (user) message, e.g. one a test delivered to the bridge.

        Replies and reactions to unknown ids seed one on demand in chat ``SEED_CHAT_ID``; call this
        first when the chat or thread matters.
        """
        with self._lock:
            self._seed(message_id, chat_id=chat_id, msg_type=msg_type, content=content,
                       sender_open_id=sender_open_id, root_id=root_id, parent_id=parent_id, thread_id=thread_id)

    def messages(self, *, include_inbound: bool = False) -> list[JSONDict]:
        """Messages the app created, in creation order (plus seeded inbound ones if asked)."""
        with self._lock:
            return [m.record() for m in self._messages.values() if include_inbound or m.sender_type == "app"]

    def message(self, message_id: str) -> JSONDict | None:
        """One message (app-sent or seeded) by id, or None."""
        with self._lock:
            m = self._messages.get(message_id)
            return m.record() if m else None

    def reactions(self) -> list[JSONDict]:
        """Reactions added through the API: message_id, reaction_id, emoji_type, deleted, action_time."""
        with self._lock:
            return [{"message_id": r["message_id"], "reaction_id": r["reaction_id"],
                     "emoji_type": r["emoji_type"], "deleted": r["deleted"], "action_time": r["action_time"]}
                    for r in self._reactions.values()]

    def uploads(self) -> list[JSONDict]:
        """Uploaded images and files: kind ("image" | "file"), key, file_name, file_type, data."""
        with self._lock:
            return [dict(u) for u in self._uploads]

    def requests(self) -> list[JSONDict]:
        """The request log: method, path, query, headers, json (body or None), time (epoch s)."""
        with self._lock:
            return copy.deepcopy(self._requests)

    @property
    def token_calls(self) -> int:
        """How many times the tenant-token endpoint was called."""
        with self._lock:
            return self._token_calls

    # ------------------------------------------------------------------ long connection controls

    def ws_connected(self) -> bool:
        """Whether a long-connection client is connected now."""
        with self._lock:
            return self._ws is not None

    @property
    def ws_connections(self) -> int:
        """How many websocket connections were accepted so far."""
        with self._lock:
            return self._ws_connections

    @property
    def ws_pings(self) -> int:
        """How many CONTROL ping frames were received (each answered with a pong)."""
        with self._lock:
            return self._ws_pings

    def wait_ws(self, connections: int = 1, timeout: float = 5.0) -> bool:
        """Wait until ``connections`` websockets have been accepted and one is open."""
        with self._cond:
            return self._cond.wait_for(lambda: self._ws_connections >= connections and self._ws is not None,
                                       timeout)

    def drop_ws(self) -> bool:
        """Close the current long connection from the server side; False if none was open."""
        return self._call(self._close_ws(), 10)

    def push_ws(self, payload: JSONDict, type: str = "event", timeout: float = 5.0, *,
                parts: int = 1) -> JSONDict:
        """Send a DATA frame carrying ``payload`` (plaintext event JSON) and wait for the client's ack.

        Returns ``{"acked", "code", "data" (decoded JSON of the ack's base64 data, or None), "biz_rt",
        "elapsed_ms"}``. ``parts`` > 1 splits the payload over several frames (sum/seq headers).
        Do not call this from a thread whose loop must run for the client to ack; use ``apush_ws``.
        """
        return self._call(self._push(payload, type, timeout, parts), timeout + 5)

    async def apush_ws(self, payload: JSONDict, type: str = "event", timeout: float = 5.0, *,
                       parts: int = 1) -> JSONDict:
        """``push_ws`` for async tests: awaits the ack without blocking the caller's loop."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("emulator not started")
        fut = asyncio.run_coroutine_threadsafe(self._push(payload, type, timeout, parts), loop)
        return await asyncio.wrap_future(fut)

    async def _close_ws(self) -> bool:
        with self._cond:
            ws, self._ws = self._ws, None
            self._cond.notify_all()
        if ws is None:
            return False
        self._fail_acks(ws)
        await ws.close(code=WSCloseCode.GOING_AWAY, message=b"closed by emulator")
        return True

    async def _close_all_ws(self) -> None:
        await self._close_ws()
        for ws in list(self._ws_open):
            self._fail_acks(ws)
            await ws.close(code=WSCloseCode.GOING_AWAY, message=b"emulator stopping")

    def _fail_acks(self, ws: web.WebSocketResponse) -> None:
        """Wake pushes still waiting for an ack on a connection that is going away."""
        for owner, waiter in list(self._acks.values()):
            if owner is ws and not waiter.done():
                waiter.set_exception(ConnectionResetError("long connection closed"))

    async def _push(self, payload: JSONDict, type_: str, timeout: float, parts: int) -> JSONDict:
        with self._lock:
            ws = self._ws
            self._ws_seq += 1
            seq_id = self._ws_seq
        result: JSONDict = {"acked": False, "code": None, "data": None, "biz_rt": None, "elapsed_ms": 0.0}
        if ws is None or ws.closed:
            return result
        body = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        parts = max(1, min(parts, len(body)))
        size = math.ceil(len(body) / parts)
        chunks = [body[i:i + size] for i in range(0, len(body), size)]
        message_id, trace_id = uuid.uuid4().hex, uuid.uuid4().hex
        ack: asyncio.Future[Frame] = asyncio.get_running_loop().create_future()
        self._acks[message_id] = (ws, ack)
        started = time.perf_counter()
        try:
            for seq, chunk in enumerate(chunks):
                headers = {"type": type_, "message_id": message_id, "sum": str(len(chunks)), "seq": str(seq),
                           "trace_id": trace_id}
                await ws.send_bytes(_frame(FRAME_DATA, headers, chunk, seq_id).SerializeToString())
            frame = await asyncio.wait_for(ack, timeout)
        except (asyncio.TimeoutError, ConnectionError):
            result["elapsed_ms"] = (time.perf_counter() - started) * 1000
            return result
        finally:
            self._acks.pop(message_id, None)
        result["elapsed_ms"] = (time.perf_counter() - started) * 1000
        result["acked"] = True
        biz_rt = _header(frame, "biz_rt")
        result["biz_rt"] = int(biz_rt) if biz_rt and biz_rt.isdigit() else biz_rt
        try:
            ack_body = json.loads(frame.payload or b"{}")
        except ValueError:
            return result
        result["code"] = ack_body.get("code")
        if ack_body.get("data"):
            raw = base64.b64decode(ack_body["data"])
            try:
                result["data"] = json.loads(raw)
            except ValueError:
                result["data"] = raw.decode("utf-8", "replace")
        return result

    # ------------------------------------------------------------------ app and middleware

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._middleware], client_max_size=32 * 1024 * 1024)
        r = app.router
        r.add_post("/open-apis/auth/v3/tenant_access_token/internal", self._h_token)
        r.add_post("/open-apis/im/v1/messages", self._h_send)
        r.add_post("/open-apis/im/v1/messages/{message_id}/reply", self._h_reply)
        r.add_patch("/open-apis/im/v1/messages/{message_id}", self._h_patch)
        r.add_put("/open-apis/im/v1/messages/{message_id}", self._h_update)
        r.add_get("/open-apis/im/v1/messages/{message_id}", self._h_get)
        r.add_delete("/open-apis/im/v1/messages/{message_id}", self._h_delete)
        r.add_post("/open-apis/im/v1/messages/{message_id}/reactions", self._h_add_reaction)
        r.add_get("/open-apis/im/v1/messages/{message_id}/reactions", self._h_list_reactions)
        r.add_delete("/open-apis/im/v1/messages/{message_id}/reactions/{reaction_id}", self._h_del_reaction)
        r.add_get("/open-apis/im/v1/messages/{message_id}/resources/{file_key}", self._h_resource)
        r.add_post("/open-apis/im/v1/images", self._h_upload_image)
        r.add_post("/open-apis/im/v1/files", self._h_upload_file)
        r.add_get("/open-apis/bot/v3/info", self._h_bot_info)
        r.add_get("/open-apis/contact/v3/users/{user_id}", self._h_user)
        r.add_post("/callback/ws/endpoint", self._h_ws_endpoint)
        r.add_get("/ws", self._h_ws)
        return app

    @web.middleware
    async def _middleware(self, request: web.Request,
                          handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        """Log the request, then apply faults, the app QPS limit and Bearer auth before the handler."""
        body: Any = None
        if request.can_read_body and not request.content_type.startswith("multipart/"):
            raw = await request.read()  # cached by aiohttp, so handlers can read it again
            try:
                body = json.loads(raw) if raw else None
            except ValueError:
                body = None
        path = request.path
        with self._lock:
            self._requests.append({"method": request.method, "path": path, "query": dict(request.query),
                                   "headers": dict(request.headers), "json": body, "time": time.time()})
            fault = self._take_fault(request.method, path)
        try:
            if fault is not None:
                if fault.delay > 0:
                    await asyncio.sleep(fault.delay)
                if fault.status is not None:
                    return self._fault_response(fault)
            if path.startswith(RATE_LIMITED_PREFIX) and not path.startswith(TOKEN_PREFIX):
                self._admit_app()
            if path.startswith(AUTHED_PREFIXES):
                self._authorize(request.headers.get("Authorization"))
            response = await handler(request)
        except _ApiError as err:
            response = err.response()
        if not response.prepared:
            response.headers.setdefault("X-Tt-Logid", secrets.token_hex(16))
        return response

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        for f in self._faults:
            if f.matches(method, path):
                if f.times > 0:
                    f.times -= 1
                    if f.times == 0:
                        self._faults.remove(f)
                return f
        return None

    @staticmethod
    def _fault_response(f: _Fault) -> web.Response:
        assert f.status is not None
        if f.raw_body is not None:
            headers = dict(f.headers)
            if not any(k.lower() == "content-type" for k in headers):
                headers["Content-Type"] = "text/html; charset=utf-8"
            return web.Response(status=f.status, text=f.raw_body, headers=headers)
        code = f.status if f.code is None else f.code
        return web.json_response({"code": code, "msg": f.msg, "data": {}}, status=f.status, headers=f.headers)

    def _admit_app(self) -> None:
        with self._lock:
            if self._app_qps <= 0:
                return
            wait = self._app_window.admit(self._app_qps, time.monotonic())
            limit = self._app_qps
        if wait is not None:
            raise _ApiError(E_APP_RATE_LIMIT, "request trigger frequency limit", status=429, headers={
                "x-ogw-ratelimit-limit": str(limit), "x-ogw-ratelimit-reset": str(max(1, math.ceil(wait)))})

    def _authorize(self, header: str | None) -> None:
        if not header or not header.startswith("Bearer ") or not header[7:].strip():
            raise _ApiError(E_TOKEN_MISSING, "Missing access token for authorization. "
                                             "Please make a request with token attached.")
        token = header[7:].strip()
        with self._lock:
            expires = self._tokens.get(token)
        if expires is None or expires <= time.time():
            raise _ApiError(E_TOKEN_INVALID, "Invalid access token for authorization. "
                                             "Please make a request with token attached.")

    @staticmethod
    async def _json(request: web.Request) -> JSONDict:
        raw = await request.read()
        if not raw:
            return {}
        try:
            body = json.loads(raw)
        except ValueError:
            raise _ApiError(E_FIELD_VALIDATION, "request body is not valid JSON") from None
        if not isinstance(body, dict):
            raise _ApiError(E_FIELD_VALIDATION, "request body must be a JSON object")
        return body

    @staticmethod
    def _ok(data: JSONDict | None = None) -> web.Response:
        return web.json_response({"code": 0, "msg": "success", "data": data if data is not None else {}})

    # ------------------------------------------------------------------ state helpers (lock held)

    def _seed(self, message_id: str, *, chat_id: str = SEED_CHAT_ID, msg_type: str = "text",
              content: str = '{"text":""}', sender_open_id: str = "ou_alice", root_id: str | None = None,
              parent_id: str | None = None, thread_id: str | None = None) -> _Message:
        now = _now_ms()
        msg = _Message(message_id=message_id, chat_id=chat_id, msg_type=msg_type, content=content,
                       sender_type="user", sender_id=sender_open_id, create_time=now, update_time=now,
                       root_id=root_id, parent_id=parent_id, thread_id=thread_id, history=[content])
        self._messages[message_id] = msg
        return msg

    def _create(self, **fields: Any) -> _Message:
        now = _now_ms()
        msg = _Message(message_id=f"om_{secrets.token_hex(16)}", sender_type="app", sender_id=self.app_id,
                       create_time=now, update_time=now, history=[fields["content"]], **fields)
        self._messages[msg.message_id] = msg
        if msg.uuid:
            self._uuids[msg.uuid] = (msg.message_id, time.monotonic())
        return msg

    def _by_uuid(self, key: str | None) -> _Message | None:
        if not key:
            return None
        hit = self._uuids.get(key)
        if hit is None or time.monotonic() - hit[1] > UUID_TTL_S:
            return None
        return self._messages.get(hit[0])

    def _admit_chat(self, chat_id: str) -> None:
        if self._chat_qps <= 0:
            return
        window = self._chat_windows.setdefault(chat_id, _Window())
        if window.admit(self._chat_qps, time.monotonic()) is not None:
            raise _ApiError(E_IM_RATE_LIMIT, "The request you send is too frequent, please reduce the frequency.")

    def _get_message(self, message_id: str, *, own: bool = False) -> _Message:
        msg = self._messages.get(message_id)
        if msg is None:
            raise _ApiError(E_BAD_PARAM, f"message not found: {message_id}")
        if msg.deleted:
            raise _ApiError(E_RECALLED, "The message was withdrawn.")
        if own and msg.sender_type != "app":
            raise _ApiError(E_NO_PERMISSION, "the message was not sent by this app")
        return msg

    @staticmethod
    def _check_content(msg_type: Any, content: Any) -> None:
        if not isinstance(msg_type, str) or msg_type not in MSG_TYPES:
            raise _ApiError(E_FIELD_VALIDATION, f"field validation failed: msg_type {msg_type!r}")
        if not isinstance(content, str):
            raise _ApiError(E_FIELD_VALIDATION, "field validation failed: content must be a JSON string")
        try:
            json.loads(content)
        except ValueError:
            raise _ApiError(E_BAD_PARAM, "invalid message content: not JSON") from None
        limit = SIZE_LIMITS.get(msg_type)
        if limit is not None and len(content.encode("utf-8")) > limit:
            raise _ApiError(E_TOO_LONG, f"message content exceeds the {limit // 1024} KB limit for {msg_type}")

    @staticmethod
    def _is_shared_card(content: str) -> bool:
        """Patchable cards: JSON 2.0, ``config.update_multi: true``, or a template reference."""
        try:
            card = json.loads(content)
        except ValueError:
            return False
        if not isinstance(card, dict):
            return False
        config = card.get("config")
        return (card.get("type") == "template" or card.get("schema") == "2.0"
                or (isinstance(config, dict) and config.get("update_multi") is True))

    # ------------------------------------------------------------------ handlers

    async def _h_token(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        with self._lock:
            self._token_calls += 1
            if body.get("app_id") != self.app_id or body.get("app_secret") != self.app_secret:
                return web.json_response({"code": E_APP_SECRET, "msg": "app secret invalid"}, status=400)
            token = f"t-{secrets.token_hex(20)}"
            expire = self._token_expire
            self._tokens[token] = time.time() + expire
        return web.json_response({"code": 0, "msg": "ok", "tenant_access_token": token, "expire": expire})

    async def _h_send(self, request: web.Request) -> web.Response:
        id_type = request.query.get("receive_id_type", "")
        if id_type not in RECEIVE_ID_TYPES:
            raise _ApiError(E_FIELD_VALIDATION, f"field validation failed: receive_id_type {id_type!r}")
        body = await self._json(request)
        receive_id, msg_type, content = body.get("receive_id"), body.get("msg_type"), body.get("content")
        if not isinstance(receive_id, str) or not receive_id:
            raise _ApiError(E_FIELD_VALIDATION, "field validation failed: receive_id is required")
        self._check_content(msg_type, content)
        with self._lock:
            msg = self._by_uuid(body.get("uuid"))
            if msg is None:
                chat_id = (receive_id if id_type == "chat_id"
                           else "oc_" + hashlib.sha1(f"p2p:{receive_id}".encode()).hexdigest()[:32])
                self._admit_chat(chat_id)
                msg = self._create(chat_id=chat_id, msg_type=msg_type, content=content, uuid=body.get("uuid"),
                                   receive_id=receive_id, receive_id_type=id_type)
            data = msg.api()
        return self._ok(data)

    async def _h_reply(self, request: web.Request) -> web.Response:
        target_id = request.match_info["message_id"]
        body = await self._json(request)
        msg_type, content = body.get("msg_type"), body.get("content")
        in_thread = bool(body.get("reply_in_thread"))
        self._check_content(msg_type, content)
        with self._lock:
            msg = self._by_uuid(body.get("uuid"))
            if msg is None:
                target = self._messages.get(target_id) or self._seed(target_id)
                if target.deleted:
                    raise _ApiError(E_RECALLED, "The message was withdrawn.")
                self._admit_chat(target.chat_id)
                root_id = target.root_id or target.message_id
                root = self._messages.get(root_id)
                thread_id = target.thread_id
                if in_thread and thread_id is None:
                    thread_id = (root.thread_id if root else None) or f"omt_{secrets.token_hex(8)}"
                    target.thread_id = thread_id
                    if root is not None and root.thread_id is None:
                        root.thread_id = thread_id
                msg = self._create(chat_id=target.chat_id, msg_type=msg_type, content=content,
                                   uuid=body.get("uuid"), parent_id=target.message_id, root_id=root_id,
                                   thread_id=thread_id, reply_in_thread=in_thread)
            data = msg.api()
        return self._ok(data)

    async def _h_patch(self, request: web.Request) -> web.Response:
        message_id = request.match_info["message_id"]
        content = (await self._json(request)).get("content")
        self._check_content("interactive", content)
        with self._lock:
            msg = self._get_message(message_id, own=True)
            if msg.msg_type != "interactive":
                raise _ApiError(E_BAD_PARAM, "only interactive (card) messages can be patched")
            if not self._is_shared_card(msg.history[0]):
                raise _ApiError(E_BAD_PARAM, "only shared cards can be updated: "
                                             "use schema 2.0 or config.update_multi=true")
            if self._patch_qps > 0:
                window = self._patch_windows.setdefault(message_id, _Window())
                if window.admit(self._patch_qps, time.monotonic()) is not None:
                    raise _ApiError(E_IM_RATE_LIMIT, "The request you send is too frequent, "
                                                     "please reduce the frequency.")
            msg.content, msg.updated, msg.update_time = content, True, _now_ms()
            msg.history.append(content)
        return self._ok({})

    async def _h_update(self, request: web.Request) -> web.Response:
        message_id = request.match_info["message_id"]
        body = await self._json(request)
        msg_type, content = body.get("msg_type"), body.get("content")
        self._check_content(msg_type, content)
        if msg_type not in ("text", "post"):
            raise _ApiError(E_BAD_PARAM, "only text and post messages can be edited")
        with self._lock:
            msg = self._get_message(message_id, own=True)
            if msg.msg_type not in ("text", "post"):
                raise _ApiError(E_BAD_PARAM, "only text and post messages can be edited")
            msg.msg_type, msg.content, msg.updated, msg.update_time = msg_type, content, True, _now_ms()
            msg.history.append(content)
            data = msg.api()
        return self._ok(data)

    async def _h_get(self, request: web.Request) -> web.Response:
        with self._lock:
            msg = self._messages.get(request.match_info["message_id"])
            if msg is None:
                raise _ApiError(E_BAD_PARAM, "message not found")
            data = {"items": [msg.api()]}
        return self._ok(data)

    async def _h_delete(self, request: web.Request) -> web.Response:
        with self._lock:
            msg = self._get_message(request.match_info["message_id"], own=True)
            msg.deleted, msg.update_time = True, _now_ms()
        return self._ok({})

    async def _h_add_reaction(self, request: web.Request) -> web.Response:
        message_id = request.match_info["message_id"]
        reaction_type = (await self._json(request)).get("reaction_type")
        emoji = reaction_type.get("emoji_type") if isinstance(reaction_type, dict) else None
        if not isinstance(emoji, str) or not emoji:
            raise _ApiError(E_FIELD_VALIDATION, "field validation failed: reaction_type.emoji_type is required")
        with self._lock:
            msg = self._messages.get(message_id) or self._seed(message_id)
            if msg.deleted:
                raise _ApiError(E_RECALLED, "The message was withdrawn.")
            rid = secrets.token_urlsafe(24)
            self._reactions[rid] = {"message_id": message_id, "reaction_id": rid, "emoji_type": emoji,
                                    "deleted": False, "action_time": str(_now_ms())}
            data = self._reaction_api(self._reactions[rid])
        return self._ok(data)

    async def _h_list_reactions(self, request: web.Request) -> web.Response:
        """The message's reactions, oldest first, of one type when `reaction_type` is given (one
        page: the emulator's messages carry few)."""
        message_id, emoji = request.match_info["message_id"], request.query.get("reaction_type")
        with self._lock:
            if message_id not in self._messages:
                raise _ApiError(E_BAD_PARAM, "message not found")
            items = [self._reaction_api(rec) for rec in self._reactions.values()
                     if rec["message_id"] == message_id and not rec["deleted"]
                     and (emoji is None or rec["emoji_type"] == emoji)]
        return self._ok({"items": items, "has_more": False, "page_token": ""})

    async def _h_del_reaction(self, request: web.Request) -> web.Response:
        message_id, rid = request.match_info["message_id"], request.match_info["reaction_id"]
        with self._lock:
            rec = self._reactions.get(rid)
            if rec is None or rec["message_id"] != message_id or rec["deleted"]:
                raise _ApiError(E_BAD_PARAM, "reaction not found")
            rec["deleted"] = True
            data = self._reaction_api(rec)
        return self._ok(data)

    def _reaction_api(self, rec: JSONDict) -> JSONDict:
        return {"reaction_id": rec["reaction_id"], "operator": {"operator_id": self.app_id, "operator_type": "app"},
                "action_time": rec["action_time"], "reaction_type": {"emoji_type": rec["emoji_type"]}}

    async def _h_resource(self, request: web.Request) -> web.Response:
        kind = request.query.get("type")
        if kind not in ("image", "file"):
            raise _ApiError(E_FIELD_VALIDATION, f"field validation failed: type {kind!r}")
        key = (request.match_info["message_id"], request.match_info["file_key"])
        with self._lock:
            found = self._resources.get(key)
        if found is None:
            raise _ApiError(E_RESOURCE_MISSING, "File not in msg.")
        data, content_type, filename = found
        return web.Response(body=data, headers={"Content-Type": content_type,
                                                "Content-Disposition": f'attachment; filename="{filename}"'})

    async def _upload(self, request: web.Request, kind: str, field_name: str) -> JSONDict:
        form = await request.post()
        upload = form.get(field_name)
        # The SDK's sync path (MultipartEncoder) sends the part without a filename: a plain field.
        if isinstance(upload, web.FileField):
            data, filename = upload.file.read(), upload.filename
        elif isinstance(upload, (str, bytes, bytearray)) and upload:
            data, filename = (upload.encode() if isinstance(upload, str) else bytes(upload)), None
        else:
            raise _ApiError(E_FIELD_VALIDATION, f"field validation failed: {field_name} is required")
        key = f"{'img' if kind == 'image' else 'file'}_v3_{secrets.token_hex(12)}"
        type_field = "image_type" if kind == "image" else "file_type"
        with self._lock:
            self._uploads.append({"kind": kind, "key": key, "data": data,
                                  "file_name": form.get("file_name") or filename,
                                  "file_type": form.get(type_field)})
        return {f"{'image' if kind == 'image' else 'file'}_key": key}

    async def _h_upload_image(self, request: web.Request) -> web.Response:
        return self._ok(await self._upload(request, "image", "image"))

    async def _h_upload_file(self, request: web.Request) -> web.Response:
        return self._ok(await self._upload(request, "file", "file"))

    async def _h_bot_info(self, request: web.Request) -> web.Response:
        return web.json_response({"code": 0, "msg": "ok", "bot": {
            "activate_status": 2, "app_name": self.bot_name, "avatar_url": "", "ip_white_list": [],
            "open_id": self.bot_open_id}})

    async def _h_user(self, request: web.Request) -> web.Response:
        user_id = request.match_info["user_id"]
        id_type = request.query.get("user_id_type", "open_id")
        with self._lock:
            name = self._users.get(user_id) if id_type == "open_id" else None
        if name is None:
            raise _ApiError(E_NO_USER, "no user authority error")
        return self._ok({"user": {"open_id": user_id, "name": name}})

    async def _h_ws_endpoint(self, request: web.Request) -> web.Response:
        body = await self._json(request)
        with self._lock:
            if body.get("AppID") != self.app_id or body.get("AppSecret") != self.app_secret:
                return web.json_response({"code": E_WS_AUTH, "msg": "auth failed", "data": {}})
            self._endpoint_calls += 1
            device = f"d{self._endpoint_calls}"
            config = dict(self._ws_client_config)
        url = f"ws://127.0.0.1:{self._port}/ws?device_id={device}&service_id={WS_SERVICE_ID}"
        return web.json_response({"code": 0, "msg": "ok", "data": {"URL": url, "ClientConfig": config}})

    async def _h_ws(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self._ws_open.add(ws)
        with self._cond:
            self._ws_connections += 1
            self._ws = ws
            self._cond.notify_all()
        try:
            async for msg in ws:
                if msg.type == WSMsgType.BINARY:
                    await self._on_frame(ws, msg.data)
        finally:
            with self._cond:
                if self._ws is ws:
                    self._ws = None
                    self._cond.notify_all()
            self._ws_open.discard(ws)
            self._fail_acks(ws)
        return ws

    async def _on_frame(self, ws: web.WebSocketResponse, data: bytes) -> None:
        """Answer pings with a pong (carrying the ClientConfig) and route acks to waiting pushes."""
        frame = Frame()
        frame.ParseFromString(data)
        if frame.method == FRAME_CONTROL:
            if _header(frame, "type") == "ping":
                with self._lock:
                    self._ws_pings += 1
                    config = json.dumps(self._ws_client_config).encode()
                try:
                    await ws.send_bytes(_frame(FRAME_CONTROL, {"type": "pong"}, config).SerializeToString())
                except ConnectionError:  # the connection is closing; nothing to answer
                    pass
        elif frame.method == FRAME_DATA:
            pending = self._acks.get(_header(frame, "message_id") or "")
            if pending is not None and pending[0] is ws and not pending[1].done():
                pending[1].set_result(frame)


@contextmanager
def fresh_emulator() -> Iterator[FeishuEmulator]:
    """An emulator started for one test, with an app id of its own: lark-oapi caches tenant
    tokens per app id for the whole process, so a reused id would leak one between tests."""
    from lark_oapi.core.token.manager import TokenManager

    emu = FeishuEmulator(app_id=f"cli_{uuid.uuid4().hex[:12]}").start()
    try:
        yield emu
    finally:
        emu.stop()
        TokenManager.cache.set(f"self_tenant_token:{emu.app_id}", "", 0)
