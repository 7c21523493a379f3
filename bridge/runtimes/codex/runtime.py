"""The Codex runtime: chat sessions as threads on one supervised `codex app-server`.

Each session is bound to a Codex thread (started on its first turn, resumed lazily after a
restart). A turn is `turn/start` followed by notifications routed by thread id: agent message
deltas and command / file-change items become throttled progress, `turn/completed` is terminal.
The server's approval requests go to the human gate and come back as Codex decisions.

When the app-server dies mid-turn the turn is not failed: the supervisor restarts the process,
the thread is resumed, and the turn's final state is read back from the thread's history
(`thread/turns/list`) before anything is reported, so a turn that did finish still gets its
reply, once, and one that did not gets a clear interruption notice.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Any

from loguru import logger

from bridge.runtimes.base import (
    Approval, Decision, TurnContext, TurnOutcome, TurnRequest,
)
from bridge.runtimes.codex import items as render
from bridge.runtimes.codex.appserver import AppServer, AppServerConfig
from bridge.runtimes.codex.rpc import ConnectionClosed, RpcConnection, RpcError, RpcTimeout

DECISIONS = {
    Decision.APPROVE: "accept",
    Decision.APPROVE_SESSION: "acceptForSession",
    Decision.DENY: "decline",
    Decision.STOP: "cancel",
    Decision.EXPIRED: "decline",  # the gate turns expiry into STOP when configured to interrupt
    Decision.INTERRUPTED: "cancel",
}
RECOVERY_TIMEOUT = 60.0  # how long a turn waits for the app-server to come back
RECOVERY_ATTEMPTS = 3
STARTUP_WAIT = 10.0
ABANDON_TIMEOUT = 5.0  # how long a cancelled turn waits for turn/start's answer, to stop its turn in codex
INTERRUPT_TRIES = 20  # turn/interrupt refused as "no active turn" while the turn is starting
INTERRUPT_RETRY_DELAY = 0.1
# A live app-server answers turn/interrupt once its turn is aborted, in well under a second; a
# person who typed /stop is not kept waiting for the generic request timeout: past this the
# app-server is taken as hung (killed and started again) and the turn ends as stopped.
INTERRUPT_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class CodexOptions:
    approval_policy: str = "on-request"
    sandbox: str = "workspace-write"
    request_timeout: float = 60.0


@dataclass(slots=True)
class _Turn:
    request: TurnRequest
    ctx: TurnContext
    thread_id: str
    generation: int
    turn_id: str | None = None
    items: dict[str, dict[str, Any]] = field(default_factory=dict)  # by item id, in start order
    deltas: dict[str, str] = field(default_factory=dict)  # agent message text while streaming
    done: asyncio.Future[dict[str, Any]] | None = None
    lost: asyncio.Event = field(default_factory=asyncio.Event)  # its app-server went away
    stop_requested: bool = False
    interrupt_pending: bool = False  # asked for before codex had given the turn an id
    errors: list[str] = field(default_factory=list)
    notices: list[str] = field(default_factory=list)
    timing: dict[str, float] = field(default_factory=dict)

    def show(self) -> str:
        return render.progress(list(self.items.values()), self.deltas)


class CodexRuntime:
    name = "codex"
    accepts_files = True  # images as `localImage` input, other files by their saved path

    def __init__(self, server: AppServerConfig, options: CodexOptions | None = None) -> None:
        self.options = options or CodexOptions()
        self.server = AppServer(
            server, on_notification=self._on_notification, on_request=self._on_request,
            on_connected=self._on_connected, on_lost=self._on_lost,
        )
        self._turns: dict[str, _Turn] = {}  # by thread id: the thread's running turn
        self._by_session: dict[int, _Turn] = {}
        self._loaded: dict[str, int] = {}  # thread id -> generation it was started/resumed in
        self.unsupported: set[str] = set()
        self._progress_tasks: set[asyncio.Task[None]] = set()
        self._background: set[asyncio.Future[Any]] = set()  # work that outlives a cancelled turn

    # -- lifecycle

    async def start(self) -> None:
        # Do not hold the service's start on codex: a missing binary shows in /readyz and doctor,
        # and each turn waits for the app-server (or fails with a clear message).
        await self.server.start(wait=False)

    async def stop(self) -> None:
        for turn in list(self._by_session.values()):
            await self._interrupt(turn)
        await self.server.stop()

    async def health(self) -> dict[str, Any]:
        info = self.server.info
        return {
            "ok": self.server.ready, "version": info.version or None, "pid": self.server.pid,
            "restarts": self.server.restarts, "hangs": self.server.hangs, "running": len(self._by_session),
            **({"error": self.server.last_error} if self.server.last_error else {}),
            **({"unsupported": sorted(self.unsupported)} if self.unsupported else {}),
        }

    async def _on_connected(self, generation: int) -> None:
        return None

    async def _on_lost(self, generation: int, reason: str) -> None:
        # the server requests of the lost connection were cancelled when it closed
        for turn in list(self._turns.values()):
            if turn.generation == generation:
                turn.lost.set()

    # -- the connection

    async def _connection(self) -> RpcConnection:
        return await self.server.wait_ready(RECOVERY_TIMEOUT)

    async def _call(self, method: str, params: dict[str, Any], *, optional: bool = False,
                    timeout: float | None = None) -> Any:
        """A request to the app-server; one unanswered past `timeout` (default: the options'
        request timeout) gets the process killed as hung (see AppServer._kill_hung)."""
        connection = await self._connection()
        if timeout is None:
            timeout = self.options.request_timeout
        try:
            return await connection.request(method, params, timeout=timeout)
        except RpcError as exc:
            if optional and exc.unsupported:
                if method not in self.unsupported:
                    logger.warning("codex: app-server {} does not support {}; going on without it",
                                   self.server.info.version or "?", method)
                    self.unsupported.add(method)
                return None
            raise

    # -- threads

    def _thread_params(self, request: TurnRequest) -> dict[str, Any]:
        return {"cwd": request.workspace, "approvalPolicy": self.options.approval_policy,
                "sandbox": self.options.sandbox}

    async def _thread_for(self, request: TurnRequest, ctx: TurnContext, timing: dict[str, float]) -> str:
        """The session's thread, resumed if this app-server has not loaded it; a thread that cannot
        be resumed is recorded as lost and replaced by a fresh one (and the person is told). Time
        spent waiting on the app-server is added to `timing["waited"]`."""
        thread_id = request.runtime_thread_id
        generation = self.server.generation
        if thread_id and self._loaded.get(thread_id) == generation:
            return thread_id
        lost_reason = ""
        if thread_id:
            try:
                asked = time.time()
                try:
                    await self._call("thread/resume", {"threadId": thread_id, "excludeTurns": True,
                                                       **self._thread_params(request)})
                finally:
                    timing["waited"] += time.time() - asked
                self._loaded[thread_id] = self.server.generation
                return thread_id
            except RpcError as exc:
                lost_reason = exc.message
                logger.bind(session=request.session_id).warning(
                    "codex: thread {} could not be resumed ({}); starting a fresh one", thread_id, exc.message)
        asked = time.time()
        try:
            result = await self._call("thread/start", self._thread_params(request))
        finally:
            timing["waited"] += time.time() - asked
        new_id = result["thread"]["id"]
        self._loaded[new_id] = self.server.generation
        await ctx.bind_thread(new_id, lost=thread_id, reason=lost_reason or None)
        if thread_id:
            await ctx.notice(render.thread_lost(thread_id))
        return new_id

    # -- turns

    async def run_turn(self, request: TurnRequest, ctx: TurnContext) -> TurnOutcome:
        log = logger.bind(session=request.session_id, turn=request.turn_id)
        turn = _Turn(request, ctx, thread_id="", generation=self.server.generation)
        # what the app-server itself takes before the turn can start (its start-up, the thread's
        # start or resume) is not the bridge's overhead: it is measured apart
        turn.timing["waited"] = 0.0
        turn.done = asyncio.get_running_loop().create_future()
        # known to interrupt() from the start: a stop before codex has the turn is kept for it
        self._by_session[request.session_id] = turn
        starting: asyncio.Future[Any] | None = None
        try:
            waiting = time.time()
            try:
                # A process that failed to start (no binary, bad config) answers in seconds, not minutes.
                await self.server.wait_ready(STARTUP_WAIT if self.server.last_error else RECOVERY_TIMEOUT)
            except ConnectionClosed as exc:
                return TurnOutcome("failed", render.unavailable(str(exc)), error=str(exc))
            finally:
                turn.timing["waited"] += time.time() - waiting
            if not turn.stop_requested:  # a stop while the app-server was starting: no thread either
                turn.thread_id = await self._thread_for(request, ctx, turn.timing)
                turn.generation = self.server.generation
                self._turns[turn.thread_id] = turn
            if turn.stop_requested:
                log.info("codex: stopped before the turn was started")
                return TurnOutcome("stopped", render.stopped(""))
            try:
                turn.timing["sent_at"] = time.time()
                params: dict[str, Any] = {"threadId": turn.thread_id, "input": _input(request)}
                if request.settings.get("model"):
                    params["model"] = request.settings["model"]
                # shielded: a turn cancelled meanwhile still learns the id of the turn it started
                starting = self._keep(asyncio.ensure_future(self._call("turn/start", params)))
                result = await asyncio.shield(starting)
                turn.turn_id = result["turn"]["id"]
                turn.generation = self.server.generation
            except (ConnectionClosed, RpcTimeout):
                # The process died (or hung and was killed) between our write and its answer:
                # whether it started the turn is unknown, and the history will tell.
                turn.lost.set()
            log.debug("codex: turn {} started on thread {}", turn.turn_id, turn.thread_id)
            if turn.interrupt_pending and turn.turn_id is not None:
                # a stop that came while turn/start was on its way: sent now that the id is known
                log.info("codex: a stop came while turn {} was starting; interrupting it", turn.turn_id)
                await self._interrupt(turn)
            final = await self._until_done(turn, log)
            turn.timing.setdefault("done_at", time.time())
            outcome = self._outcome(turn, final)
            return dataclasses.replace(outcome, timing=turn.timing)
        except asyncio.CancelledError:
            # The bridge gave up on the turn (its time limit, shutdown): codex must stop it too,
            # or it runs on unseen. Best effort, bounded, and the cancellation goes on regardless.
            abandon = self._keep(asyncio.ensure_future(self._abandon(turn, starting, log)))
            try:
                await asyncio.shield(abandon)
            except asyncio.CancelledError:
                pass  # cancelled again: the interrupt goes on in its own task
            raise
        finally:
            if self._turns.get(turn.thread_id) is turn:
                del self._turns[turn.thread_id]
            if self._by_session.get(request.session_id) is turn:
                del self._by_session[request.session_id]

    def _keep(self, future: asyncio.Future[Any]) -> asyncio.Future[Any]:
        """Hold a reference to work that may outlive the turn that started it; its failure is
        the turn's business (or nobody's, once the turn was cancelled), never an unretrieved one."""
        self._background.add(future)
        future.add_done_callback(self._background.discard)
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        return future

    async def _abandon(self, turn: _Turn, starting: asyncio.Future[Any] | None, log) -> None:
        """Interrupt in codex a turn whose task was cancelled, once its id is known."""
        assert turn.done is not None
        if turn.done.done() or turn.lost.is_set():
            return  # it ended, or its app-server went away with it
        if turn.turn_id is None and starting is not None:
            try:
                async with asyncio.timeout(ABANDON_TIMEOUT):
                    result = await starting
            except TimeoutError:
                log.warning("codex: a cancelled turn's turn/start was not answered within {:g}s", ABANDON_TIMEOUT)
                return
            except (ConnectionClosed, RpcTimeout, RpcError):
                return  # never started
            turn.turn_id = result["turn"]["id"]
        if turn.turn_id is None:
            return
        log.warning("codex: turn {} cancelled in the bridge; interrupting it in codex", turn.turn_id)
        # bounded by the interrupt's own timeout, past which a hung app-server is killed and
        # restarted (a limit around it here would give up first and leave the hung process)
        await self._interrupt(turn)

    async def _until_done(self, turn: _Turn, log) -> dict[str, Any]:
        assert turn.done is not None
        lost = asyncio.ensure_future(turn.lost.wait())
        try:
            await asyncio.wait({turn.done, lost}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            lost.cancel()
        if turn.done.done():
            return turn.done.result()
        # The app-server went away mid-turn: recover instead of failing the turn.
        log.warning("codex: app-server lost during turn {}; recovering", turn.turn_id)
        await turn.ctx.progress(render.recovering())
        error: Exception | None = None
        for attempt in range(1, RECOVERY_ATTEMPTS + 1):
            try:
                return await self._recover(turn)
            except (ConnectionClosed, RpcTimeout, RpcError) as exc:
                error = exc
                log.warning("codex: recovery attempt {} failed: {}", attempt, exc)
                await asyncio.sleep(min(5.0, attempt))
        log.error("codex: could not recover turn {}: {}", turn.turn_id, error)
        return {"status": "interrupted", "recovery": "failed", "error": {"message": str(error)}}

    async def _recover(self, turn: _Turn) -> dict[str, Any]:
        connection = await self._connection()
        turn.generation = self.server.generation
        await connection.request("thread/resume", {"threadId": turn.thread_id, "excludeTurns": True,
                                                   **self._thread_params(turn.request)},
                                 timeout=self.options.request_timeout)
        self._loaded[turn.thread_id] = turn.generation
        history = await connection.request("thread/turns/list", {"threadId": turn.thread_id, "limit": 10},
                                           timeout=self.options.request_timeout)
        for past in (history or {}).get("data", []):
            if turn.turn_id is None or past.get("id") == turn.turn_id:
                if turn.turn_id is None and not _has_input(past, _said(turn.request)):
                    continue
                state = dict(past, recovered=True)
                if state.get("status") == "inProgress":
                    state["status"] = "interrupted"  # the process that ran it is gone
                return state
        return {"status": "interrupted", "recovered": True, "items": []}

    def _outcome(self, turn: _Turn, final: dict[str, Any]) -> TurnOutcome:
        status = final.get("status")
        items = list(turn.items.values())
        for item in final.get("items") or []:  # a recovered turn: the history's summary
            if item.get("id") not in turn.items:
                items.append(item)
        text = render.final_text(items) or ""
        output = render.transcript(items)
        notices = "".join(f"{n}\n\n" for n in turn.notices)
        if status == "completed":
            body = text or "_Codex finished without a reply._"
            return TurnOutcome("completed", notices + body + render.footer(items), output=output)
        if status == "interrupted":
            recovered = bool(final.get("recovered") or final.get("recovery"))
            if turn.stop_requested:
                # recovered: its app-server went away meanwhile, as one that leaves the interrupt
                # unanswered does (killed as hung and started again)
                return TurnOutcome("stopped", notices + render.stopped(text, restarted=recovered), output=output)
            reason = "codex restarted" if recovered else "interrupted"
            return TurnOutcome("interrupted", notices + render.interrupted(text, restarted=recovered),
                               output=output, error=reason)
        error = (final.get("error") or {}).get("message") or "; ".join(turn.errors) or "the turn failed"
        return TurnOutcome("failed", notices + render.failed(error), output=output, error=error)

    async def interrupt(self, session_id: int) -> bool:
        turn = self._by_session.get(session_id)
        if turn is None:
            return False
        turn.stop_requested = True
        await self._interrupt(turn)
        return True

    async def _interrupt(self, turn: _Turn) -> None:
        if turn.turn_id is None:
            turn.interrupt_pending = True  # run_turn sends it once turn/start has answered
            return
        turn.interrupt_pending = False
        log = logger.bind(session=turn.request.session_id, turn=turn.request.turn_id)
        timeout = min(INTERRUPT_TIMEOUT, self.options.request_timeout)  # never longer than any other request
        for attempt in range(1, INTERRUPT_TRIES + 1):
            try:
                await self._call("turn/interrupt", {"threadId": turn.thread_id, "turnId": turn.turn_id},
                                 timeout=timeout)
                return
            except RpcError as exc:
                # codex answers turn/start a moment before the turn is active; until then an
                # interrupt is refused with "no active turn"
                ended = turn.done is not None and turn.done.done()
                if "no active turn" in exc.message and attempt < INTERRUPT_TRIES and not ended:
                    await asyncio.sleep(INTERRUPT_RETRY_DELAY)
                    continue
                log.warning("codex: interrupt failed: {}", exc)
                return
            except RpcTimeout as exc:
                # the app-server was killed as hung: the turn is lost with it, and run_turn
                # recovers it from the thread's history on the new process, as stopped
                log.warning("codex: turn {} was not interrupted in time ({}); its app-server is taken as hung",
                            turn.turn_id, exc)
                return
            except ConnectionClosed as exc:
                log.warning("codex: interrupt failed: {}", exc)
                return

    async def steer(self, session_id: int, text: str) -> bool:
        """Add a message to the session's running turn; False if none runs (or it cannot steer)."""
        turn = self._by_session.get(session_id)
        if turn is None or turn.turn_id is None:
            return False
        try:
            result = await self._call("turn/steer", {
                "threadId": turn.thread_id, "expectedTurnId": turn.turn_id,
                "input": [{"type": "text", "text": text, "text_elements": []}],
            }, optional=True)
        except RpcError as exc:
            logger.bind(session=session_id).info("codex: steer refused: {}", exc.message)
            return False
        return result is not None

    # -- notifications

    def _on_notification(self, method: str, params: dict[str, Any]) -> None:
        if method == "serverRequest/resolved":
            # Codex settled one of its requests itself (the turn was interrupted or ended): stop
            # waiting for a person, whose card the gate then marks interrupted, and send no
            # answer. Whether its turn still runs here does not matter (it may have ended first),
            # nor whether the request's task has started yet.
            self._resolved(params)
            return
        thread_id = params.get("threadId")
        turn = self._turns.get(thread_id) if thread_id else None
        if turn is None:
            if method in ("error", "warning", "configWarning"):
                logger.warning("codex: {}: {}", method, _message(params))
            return
        if method == "turn/started":
            turn.turn_id = turn.turn_id or (params.get("turn") or {}).get("id")
            return
        if turn.turn_id and params.get("turnId") not in (None, turn.turn_id):
            return  # a late event of an earlier turn
        if method in ("item/started", "item/completed"):
            item = params.get("item") or {}
            if "id" in item:
                previous = turn.items.get(item["id"], {})
                turn.items[item["id"]] = {**previous, **item}
                if method == "item/completed":
                    turn.deltas.pop(item["id"], None)
                self._progress(turn)
        elif method == "item/agentMessage/delta":
            item_id = params.get("itemId", "")
            turn.deltas[item_id] = turn.deltas.get(item_id, "") + params.get("delta", "")
            self._progress(turn)
        elif method == "error":
            message = _message(params)
            if not params.get("willRetry"):
                turn.errors.append(message)
            logger.bind(session=turn.request.session_id, turn=turn.request.turn_id).warning(
                "codex: error{}: {}", " (retrying)" if params.get("willRetry") else "", message)
        elif method == "turn/completed":
            completed = params.get("turn") or {}
            if turn.turn_id is None or completed.get("id") == turn.turn_id:
                turn.turn_id = completed.get("id")
                if turn.done is not None and not turn.done.done():
                    turn.timing["done_at"] = time.time()
                    turn.done.set_result(completed)

    def _progress(self, turn: _Turn) -> None:
        # Called from the reader, which must not wait: the update runs as a task, kept referenced
        # until done (a bare future may be collected mid-flight).
        task = asyncio.ensure_future(turn.ctx.progress(turn.show()))
        self._progress_tasks.add(task)
        task.add_done_callback(self._progress_tasks.discard)

    # -- server requests (approvals, questions)

    def _resolved(self, params: dict[str, Any]) -> None:
        connection = self.server.connection
        request_id = params.get("requestId")
        if connection is not None and connection.cancel_server_request(request_id):
            turn = self._turns.get(params.get("threadId") or "")
            logger.bind(session=turn.request.session_id if turn else None,
                        turn=turn.request.turn_id if turn else None).info(
                "codex: request {} was settled by codex itself; no answer is sent", request_id)

    async def _on_request(self, method: str, params: dict[str, Any], request_id: Any = None) -> dict[str, Any]:
        return await self._answer(method, params)

    @staticmethod
    def _decision(turn: _Turn, approval: Approval) -> dict[str, Any]:
        if approval.decision is Decision.STOP:
            turn.stop_requested = True  # `cancel` ends the turn: it was stopped, not lost
        return {"decision": DECISIONS[approval.decision]}

    async def _answer(self, method: str, params: dict[str, Any]) -> dict[str, Any]:
        turn = self._turns.get(params.get("threadId", ""))
        if method == "item/commandExecution/requestApproval":
            if turn is None:
                return {"decision": "decline"}
            approval = await turn.ctx.ask_approval(render.command_request(params))
            return self._decision(turn, approval)
        if method == "item/fileChange/requestApproval":
            if turn is None:
                return {"decision": "decline"}
            started = turn.items.get(params.get("itemId", ""), {})
            approval = await turn.ctx.ask_approval(render.file_change_request(params, started))
            return self._decision(turn, approval)
        if method == "item/tool/requestUserInput":
            answers: dict[str, Any] = {}
            for question in params.get("questions") or []:
                if turn is None:
                    break
                approval = await turn.ctx.ask_approval(render.question_request(question))
                if approval.decision in (Decision.STOP, Decision.INTERRUPTED):
                    await self._interrupt(turn)
                    break
                chosen = approval.answer or (render.first_option(question) if approval.allows else None)
                if chosen:
                    answers[question["id"]] = {"answers": [chosen]}
            return {"answers": answers}
        if method == "item/permissions/requestApproval":
            if turn is None:
                return {"permissions": {}, "scope": "turn"}
            approval = await turn.ctx.ask_approval(render.permissions_request(params))
            granted = params.get("permissions") or {} if approval.allows else {}
            scope = "session" if approval.decision is Decision.APPROVE_SESSION else "turn"
            return {"permissions": granted, "scope": scope}
        logger.warning("codex: no handler for server request {}; answering with an error", method)
        raise NotImplementedError(f"agent-bridge does not handle {method}")


def _said(request: TurnRequest) -> str:
    """In a group the model sees who said it: `[Alice] …`. Attachments are listed with their
    saved paths (images are also sent as images, see `_input`)."""
    text = request.text
    files = [f for f in request.files if f.path]
    if files:
        listed = "\n".join(f"- {f.name}: {f.path}" for f in files)
        text = f"{text}\n\nAttached files (saved on this machine):\n{listed}".strip()
    lost = [f.name for f in request.files if not f.path]
    if lost:
        text = f"{text}\n\nAttached but not downloaded: {', '.join(lost)}".strip()
    return f"[{request.sender_name}] {text}" if request.is_group else text


def _input(request: TurnRequest) -> list[dict[str, Any]]:
    """`turn/start`'s input: the text, then each downloaded image as a `localImage` item."""
    items: list[dict[str, Any]] = [{"type": "text", "text": _said(request), "text_elements": []}]
    items += [{"type": "localImage", "path": f.path} for f in request.files if f.path and f.is_image]
    return items


def _message(params: dict[str, Any]) -> str:
    error = params.get("error")
    if isinstance(error, dict):
        return str(error.get("message") or error)
    return str(params.get("message") or params.get("summary") or params)


def _has_input(turn: dict[str, Any], text: str) -> bool:
    for item in turn.get("items") or []:
        if item.get("type") == "userMessage":
            for part in item.get("content") or []:
                if part.get("text") == text:
                    return True
    return False

