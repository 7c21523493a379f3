"""Command line: `agent-bridge serve | db upgrade | doctor | version | approvals | sessions | handoff | routines`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from bridge import __version__


def _settings():
    from bridge.config import ConfigError, load_settings

    try:
        return load_settings()
    except ConfigError as exc:
        print(f"agent-bridge: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def cmd_serve(_args: argparse.Namespace) -> int:
    settings = _settings()
    from bridge import logs
    from bridge.app import Service

    from bridge.approvals.rules import RulesError

    logs.setup(settings.log_level, settings.log_format)
    try:
        service = Service(settings)
    except RulesError as exc:
        print(f"agent-bridge: {exc}", file=sys.stderr)
        return 2
    from bridge.edge.workers import EdgeStartError
    from channels.base import ChannelStartError

    try:
        asyncio.run(service.run_until_signalled())
    except ChannelStartError as exc:
        print(f"agent-bridge: cannot start: {exc}", file=sys.stderr)
        return 2
    except (OSError, EdgeStartError) as exc:
        print(f"agent-bridge: cannot start: {exc}", file=sys.stderr)
        return 1
    return 0


def cmd_db_upgrade(_args: argparse.Namespace) -> int:
    settings = _settings()
    from bridge.store import migrate
    from bridge.store.db import make_engine

    async def run() -> str | None:
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        engine = make_engine(settings.database_url, pool_size=1)
        try:
            await migrate.upgrade(engine)
            return await migrate.current_revision(engine)
        finally:
            await engine.dispose()

    revision = asyncio.run(run())
    print(f"database at revision {revision}")
    return 0


def cmd_doctor(_args: argparse.Namespace) -> int:
    from bridge.doctor import run_checks

    settings = _settings()
    rows = asyncio.run(run_checks(settings))
    width = max(len(name) for name, _, _ in rows)
    for name, ok, detail in rows:
        print(f"{name:<{width}}  {'ok  ' if ok else 'FAIL'}  {detail}")
    failed = [name for name, ok, _ in rows if not ok]
    if failed:
        print(f"\n{len(failed)} check(s) failed: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0


def _since(value: str) -> float:
    """`30m`, `2h`, `7d` ago, or an ISO date/time (UTC when no zone is given)."""
    import re
    import time
    from datetime import datetime, timezone

    match = re.fullmatch(r"(\d+)([smhd])", value.strip())
    if match:
        return time.time() - int(match.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match.group(2)]
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a duration (30m, 2h, 7d) or an ISO time: {value!r}") from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=timezone.utc)
    return moment.timestamp()


def _read(settings, fn):
    from bridge.store.db import Database

    async def run():
        db = Database(settings.database_url, read_pool=1)
        try:
            return await db.read(fn)
        finally:
            await db.close()

    return asyncio.run(run())


def cmd_approvals_list(args: argparse.Namespace) -> int:
    from bridge.presenter import clock
    from bridge.store import approvals

    rows = _read(_settings(), lambda c: approvals.list_recent(c, pending_only=args.pending, limit=args.limit))
    if not rows:
        print("no approvals" + (" pending" if args.pending else ""))
        return 0
    print(f"{'id':<12} {'status':<21} {'asked by':<14} {'asked at':<12} {'decided by':<14} summary")
    for r in rows:
        print(f"{r.id[:12]:<12} {r.status:<21} {r.requested_by[:14]:<14} {clock(r.requested_at):<12} "
              f"{(r.decided_by or '-')[:14]:<14} {r.summary}")
    return 0


def cmd_approvals_audit(args: argparse.Namespace) -> int:
    import json
    from datetime import datetime, timezone

    from bridge.store import approvals

    rows, total = _read(_settings(), lambda c: approvals.audit_since(c, args.since, limit=args.limit))
    if total > len(rows):
        print(f"the newest {len(rows)} of {total} audit records in that period (--limit)")
    for r in rows:
        at = datetime.fromtimestamp(r.at, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        print(f"{at}  {r.event:<13} {(r.actor or '-'):<14} {r.approval_id[:12]}  {r.conversation_key}  "
              f"{json.dumps(r.detail, ensure_ascii=False)}")
    if not rows:
        print("no audit records in that period")
    return 0


def _write(settings, fn):
    from bridge.store import migrate
    from bridge.store.db import Database

    async def run():
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        db = Database(settings.database_url, read_pool=1)
        await migrate.ensure_schema(db.writer_engine)
        await db.start()
        try:
            return await db.write(fn)
        finally:
            await db.close()

    return asyncio.run(run())


def cmd_sessions_list(args: argparse.Namespace) -> int:
    from bridge.presenter import clock
    from bridge.store import conversations

    rows = _read(_settings(), lambda c: conversations.all_sessions(c, include_archived=args.all))
    if not rows:
        print("no sessions")
        return 0
    print(f"{'id':>5}  {'conversation':<32} {'name':<12} {'runtime':<8} {'status':<9} {'last active':<12} thread")
    for r in rows:
        mark = "*" if r.active_session_id == r.id else " "
        print(f"{r.id:>5}{mark} {r.key[:32]:<32} {r.name[:12]:<12} {r.runtime:<8} {r.status:<9} "
              f"{clock(r.last_active_at):<12} {r.runtime_thread_id or '-'}")
    print("(* the conversation's active session)")
    return 0


def cmd_sessions_show(args: argparse.Namespace) -> int:
    from bridge.presenter import clock
    from bridge.store import conversations

    async def fetch(conn):
        session = await conversations.get_session(conn, args.id)
        threads = await conversations.threads_of(conn, args.id) if session else []
        return session, threads

    session, threads = _read(_settings(), fetch)
    if session is None:
        print(f"no session {args.id}", file=sys.stderr)
        return 1
    print(f"session {session.session_id} `{session.name}` · runtime {session.runtime} · workspace {session.workspace}")
    print(f"thread: {session.runtime_thread_id or '-'} · settings: {session.settings or '{}'}")
    for t in threads:
        print(f"  {t.thread_id}  {t.status:<7} since {clock(t.created_at)}" + (f"  ({t.reason})" if t.reason else ""))
    return 0


def cmd_sessions_archive(args: argparse.Namespace) -> int:
    from bridge.store import conversations

    try:
        done = _write(_settings(), lambda c: conversations.archive_session(c, args.id))
    except ValueError as exc:
        print(f"agent-bridge: {exc}", file=sys.stderr)
        return 1
    print({True: f"session {args.id} archived", False: f"session {args.id} was archived already",
           None: f"no session {args.id}"}[done])
    return 1 if done is None else 0


def cmd_handoff(args: argparse.Namespace) -> int:
    """The terminal side of the handoff: bind a runtime thread (a Codex session started here) to a
    chat conversation as its new active session, and tell the chat."""
    from channels.base import ConversationKey, Reply

    from bridge.delivery.outbox import Outbox
    from bridge.store import conversations

    settings = _settings()
    if settings.runtime != "codex":
        print(f"agent-bridge: handoff continues a Codex thread, and this service runs the {settings.runtime} runtime "
              f"(BRIDGE_RUNTIME={settings.runtime}), which has none; set BRIDGE_RUNTIME=codex", file=sys.stderr)
        return 2
    try:
        key = ConversationKey.parse(args.to)
    except ValueError as exc:
        print(f"agent-bridge: {exc} (expected channel:chat, e.g. webchat:c-team or feishu:oc_123)", file=sys.stderr)
        return 2
    outbox = Outbox("sqlite" if settings.is_sqlite else "postgresql")

    async def bind(conn):
        conversation_id = await conversations.ensure_conversation(
            conn, str(key), channel=key.channel, chat_id=key.chat_id, thread_id=key.thread_id,
            is_group=key.chat_id.startswith(("g-", "oc_", "C")))
        current = await conversations.active_session(conn, conversation_id, runtime=settings.runtime,
                                                     workspace=str(settings.workspace))
        session = await conversations.new_session(conn, conversation_id, name=args.name, runtime=settings.runtime,
                                                  workspace=current.workspace, runtime_thread_id=args.thread_id)
        note = Reply(text=f"🔗 Handed off from the terminal: session `{session.name}` continues thread "
                          f"`{args.thread_id}`. Your next message goes to it.")
        await outbox.send_in(conn, key.channel, str(key), note, ref=outbox.new_ref())
        return session

    try:
        session = _write(settings, bind)
    except ValueError as exc:
        print(f"agent-bridge: {exc}", file=sys.stderr)
        return 1
    print(f"{key}: session {session.session_id} `{session.name}` now continues thread {args.thread_id}")
    return 0


def cmd_outbox_list(args: argparse.Namespace) -> int:
    from bridge.store import outbox

    status = None if args.status == "all" else args.status
    rows = _read(_settings(), lambda c: outbox.list_ops(c, status, conversation_key=args.conversation,
                                                        limit=args.limit))
    if not rows:
        print(f"no {'' if status is None else status + ' '}outbound operations")
        return 0
    print(f"{'id':>6}  {'status':<10} {'op':<6} {'conversation':<32} {'attempts':>8}  {'created (UTC)':<16} last error")
    for r in rows:
        error = (r.last_error or "").splitlines()[0][:80] if r.last_error else "-"
        print(f"{r.id:>6}  {r.status:<10} {r.op:<6} {r.conversation_key[:32]:<32} {r.attempts:>8}  "
              f"{_when(r.created_at):<16} {error}")
    return 0


def _when(ts: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M")


def cmd_outbox_retry(args: argparse.Namespace) -> int:
    """Dead operations delivered again by the running service (within a second), or at its next start."""
    import time

    from bridge.store import outbox

    if not args.ids and not args.all_dead:
        print("agent-bridge: name the operations to retry (ids from `agent-bridge outbox list`) or pass --all-dead",
              file=sys.stderr)
        return 2
    ids = None if args.all_dead else sorted(set(args.ids))
    requeued = _write(_settings(), lambda c: outbox.requeue_dead(c, ids, now=time.time()))
    if ids is not None:
        for missing in sorted(set(ids) - set(requeued)):
            print(f"operation {missing} is not dead (or does not exist): left as it is", file=sys.stderr)
    print(f"{len(requeued)} operation(s) queued for delivery again" + (f": {', '.join(map(str, requeued))}"
                                                                      if requeued else ""))
    return 0 if ids is None or len(requeued) == len(ids) else 1


def _routines(settings):
    from bridge.routines.definitions import load_dir

    routines, errors = load_dir(settings.routines_dir)
    for error in errors:
        print(f"agent-bridge: {error.file} not loaded: {error.reason}", file=sys.stderr)
    return routines


def cmd_routines_list(_args: argparse.Namespace) -> int:
    from bridge.presenter import routines_list
    from bridge.routines.definitions import load_dir
    from bridge.store import routines as repo

    settings = _settings()
    routines, errors = load_dir(settings.routines_dir)

    async def fetch(conn):
        return await repo.states(conn), await repo.last_runs(conn)

    states, last = _read(settings, fetch) if _db_exists(settings) else ({}, {})
    print(routines_list(routines, states, last, errors).text.replace("`", ""))
    return 1 if errors else 0


def _db_exists(settings) -> bool:
    import os

    return not settings.is_sqlite or os.path.exists(settings.database_url.split(":///", 1)[1])


def cmd_routines_show(args: argparse.Namespace) -> int:
    settings = _settings()
    routine = _routines(settings).get(args.name)
    if routine is None:
        print(f"no routine named {args.name!r} in {settings.routines_dir}", file=sys.stderr)
        return 1
    for key, value in routine.model_dump(exclude_none=True).items():
        print(f"{key}: {value}")
    return 0


def cmd_routines_history(args: argparse.Namespace) -> int:
    from bridge.routines.definitions import utc
    from bridge.store import routines as repo

    rows = _read(_settings(), lambda c: repo.history(c, args.name, args.limit))
    if not rows:
        print("no runs")
    for r in rows:
        took = f"{r.finished_at - r.started_at:.1f}s" if r.finished_at and r.started_at else "-"
        print(f"{r.id:>5}  {r.routine:<20} due {utc(r.due_at)}  {r.status:<11} {took:>7}"
              f"{'  manual' if r.manual else ''}  → {r.delivered_to or '-'}  {(r.error or r.note or '')[:80]}")
    return 0


def cmd_routines_toggle(args: argparse.Namespace) -> int:
    import time

    from bridge.store import routines as repo

    settings = _settings()
    if args.name not in _routines(settings):
        print(f"no routine named {args.name!r} in {settings.routines_dir}", file=sys.stderr)
        return 1
    enabled = args.routines_command == "enable"
    _write(settings, lambda c: repo.set_enabled(c, args.name, enabled, now=time.time()))
    print(f"{args.name} {'enabled' if enabled else 'disabled'}")
    return 0


def cmd_routines_run(args: argparse.Namespace) -> int:
    """Run a routine now, in this process; its output goes to the targets through the outbox
    (delivered by the running service, or at its next start) and is printed here."""
    import time

    settings = _settings()
    routine = _routines(settings).get(args.name)
    if routine is None:
        print(f"no routine named {args.name!r} in {settings.routines_dir}", file=sys.stderr)
        return 1
    from bridge.app import build_runtime
    from bridge.approvals import rules
    from bridge.approvals.gate import HumanGate
    from bridge.delivery.outbox import Outbox
    from bridge.metrics import Metrics
    from bridge.routines.scheduler import LEASE, RoutineRunner
    from bridge.store import migrate
    from bridge.store import routines as repo
    from bridge.store.db import Database

    async def run():
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        db = Database(settings.database_url, read_pool=1)
        await migrate.ensure_schema(db.writer_engine)
        await db.start()
        runtime = build_runtime(settings)
        await runtime.start()
        try:
            outbox = Outbox(db.dialect)
            gate = HumanGate(db, outbox, Metrics(), rules=rules.load(settings.approval_rules),
                             timeout=settings.approval_timeout, admins=settings.admins)
            runner = RoutineRunner(db, outbox, runtime, gate, workspace=str(settings.workspace))
            now = time.time()
            run_id = await db.write(lambda c: repo.claim(c, routine.name, now, owner="cli", lease=LEASE, manual=True))
            if run_id is None:
                return None
            return await runner.run(routine, run_id, now)
        finally:
            await runtime.stop()
            await db.close()

    reply = asyncio.run(run())
    if reply is None:
        print(f"{args.name} is running now", file=sys.stderr)
        return 1
    print(reply.card.body if reply.card else reply.text)
    print(f"\n(queued for {', '.join(routine.targets) or 'no target'})")
    return 0


def cmd_version(_args: argparse.Namespace) -> int:
    print(f"agent-bridge {__version__}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agent-bridge", description="Run coding agents from team chat.")
    parser.add_argument("--version", action="version", version=f"agent-bridge {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("serve", help="run the service").set_defaults(fn=cmd_serve)
    db = sub.add_parser("db", help="database maintenance")
    db_sub = db.add_subparsers(dest="db_command", required=True)
    db_sub.add_parser("upgrade", help="apply migrations").set_defaults(fn=cmd_db_upgrade)
    sub.add_parser("doctor", help="check configuration, store, runtime and channels").set_defaults(fn=cmd_doctor)
    sub.add_parser("version", help="print the version").set_defaults(fn=cmd_version)
    appr = sub.add_parser("approvals", help="approvals and their audit trail")
    appr_sub = appr.add_subparsers(dest="approvals_command", required=True)
    listing = appr_sub.add_parser("list", help="recent approvals, newest first")
    listing.add_argument("--pending", action="store_true", help="only those waiting for a decision")
    listing.add_argument("--limit", type=int, default=50)
    listing.set_defaults(fn=cmd_approvals_list)
    audit = appr_sub.add_parser("audit", help="the audit trail: requests, decisions, expiries, refused clicks")
    audit.add_argument("--since", type=_since, default=_since("24h"), help="30m, 2h, 7d or an ISO time (default 24h)")
    audit.add_argument("--limit", type=int, default=1000)
    audit.set_defaults(fn=cmd_approvals_audit)
    sess = sub.add_parser("sessions", help="the conversations' sessions")
    sess_sub = sess.add_subparsers(dest="sessions_command", required=True)
    listing = sess_sub.add_parser("list", help="every session, by conversation")
    listing.add_argument("--all", action="store_true", help="archived ones too")
    listing.set_defaults(fn=cmd_sessions_list)
    show = sess_sub.add_parser("show", help="one session and its runtime threads")
    show.add_argument("id", type=int)
    show.set_defaults(fn=cmd_sessions_show)
    archive = sess_sub.add_parser("archive", help="archive a session (not a conversation's active one)")
    archive.add_argument("id", type=int)
    archive.set_defaults(fn=cmd_sessions_archive)
    rout = sub.add_parser("routines", help="scheduled routines (one YAML file each in the routines directory)")
    rout_sub = rout.add_subparsers(dest="routines_command", required=True)
    rout_sub.add_parser("list", help="routines, their schedules, next and last runs").set_defaults(
        fn=cmd_routines_list)
    for name, fn, text in [("show", cmd_routines_show, "one routine's definition"),
                           ("run", cmd_routines_run, "run a routine now (output to its targets)"),
                           ("enable", cmd_routines_toggle, "enable a routine (overrides its file)"),
                           ("disable", cmd_routines_toggle, "disable a routine (overrides its file)")]:
        p = rout_sub.add_parser(name, help=text)
        p.add_argument("name")
        p.set_defaults(fn=fn)
    hist = rout_sub.add_parser("history", help="run receipts, newest first")
    hist.add_argument("name", nargs="?", default=None)
    hist.add_argument("--limit", type=int, default=20)
    hist.set_defaults(fn=cmd_routines_history)
    outb = sub.add_parser("outbox", help="outbound operations: what failed to reach a chat, and delivering it again")
    outb_sub = outb.add_subparsers(dest="outbox_command", required=True)
    listing = outb_sub.add_parser("list", help="outbound operations, newest first (default: the dead ones)")
    listing.add_argument("--status", default="dead", choices=("dead", "pending", "delivered", "superseded", "all"))
    listing.add_argument("--conversation", default=None, help="one conversation: channel:chat, e.g. slack:C123")
    listing.add_argument("--limit", type=int, default=50)
    listing.set_defaults(fn=cmd_outbox_list)
    retry = outb_sub.add_parser("retry", help="deliver dead operations again (after fixing what made them fail)")
    retry.add_argument("ids", type=int, nargs="*", help="operation ids (from `outbox list`)")
    retry.add_argument("--all-dead", action="store_true", help="every dead message and edit (reactions stay dead)")
    retry.set_defaults(fn=cmd_outbox_retry)
    handoff = sub.add_parser("handoff", help="continue a runtime thread (e.g. a terminal Codex session) in a chat")
    handoff.add_argument("thread_id", help="the runtime's thread id (Codex: the session id `codex resume` shows)")
    handoff.add_argument("--to", required=True, help="the conversation: channel:chat, e.g. webchat:c-team")
    handoff.add_argument("--name", default=None, help="the new session's name (default: s<n>)")
    handoff.set_defaults(fn=cmd_handoff)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.fn is not cmd_serve:
        # a one-shot command prints its own result; the store's and the runtime's routine records
        # (commits, start-up) are for the service's log, so only warnings and errors show here
        from loguru import logger

        logger.remove()
        logger.add(sys.stderr, level="WARNING", format="{level}: {message}")
    return args.fn(args)

