"""A fake Slack platform for tests.

The emulator is an aiohttp app that runs in its own thread with its own event loop, so blocking test code
and clients on other loops can all talk to it. Every public method may be called from any thread. Shared
state sits behind one ``threading.Lock``; handlers never await while they hold it. Websocket objects are
only touched on the emulator loop.

It covers what the bridge uses, with the wire formats the real ``slack_sdk`` clients produce:

* the Web API under ``/api/{method}`` (query, form or JSON arguments; ``Authorization: Bearer``):
  ``auth.test``, ``chat.postMessage`` / ``update`` / ``delete`` / ``postEphemeral`` / ``getPermalink``,
  ``reactions.add`` / ``remove``, ``users.info``, ``conversations.info``, ``files.info`` and
  ``apps.connections.open``; errors are HTTP 200 ``{"ok": false, "error": ...}`` like Slack's;
* private file downloads (``url_private[_download]``) that need the bot token and, like Slack, answer
  a missing or wrong token with an HTML sign-in page and status 200;
* ``response_url`` webhooks for interactive payloads (``response_url(channel, ts)``);
* Socket Mode: a websocket at the URL ``apps.connections.open`` hands out (single-use tickets) that
  says ``hello``, delivers envelopes and collects acks.

Test controls are plain Python methods: ``messages()``, ``requests()``, ``fault()``, ``configure()``,
``push_socket()`` / ``apush_socket()`` and so on.
"""

from __future__ import annotations

import asyncio
import copy
import json
import math
import secrets
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote

from aiohttp import WSCloseCode, WSMsgType, web

__all__ = ["SlackEmulator"]

JSONDict = dict[str, Any]
_T = TypeVar("_T")

TEXT_LIMIT = 40_000
MAX_BLOCKS = 50
SECTION_TEXT_LIMIT = 3000
SECTION_FIELDS_LIMIT = 10
SECTION_FIELD_TEXT_LIMIT = 2000
HEADER_TEXT_LIMIT = 150
CONTEXT_ELEMENTS_LIMIT = 10
ACTIONS_ELEMENTS_LIMIT = 25
MARKDOWN_BLOCK_LIMIT = 12_000
ID_LIMIT = 255
TS_BASE = 1_700_000_000
"""Message timestamps are ``TS_BASE + n/10_000`` seconds: "1700000000.000100", "1700000000.000200", ..."""
RATE_WINDOW_S = 60.0
BOT_SCOPES = ("app_mentions:read,channels:history,chat:write,files:read,groups:history,im:history,"
              "mpim:history,reactions:write,users:read")
SOCKET_PATH = "/socket"
LOGIN_PAGE = ("<!DOCTYPE html><html lang=\"en\"><head><title>Slack</title></head>"
              "<body><h1>Sign in to your workspace</h1></body></html>")

# ``interactive`` payload types whose ack may carry a response payload (Socket Mode).
_RESPONSE_PAYLOAD_TYPES = frozenset({"view_submission", "block_suggestion"})


class _SlackError(Exception):
    """Raised by handlers; becomes ``{"ok": false, "error": ...}`` (HTTP 200 unless ``status`` says else)."""

    def __init__(self, error: str, *, status: int = 200, headers: dict[str, str] | None = None,
                 extra: JSONDict | None = None) -> None:
        super().__init__(error)
        self.error, self.status, self.headers, self.extra = error, status, headers or {}, extra or {}

    def response(self) -> web.Response:
        return web.json_response({"ok": False, "error": self.error, **self.extra},
                                 status=self.status, headers=self.headers)


@dataclass
class _Message:
    channel: str
    ts: str
    text: str
    blocks: list[JSONDict] | None
    thread_ts: str | None
    user: str
    bot_id: str
    args: JSONDict
    history: list[JSONDict]
    deleted: bool = False
    edited: JSONDict | None = None
    reply_count: int = 0
    latest_reply: str | None = None

    def record(self) -> JSONDict:
        """A detached dict for test assertions."""
        return copy.deepcopy({
            "channel": self.channel, "ts": self.ts, "thread_ts": self.thread_ts, "text": self.text,
            "blocks": self.blocks, "user": self.user, "bot_id": self.bot_id, "history": self.history,
            "deleted": self.deleted, "edited": self.edited, "reply_count": self.reply_count, "args": self.args,
        })


@dataclass
class _Fault:
    method: str
    status: int
    error: str | None
    headers: dict[str, str] | None
    raw_body: str | None
    delay: float
    times: int

    @property
    def passthrough(self) -> bool:
        """A delay-only fault: the request is served normally afterwards."""
        return self.status == 200 and self.error is None and self.raw_body is None

    def response(self) -> web.Response:
        headers = dict(self.headers or {})
        if self.raw_body is not None:
            if not any(k.lower() == "content-type" for k in headers):
                headers["Content-Type"] = "text/html; charset=utf-8"
            return web.Response(status=self.status, text=self.raw_body, headers=headers)
        if self.status == 429 and self.headers is None:
            headers["Retry-After"] = "1"
        error = self.error or ("ratelimited" if self.status == 429 else "internal_error")
        return web.json_response({"ok": False, "error": error}, status=self.status, headers=headers)


@dataclass(eq=False)
class _Socket:
    ws: web.WebSocketResponse
    transport: asyncio.Transport | None
    number: int


@dataclass
class _File:
    obj: JSONDict
    data: bytes
    mimetype: str


@dataclass
class _State:
    """Everything ``reset()`` forgets."""

    messages: dict[tuple[str, str], _Message] = field(default_factory=dict)
    ephemerals: list[JSONDict] = field(default_factory=list)
    reactions: list[JSONDict] = field(default_factory=list)
    users: dict[str, JSONDict] = field(default_factory=dict)
    channels: dict[str, JSONDict] = field(default_factory=dict)
    files: dict[str, _File] = field(default_factory=dict)
    requests: list[JSONDict] = field(default_factory=list)
    faults: list[_Fault] = field(default_factory=list)
    revoked: set[str] = field(default_factory=set)
    rate_limit: int = 0
    method_limits: dict[str, int] = field(default_factory=dict)
    windows: dict[str, deque[float]] = field(default_factory=dict)
    answer_pings: bool = True
    acks: list[JSONDict] = field(default_factory=list)


def _flag(value: Any) -> bool:
    """Slack booleans: ``true``/``false`` in JSON, ``"1"``/``"0"`` or ``"true"``/``"false"`` in forms."""
    return value is True or (isinstance(value, str) and value.lower() in ("1", "true"))


def _text_of(obj: Any) -> str:
    return obj.get("text", "") if isinstance(obj, dict) and isinstance(obj.get("text"), str) else ""


def _invalid_blocks(message: str, pointer: str) -> _SlackError:
    detail = f"{message} [json-pointer:{pointer}]"
    return _SlackError("invalid_blocks", extra={"errors": [detail],
                                                "response_metadata": {"messages": [f"[ERROR] {detail}"]}})


def _parse_blocks(value: Any) -> list[JSONDict] | None:
    """``blocks`` as a list (JSON callers send a list, form callers a JSON string); validate Slack's limits."""
    if value is None:
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise _SlackError("invalid_blocks_format") from None
    if not isinstance(value, list):
        raise _SlackError("invalid_blocks_format")
    if len(value) > MAX_BLOCKS:
        raise _invalid_blocks(f"no more than {MAX_BLOCKS} items allowed", "/blocks")
    for i, block in enumerate(value):
        ptr = f"/blocks/{i}"
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise _SlackError("invalid_blocks_format")
        if len(str(block.get("block_id", ""))) > ID_LIMIT:
            raise _invalid_blocks(f"must be less than {ID_LIMIT + 1} characters", f"{ptr}/block_id")
        kind = block["type"]
        if kind == "section":
            if len(_text_of(block.get("text"))) > SECTION_TEXT_LIMIT:
                raise _invalid_blocks(f"must be less than {SECTION_TEXT_LIMIT + 1} characters", f"{ptr}/text")
            fields = block.get("fields") or []
            if len(fields) > SECTION_FIELDS_LIMIT:
                raise _invalid_blocks(f"no more than {SECTION_FIELDS_LIMIT} items allowed", f"{ptr}/fields")
            for j, item in enumerate(fields):
                if len(_text_of(item)) > SECTION_FIELD_TEXT_LIMIT:
                    raise _invalid_blocks(f"must be less than {SECTION_FIELD_TEXT_LIMIT + 1} characters",
                                          f"{ptr}/fields/{j}")
        elif kind == "header" and len(_text_of(block.get("text"))) > HEADER_TEXT_LIMIT:
            raise _invalid_blocks(f"must be less than {HEADER_TEXT_LIMIT + 1} characters", f"{ptr}/text")
        elif kind == "context" and len(block.get("elements") or []) > CONTEXT_ELEMENTS_LIMIT:
            raise _invalid_blocks(f"no more than {CONTEXT_ELEMENTS_LIMIT} items allowed", f"{ptr}/elements")
        elif kind == "actions":
            elements = block.get("elements") or []
            if len(elements) > ACTIONS_ELEMENTS_LIMIT:
                raise _invalid_blocks(f"no more than {ACTIONS_ELEMENTS_LIMIT} items allowed", f"{ptr}/elements")
            for j, element in enumerate(elements):
                if isinstance(element, dict) and len(str(element.get("action_id", ""))) > ID_LIMIT:
                    raise _invalid_blocks(f"must be less than {ID_LIMIT + 1} characters",
                                          f"{ptr}/elements/{j}/action_id")
        elif kind == "markdown" and len(_text_of(block)) > MARKDOWN_BLOCK_LIMIT:
            raise _invalid_blocks(f"must be less than {MARKDOWN_BLOCK_LIMIT + 1} characters", f"{ptr}/text")
    return value


class SlackEmulator:
    """A fake Slack on ``127.0.0.1``, served from its own thread."""

    def __init__(self, bot_token: str = "xoxb-test", app_token: str = "xapp-test", bot_user_id: str = "UBOT",
                 team_id: str = "T1", *, bot_id: str = "B1", app_id: str = "A1", bot_name: str = "bridge-bot",
                 team_name: str = "Test Team") -> None:
        self.bot_token = bot_token
        self.app_token = app_token
        self.bot_user_id = bot_user_id
        self.team_id = team_id
        self.bot_id = bot_id
        self.app_id = app_id
        self.bot_name = bot_name
        self.team_name = team_name
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._port = 0
        self._ts_seq = 0  # survives reset(): timestamps never repeat within one emulator
        # Socket Mode (the lists are guarded by the lock; websocket objects are used on the loop only).
        self._tickets: set[str] = set()
        self._sockets: list[_Socket] = []
        self._socket_connections = 0
        self._socket_pings = 0
        self._pending: dict[str, asyncio.Future[JSONDict]] = {}  # loop only
        self._pending_on: dict[str, _Socket] = {}  # loop only
        self._tasks: set[asyncio.Task[Any]] = set()  # loop only
        self._api: dict[str, Callable[[JSONDict], JSONDict]] = {
            "auth.test": self._m_auth_test,
            "chat.postMessage": self._m_post_message,
            "chat.update": self._m_update,
            "chat.delete": self._m_delete,
            "chat.postEphemeral": self._m_post_ephemeral,
            "chat.getPermalink": self._m_permalink,
            "reactions.add": self._m_reactions_add,
            "reactions.remove": self._m_reactions_remove,
            "users.info": self._m_users_info,
            "conversations.info": self._m_conversations_info,
            "files.info": self._m_files_info,
            "apps.connections.open": self._m_connections_open,
        }
        self._state = _State()
        self._seed_bot_user()

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> SlackEmulator:
        """Serve on a free port of 127.0.0.1; return once the server accepts connections."""
        if self._thread is not None:
            raise RuntimeError("emulator already started")
        ready = threading.Event()
        errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._serve, args=(ready, errors), name="slack-emulator",
                                        daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("emulator did not start within 10 s")
        if errors:
            self._thread.join(5)
            self._thread = None
            raise errors[0]
        return self

    def stop(self) -> None:
        """Close every socket, stop serving and join the thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        if loop.is_running():
            try:
                asyncio.run_coroutine_threadsafe(self._close_all_sockets(), loop).result(10)
            finally:
                loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        self._thread = self._loop = None

    def __enter__(self) -> SlackEmulator:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        if not self._port:
            raise RuntimeError("emulator not started")
        return f"http://127.0.0.1:{self._port}"

    @property
    def api_url(self) -> str:
        """The Web API root, what ``AsyncWebClient(base_url=...)`` takes (ends with a slash)."""
        return self.url + "/api/"

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

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> None:
        """Start a background task on the emulator loop (called on the loop) and keep a reference."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ------------------------------------------------------------------ test controls

    def reset(self) -> None:
        """Forget messages, reactions, users, channels, files, the request log, faults, revocations,
        configuration and recorded acks. Open sockets stay connected; timestamps keep increasing."""
        with self._lock:
            self._state = _State()
            self._seed_bot_user()

    def configure(self, rate_limit_per_minute: int | None = None, *,
                  method_limits: Mapping[str, int] | None = None, answer_pings: bool | None = None) -> None:
        """Change settings; None leaves one unchanged.

        ``rate_limit_per_minute`` limits every Web API method separately (sliding 60 s window; 0 = off,
        the default); ``method_limits`` overrides it per method. Over the limit a call gets HTTP 429,
        ``{"ok": false, "error": "ratelimited"}`` and ``Retry-After`` (whole seconds until a slot frees).
        ``answer_pings=False`` stops ponging Socket Mode pings, so clients see the link go stale.
        """
        with self._lock:
            if rate_limit_per_minute is not None:
                self._state.rate_limit = rate_limit_per_minute
            if method_limits is not None:
                self._state.method_limits.update(method_limits)
            if answer_pings is not None:
                self._state.answer_pings = answer_pings

    def fault(self, method: str, *, status: int = 200, error: str | None = None,
              headers: dict[str, str] | None = None, raw_body: str | None = None, delay: float = 0.0,
              times: int = 1) -> None:
        """Answer the next ``times`` calls of Web API ``method`` ("*" = any) with a fault.

        The body is ``raw_body`` as-is (``text/html`` unless ``headers`` set a Content-Type), else
        ``{"ok": false, "error": error}`` where ``error`` defaults to ``ratelimited`` for 429 (which also
        gets ``Retry-After: 1`` when ``headers`` is None) and ``internal_error`` otherwise. ``delay``
        sleeps first; a fault with status 200 and neither ``error`` nor ``raw_body`` only delays, then
        the call is served normally. A negative ``times`` never expires. Faults apply before auth.
        """
        if times == 0:
            return
        with self._lock:
            self._state.faults.append(_Fault(method, status, error, dict(headers) if headers is not None else None,
                                             raw_body, delay, times))

    def revoke_token(self, token: str | None = None) -> None:
        """Revoke ``token`` (default: the bot token); calls with it get ``token_revoked``. ``reset()`` undoes it."""
        with self._lock:
            self._state.revoked.add(token or self.bot_token)

    def seed_user(self, user_id: str, name: str, real_name: str | None = None, is_bot: bool = False) -> JSONDict:
        """Make ``users.info`` find this user; returns the user object it will answer with."""
        real = real_name or name
        user = {
            "id": user_id, "team_id": self.team_id, "name": name, "deleted": False, "color": "9f69e7",
            "real_name": real, "tz": "Etc/UTC", "tz_label": "Coordinated Universal Time", "tz_offset": 0,
            "is_admin": False, "is_owner": False, "is_primary_owner": False, "is_restricted": False,
            "is_ultra_restricted": False, "is_bot": is_bot, "is_app_user": False, "updated": TS_BASE,
            "profile": {"real_name": real, "real_name_normalized": real, "display_name": name,
                        "display_name_normalized": name, "team": self.team_id},
        }
        with self._lock:
            self._state.users[user_id] = user
            return copy.deepcopy(user)

    def seed_channel(self, channel_id: str, name: str | None = None, *, is_private: bool = False,
                     user: str | None = None, is_member: bool = True) -> JSONDict:
        """Make ``conversations.info`` answer with this channel (others get a default from the id prefix)."""
        channel = self._default_channel(channel_id, name=name, is_private=is_private, user=user,
                                        is_member=is_member)
        with self._lock:
            self._state.channels[channel_id] = channel
            return copy.deepcopy(channel)

    def seed_file(self, file_id: str, name: str, data: bytes, mimetype: str = "application/octet-stream",
                  *, user: str = "UALICE") -> JSONDict:
        """Register a file for ``files.info`` and the download URLs; returns the file object (as in events)."""
        now = int(time.time())
        filetype = name.rsplit(".", 1)[-1].lower() if "." in name else "binary"
        key, safe = f"{self.team_id}-{file_id}", quote(name)
        obj: JSONDict = {
            "id": file_id, "created": now, "timestamp": now, "name": name, "title": name, "mimetype": mimetype,
            "filetype": filetype, "pretty_type": filetype.upper(), "user": user, "user_team": self.team_id,
            "editable": False, "size": len(data), "mode": "hosted", "is_external": False, "external_type": "",
            "is_public": False, "public_url_shared": False, "display_as_bot": False, "username": "",
            "url_private": f"{self.url}/files-pri/{key}/{safe}",
            "url_private_download": f"{self.url}/files-pri/{key}/download/{safe}",
            "permalink": f"{self.url}/files/{user}/{file_id}/{safe}",
            "permalink_public": f"{self.url}/{key}-{secrets.token_hex(5)}",
            "has_rich_preview": False, "file_access": "visible",
        }
        with self._lock:
            self._state.files[file_id] = _File(obj, bytes(data), mimetype)
            return copy.deepcopy(obj)

    def response_url(self, channel: str, message_ts: str | None = None) -> str:
        """A ``response_url`` for an interactive payload about the message at ``(channel, message_ts)``."""
        return f"{self.url}/actions/{channel}/{message_ts or '-'}/{secrets.token_urlsafe(12)}"

    def messages(self) -> list[JSONDict]:
        """Messages the bot posted (including deleted ones), in posting order."""
        with self._lock:
            return [m.record() for m in self._state.messages.values()]

    def message(self, channel: str, ts: str) -> JSONDict | None:
        """One bot message by channel and ts, or None."""
        with self._lock:
            m = self._state.messages.get((channel, ts))
            return m.record() if m else None

    def ephemerals(self) -> list[JSONDict]:
        """Ephemeral messages (``chat.postEphemeral`` and ephemeral ``response_url`` replies)."""
        with self._lock:
            return copy.deepcopy(self._state.ephemerals)

    def reactions(self) -> list[JSONDict]:
        """Reactions added by the bot: channel, ts, name, user, removed."""
        with self._lock:
            return copy.deepcopy(self._state.reactions)

    def requests(self, method: str | None = None) -> list[JSONDict]:
        """The request log: method (API method, ``files-pri`` or ``response_url``), http_verb, path,
        headers, params (query + body merged), content_type, token, time. Optionally one method only."""
        with self._lock:
            return [copy.deepcopy(r) for r in self._state.requests if method is None or r["method"] == method]

    # ------------------------------------------------------------------ Socket Mode controls

    def socket_connected(self) -> bool:
        """Whether a Socket Mode client is connected now."""
        with self._lock:
            return bool(self._sockets)

    @property
    def socket_connections(self) -> int:
        """How many Socket Mode websockets were accepted so far."""
        with self._lock:
            return self._socket_connections

    @property
    def socket_pings(self) -> int:
        """How many websocket ping frames clients sent."""
        with self._lock:
            return self._socket_pings

    def socket_acks(self) -> list[JSONDict]:
        """Every envelope ack received (``{"envelope_id", "payload"?}``), in arrival order."""
        with self._lock:
            return copy.deepcopy(self._state.acks)

    def wait_socket(self, connections: int = 1, timeout: float = 5.0) -> bool:
        """Block until ``connections`` websockets have been accepted and one is open.

        This blocks the calling thread: from an async test whose loop runs the client, use ``await_socket``.
        """
        with self._cond:
            return self._cond.wait_for(lambda: self._socket_connections >= connections and bool(self._sockets),
                                       timeout)

    async def await_socket(self, connections: int = 1, timeout: float = 5.0) -> bool:
        """``wait_socket`` for async tests: polls without blocking the caller's loop."""
        deadline = time.monotonic() + timeout
        while True:
            with self._lock:
                if self._socket_connections >= connections and self._sockets:
                    return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.005)

    def push_socket(self, envelope_type: str, payload: JSONDict, timeout: float = 5.0, *,
                    accepts_response_payload: bool | None = None, retry_attempt: int = 0,
                    retry_reason: str = "") -> JSONDict:
        """Send an envelope over the newest Socket Mode connection and wait for its ack.

        ``envelope_type`` is ``events_api`` | ``interactive`` | ``slash_commands``; ``payload`` is what
        Slack would POST over HTTP (an ``event_callback`` dict, a ``block_actions`` dict, slash-command
        fields). ``accepts_response_payload`` defaults to True for slash commands, view submissions and
        block suggestions. Returns ``{"acked", "ack" (the client's JSON or None), "elapsed_ms",
        "envelope_id"}``; not acked if no socket is open, it closes first, or ``timeout`` passes.
        Do not call this from the thread whose loop runs the client; use ``apush_socket`` there.
        """
        return self._call(self._push(envelope_type, payload, timeout, accepts_response_payload,
                                     retry_attempt, retry_reason), timeout + 5)

    async def apush_socket(self, envelope_type: str, payload: JSONDict, timeout: float = 5.0, *,
                           accepts_response_payload: bool | None = None, retry_attempt: int = 0,
                           retry_reason: str = "") -> JSONDict:
        """``push_socket`` for async tests: awaits the ack without blocking the caller's loop."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("emulator not started")
        fut = asyncio.run_coroutine_threadsafe(
            self._push(envelope_type, payload, timeout, accepts_response_payload, retry_attempt, retry_reason),
            loop)
        return await asyncio.wrap_future(fut)

    def drop_socket(self, *, abrupt: bool = False) -> bool:
        """Close the newest socket from the server side; False if none was open.

        By default a close frame is sent (the aiohttp client reconnects at once); ``abrupt`` aborts the TCP
        connection instead, which clients only notice through their own pings. Does not wait for the client.
        """
        return self._call(self._drop(abrupt), 5)

    def request_disconnect(self, reason: str = "refresh_requested") -> bool:
        """Send ``{"type": "disconnect", "reason": ...}`` on the newest socket; False if none was open."""
        message = {"type": "disconnect", "reason": reason, "debug_info": {"host": "applink-emulator"}}
        return self._call(self._send_newest(message), 5)

    # ------------------------------------------------------------------ Socket Mode internals (loop)

    def _newest_socket(self) -> _Socket | None:
        with self._lock:
            return self._sockets[-1] if self._sockets else None

    async def _send_newest(self, message: JSONDict) -> bool:
        sock = self._newest_socket()
        if sock is None or sock.ws.closed:
            return False
        try:
            await sock.ws.send_str(json.dumps(message))
        except ConnectionError:
            return False
        return True

    async def _push(self, envelope_type: str, payload: JSONDict, timeout: float, accepts: bool | None,
                    retry_attempt: int, retry_reason: str) -> JSONDict:
        envelope_id = str(uuid.uuid4())
        result: JSONDict = {"acked": False, "ack": None, "elapsed_ms": 0.0, "envelope_id": envelope_id}
        sock = self._newest_socket()
        if sock is None or sock.ws.closed:
            return result
        if accepts is None:
            accepts = envelope_type == "slash_commands" or (
                envelope_type == "interactive" and payload.get("type") in _RESPONSE_PAYLOAD_TYPES)
        envelope: JSONDict = {"envelope_id": envelope_id, "payload": payload, "type": envelope_type,
                              "accepts_response_payload": accepts}
        if envelope_type == "events_api":
            envelope.update({"retry_attempt": retry_attempt, "retry_reason": retry_reason})
        waiter: asyncio.Future[JSONDict] = asyncio.get_running_loop().create_future()
        self._pending[envelope_id], self._pending_on[envelope_id] = waiter, sock
        started = time.perf_counter()
        try:
            await sock.ws.send_str(json.dumps(envelope, ensure_ascii=False))
            result["ack"] = await asyncio.wait_for(waiter, timeout)
            result["acked"] = True
        except (asyncio.TimeoutError, ConnectionError):
            pass
        finally:
            self._pending.pop(envelope_id, None)
            self._pending_on.pop(envelope_id, None)
            result["elapsed_ms"] = (time.perf_counter() - started) * 1000
        return result

    def _fail_pending(self, sock: _Socket) -> None:
        """Wake pushes still waiting for an ack on a connection that is going away."""
        for envelope_id, owner in list(self._pending_on.items()):
            waiter = self._pending.get(envelope_id)
            if owner is sock and waiter is not None and not waiter.done():
                waiter.set_exception(ConnectionResetError("socket closed"))

    def _forget_socket(self, sock: _Socket) -> bool:
        with self._cond:
            if sock not in self._sockets:
                return False
            self._sockets.remove(sock)
            self._cond.notify_all()
            return True

    async def _drop(self, abrupt: bool) -> bool:
        sock = self._newest_socket()
        if sock is None or not self._forget_socket(sock):
            return False
        self._fail_pending(sock)
        if abrupt and sock.transport is not None:
            sock.transport.abort()
        else:
            self._spawn(sock.ws.close(code=WSCloseCode.GOING_AWAY, message=b"dropped by emulator"))
        return True

    async def _close_all_sockets(self) -> None:
        with self._cond:
            socks, self._sockets = list(self._sockets), []
            self._cond.notify_all()
        for sock in socks:
            self._fail_pending(sock)
            try:
                await asyncio.wait_for(sock.ws.close(code=WSCloseCode.GOING_AWAY, message=b"emulator stopping"), 1.0)
            except (asyncio.TimeoutError, ConnectionError):
                if sock.transport is not None:
                    sock.transport.abort()
        for task in list(self._tasks):
            task.cancel()

    async def _h_socket(self, request: web.Request) -> web.StreamResponse:
        ticket = request.query.get("ticket", "")
        with self._lock:
            valid = ticket in self._tickets
            self._tickets.discard(ticket)
        if not valid:
            return web.json_response({"ok": False, "error": "invalid_ticket"}, status=401)
        ws = web.WebSocketResponse(autoping=False, timeout=2.0)
        await ws.prepare(request)
        with self._lock:
            self._socket_connections += 1
            sock = _Socket(ws, request.transport, self._socket_connections)
        try:
            with self._lock:
                open_count = len(self._sockets) + 1
            await ws.send_str(json.dumps({
                "type": "hello", "num_connections": open_count,
                "debug_info": {"host": "applink-emulator", "build_number": 1,
                               "approximate_connection_time": 18060},
                "connection_info": {"app_id": self.app_id}}))
            with self._cond:
                self._sockets.append(sock)
                self._cond.notify_all()
            async for msg in ws:
                if msg.type == WSMsgType.PING:
                    with self._lock:
                        self._socket_pings += 1
                        answer = self._state.answer_pings
                    if answer:
                        await ws.pong(msg.data)
                elif msg.type == WSMsgType.TEXT:
                    self._on_socket_text(msg.data)
        except ConnectionError:
            pass
        finally:
            self._forget_socket(sock)
            self._fail_pending(sock)
        return ws

    def _on_socket_text(self, data: str) -> None:
        """Record an ack and hand it to the push waiting for that envelope (on whichever socket it came)."""
        try:
            message = json.loads(data)
        except ValueError:
            return
        if not isinstance(message, dict) or "envelope_id" not in message:
            return
        with self._lock:
            self._state.acks.append(copy.deepcopy(message))
        waiter = self._pending.get(str(message["envelope_id"]))
        if waiter is not None and not waiter.done():
            waiter.set_result(message)

    # ------------------------------------------------------------------ app and dispatch

    def _build_app(self) -> web.Application:
        app = web.Application(client_max_size=32 * 1024 * 1024)
        r = app.router
        r.add_route("*", "/api/{method}", self._h_api)
        r.add_get(SOCKET_PATH, self._h_socket)
        r.add_get("/files-pri/{key}/download/{name}", self._h_file)
        r.add_get("/files-pri/{key}/{name}", self._h_file)
        r.add_post("/actions/{channel}/{ts}/{secret}", self._h_response_url)
        return app

    def _log(self, request: web.Request, method: str, params: JSONDict, token: str | None) -> None:
        """Append to the request log (lock held by the caller)."""
        self._state.requests.append({
            "method": method, "http_verb": request.method, "path": request.path,
            "headers": dict(request.headers), "params": copy.deepcopy(params),
            "content_type": request.headers.get("Content-Type"),
            "token": token, "time": time.time()})

    @staticmethod
    def _bearer(request: web.Request) -> str | None:
        header = request.headers.get("Authorization", "")
        if header[:7].lower() == "bearer " and header[7:].strip():
            return header[7:].strip()
        return None

    @staticmethod
    async def _args(request: web.Request) -> JSONDict:
        """Query string merged with a JSON or form body, as Slack reads arguments."""
        args: JSONDict = dict(request.query)
        if not request.body_exists:
            return args
        if request.content_type == "application/json":
            raw = await request.read()
            if raw:
                try:
                    body = json.loads(raw)
                except ValueError:
                    raise _SlackError("invalid_json") from None
                if not isinstance(body, dict):
                    raise _SlackError("invalid_json")
                args.update(body)
        elif request.content_type in ("application/x-www-form-urlencoded", "multipart/form-data"):
            for key, value in (await request.post()).items():
                if isinstance(value, web.FileField):
                    args[key] = {"filename": value.filename, "content_type": value.content_type,
                                 "data": value.file.read()}
                else:
                    args[key] = value
        return args

    async def _h_api(self, request: web.Request) -> web.StreamResponse:
        method = request.match_info["method"]
        bad_body: _SlackError | None = None
        try:
            args = await self._args(request)
        except _SlackError as err:
            args, bad_body = {}, err
        token = self._bearer(request) or (args.pop("token", None) if isinstance(args.get("token"), str) else None)
        with self._lock:
            self._log(request, method, args, token)
            fault = self._take_fault(method)
        if fault is not None:
            if fault.delay > 0:
                await asyncio.sleep(fault.delay)
            if not fault.passthrough:
                return fault.response()
        handler = self._api.get(method)
        try:
            if bad_body is not None:
                raise bad_body
            if handler is None:
                raise _SlackError("unknown_method", extra={"req_method": method})
            self._authorize(method, token)
            self._admit(method)
            data = handler(args)
        except _SlackError as err:
            response = err.response()
        else:
            response = web.json_response({"ok": True, **data})
        response.headers["X-Slack-Req-Id"] = secrets.token_hex(16)
        if method == "auth.test" and response.status == 200 and token == self.bot_token:
            response.headers["X-OAuth-Scopes"] = BOT_SCOPES
        return response

    def _take_fault(self, method: str) -> _Fault | None:
        """The first fault for ``method`` (lock held), counting one use of it."""
        for f in self._state.faults:
            if f.method in ("*", method):
                if f.times > 0:
                    f.times -= 1
                    if f.times == 0:
                        self._state.faults.remove(f)
                return f
        return None

    def _authorize(self, method: str, token: str | None) -> None:
        if not token:
            raise _SlackError("not_authed")
        with self._lock:
            revoked = token in self._state.revoked
        if revoked:
            raise _SlackError("token_revoked")
        wanted, other = ((self.app_token, self.bot_token) if method == "apps.connections.open"
                         else (self.bot_token, self.app_token))
        if token == other:
            raise _SlackError("not_allowed_token_type")
        if token != wanted:
            raise _SlackError("invalid_auth")

    def _admit(self, method: str) -> None:
        """Per-method sliding-window rate limit (see ``configure``)."""
        with self._lock:
            limit = self._state.method_limits.get(method, self._state.rate_limit)
            if limit <= 0:
                return
            now = time.monotonic()
            window = self._state.windows.setdefault(method, deque())
            while window and now - window[0] >= RATE_WINDOW_S:
                window.popleft()
            if len(window) < limit:
                window.append(now)
                return
            retry_after = max(1, math.ceil(RATE_WINDOW_S - (now - window[0])))
        raise _SlackError("ratelimited", status=429, headers={"Retry-After": str(retry_after)})

    # ------------------------------------------------------------------ Web API methods (sync, take the lock)

    def _m_auth_test(self, args: JSONDict) -> JSONDict:
        return {"url": f"{self.url}/", "team": self.team_name, "user": self.bot_name, "team_id": self.team_id,
                "user_id": self.bot_user_id, "bot_id": self.bot_id, "is_enterprise_install": False}

    def _m_post_message(self, args: JSONDict) -> JSONDict:
        channel = self._target_channel(args.get("channel"))
        text, blocks = self._content(args, require=True)
        thread_ts = str(args["thread_ts"]) if args.get("thread_ts") else None
        with self._lock:
            msg = self._post(channel, text, blocks, thread_ts, args)
            return {"channel": channel, "ts": msg.ts, "message": self._message_api(msg)}

    def _m_update(self, args: JSONDict) -> JSONDict:
        """Only bot messages can be edited. Absent ``text`` or ``blocks`` keep the old value; ``blocks=[]``
        clears the blocks. Every resulting version is appended to the message's ``history``."""
        channel, ts = args.get("channel"), args.get("ts")
        if not channel:
            raise _SlackError("channel_not_found")
        if not ts:
            raise _SlackError("message_not_found")
        text, blocks = self._content(args, require=True)
        with self._lock:
            msg = self._state.messages.get((str(channel), str(ts)))
            if msg is None or msg.deleted:
                raise _SlackError("message_not_found")
            if text is not None:
                msg.text = text
            if "blocks" in args:  # absent keeps the old blocks; [] clears them
                msg.blocks = blocks or None
            msg.edited = {"user": self.bot_user_id, "ts": f"{time.time():.6f}"}
            msg.history.append({"text": msg.text, "blocks": copy.deepcopy(msg.blocks)})
            return {"channel": msg.channel, "ts": msg.ts, "text": msg.text, "message": self._message_api(msg)}

    def _m_delete(self, args: JSONDict) -> JSONDict:
        channel, ts = str(args.get("channel") or ""), str(args.get("ts") or "")
        if not channel:
            raise _SlackError("channel_not_found")
        with self._lock:
            msg = self._state.messages.get((channel, ts))
            if msg is None or msg.deleted:
                raise _SlackError("message_not_found")
            msg.deleted = True
        return {"channel": channel, "ts": ts}

    def _m_post_ephemeral(self, args: JSONDict) -> JSONDict:
        channel = self._target_channel(args.get("channel"))
        user = args.get("user")
        if not user:
            raise _SlackError("user_not_in_channel")
        text, blocks = self._content(args, require=True)
        with self._lock:
            ts = self._next_ts()
            self._state.ephemerals.append({"channel": channel, "user": str(user), "ts": ts, "text": text or "",
                                           "blocks": blocks, "thread_ts": args.get("thread_ts"), "via": "api"})
        return {"message_ts": ts}

    def _m_permalink(self, args: JSONDict) -> JSONDict:
        channel, ts = str(args.get("channel") or ""), str(args.get("message_ts") or "")
        if not channel:
            raise _SlackError("channel_not_found")
        if not ts:
            raise _SlackError("message_not_found")
        return {"channel": channel, "permalink": f"{self.url}/archives/{channel}/p{ts.replace('.', '')}"}

    def _reaction_target(self, args: JSONDict) -> tuple[str, str, str]:
        channel, ts, name = (str(args.get(k) or "") for k in ("channel", "timestamp", "name"))
        if not name:
            raise _SlackError("invalid_name")
        if not channel or not ts:
            raise _SlackError("no_item_specified")
        msg = self._state.messages.get((channel, ts))
        if msg is not None and msg.deleted:
            raise _SlackError("message_not_found")
        return channel, ts, name

    def _m_reactions_add(self, args: JSONDict) -> JSONDict:
        """Any (channel, ts) is accepted: inbound user messages are not known to the emulator."""
        with self._lock:
            channel, ts, name = self._reaction_target(args)
            for r in self._state.reactions:
                if (r["channel"], r["ts"], r["name"], r["removed"]) == (channel, ts, name, False):
                    raise _SlackError("already_reacted")
            self._state.reactions.append({"channel": channel, "ts": ts, "name": name, "user": self.bot_user_id,
                                          "removed": False})
        return {}

    def _m_reactions_remove(self, args: JSONDict) -> JSONDict:
        with self._lock:
            channel, ts, name = self._reaction_target(args)
            for r in self._state.reactions:
                if (r["channel"], r["ts"], r["name"], r["removed"]) == (channel, ts, name, False):
                    r["removed"] = True
                    return {}
        raise _SlackError("no_reaction")

    def _m_users_info(self, args: JSONDict) -> JSONDict:
        with self._lock:
            user = self._state.users.get(str(args.get("user") or ""))
            if user is None:
                raise _SlackError("user_not_found")
            return {"user": copy.deepcopy(user)}

    def _m_conversations_info(self, args: JSONDict) -> JSONDict:
        channel_id = str(args.get("channel") or "")
        if not channel_id:
            raise _SlackError("channel_not_found")
        with self._lock:
            channel = self._state.channels.get(channel_id)
        return {"channel": copy.deepcopy(channel) if channel else self._default_channel(channel_id)}

    def _m_files_info(self, args: JSONDict) -> JSONDict:
        with self._lock:
            found = self._state.files.get(str(args.get("file") or ""))
            if found is None:
                raise _SlackError("file_not_found")
            return {"file": copy.deepcopy(found.obj), "comments": [], "response_metadata": {"next_cursor": ""}}

    def _m_connections_open(self, args: JSONDict) -> JSONDict:
        ticket = str(uuid.uuid4())
        with self._lock:
            self._tickets.add(ticket)
        return {"url": f"ws://127.0.0.1:{self._port}{SOCKET_PATH}?ticket={ticket}&app_id={self.app_id}"}

    # ------------------------------------------------------------------ other routes

    async def _h_file(self, request: web.Request) -> web.StreamResponse:
        """A private file download; without the bot token Slack serves its sign-in page (HTML, 200)."""
        token = self._bearer(request)
        key = request.match_info["key"]
        file_id = key.split("-", 1)[1] if key.startswith(f"{self.team_id}-") else ""
        with self._lock:
            self._log(request, "files-pri", {"file": file_id}, token)
            found = self._state.files.get(file_id)
            authorized = token == self.bot_token and token not in self._state.revoked
        if not authorized:
            return web.Response(text=LOGIN_PAGE, content_type="text/html", charset="utf-8")
        if found is None:
            return web.Response(status=404, text="Not Found", content_type="text/plain")
        return web.Response(body=found.data, headers={
            "Content-Type": found.mimetype,
            "Content-Disposition": f"attachment; filename=\"{found.obj['name']}\""})

    async def _h_response_url(self, request: web.Request) -> web.StreamResponse:
        """``response_url``: replace/delete the original, or post in channel / ephemerally (the default)."""
        channel, ts = request.match_info["channel"], request.match_info["ts"]
        try:
            body = json.loads(await request.read() or b"{}")
        except ValueError:
            body = None
        with self._lock:
            self._log(request, "response_url", body if isinstance(body, dict) else {}, None)
        if not isinstance(body, dict):
            return web.json_response({"ok": False, "error": "invalid_payload"}, status=400)
        try:
            blocks = _parse_blocks(body.get("blocks"))
        except _SlackError as err:
            return web.json_response({"ok": False, "error": err.error}, status=400)
        text = str(body["text"]) if body.get("text") is not None else None
        with self._lock:
            original = self._state.messages.get((channel, ts))
            if _flag(body.get("delete_original")) or _flag(body.get("replace_original")):
                if original is None or original.deleted:
                    return web.json_response({"ok": False, "error": "message_not_found"}, status=404)
                if _flag(body.get("delete_original")):
                    original.deleted = True
                else:
                    original.text = text if text is not None else original.text
                    original.blocks = blocks
                    original.edited = {"user": self.bot_user_id, "ts": f"{time.time():.6f}"}
                    original.history.append({"text": original.text, "blocks": copy.deepcopy(blocks)})
            elif body.get("response_type") == "in_channel":
                self._post(channel, text or "", blocks, body.get("thread_ts"), body)
            else:
                self._state.ephemerals.append({"channel": channel, "user": None, "ts": self._next_ts(),
                                               "text": text or "", "blocks": blocks,
                                               "thread_ts": body.get("thread_ts"), "via": "response_url"})
        return web.json_response({"ok": True})

    # ------------------------------------------------------------------ state helpers

    def _seed_bot_user(self) -> None:
        """The bot user is always known to ``users.info`` (lock held or not yet shared)."""
        real = self.bot_name
        self._state.users[self.bot_user_id] = {
            "id": self.bot_user_id, "team_id": self.team_id, "name": self.bot_name, "deleted": False,
            "real_name": real, "is_bot": True, "is_app_user": False, "updated": TS_BASE,
            "profile": {"real_name": real, "display_name": "", "bot_id": self.bot_id, "api_app_id": self.app_id,
                        "team": self.team_id}}

    def _next_ts(self) -> str:
        """The next message timestamp (lock held)."""
        self._ts_seq += 1
        seconds, frac = divmod(self._ts_seq, 10_000)
        return f"{TS_BASE + seconds}.{frac * 100:06d}"

    @staticmethod
    def _target_channel(value: Any) -> str:
        """The channel a post lands in: posting to a user id (U…/W…) lands in the DM with them (D…)."""
        channel = str(value or "")
        if not channel:
            raise _SlackError("channel_not_found")
        if channel[0] in "UW":
            return "D" + channel[1:]
        return channel

    @staticmethod
    def _content(args: JSONDict, *, require: bool) -> tuple[str | None, list[JSONDict] | None]:
        """Validated ``text`` and ``blocks`` (``no_text``, ``msg_too_long``, ``invalid_blocks``...)."""
        text = None if args.get("text") is None else str(args["text"])
        blocks = _parse_blocks(args.get("blocks"))
        if require and not (text or blocks or args.get("attachments") or args.get("markdown_text")):
            raise _SlackError("no_text")
        if text is not None and len(text) > TEXT_LIMIT:
            raise _SlackError("msg_too_long")
        return text, blocks

    def _post(self, channel: str, text: str | None, blocks: list[JSONDict] | None, thread_ts: Any,
              args: JSONDict) -> _Message:
        """Store a new bot message (lock held)."""
        ts = self._next_ts()
        thread = str(thread_ts) if thread_ts else None
        msg = _Message(channel=channel, ts=ts, text=text or "", blocks=blocks, thread_ts=thread,
                       user=self.bot_user_id, bot_id=self.bot_id, args=copy.deepcopy(args),
                       history=[{"text": text or "", "blocks": copy.deepcopy(blocks)}])
        self._state.messages[(channel, ts)] = msg
        parent = self._state.messages.get((channel, thread)) if thread else None
        if parent is not None:
            parent.thread_ts = parent.thread_ts or parent.ts
            parent.reply_count += 1
            parent.latest_reply = ts
        return msg

    def _message_api(self, msg: _Message) -> JSONDict:
        """The message object as the Web API returns it."""
        out: JSONDict = {
            "user": msg.user, "type": "message", "ts": msg.ts, "bot_id": msg.bot_id, "app_id": self.app_id,
            "text": msg.text, "team": self.team_id,
            "bot_profile": {"id": msg.bot_id, "app_id": self.app_id, "name": self.bot_name, "deleted": False,
                            "team_id": self.team_id, "updated": TS_BASE},
        }
        if msg.blocks:
            out["blocks"] = copy.deepcopy(msg.blocks)
        if msg.thread_ts:
            out["thread_ts"] = msg.thread_ts
        if msg.reply_count:
            out.update({"reply_count": msg.reply_count, "latest_reply": msg.latest_reply})
        if msg.edited:
            out["edited"] = dict(msg.edited)
        return out

    def _default_channel(self, channel_id: str, *, name: str | None = None, is_private: bool = False,
                         user: str | None = None, is_member: bool = True) -> JSONDict:
        """A ``conversations.info`` channel object; the id prefix decides DM (D), private (G) or public (C)."""
        is_im = channel_id.startswith("D")
        is_group = channel_id.startswith("G") or (is_private and not is_im)
        out: JSONDict = {
            "id": channel_id, "created": TS_BASE, "is_archived": False, "is_org_shared": False,
            "context_team_id": self.team_id, "updated": TS_BASE * 1000,
            "is_im": is_im, "is_mpim": False, "is_channel": not is_im and not is_group, "is_group": is_group,
            "is_private": is_im or is_group, "is_member": is_member,
        }
        if is_im:
            out.update({"user": user or "UALICE", "is_open": True, "priority": 0})
        else:
            out.update({"name": name or channel_id.lower(), "name_normalized": name or channel_id.lower(),
                        "is_general": False, "is_shared": False, "is_ext_shared": False,
                        "creator": "UALICE", "topic": {"value": "", "creator": "", "last_set": 0},
                        "purpose": {"value": "", "creator": "", "last_set": 0}})
        return out
