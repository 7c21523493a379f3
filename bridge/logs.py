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


class FailureStreak:
    """For a loop that outlives its failures (a store outage fails every round): the first failure
    is logged with its traceback, then one line every `every` failures, and the recovery once."""

    def __init__(self, what: str, *, every: int = 60) -> None:
        self.what = what
        self.every = every
        self.count = 0

    def failed(self, exc: BaseException) -> None:
        self.count += 1
        if self.count == 1:
            logger.opt(exception=exc, depth=1).error("{} failed", self.what)
        elif self.count % self.every == 0:
            logger.opt(depth=1).error("{} still failing ({} in a row): {}: {}", self.what, self.count, type(exc).__name__,
                         str(exc).splitlines()[0] if str(exc) else "")

    def ok(self) -> None:
        if self.count:
            logger.opt(depth=1).info("{} works again after {} failures", self.what, self.count)
            self.count = 0
