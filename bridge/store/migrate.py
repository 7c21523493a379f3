"""Schema migrations (Alembic, in `migrations/`): applied on `serve` and by `agent-bridge db upgrade`.

The service checks the schema's revision with one plain query; only when it is behind does it run
Alembic, in a short-lived child process, so the long-running service never carries Alembic's
modules (about 14 MB).
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

import migrations

MIGRATIONS_DIR = Path(migrations.__file__).resolve().parent
HEAD = migrations.HEAD


class MigrationError(RuntimeError):
    pass


def alembic_config(url: str):
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


async def upgrade(engine: AsyncEngine, revision: str = "head") -> None:
    """Upgrade the database behind `engine` to `revision`, in this process."""
    from alembic import command

    def _upgrade(connection) -> None:
        config = alembic_config(engine.url.render_as_string(hide_password=False))
        config.attributes["connection"] = connection
        command.upgrade(config, revision)

    async with engine.begin() as conn:
        await conn.run_sync(_upgrade)


async def current_revision(engine: AsyncEngine) -> str | None:
    """The schema's revision, or None for an empty database (one plain query, no Alembic)."""
    async with engine.connect() as conn:
        try:
            return (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar()
        except Exception:  # noqa: BLE001 - no alembic_version table yet
            return None


async def ensure_schema(engine: AsyncEngine) -> None:
    """Bring the schema to HEAD, running Alembic in a child process only when it is behind."""
    if await current_revision(engine) == HEAD:
        return
    url = engine.url.render_as_string(hide_password=False)
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bridge.store.migrate", stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
        env={**os.environ, "BRIDGE_MIGRATE_URL": url},
    )
    output, _ = await child.communicate()
    if child.returncode != 0:
        raise MigrationError(f"database migration failed:\n{output.decode(errors='replace')[-4000:]}")


async def _main() -> None:
    from bridge.store.db import make_engine

    engine = make_engine(os.environ["BRIDGE_MIGRATE_URL"], pool_size=1)
    try:
        await upgrade(engine)
    finally:
        await engine.dispose()


if __name__ == "__main__":
    asyncio.run(_main())
