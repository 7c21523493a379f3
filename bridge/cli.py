"""Command line: `agent-bridge serve | db upgrade | doctor | version`."""

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
    try:
        asyncio.run(service.run_until_signalled())
    except OSError as exc:
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

    rows = _read(_settings(), lambda c: approvals.audit_since(c, args.since, limit=args.limit))
    for r in rows:
        at = datetime.fromtimestamp(r.at, timezone.utc).strftime("%Y-%m-%d %H:%M:%S")
        print(f"{at}  {r.event:<13} {(r.actor or '-'):<14} {r.approval_id[:12]}  {r.conversation_key}  "
              f"{json.dumps(r.detail, ensure_ascii=False)}")
    if not rows:
        print("no audit records in that period")
    return 0


def cmd_version(_args: argparse.Namespace) -> int:
    print(f"agent-bridge {__version__}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agent-bridge", description="Run coding agents from team chat.")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)

