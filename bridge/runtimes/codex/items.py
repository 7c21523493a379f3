"""What a Codex turn looks like in chat: items as compact progress lines, the final reply,
and the server's approval requests as the gate's neutral requests."""

from __future__ import annotations

import shlex
from typing import Any

from bridge.runtimes.base import ApprovalRequest

SHELLS = ("bash", "sh", "zsh", "dash")
PROGRESS_TAIL = 1500  # characters of streaming text shown while the turn runs
LINE_LIMIT = 120


def inner_command(command: str) -> str:
    """`/bin/bash -lc 'git status'` -> `git status` (what the model asked for, what rules match)."""
    try:
        argv = shlex.split(command)
    except ValueError:
        return command
    if len(argv) == 3 and argv[0].rsplit("/", 1)[-1] in SHELLS and argv[1] in ("-c", "-lc", "-cl"):
        return argv[2]
    return command


def _short(text: str, limit: int = LINE_LIMIT) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _command_line(item: dict[str, Any]) -> str:
    command = _short(inner_command(item.get("command") or ""))
    status = item.get("status")
    if status == "completed":
        code = item.get("exitCode")
        mark = "✓" if code in (0, None) else f"✗ exit {code}"
    elif status == "declined":
        mark = "declined"
    elif status == "failed":
        mark = "✗ failed"
    else:
        mark = "…"
    return f"⚙️ `{command}` {mark}"


def _file_line(item: dict[str, Any]) -> str:
    changes = item.get("changes") or []
    paths = ", ".join(f"`{c.get('path')}`" for c in changes[:5]) + (" …" if len(changes) > 5 else "")
    status = item.get("status")
    mark = {"completed": "✓", "declined": "declined", "failed": "✗ failed"}.get(status or "", "…")
    return f"📝 {paths or 'files'} {mark}"


def action_lines(items: list[dict[str, Any]]) -> list[str]:
    lines = []
    for item in items:
        kind = item.get("type")
        if kind == "commandExecution":
            lines.append(_command_line(item))
        elif kind == "fileChange":
            lines.append(_file_line(item))
        elif kind == "mcpToolCall":
            lines.append(f"🔧 {item.get('server', '')}.{item.get('tool', '')}")
        elif kind == "webSearch":
            lines.append(f"🔎 {_short(str(item.get('query', '')))}")
    return lines


def progress(items: list[dict[str, Any]], deltas: dict[str, str]) -> str:
    lines = action_lines(items)
    streaming = "".join(deltas.values()).strip()
    if not streaming:
        done = [i.get("text", "") for i in items if i.get("type") == "agentMessage" and i.get("text")]
        streaming = done[-1] if done else ""
    if len(streaming) > PROGRESS_TAIL:
        streaming = "…" + streaming[-PROGRESS_TAIL:]
    parts = ["⚙️ _Codex is working…_"]
    if lines:
        parts.append("\n".join(lines[-12:]))
    if streaming:
        parts.append(streaming)
    return "\n\n".join(parts)


def final_text(items: list[dict[str, Any]]) -> str:
    """The reply: the turn's last agent message."""
    texts = [i.get("text", "") for i in items if i.get("type") == "agentMessage" and i.get("text")]
    return texts[-1].strip() if texts else ""


def footer(items: list[dict[str, Any]]) -> str:
    commands = sum(1 for i in items if i.get("type") == "commandExecution")
    files = {c.get("path") for i in items if i.get("type") == "fileChange" and i.get("status") == "completed"
             for c in i.get("changes") or []}
    parts = []
    if commands:
        parts.append(f"ran {commands} command{'s' if commands != 1 else ''}")
    if files:
        parts.append(f"changed {len(files)} file{'s' if len(files) != 1 else ''}")
    return f"\n\n_{', '.join(parts).capitalize()}._" if parts else ""


def transcript(items: list[dict[str, Any]]) -> str:
    """The whole turn as text, kept in the turn ledger."""
    out = []
    for item in items:
        kind = item.get("type")
        if kind == "agentMessage":
            out.append(item.get("text", ""))
        elif kind == "commandExecution":
            out.append(f"$ {inner_command(item.get('command') or '')}\n{item.get('aggregatedOutput') or ''}".rstrip())
        elif kind == "fileChange":
            for change in item.get("changes") or []:
                out.append(f"--- {change.get('path')}\n{change.get('diff', '')}".rstrip())
    return "\n\n".join(part for part in out if part)


def stopped(text: str, *, restarted: bool = False) -> str:
    why = " Codex was not answering, so it was restarted." if restarted else ""
    return f"⏹️ Stopped.{why}" + (f"\n\n{text}" if text else "")


def interrupted(text: str, *, restarted: bool) -> str:
    why = ("Codex stopped unexpectedly and was restarted; this turn did not finish. "
           "Send your message again to continue." if restarted else "The turn was interrupted.")
    return f"⚠️ {why}" + (f"\n\nWhat it had said so far:\n\n{text}" if text else "")


def failed(error: str) -> str:
    return f"❌ Codex could not finish this turn: {error}"


def unavailable(error: str) -> str:
    return f"❌ Codex is not available right now ({error}). The bridge keeps trying to start it; send your message again in a moment."


def recovering() -> str:
    return "⚠️ _Codex stopped unexpectedly; restarting it and recovering this turn…_"


def thread_lost(thread_id: str) -> str:
    return (f"⚠️ The previous Codex thread ({thread_id}) could not be resumed, so this conversation "
            "continues in a fresh thread without the earlier context.")


def command_request(params: dict[str, Any]) -> ApprovalRequest:
    command = inner_command(params.get("command") or "")
    summary = f"Run `{_short(command, 200)}`"
    detail = {"command": command, "cwd": params.get("cwd") or ""}
    if params.get("reason"):
        detail["reason"] = params["reason"]
    return ApprovalRequest(kind="command", summary=summary, detail=detail)


def file_change_request(params: dict[str, Any], started: dict[str, Any]) -> ApprovalRequest:
    changes = started.get("changes") or []
    paths = [c.get("path") for c in changes if c.get("path")]
    diff = "\n".join(f"--- {c.get('path')}\n{c.get('diff', '')}" for c in changes)
    detail: dict[str, Any] = {"paths": paths}
    if diff:
        detail["diff"] = diff
    if params.get("reason"):
        detail["reason"] = params["reason"]
    if params.get("grantRoot"):
        detail["grant_root"] = params["grantRoot"]
    count = len(paths)
    summary = f"Change {count} file{'s' if count != 1 else ''}" if count else "Change files"
    return ApprovalRequest(kind="file_change", summary=summary, detail=detail)


def question_request(question: dict[str, Any]) -> ApprovalRequest:
    text = question.get("question") or question.get("header") or "Codex asks a question"
    options = [o.get("label", "") for o in question.get("options") or [] if o.get("label")]
    return ApprovalRequest(kind="question", summary=_short(text, 200),
                           detail={"question": text, "options": options})


def first_option(question: dict[str, Any]) -> str | None:
    options = question.get("options") or []
    return options[0].get("label") if options else None


def permissions_request(params: dict[str, Any]) -> ApprovalRequest:
    wanted = params.get("permissions") or {}
    detail = {"permissions": wanted, "cwd": params.get("cwd") or ""}
    if params.get("reason"):
        detail["reason"] = params["reason"]
    return ApprovalRequest(kind="permission", summary=f"Grant extra permissions: {_short(str(wanted), 200)}",
                           detail=detail)
