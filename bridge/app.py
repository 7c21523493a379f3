"""The composition root: the one place that builds every part and wires them together.

Nothing else constructs collaborators or looks them up; each part gets what it needs here.
"""

from __future__ import annotations

import asyncio
import gc
import ipaddress
import os
import secrets
import signal
import sys
import time
from typing import Any

from aiohttp import web
from loguru import logger

from bridge.approvals import rules
from bridge.approvals.gate import HumanGate
from bridge.attachments import AttachmentRetention
from bridge.config import Settings
from bridge.delivery.outbox import Outbox
from bridge.delivery.worker import DeliveryWorker
from bridge.edge.workers import EdgeWorkers
from bridge.metrics import Metrics
from bridge.pipeline.control import ControlCommands
from bridge.pipeline.dispatcher import Dispatcher, JobSink
from bridge.pipeline.ingest import Ingestor
from bridge.pipeline.ownership import Ownership
from bridge.pipeline.pacing import BurstPacer
from bridge.pipeline.recovery import interrupt_and_reset, recover
from bridge.pipeline.retry import Retrier
from bridge.pipeline.session_commands import SessionCommands
from bridge.pipeline.sessions import SessionResolver
from bridge.pipeline.turns import TurnRunner
from bridge.routines.scheduler import RoutineRunner, Scheduler
from bridge.runtimes.base import Runtime
from bridge.runtimes.codex.appserver import AppServerConfig
from bridge.runtimes.codex.runtime import CodexOptions, CodexRuntime
from bridge.runtimes.shell import ShellRuntime
from bridge.runtimes.shell_records import CommandRecords
from bridge.store import approvals as approvals_repo
from bridge.store import migrate
from bridge.store import outbox as outbox_repo
from bridge.store.db import GATHER_ROUNDS, Database
from bridge.store.files import StoreFiles
from bridge.store.notify import Listener
from bridge.web import webhooks
from bridge.web.server import build_app
from channels.base import ChannelAdapter
from channels.files import FileKeeper
from channels.webchat import transcript
from channels.webchat.adapter import WebChatChannel
from channels.webchat.uploads import Uploads


SWITCH_INTERVAL = 0.0005  # seconds; see Service.start

# Chat-platform credentials are the bridge's, not the agent's: they never reach a runtime.
PLATFORM_SECRET_PREFIXES = ("BRIDGE_", "FEISHU_", "LARK_", "SLACK_")


def build_runtime(settings: Settings) -> Runtime:
    if settings.runtime == "shell":
        # each process on a data dir records the commands it runs there, and its start ends those
        # a killed one left running (each replica has a data dir of its own)
        return ShellRuntime(timeout=settings.shell_timeout, output_limit=settings.shell_output_limit,
                            records=CommandRecords(settings.data_dir / "running-commands"))
    if settings.runtime == "codex":
        env = {k: v for k, v in os.environ.items() if not k.startswith(PLATFORM_SECRET_PREFIXES)}
        server = AppServerConfig(binary=settings.codex_bin, overrides=tuple(settings.codex_config),
                                 cwd=str(settings.workspace), env=env)
        return CodexRuntime(server, CodexOptions(
            approval_policy=settings.codex_approval_policy, sandbox=settings.codex_sandbox,
            request_timeout=settings.codex_request_timeout,
        ))
    raise NotImplementedError(f"BRIDGE_RUNTIME={settings.runtime} is not available yet; use shell")


def build_feishu(settings: Settings, files: FileKeeper) -> ChannelAdapter:
    # Nothing here imports lark-oapi: the channel builds its API client on a worker thread when
    # it starts (channels/feishu/sdk.py loads only the APIs it calls: ~0.2 s, ~10 MB).
    from channels.feishu.adapter import FeishuChannel, FeishuConfig
    from channels.feishu.normalize import ChatPolicy

    default = ChatPolicy(trigger=settings.feishu_group_trigger, scope=settings.feishu_conversation_scope)
    config = FeishuConfig(
        app_id=settings.feishu_app_id,
        app_secret=settings.feishu_app_secret.get_secret_value(),
        verification_token=settings.feishu_verification_token.get_secret_value(),
        encrypt_key=settings.feishu_encrypt_key.get_secret_value(),
        domain=settings.feishu_domain,
        connection=settings.feishu_connection,
        stale_after=settings.feishu_stale_after,
        default_policy=default,
        chat_policies={chat: ChatPolicy(trigger=p.get("trigger", default.trigger),  # type: ignore[arg-type]
                                        scope=p.get("scope", default.scope))  # type: ignore[arg-type]
                       for chat, p in settings.feishu_chat_policies.items()},
        allowed_users=frozenset(settings.feishu_allowed_users),
        allowed_chats=frozenset(settings.feishu_allowed_chats),
        reactions=settings.feishu_reactions,
    )
    def api_factory():
        from channels.feishu.api import FeishuApi

        return FeishuApi(app_id=config.app_id, app_secret=config.app_secret, domain=config.domain)

    channel = FeishuChannel(config, api_factory, files)
    if config.connection == "websocket":
        from channels.feishu.longconn import LongConnection

        channel.transport = LongConnection(config)
    return channel


def build_slack(settings: Settings, files: FileKeeper) -> ChannelAdapter:
    from channels.slack.adapter import SlackChannel, SlackConfig
    from channels.slack.normalize import ChannelPolicy

    return SlackChannel(SlackConfig(
        bot_token=settings.slack_bot_token.get_secret_value(),
        signing_secret=settings.slack_signing_secret.get_secret_value(),
        app_token=settings.slack_app_token.get_secret_value(),
        api_url=settings.slack_api_url,
        fmt=settings.slack_format,
        default_policy=ChannelPolicy(trigger=settings.slack_group_trigger, scope=settings.slack_conversation_scope),
        allowed_users=frozenset(settings.slack_allowed_users),
        allowed_channels=frozenset(settings.slack_allowed_channels),
        reactions=settings.slack_reactions,
    ), files)


class Service:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        # Requests this process reads itself arrive a loop pass apart: the writer gathers them
        # into one commit. Edge workers hand them over already grouped, one link read at a
        # time, and there the gathering's extra passes cost more than they saved (docs/benchmarks.md).
        self.db = Database(settings.database_url, gather_rounds=0 if settings.edge_workers else GATHER_ROUNDS)
        self.runtime = build_runtime(settings)
        # Files people attach: on this replica's disk, and with several replicas in the store too
        # (each replica has its own data dir; the one that runs a file's turn reads it there).
        self.shared_files: StoreFiles | None = None
        if not self.db.is_sqlite:
            self.shared_files = StoreFiles(self.db, keep_days=settings.shared_files_days)
        self.files = FileKeeper(settings.data_dir / "attachments", shared=self.shared_files)
        self.retention = AttachmentRetention(self.files, keep_days=settings.attachments_keep_days,
                                             store=self.shared_files)
        self.channels: dict[str, ChannelAdapter] = {}
        self.webchat: WebChatChannel | None = None
        self.webchat_live: Listener | None = None
        if settings.webchat:
            self.webchat = WebChatChannel(self.db, Uploads(self.files,
                                                           max_bytes=settings.webchat_max_file_mb * 1024 * 1024,
                                                           unsent_ttl=settings.webchat_upload_ttl_hours * 3600),
                                          shared_store=not self.db.is_sqlite)
            self.channels[self.webchat.name] = self.webchat
            # Several replicas: a page open on one sees live what any replica writes to its transcript.
            if not self.db.is_sqlite:
                self.webchat_live = Listener(settings.database_url, transcript.LIVE_CHANNEL,
                                             on_notify=self.webchat.changed, on_gap=self.webchat.changed_all,
                                             application_name=f"agent-bridge {settings.replica_id}")
        if settings.feishu_enabled:
            feishu = build_feishu(settings, self.files)
            self.channels[feishu.name] = feishu
        if settings.slack_enabled:
            slack = build_slack(settings, self.files)
            self.channels[slack.name] = slack
        self.outbox = Outbox(self.db.dialect)
        self.delivery = DeliveryWorker(
            self.db, self.channels, self.metrics,
            max_attempts=settings.delivery_max_attempts,
            base_delay=settings.delivery_base_delay,
            max_delay=settings.delivery_max_delay,
        )
        self.outbox.bind(self.delivery.kick)
        self.gate = HumanGate(self.db, self.outbox, self.metrics, rules=rules.load(settings.approval_rules),
                              timeout=settings.approval_timeout, admins=settings.admins,
                              on_expiry=settings.approval_on_expiry)
        self.sessions = SessionResolver(self.db, runtime=self.runtime.name, workspace=str(settings.workspace))
        self.runner = TurnRunner(
            self.db, self.outbox, self.runtime, self.gate, self.metrics, sessions=self.sessions,
            workspace=str(settings.workspace), max_concurrent=settings.max_concurrent_turns,
            turn_timeout=settings.turn_timeout, fenced=not self.db.is_sqlite, files=self.files,
        )
        self.pacer = BurstPacer(burst_rate=settings.burst_rate, burst_starts=settings.burst_turn_starts)
        self.dispatcher = Dispatcher(
            process=self.runner.process, control=self._control, notify_queued=self.runner.notify_queued,
            intercepts=self.gate.intercepts, pacer=self.pacer, notify_backlog=self.runner.notify_backlog,
        )
        # Several replicas (PostgreSQL): events reach the dispatcher of their conversation's owner.
        self.ownership: Ownership | None = None
        sink: JobSink = self.dispatcher
        if not self.db.is_sqlite:
            self.ownership = Ownership(
                self.db, self.dispatcher, owner=settings.replica_id, take_over=self._take_over,
                in_delivery=self.delivery.in_delivery, kick_delivery=self.delivery.kick,
                on_lost=self.runner.abandon, ttl=settings.lease_ttl,
            )
            self.delivery.owns = self.ownership.owns
            self.runner.owns = self.ownership.owns
            sink = self.ownership
        self.retrier = Retrier(self.db, self.gate, sink)
        self.routine_runner = RoutineRunner(self.db, self.outbox, self.runtime, self.gate,
                                            workspace=str(settings.workspace))
        assert settings.routines_dir is not None
        self.scheduler = Scheduler(self.db, self.routine_runner, self.outbox, directory=settings.routines_dir)
        session_commands = SessionCommands(self.db, self.sessions, is_admin=settings.is_admin,
                                           allowed_roots=settings.allowed_roots, busy=self.dispatcher.busy)
        self.control = ControlCommands(self.db, self.outbox, self.runner, self.gate, self.retrier, self.dispatcher,
                                       session_commands, busy_policy=settings.busy_policy,
                                       routines=self.scheduler)
        if settings.busy_policy != "queue":
            self.dispatcher.on_busy = self.control.on_busy
        self.ingest = Ingestor(self.db, sink, self.gate, self.retrier, self.metrics, pacer=self.pacer)
        checks = {"store": self._store_health, "runtime": self.runtime.health}
        checks.update({f"channel:{name}": ch.health for name, ch in self.channels.items()})
        if self.ownership is not None:
            checks["replica"] = self.ownership.health
        if self.webchat_live is not None:
            checks["webchat_live"] = self.webchat_live.health
        self.webhooks = [hook for ch in self.channels.values() for hook in ch.webhooks()]
        routes = [route for ch in self.channels.values() for route in ch.routes()]
        routes += [webhooks.route(hook.check, hook.accept) for hook in self.webhooks]
        # With edge workers they serve the port; this process's own HTTP server listens on a
        # local socket, for what they pass through.
        self.edges: EdgeWorkers | None = None
        if settings.edge_workers:
            self.edges = EdgeWorkers(
                count=settings.edge_workers, host=settings.host, port=settings.port, webhooks=self.webhooks,
                service_socket=f"\0agent-bridge-{os.getpid()}-{secrets.token_hex(4)}",
                log_level=settings.log_level, log_format=settings.log_format,
                shutdown_timeout=min(10.0, settings.shutdown_timeout),
            )
            checks["http"] = self.edges.health
        self.app = build_app(self.metrics, checks, routes, self._refresh_metrics)
        self._runner: web.AppRunner | None = None
        self._site: web.BaseSite | None = None
        self._settled: asyncio.Future[None] | None = None
        self.port: int | None = None

    async def _control(self, job) -> None:
        await self.control.handle(job)

    async def _take_over(self, conversation_key: str, keep) -> int:
        return await interrupt_and_reset(self.db, self.outbox, self.gate, conversation_key, keep=keep)

    async def _store_health(self) -> dict[str, Any]:
        backend = "sqlite" if self.db.is_sqlite else "postgresql"
        try:
            await self.db.ping()
        except Exception as exc:  # noqa: BLE001 - reported with what the writer is holding meanwhile
            return {"ok": False, "backend": backend, "error": f"{type(exc).__name__}: {str(exc)[:200]}",
                    **self.db.writer_state()}
        return {"ok": True, "backend": backend, **self.db.writer_state()}

    async def _refresh_metrics(self) -> None:
        """Before a scrape. With the store out of reach the scrape still succeeds: the gauges read
        from the store keep their last values and `bridge_store_up` says 0."""
        writer = self.db.writer_state()
        self.metrics.store_writes_queued.set(writer["queued_writes"])
        self.metrics.store_waiting.set(writer.get("waiting_for_database_s", 0.0))
        try:
            pending = await self.db.read(approvals_repo.count_pending)
            depth = await self.db.read(outbox_repo.count_by_status)
            kept = await self.shared_files.stats() if self.shared_files is not None else None
        except Exception as exc:  # noqa: BLE001 - reported as a metric; the scrape goes on
            logger.warning("metrics: the store did not answer ({}); its gauges keep their last values",
                           type(exc).__name__)
            self.metrics.store_up.set(0)
            return
        self.metrics.store_up.set(1)
        self.metrics.approvals_pending.set(pending)
        for status in ("pending", "dead", "delivered", "superseded"):
            self.metrics.outbox_depth.labels(status).set(depth.get(status, 0))
        if kept is not None:
            self.metrics.shared_files.set(kept[0])
            self.metrics.shared_files_bytes.set(kept[1])

    async def start(self) -> None:
        started = time.monotonic()
        self.settings.data_dir.mkdir(parents=True, exist_ok=True)
        assert self.settings.workspace is not None
        self.settings.workspace.mkdir(parents=True, exist_ok=True)
        await migrate.ensure_schema(self.db.writer_engine)
        await self.db.start()
        if self.webchat_live is not None:
            await self.webchat_live.start()
        self.retention.start()
        # before recovery or a takeover says a turn was interrupted: the runtime ends what a killed
        # run of this process left running (the shell's recorded commands)
        await self.runtime.start()
        if self.ownership is None:
            # before any channel takes a message: what the last run left keeps its place in line
            await recover(self.db, self.outbox, self.gate, self.dispatcher)
        for channel in self.channels.values():
            await channel.start(self.ingest)
        await self.delivery.start()
        if self.ownership is not None:
            await self.ownership.start()  # its sweep takes over what stopped replicas left
        await self.scheduler.start()
        self._runner = web.AppRunner(self.app, access_log=None, handler_cancellation=False)
        await self._runner.setup()
        if self.edges is not None:
            self._site = web.UnixSite(self._runner, self.edges.config.service_socket)
            await self._site.start()
            self.port = await self.edges.start()
        else:
            self._site = web.TCPSite(self._runner, self.settings.host, self.settings.port)
            await self._site.start()
            sockets = self._site._server.sockets if self._site._server else []  # type: ignore[union-attr]
            self.port = sockets[0].getsockname()[1] if sockets else self.settings.port
        # Everything built so far lives as long as the process: move it out of the collector's
        # sight, and collect young objects less often. Full collections over a large heap were the
        # main source of ack-latency spikes (p99 56 -> 18 ms in bench/ingest.py, empty messages).
        _freeze_heap()
        gc.set_threshold(20_000, 20, 20)
        # A channel that loads its SDK in the background (Feishu: lark-oapi's messaging API)
        # adds long-lived objects after this point: freeze again once it is loaded, or every full
        # collection walks them (ack p99 0.4-0.7 s in bench/feishu_webhook.py before this).
        self._settled = asyncio.ensure_future(self._settle())
        # The store's connections run on threads (aiosqlite); each statement hands the GIL to one
        # and back. With the default 5 ms switch interval a busy loop makes every hand-over wait
        # up to 5 ms, so a write of a few statements took tens of ms under load.
        sys.setswitchinterval(SWITCH_INTERVAL)
        if self.webchat is not None and not _loopback(self.settings.host):
            logger.warning("the web chat has no sign-in and {} is reachable from other machines: anyone who "
                           "reaches /chat may post as any user; set BRIDGE_WEBCHAT=off, or put it behind a proxy "
                           "that signs people in", self.settings.host)
        logger.info(
            "agent-bridge ready on http://{}:{} (runtime {}, store {}) in {:.2f}s",
            self.settings.host, self.port, self.runtime.name, "sqlite" if self.db.is_sqlite else "postgresql",
            time.monotonic() - started,
        )

    async def _settle(self) -> None:
        await asyncio.gather(*(channel.loaded() for channel in self.channels.values()), return_exceptions=True)
        gc.freeze()  # no collection first: over lark-oapi's heap it stalls the loop for ~0.3 s
        logger.debug("start-up settled: {} objects frozen", gc.get_freeze_count())

    async def stop(self) -> None:
        """Graceful: stop accepting, let running turns finish (or interrupt them at the deadline),
        deliver what is queued, then close the store."""
        deadline = time.monotonic() + self.settings.shutdown_timeout
        logger.info("shutting down (deadline {:.0f}s)", self.settings.shutdown_timeout)
        if self._settled is not None:
            self._settled.cancel()
        if self.edges is not None:
            await self.edges.stop(timeout=min(10.0, max(1.0, deadline - time.monotonic())))
        if self._site is not None:
            await self._site.stop()
        await self.scheduler.stop()
        self.runner.slots.close()  # turns waiting for a runtime slot start no more: they run after the next start
        await self.dispatcher.close(timeout=max(0.0, deadline - time.monotonic()),
                                    waiting_on_people=self.gate.waiting_turns)
        if self.ownership is not None:
            await self.ownership.close()
        drained = await self.delivery.flush(deadline=max(deadline, time.monotonic() + 2.0))
        if not drained:
            logger.warning("shutdown: some outbound messages are still pending; they are sent on the next start")
        await self.delivery.stop()
        if self.ownership is not None:
            await self.ownership.release_all()  # another replica takes the conversations over at once
        for channel in self.channels.values():
            await channel.stop()
        if self.webchat_live is not None:
            await self.webchat_live.stop()
        await self.runtime.stop()
        if self._runner is not None:
            await self._runner.cleanup()
        await self.retention.stop()
        await self.db.close()
        logger.info("stopped")

    async def run_until_signalled(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await self.start()
        try:
            await stop.wait()
        finally:
            await self.stop()


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def _freeze_heap() -> None:
    """Move everything alive now out of the collector's sight (it lives as long as the process)."""
    gc.collect()
    gc.freeze()
