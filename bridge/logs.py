"""Logging with loguru: structured records carrying conversation, session and turn ids."""

from __future__ import annotations

import sys

from loguru import logger

TEXT_FORMAT = (
    "<green>{time:YYYY-MM-DD HH:mm:ss.SSS}</green> <level>{level: <7}</level> "
    "<cyan>{name}</cyan> {message}"
    "{extra[ids]}"
)


def _ids(record) -> bool:
    extra = record["extra"]
    keys = [k for k in ("edge", "conversation", "session", "turn", "event", "outbox") if k in extra]
    extra["ids"] = (" | " + " ".join(f"{k}={extra[k]}" for k in keys)) if keys else ""
    return True


def setup(level: str = "INFO", fmt: str = "text") -> None:
    logger.remove()
    if fmt == "json":
        logger.add(sys.stderr, level=level, serialize=True, filter=_ids, backtrace=False, diagnose=False)
    else:
        logger.add(sys.stderr, level=level, format=TEXT_FORMAT, filter=_ids, backtrace=False, diagnose=False)
