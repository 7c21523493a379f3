"""Service configuration, read from the environment and an optional `.env` file.

Every setting is documented in `.env.example`; `load_settings()` turns a validation error
into one readable line naming the setting (the CLI exits with code 2 on it).
"""

from __future__ import annotations

import json
import os
import shlex
import socket
from pathlib import Path
from typing import Annotated, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from bridge.errors import plain_message


class ConfigError(Exception):
    """A setting is missing or invalid; the message names it."""


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="BRIDGE_",
        env_file=".env",
        env_file_encoding="utf-8",
        # `NAME=` (as in a copy of .env.example) means "not set": the default, not an empty value
        # (an empty path would be the current directory)
        env_ignore_empty=True,
        extra="ignore",
        validate_default=True,
    )

    host: str = "127.0.0.1"
    port: int = Field(8788, ge=0, le=65535)
    # HTTP edge workers: processes that serve the port, check webhooks (signatures, decryption)
    # and hand them to the service, so HTTP uses more than one core. 0: the service serves HTTP
    # itself; auto: 1 when this process may run on two or more CPUs, else 0.
    http_workers: int | Literal["auto"] = "auto"
    data_dir: Path = Path("./data")
    database_url: str = ""
    # This replica's name among several on one PostgreSQL database (its conversation leases carry
    # it). Default: the host name and the data dir, so a restarted replica knows its own leases.
    replica_id: str = Field("", max_length=128)
    # Seconds a conversation's lease lasts unless renewed: how long the conversations of a replica
    # that died wait before another replica takes them over.
    lease_ttl: float = Field(15.0, ge=1.0, le=600.0)
    # Several replicas: days the store keeps its copy of each file people attach, for the replica
    # that runs the file's turn (each replica keeps its own disk copies regardless).
    shared_files_days: float = Field(7.0, gt=0)
    runtime: Literal["shell", "codex", "claude"] = "shell"
    workspace: Path | None = None
    admins: Annotated[list[str], NoDecode] = Field(default_factory=list)
    log_level: Literal["TRACE", "DEBUG", "INFO", "SUCCESS", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    log_format: Literal["text", "json"] = "text"
    # The built-in web chat (`/chat`). It has no sign-in: whoever reaches the port may post as any
    # user id; off where the port is reachable by others (the platforms' webhooks stay served).
    webchat: bool = True
    # Web chat: the largest file a person may attach (MiB).
    webchat_max_file_mb: int = Field(20, gt=0, le=1024)
    # Days the files people attach are kept on this replica's disk (0: for good).
    attachments_keep_days: float = Field(30.0, ge=0)
    # Web chat: hours an uploaded file is kept when no message was sent with it.
    webchat_upload_ttl_hours: float = Field(24.0, gt=0)

    # Shell runtime.
    shell_timeout: float = Field(600.0, gt=0)
    shell_output_limit: int = Field(3500, ge=200)

    # Codex runtime (`codex app-server`).
    codex_bin: str = Field("codex", validation_alias=AliasChoices("CODEX_BIN", "BRIDGE_CODEX_BIN"))
    codex_config: Annotated[list[str], NoDecode] = Field(default_factory=list)  # `key=value` per line -> `-c`
    codex_approval_policy: Literal["on-request", "never"] = "on-request"
    codex_sandbox: Literal["read-only", "workspace-write", "danger-full-access"] = "workspace-write"
    codex_request_timeout: float = Field(60.0, gt=0)

    # Feishu / Lark channel (enabled when the app id and secret are set).
    feishu_app_id: str = Field("", validation_alias="FEISHU_APP_ID")
    feishu_app_secret: SecretStr = Field(SecretStr(""), validation_alias="FEISHU_APP_SECRET")
    feishu_verification_token: SecretStr = Field(SecretStr(""), validation_alias="FEISHU_VERIFICATION_TOKEN")
    feishu_encrypt_key: SecretStr = Field(SecretStr(""), validation_alias="FEISHU_ENCRYPT_KEY")
    feishu_domain: str = Field("https://open.feishu.cn", validation_alias="FEISHU_DOMAIN")
    feishu_connection: Literal["webhook", "websocket"] = Field("webhook", validation_alias="FEISHU_CONNECTION")
    feishu_stale_after: float = Field(600.0, gt=0, validation_alias="FEISHU_STALE_AFTER")
    feishu_group_trigger: Literal["mention", "all"] = Field("mention", validation_alias="FEISHU_GROUP_TRIGGER")
    feishu_conversation_scope: Literal["chat", "thread", "user"] = Field(
        "chat", validation_alias="FEISHU_CONVERSATION_SCOPE")
    feishu_chat_policies: Annotated[dict[str, dict[str, str]], NoDecode] = Field(
        default_factory=dict, validation_alias="FEISHU_CHAT_POLICIES")
    feishu_allowed_users: Annotated[list[str], NoDecode] = Field(default_factory=list,
                                                                 validation_alias="FEISHU_ALLOWED_USERS")
    feishu_allowed_chats: Annotated[list[str], NoDecode] = Field(default_factory=list,
                                                                 validation_alias="FEISHU_ALLOWED_CHATS")
    feishu_reactions: bool = Field(True, validation_alias="FEISHU_REACTIONS")

    # Slack channel (enabled when the bot token is set).
    slack_bot_token: SecretStr = Field(SecretStr(""), validation_alias="SLACK_BOT_TOKEN")
    slack_signing_secret: SecretStr = Field(SecretStr(""), validation_alias="SLACK_SIGNING_SECRET")
    slack_app_token: SecretStr = Field(SecretStr(""), validation_alias="SLACK_APP_TOKEN")
    slack_api_url: str = Field("https://slack.com/api/", validation_alias="SLACK_API_URL")
    slack_format: Literal["markdown", "mrkdwn"] = Field("markdown", validation_alias="SLACK_FORMAT")
    slack_group_trigger: Literal["mention", "all"] = Field("mention", validation_alias="SLACK_GROUP_TRIGGER")
    slack_conversation_scope: Literal["chat", "thread", "user"] = Field(
        "thread", validation_alias="SLACK_CONVERSATION_SCOPE")
    slack_allowed_users: Annotated[list[str], NoDecode] = Field(default_factory=list,
                                                                validation_alias="SLACK_ALLOWED_USERS")
    slack_allowed_channels: Annotated[list[str], NoDecode] = Field(default_factory=list,
                                                                   validation_alias="SLACK_ALLOWED_CHANNELS")
    slack_reactions: bool = Field(True, validation_alias="SLACK_REACTIONS")

    # Routines: one YAML file per routine (default: <data dir>/routines).
    routines_dir: Path | None = None

    # Pipeline.
    busy_policy: Literal["queue", "steer", "interrupt"] = "queue"
    allowed_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list)  # `:`-separated; /cwd binds inside
    max_concurrent_turns: int = Field(32, ge=1)
    # A turn running longer than this (seconds; waiting for a person's approval not counted) is
    # stopped and said so, so a stalled runtime cannot hold its conversation for good. 0: no limit.
    turn_timeout: float = Field(3600.0, ge=0)
    # Burst pacing: above this many messages a second (0: off), turns start at most
    # `burst_turn_starts` a second until the burst is over; acknowledgements go first.
    burst_rate: float = Field(200.0, ge=0)
    burst_turn_starts: float = Field(20.0, gt=0)
    shutdown_timeout: float = Field(20.0, ge=0)
    approval_timeout: float = Field(1800.0, gt=0)
    approval_on_expiry: Literal["decline", "interrupt"] = "decline"
    approval_rules: Path | None = None  # default: templates/approval-rules.yaml

    # Delivery.
    delivery_max_attempts: int = Field(8, ge=1)
    delivery_base_delay: float = Field(0.5, gt=0)
    delivery_max_delay: float = Field(60.0, gt=0)

    @field_validator("runtime")
    @classmethod
    def _available(cls, value: str) -> str:
        if value == "claude":
            raise ValueError("the claude runtime is not available yet; use shell or codex")
        return value

    @field_validator("admins", mode="before")
    @classmethod
    def _split_admins(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("admins")
    @classmethod
    def _qualified_admins(cls, value: list[str]) -> list[str]:
        for item in value:
            channel, sep, user = item.partition(":")
            if not sep or not channel or not user:
                raise ValueError(f"{item!r} is not channel-qualified (expected e.g. webchat:alice)")
        return value

    @field_validator("allowed_roots", mode="before")
    @classmethod
    def _split_roots(cls, value: object) -> object:
        if isinstance(value, str):
            return [item for item in value.split(":") if item.strip()]
        return value

    @field_validator("feishu_allowed_users", "feishu_allowed_chats", "slack_allowed_users", "slack_allowed_channels",
                     mode="before")
    @classmethod
    def _split_ids(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("feishu_chat_policies", mode="before")
    @classmethod
    def _parse_policies(cls, value: object) -> object:
        if isinstance(value, str):
            if not value.strip():
                return {}
            try:
                value = json.loads(value)
            except ValueError as exc:
                raise ValueError(f"not JSON: {exc}") from None
        if isinstance(value, dict):
            for chat, policy in value.items():
                if not isinstance(policy, dict) or set(policy) - {"trigger", "scope"}:
                    raise ValueError(f"{chat}: expected {{\"trigger\": \"mention|all\", \"scope\": \"chat|thread|user\"}}")
                if policy.get("trigger", "mention") not in ("mention", "all"):
                    raise ValueError(f"{chat}: trigger must be mention or all")
                if policy.get("scope", "chat") not in ("chat", "thread", "user"):
                    raise ValueError(f"{chat}: scope must be chat, thread or user")
        return value

    @field_validator("slack_api_url")
    @classmethod
    def _slack_url(cls, value: str) -> str:
        if not value.startswith(("https://", "http://127.0.0.1", "http://localhost", "http://[::1]")):
            raise ValueError("must be https:// (plain http only for 127.0.0.1 / localhost)")
        return value if value.endswith("/") else value + "/"

    @field_validator("slack_bot_token")
    @classmethod
    def _bot_token(cls, value: SecretStr) -> SecretStr:
        if value.get_secret_value() and not value.get_secret_value().startswith("xoxb-"):
            raise ValueError("a bot token starts with xoxb-")
        return value

    @field_validator("slack_app_token")
    @classmethod
    def _app_token(cls, value: SecretStr) -> SecretStr:
        if value.get_secret_value() and not value.get_secret_value().startswith("xapp-"):
            raise ValueError("an app-level token starts with xapp-")
        return value

    @field_validator("feishu_domain")
    @classmethod
    def _domain(cls, value: str) -> str:
        value = value.rstrip("/")
        if not value.startswith(("https://", "http://127.0.0.1", "http://localhost", "http://[::1]")):
            raise ValueError("must be https:// (plain http only for 127.0.0.1 / localhost)")
        return value

    @field_validator("codex_config", mode="before")
    @classmethod
    def _split_codex_config(cls, value: object) -> object:
        if isinstance(value, str):
            return [line.strip() for line in value.replace("\\n", "\n").splitlines()
                    if line.strip() and not line.strip().startswith("#")]
        return value

    @field_validator("codex_config")
    @classmethod
    def _key_value_lines(cls, value: list[str]) -> list[str]:
        for line in value:
            key, sep, _ = line.partition("=")
            if not sep or not key.strip():
                raise ValueError(f"{line!r} is not key=value (one Codex config override per line)")
        return value

    @field_validator("http_workers")
    @classmethod
    def _workers(cls, value: int | str) -> int | str:
        if isinstance(value, int) and not 0 <= value <= 32:
            raise ValueError("must be auto or a number from 0 to 32")
        return value

    @field_validator("log_level", mode="before")
    @classmethod
    def _upper_level(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("database_url")
    @classmethod
    def _known_driver(cls, value: str) -> str:
        if value and not value.startswith(("sqlite+aiosqlite://", "postgresql+asyncpg://")):
            raise ValueError("must start with sqlite+aiosqlite:// or postgresql+asyncpg://")
        return value

    @model_validator(mode="after")
    def _derive_paths(self) -> "Settings":
        if not self.database_url:
            self.database_url = f"sqlite+aiosqlite:///{(self.data_dir / 'bridge.db').resolve()}"
        if self.workspace is None:
            self.workspace = self.data_dir / "workspace"
        if self.routines_dir is None:
            self.routines_dir = self.data_dir / "routines"
        self.workspace = self.workspace.resolve()
        self.allowed_roots = [Path(p).expanduser().resolve() for p in self.allowed_roots] or [self.workspace]
        if not self.replica_id:
            self.replica_id = f"{socket.gethostname()}:{self.data_dir.resolve()}"[-128:]
        return self

    @property
    def slack_enabled(self) -> bool:
        return bool(self.slack_bot_token.get_secret_value())

    @property
    def feishu_enabled(self) -> bool:
        return bool(self.feishu_app_id and self.feishu_app_secret.get_secret_value())

    @field_validator("codex_bin")
    @classmethod
    def _command_line(cls, value: str) -> str:
        # a command line, split as a shell would (e.g. `npx @openai/codex`)
        try:
            argv = shlex.split(value)
        except ValueError as exc:
            raise ValueError(f"not a command line: {exc}") from None
        if not argv:
            raise ValueError("must name the codex command")
        return value

    @model_validator(mode="after")
    def _feishu_pair(self) -> "Settings":
        if bool(self.feishu_app_id) != bool(self.feishu_app_secret.get_secret_value()):
            raise ValueError("FEISHU_APP_ID and FEISHU_APP_SECRET must be set together")
        if (self.feishu_enabled and self.feishu_connection == "webhook"
                and not (self.feishu_verification_token.get_secret_value() or self.feishu_encrypt_key.get_secret_value())):
            # unchecked, anyone who reaches the port could post events and card clicks as anyone
            raise ValueError("FEISHU_VERIFICATION_TOKEN or FEISHU_ENCRYPT_KEY: webhook mode needs at least one "
                             "(from the app's Events and Callbacks page), or set FEISHU_CONNECTION=websocket")
        return self

    @property
    def edge_workers(self) -> int:
        """How many HTTP edge workers to run (BRIDGE_HTTP_WORKERS, `auto` resolved)."""
        if self.http_workers == "auto":
            return 1 if len(os.sched_getaffinity(0)) >= 2 else 0
        return int(self.http_workers)

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def is_admin(self, channel: str, user_id: str) -> bool:
        return f"{channel}:{user_id}" in self.admins


def _env_name(loc: tuple[object, ...]) -> str:
    if not loc:
        return "(settings)"
    field = str(loc[0])
    if field.isupper():
        return field  # a fixed name (FEISHU_APP_ID, CODEX_BIN)
    alias = Settings.model_fields.get(field)
    if alias is not None and isinstance(alias.validation_alias, str):
        return alias.validation_alias
    return f"BRIDGE_{field.upper()}"


def load_settings(**overrides: object) -> Settings:
    """Build the settings, raising ConfigError with one line per invalid setting."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        # one entry per setting: a setting of several types (`3` or `auto`) fails once per type
        found: dict[str, tuple[list[str], str]] = {}
        for err in exc.errors():
            name = _env_name(err.get("loc", ()))
            value = err.get("input")
            shown = f" (got {value!r})" if isinstance(value, (str, int, float)) else ""
            messages, _ = found.setdefault(name, ([], shown))
            messages.append(plain_message(err))
        raise ConfigError("; ".join(f"invalid setting {name}: {', or '.join(messages)}{shown}"
                                    for name, (messages, shown) in found.items())) from None
