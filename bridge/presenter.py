"""Every message the bridge itself says to a user, as neutral Replies and Cards.

Runtimes produce markdown; the gate and the pipeline take their wording from here, so the tone
stays consistent and each channel renders the same neutral objects.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from bridge.markdown import fence
from bridge.runtimes.base import Decision, InputFile
from channels.base import Button, Card, Reply


def clock(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%H:%M:%S UTC")


def queued(position: int) -> Reply:
    return Reply(text=f"⏳ Queued (position {position}); it runs when the current turn finishes.")


def waiting_for_slot(limit: int) -> Reply:
    return Reply(text=f"⏳ Waiting: the bridge is running as many turns as it may at once ({limit}); "
                      "this one starts when one of them ends.")


NEWER_MESSAGE_RUNS = "Your newer message runs instead."  # the `interrupt` busy policy, before a turn started


def stopped_before_start(why: str | None = None) -> Reply:
    """`why`: when not a person's /stop (the `interrupt` busy policy: for a newer message)."""
    return Reply(text=f"⏹ Stopped before it started; not run.{f' {why}' if why else ''}")


def backlog(count: int) -> Reply:
    return Reply(text=f"⏳ {count} messages are queued after a burst; they run one at a time, in the order sent.")


def started(text: str) -> Reply:
    return Reply(text=f"▶️ Started: `{_short(text, 80)}`")


def stale(age: float) -> Reply:
    minutes = max(1, round(age / 60))
    return Reply(text=f"⌛ This message reached me {minutes} min after it was sent, so I did not run it. "
                      "Send it again if it is still wanted.")


def files_not_run(files: Sequence[InputFile], *, runtime: str, accepts_files: bool) -> Reply:
    """A message with files and no text that cannot become a turn."""
    saved = [f for f in files if f.path]
    lost = [f.name for f in files if not f.path]
    lines = []
    if lost:
        lines.append(f"📎 I could not download {_names(lost)}. Send it again, or describe what you need in words.")
    if saved and not accepts_files:
        lines.append(f"📎 The {runtime} runtime takes text only, so a file alone has nothing to run. Saved on the "
                     "bridge's machine:")
        lines += [f"- `{f.path}`" for f in saved]
    return Reply(text="\n".join(lines))


def _names(names: Sequence[str]) -> str:
    quoted = [f"`{_short(n, 60)}`" for n in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + f" and {quoted[-1]}"


def skipped() -> Reply:
    return Reply(text="Skipped: there was nothing to run.")


def working() -> Reply:
    return Reply(text="⚙️ Working…")


def waiting_for_approval() -> Reply:
    return Reply(text="⏸ Waiting for approval: see the card above.")


def interrupted_by_restart(command: str, *, card: bool = False) -> Reply:
    """`card`: it waited for an approval, whose card now offers Retry."""
    again = "Retry on its approval card asks again." if card else "Send it again to retry."
    return Reply(
        text=f"⚠️ Interrupted: the service restarted while this turn was running (`{_short(command)}`). {again}"
    )


def interrupted_by_shutdown() -> Reply:
    return Reply(text="⚠️ Interrupted: the service is shutting down. Send the message again once it is back.")


def turn_timed_out(limit: float, partial: str = "") -> Reply:
    """A turn stopped at BRIDGE_TURN_TIMEOUT, with what it had said so far."""
    took = f"{limit / 60:g} min" if limit >= 60 else f"{limit:g} s"
    note = (f"⏱ Stopped: the turn ran longer than {took} (`BRIDGE_TURN_TIMEOUT`). "
            "Send the message again, or split the task.")
    return Reply(text=f"{partial.rstrip()}\n\n{note}" if partial.strip() else note)


def runtime_failed(error: str) -> Reply:
    return Reply(text=f"⚠️ The turn failed: {_short(error, 300)}")


def not_stored(error: str) -> Reply:
    return Reply(text=f"⚠️ This answer could not be stored, so it is not shown: {_short(error, 200)}")


def start_refused(error: str) -> Reply:
    return Reply(text=f"⚠️ This message could not be started: the store refused it ({_short(error, 200)}). "
                      "Nothing ran; the conversation goes on with the next message.")


def nothing_to_stop() -> Reply:
    return Reply(text="Nothing is running.")


def stopped_waiting(text: str) -> Reply:
    return Reply(text=f"⏹ Dropped `{_short(text, 80)}` before it started (it was waiting for a free runtime slot).")


def stop_requested() -> Reply:
    return Reply(text="⏹ Stopping the running turn…")


OUTPUT_SHOWN = 30_000  # characters of a kept output that `/output` shows (its end); channels split long replies


def kept_output(turn: Any | None) -> Reply:
    """`/output`: the output the active session's latest turn kept, which its reply may have cut."""
    if turn is None:
        return Reply(text="No turn of this session has kept an output yet.")
    output = turn.output.rstrip("\n")
    request = " ".join(turn.input_text.split())
    request = request if len(request) <= 80 else request[:79] + "…"
    cut = ""
    if len(output) > OUTPUT_SHOWN:
        cut = (f"\n_The first {len(output) - OUTPUT_SHOWN} of {len(output)} characters are not shown "
               "(the whole output stays in the store)._")
        output = output[-OUTPUT_SHOWN:]
    return Reply(text=f'Output of the last turn ({turn.status}), "{request}":\n{fence(output)}{cut}')


def help_text(runtime: str) -> Reply:
    lines = [
        f"**agent-bridge** · runtime `{runtime}`",
        "",
        "- Send a message to start a turn; messages sent while one runs are queued (or join it, per the busy policy).",
        "- `/stop` stops the running turn (the queue is kept; `/stop all` also drops the queue).",
        "- `/status` what runs, waits and is queued · `/queue` the queued messages · `/steer <text>` add to the running turn.",
        "- `/new [name]` a fresh session (the old one is kept) · `/sessions` · `/switch <name|n>`.",
        "- `/resume <thread id>` continue a runtime thread started elsewhere (admins).",
        "- `/cwd [path]` the workspace (admins, inside the allowed roots) · `/model [name]` · `/mode strict|default|trusted`.",
        f"- `/output` more of the last turn's output (its last {OUTPUT_SHOWN:,} characters), where its reply was cut.",
        "- `/routines` the scheduled routines and their next runs · `/routines run <name>` runs one now (admins).",
        "- `/retry` asks an expired or interrupted approval again · `/help` shows this.",
    ]
    if runtime == "shell":
        lines.insert(2, "- Each message is a shell command. Read-only commands run at once; others ask for approval.")
    # Where the channel has buttons, the common commands are one click away.
    buttons = tuple(Button(f"cmd:{name}", label, style, {"command": f"/{name}"}) for name, label, style in (
        ("status", "Status", "primary"), ("sessions", "Sessions", "default"), ("queue", "Queue", "default"),
        ("new", "New session", "default"), ("stop", "Stop", "danger")))
    return Reply(card=Card(kind="help", title=lines[0].replace("**", ""), body="\n".join(lines[2:]),
                           actions=buttons))


CLICKABLE_COMMANDS = frozenset({"/status", "/sessions", "/queue", "/new", "/stop", "/help", "/routines"})


def status_text(*, runtime: str, session: str, workspace: str, running: str | None, elapsed: float | None,
                doing: str | None, queued: int, pending: list[str], settings: dict,
                slot_wait: tuple[str, float, int] | None = None) -> Reply:
    """`slot_wait`: the message waiting for a runtime slot (its text, seconds waited, the limit)."""
    extras = "".join(f" · {k} `{v}`" for k, v in sorted(settings.items()))
    parts = [f"Session `{session}` · runtime `{runtime}` · workspace `{workspace}`{extras}"]
    if running is not None:
        parts.append(f"⚙️ Working for {elapsed:.0f}s on `{_short(running)}`")
        if doing and not pending:  # waiting for a card is said once, below
            parts.append(f"Now: {_short(doing, 200)}")
    elif slot_wait is not None:
        text, waited, limit = slot_wait
        parts.append(f"⏳ `{_short(text)}` has waited {waited:.0f}s to start: the bridge is running as many "
                     f"turns as it may at once ({limit}). `/stop` drops it.")
    else:
        parts.append("💤 Idle.")
    if pending:
        parts.append("⏸ Waiting for approval (see the card above): " + "; ".join(_short(p, 80) for p in pending))
    parts.append(f"Queued: {queued}")
    return Reply(text="\n".join(parts))


def queue_text(texts: list[str], *, more: int = 0) -> Reply:
    if not texts:
        return Reply(text="Nothing is queued.")
    lines = [f"{n}. `{_short(t, 80)}`" for n, t in enumerate(texts, 1)]
    if more > 0:
        lines.append(f"… and {more} more")
    return Reply(text="Queued:\n" + "\n".join(lines))


def session_list(rows, *, active_id: int) -> Reply:
    lines = ["Sessions:"]
    for n, row in enumerate(rows, 1):  # numbered among all, archived ones included (and not shown)
        if row.status == "archived":
            continue
        mark = "▶️" if row.id == active_id else "  "
        thread = f" · thread `{row.runtime_thread_id}`" if row.runtime_thread_id else ""
        lines.append(f"{mark} {n}. `{row.name}` · {row.runtime} · last active {clock(row.last_active_at)}{thread}")
    return Reply(text="\n".join(lines))


def busy_for(command: str) -> Reply:
    return Reply(text=f"A turn is running; `/stop` it (or wait) before `/{command}`.")


def admins_only(command: str) -> Reply:
    return Reply(text=f"Sorry, `{command}` is for admins.")


def cancelled_by_stop_all() -> Reply:
    return Reply(text="⏹ Dropped by `/stop all`; not run.")


def stopped_all(dropped: int, *, stopping: bool) -> Reply:
    """`/stop all`: what it did, and only that (no turn running, or nothing queued, is said so)."""
    if not stopping and not dropped:
        return Reply(text="Nothing is running and nothing is queued.")
    queue = f"{dropped} queued message(s) dropped" if dropped else "nothing was queued"
    return Reply(text=f"⏹ Stopping the running turn; {queue}." if stopping else f"⏹ Nothing is running; {queue}.")


def steered() -> Reply:
    return Reply(text="↪️ Added to the running turn.")


def nothing_to_steer() -> Reply:
    return Reply(text="Nothing is running; send it as a normal message.")


def interrupted_for_new_input() -> Reply:
    return Reply(text="⏹ Stopped for your new message.")


def unknown_command(name: str) -> Reply:
    return Reply(text=f"Unknown command `/{name}`. Send `/help` for the list.")


APPROVAL_STATUS_LABEL = {
    "pending": "Waiting for approval",
    "approved": "Approved",
    "approved_for_session": "Approved for this session",
    "denied": "Denied",
    "stopped": "Stopped",
    "expired": "Expired",
    "interrupted": "Interrupted",
}


DECISION_TOAST = {
    Decision.APPROVE: "Approved.",
    Decision.APPROVE_SESSION: "Approved for this session.",
    Decision.DENY: "Denied.",
    Decision.STOP: "Stopping the turn.",
}


def approval_card(approval: dict[str, Any], *, approval_id: str, retried_by: str | None = None) -> Reply:
    """The approval card for a row of the approvals table (or the same fields in a dict)."""
    status = approval["status"]
    detail = approval["detail"] or {}
    question = approval.get("kind") == "question"
    lines = []
    if question:
        lines.append(detail.get("question") or approval["summary"])
    if "command" in detail:
        lines.append(fence(str(detail["command"])))
    if detail.get("cwd"):
        lines.append(f"in `{detail['cwd']}`")
    if detail.get("paths"):
        lines.append("Files: " + ", ".join(f"`{p}`" for p in detail["paths"][:20]))
    if detail.get("diff"):
        lines.append(_collapsed_diff(detail["diff"]))
    if detail.get("reason"):
        lines.append(f"Reason: {detail['reason']}")
    lines.append(f"Asked by {approval['requested_by']} at {clock(approval['requested_at'])}.")
    value = {"approval_id": approval_id}
    actions: tuple[Button, ...] = ()
    if status == "pending" and question:
        lines.append(f"Expires at {clock(approval['expires_at'])}. Or reply in the chat to answer in your own words.")
        options = detail.get("options") or []
        actions = tuple(Button(f"option:{i}", str(o)[:40], "primary" if i == 0 else "default", value)
                        for i, o in enumerate(options[:10])) + (Button("stop", "Stop turn", "danger", value),)
    elif status == "pending":
        lines.append(f"Expires at {clock(approval['expires_at'])}.")
        actions = (
            Button("approve", "Approve", "primary", value),
            Button("approve_session", "Approve for session", "default", value),
            Button("deny", "Deny", "danger", value),
            Button("stop", "Stop turn", "danger", value),
        )
    elif status in ("expired", "interrupted"):
        why = "It expired" if status == "expired" else "The service restarted before a decision"
        if retried_by:
            lines.append(f"{why}; nothing was run. Retried by {retried_by} at {clock(time.time())}.")
        else:
            lines.append(f"{why}; nothing was run. Retry (or send `/retry`) to ask again.")
            actions = (Button("retry", "Retry", "primary", value),)
    else:
        who = approval.get("decided_by") or "someone"
        when = clock(approval.get("decided_at") or time.time())
        if question and approval.get("answer") is not None:
            lines.append(f"Answered by {who} at {when}: {approval['answer']}")
        else:
            lines.append(f"{APPROVAL_STATUS_LABEL[status]} by {who} at {when}.")
    label = "Question" if question and status == "pending" else APPROVAL_STATUS_LABEL[status]
    title = f"{label}: {approval['summary']}"
    return Reply(text="", card=Card("approval", title, "\n\n".join(lines), status, actions))


DIFF_LINES_SHOWN = 40


def _collapsed_diff(diff: str) -> str:
    """A diff as a code block; a long one shows its first lines and says how many more there are."""
    lines = diff.rstrip("\n").splitlines()
    shown = "\n".join(lines[:DIFF_LINES_SHOWN])
    more = len(lines) - DIFF_LINES_SHOWN
    note = f"\n_… {more} more lines of the diff not shown (the full request is kept)._" if more > 0 else ""
    return fence(shown, "diff") + note


def nothing_to_decide() -> Reply:
    return Reply(text="Nothing is waiting for approval.")


def several_pending(count: int) -> Reply:
    return Reply(text=f"{count} approvals are waiting: use the buttons on each card, or send `approve all`.")


def decided_by_shortcut(results: list[str]) -> Reply:
    return Reply(text="\n".join(results))


def nothing_to_retry() -> Reply:
    return Reply(text="Nothing to retry: no expired or interrupted approval in this conversation.")


def _short(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 1] + "…"


def routines_list(routines: dict, states: dict, last: dict, errors: list) -> Reply:
    from bridge.routines.definitions import utc

    if not routines and not errors:
        return Reply(text="No routines. Put one YAML file per routine in the routines directory "
                          "(see templates/routines/).")
    lines = ["Routines:"]
    for name, routine in sorted(routines.items()):
        state = states.get(name)
        enabled = routine.enabled if state is None or state.enabled is None else bool(state.enabled)
        next_due = routine.next_due(state.last_due_at) if state is not None else None
        run = last.get(name)
        last_part = f" · last: {run.status} at {utc(run.started_at or run.due_at)}" if run is not None else ""
        when = f"next {utc(next_due)}" if enabled and next_due else "disabled" if not enabled else "starting"
        lines.append(f"- `{name}` · {routine.describe_schedule()} · {when}{last_part} → "
                     f"{', '.join(routine.targets) or 'no target'}")
    for error in errors:
        lines.append(f"- ⚠️ `{error.file}` not loaded: {error.reason}")
    return Reply(text="\n".join(lines))
