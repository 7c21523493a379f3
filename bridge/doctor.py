"""`agent-bridge doctor`: check configuration, store, runtime and channels; one row each."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess

from bridge.config import Settings
from bridge.store import migrate
from bridge.store.db import make_engine

Row = tuple[str, bool, str]


async def _store(settings: Settings) -> list[Row]:
    head = migrate.HEAD
    if settings.is_sqlite:
        path = settings.database_url.split(":///", 1)[1]
        if not os.path.exists(path):
            return [("store", True, f"sqlite, {path} not created yet: `serve` or `db upgrade` creates it")]
    engine = make_engine(settings.database_url, pool_size=1)
    try:
        revision = await migrate.current_revision(engine)
    except Exception as exc:  # noqa: BLE001 - reported as a failed row
        reason = str(exc).splitlines()[0] if str(exc) else ""
        return [("store", False, f"cannot connect: {type(exc).__name__}: {reason}")]
    finally:
        await engine.dispose()
    backend = "sqlite" if settings.is_sqlite else "postgresql"
    if revision == head:
        return [("store", True, f"{backend}, schema at {revision}")]
    if revision is None:
        return [("store", True, f"{backend}, empty: `agent-bridge db upgrade` (or serve) creates the schema")]
    return [("store", False, f"{backend}, schema at {revision} but code expects {head}: run `agent-bridge db upgrade`")]


def _runtime(settings: Settings) -> list[Row]:
    if settings.runtime == "shell":
        bash = shutil.which("bash")
        return [("runtime", bash is not None, f"shell via {bash}" if bash else "bash not found on PATH")]
    if settings.runtime == "codex":
        return [_codex(settings)]
    return [("runtime", False, f"{settings.runtime} is not available yet")]


def _codex(settings: Settings) -> Row:
    argv = shlex.split(settings.codex_bin)
    if not argv or shutil.which(argv[0]) is None:
        return ("runtime", False, f"codex: {settings.codex_bin!r} not found (set CODEX_BIN or install @openai/codex)")
    try:
        out = subprocess.run([*argv, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return ("runtime", False, f"codex: {settings.codex_bin} --version failed: {exc}")
    if out.returncode != 0:
        return ("runtime", False, f"codex: {settings.codex_bin} --version exited {out.returncode}: "
                                  f"{(out.stderr or out.stdout).strip()[:200]}")
    home = os.environ.get("CODEX_HOME") or "~/.codex"
    return ("runtime", True, f"{out.stdout.strip()} ({argv[0]}), CODEX_HOME {home}, sandbox "
                             f"{settings.codex_sandbox}, approvals {settings.codex_approval_policy}")


def _workspace(settings: Settings) -> list[Row]:
    assert settings.workspace is not None
    path = settings.workspace
    probe = path if path.exists() else path.parent
    while not probe.exists():
        probe = probe.parent
    ok = os.access(probe, os.W_OK)
    return [("workspace", ok, str(path) + ("" if ok else " is not writable"))]


def _rules(settings: Settings) -> list[Row]:
    from bridge.approvals.rules import RulesError, load

    try:
        rules = load(settings.approval_rules)
    except RulesError as exc:
        return [("approval rules", False, str(exc))]
    count = len(rules.parsed.rules) + sum(len(s.rules) for s in [*rules.parsed.workspaces.values(),
                                                                   *rules.parsed.conversations.values()])
    return [("approval rules", True, f"{rules.source}: {count} rules, preset {rules.parsed.preset or 'default'}")]


async def run_checks(settings: Settings) -> list[Row]:
    rows: list[Row] = [("config", True, f"listen {settings.host}:{settings.port}, runtime {settings.runtime}")]
    rows += await _store(settings)
    rows += _runtime(settings)
    rows += _workspace(settings)
    rows += _rules(settings)
    if settings.webchat:
        everywhere = settings.host in ("0.0.0.0", "::", "")
        host = "127.0.0.1" if everywhere else f"[{settings.host}]" if ":" in settings.host else settings.host
        where = " (listening on every interface)" if everywhere else ""
        rows.append(("channel:webchat", True, f"http://{host}:{settings.port}/chat{where} (no sign-in: anyone "
                                              "who reaches the port may post as any user)"))
    if settings.feishu_enabled:
        rows += await _feishu(settings)
    if settings.slack_enabled:
        rows += await _slack(settings)
    return rows


async def _slack(settings: Settings) -> list[Row]:
    """The bot token works (auth.test); with an app token, Socket Mode can open a connection URL."""
    from slack_sdk.errors import SlackApiError
    from slack_sdk.web.async_client import AsyncWebClient

    bot = AsyncWebClient(token=settings.slack_bot_token.get_secret_value(), base_url=settings.slack_api_url)
    try:
        auth = await bot.auth_test()
    except SlackApiError as exc:
        return [("channel:slack", False, f"auth.test: {_slack_error(exc)}")]
    except Exception as exc:  # noqa: BLE001 - unreachable API
        return [("channel:slack", False, f"{settings.slack_api_url}: {type(exc).__name__}: {exc}")]
    detail = f"bot {auth.get('user')} ({auth.get('user_id')}) in {auth.get('team')}"
    app_token = settings.slack_app_token.get_secret_value()
    if app_token:
        app = AsyncWebClient(token=app_token, base_url=settings.slack_api_url)
        try:
            await app.apps_connections_open(app_token=app_token)
        except SlackApiError as exc:
            return [("channel:slack", False, f"{detail}; Socket Mode: {_slack_error(exc)}")]
        return [("channel:slack", True, f"{detail}, Socket Mode ok")]
    if not settings.slack_signing_secret.get_secret_value():
        return [("channel:slack", False, f"{detail}; neither SLACK_APP_TOKEN (Socket Mode) nor "
                                         "SLACK_SIGNING_SECRET (HTTP) is set")]
    return [("channel:slack", True, f"{detail}, HTTP at /slack/events and /slack/interactions")]


def _slack_error(exc) -> str:
    data = exc.response.data if isinstance(exc.response.data, dict) else {}
    return str(data.get("error") or f"HTTP {exc.response.status_code}")


async def _feishu(settings: Settings) -> list[Row]:
    """The credentials work (a tenant token, the bot's identity); for the long connection, the
    endpoint hands out a connection URL."""
    from channels.base import DeliveryError
    from channels.feishu.api import FeishuApi

    api = FeishuApi(app_id=settings.feishu_app_id, app_secret=settings.feishu_app_secret.get_secret_value(),
                    domain=settings.feishu_domain)
    try:
        bot = await api.bot_open_id()
    except DeliveryError as exc:
        return [("channel:feishu", False, f"{settings.feishu_domain}: {exc}")]
    detail = f"{settings.feishu_domain}, bot {bot}, {settings.feishu_connection}"
    if settings.feishu_connection == "webhook":
        detail += f" at http(s)://<host>:{settings.port}/feishu/events"
        if not settings.feishu_encrypt_key.get_secret_value():
            detail += " (no FEISHU_ENCRYPT_KEY: requests are not signed)"
        return [("channel:feishu", True, detail)]
    import asyncio

    import requests

    def endpoint() -> dict:
        resp = requests.post(f"{settings.feishu_domain}/callback/ws/endpoint", timeout=10, headers={"locale": "en"},
                             json={"AppID": settings.feishu_app_id,
                                   "AppSecret": settings.feishu_app_secret.get_secret_value()})
        return resp.json()

    try:
        answer = await asyncio.get_running_loop().run_in_executor(None, endpoint)
    except Exception as exc:  # noqa: BLE001 - reported as a failed row
        return [("channel:feishu", False, f"long connection endpoint: {type(exc).__name__}: {exc}")]
    if answer.get("code") != 0:
        return [("channel:feishu", False, f"long connection endpoint: code {answer.get('code')} {answer.get('msg', '')}")]
    return [("channel:feishu", True, detail + " (endpoint ok)")]
