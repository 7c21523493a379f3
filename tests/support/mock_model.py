"""A scripted stand-in for the OpenAI Responses API (the far side of the Codex runtime).

It serves `POST /v1/responses` on 127.0.0.1 as server-sent events, the way `codex app-server`
expects, and decides each answer from the request's last input item:

- after a tool result: "Command done. Output was: <the tool output>"
- `RUN: <cmd>`         an `exec_command` call (runs inside Codex's sandbox)
- `ESCALATE: <cmd>`    an `exec_command` call asking to leave the sandbox (-> an approval request)
- `PATCH: <path> <text>` an `apply_patch` call adding the file (outside the workspace -> approval)
- `FAIL`               `response.failed` (the turn fails)
- `HTTP <code>`        that HTTP status
- `SLOW <s>: <text>`   the reply streamed in words, <s> seconds apart
- `HANG`               nothing until the client goes away (a turn that never ends by itself)
- anything else        "Mock reply: <text>", streamed in words

Every request body is kept in `requests`, so tests can check what the model saw.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


def _last_user_text(items: list[dict[str, Any]]) -> str:
    for item in reversed(items):
        if item.get("role") == "user" and item.get("type", "message") == "message":
            content = item.get("content")
            if isinstance(content, str):
                return content
            texts = [c.get("text", "") for c in content or [] if c.get("type") in ("input_text", "text")]
            texts = [t for t in texts if not t.lstrip().startswith("<")]  # skip environment context blocks
            if texts:
                return texts[-1]
    return ""


class _Handler(BaseHTTPRequestHandler):
    server: "MockModel._Server"
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - quiet
        return

    def do_POST(self) -> None:  # noqa: N802
        length = int(self.headers.get("content-length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        model: MockModel = self.server.model
        model.requests.append(body)
        items = body.get("input") or []
        last = items[-1] if items else {}
        if last.get("type") in ("function_call_output", "custom_tool_call_output"):
            output = last.get("output")
            if isinstance(output, list):
                output = " ".join(str(part.get("text", "")) for part in output)
            self._stream(self._message(f"Command done. Output was: {output}"))
            return
        text = _last_user_text(items).strip()
        if text.startswith("HTTP "):
            code = int(text.split()[1])
            payload = json.dumps({"error": {"message": f"mock status {code}", "type": "mock"}}).encode()
            self.send_response(code)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        if text == "FAIL":
            self._events([("response.created", {"response": {"id": self._id("resp")}}),
                          ("response.failed", {"response": {"id": self._id("resp"), "error": {
                              "code": "server_error", "message": "mock failure"}}})])
            return
        if text == "HANG":
            self._start_stream()
            self._send_event("response.created", {"response": {"id": self._id("resp")}})
            while not model.stopping.is_set():
                time.sleep(0.05)
                try:
                    self.wfile.write(b": keep-alive\n\n")
                    self.wfile.flush()
                except OSError:
                    return
            return
        if text.startswith(("RUN:", "ESCALATE:")):
            escalate = text.startswith("ESCALATE:")
            cmd = text.split(":", 1)[1].strip()
            args: dict[str, Any] = {"cmd": cmd}
            if escalate:
                args |= {"sandbox_permissions": "require_escalated",
                         "justification": "The mock model wants to run this outside the sandbox"}
            call = {"type": "function_call", "id": self._id("fc"), "call_id": self._id("call"),
                    "name": "exec_command", "arguments": json.dumps(args)}
            self._stream(call)
            return
        if text.startswith("PATCH:"):
            path, _, content = text.split(":", 1)[1].strip().partition(" ")
            patch = f"*** Begin Patch\n*** Add File: {path}\n+{content}\n*** End Patch\n"
            call = {"type": "custom_tool_call", "id": self._id("ctc"), "call_id": self._id("call"),
                    "name": "apply_patch", "input": patch}
            self._stream(call)
            return
        pause = 0.0
        if text.startswith("SLOW "):
            head, _, text = text.partition(":")
            pause = float(head.split()[1])
            text = text.strip()
        self._stream(self._message(f"Mock reply: {text}"), pause=pause)

    # -- SSE helpers

    @staticmethod
    def _id(prefix: str) -> str:
        return f"{prefix}_{uuid.uuid4().hex[:16]}"

    def _message(self, text: str) -> dict[str, Any]:
        return {"type": "message", "id": self._id("msg"), "role": "assistant", "status": "completed",
                "content": [{"type": "output_text", "text": text, "annotations": []}]}

    def _start_stream(self) -> None:
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("cache-control", "no-cache")
        self.send_header("connection", "close")
        self.end_headers()

    def _send_event(self, kind: str, data: dict[str, Any]) -> None:
        self.wfile.write(f"event: {kind}\ndata: {json.dumps({'type': kind, **data})}\n\n".encode())
        self.wfile.flush()

    def _events(self, events: list[tuple[str, dict[str, Any]]]) -> None:
        self._start_stream()
        for kind, data in events:
            self._send_event(kind, data)
        self.close_connection = True

    def _stream(self, item: dict[str, Any], *, pause: float = 0.0) -> None:
        response_id = self._id("resp")
        self._start_stream()
        self._send_event("response.created", {"response": {"id": response_id}})
        if item["type"] == "message":
            text = item["content"][0]["text"]
            added = dict(item, content=[], status="in_progress")
            self._send_event("response.output_item.added", {"output_index": 0, "item": added})
            words = text.split(" ")
            for n, word in enumerate(words):
                if pause and n:
                    time.sleep(pause)
                delta = word if n == 0 else " " + word
                self._send_event("response.output_text.delta", {
                    "item_id": item["id"], "output_index": 0, "content_index": 0, "delta": delta})
        else:
            self._send_event("response.output_item.added", {"output_index": 0, "item": item})
        self._send_event("response.output_item.done", {"output_index": 0, "item": item})
        self._send_event("response.completed", {"response": {
            "id": response_id, "usage": {"input_tokens": 10, "input_tokens_details": {"cached_tokens": 0},
                                         "output_tokens": 5, "output_tokens_details": {"reasoning_tokens": 0},
                                         "total_tokens": 15}}})
        self.close_connection = True


class MockModel:
    class _Server(ThreadingHTTPServer):
        daemon_threads = True
        model: "MockModel"

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.stopping = threading.Event()
        self._server = self._Server(("127.0.0.1", 0), _Handler)
        self._server.model = self
        self._thread = threading.Thread(target=self._server.serve_forever, name="mock-model", daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    def start(self) -> "MockModel":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        self._server.shutdown()
        self._server.server_close()

    def user_texts(self) -> list[str]:
        """The last user text of every request, in order."""
        return [_last_user_text(body.get("input") or []) for body in self.requests]
