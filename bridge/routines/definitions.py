"""Routine definitions: one YAML file per routine in the routines directory.

A file that does not parse or validate is reported (file and reason) and skipped; the others
load. Due times come from a 5-field cron expression in a time zone (croniter), or a fixed
interval in seconds.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import yaml
from croniter import croniter
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

LIMIT = 1000  # due times listed at once (catch_up: all runs a long outage's in batches of this many)


class Routine(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
    schedule: str | None = None  # 5-field cron
    timezone: str = "UTC"
    interval: float | None = Field(None, gt=0)  # seconds
    runtime: str | None = None  # default: the service's
    prompt: str | None = None
    command: str | None = None  # for the shell runtime
    workspace: str | None = None
    targets: list[str] = Field(default_factory=list)  # channel:chat
    session: Literal["reuse", "fresh"] = "reuse"
    timeout: float = Field(1800.0, gt=0)
    catch_up: Literal["skip", "latest", "all"] = "latest"
    enabled: bool = True
    kind: Literal["turn", "digest"] = "turn"

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str | None) -> str | None:
        if value is not None and (len(value.split()) != 5 or not croniter.is_valid(value)):
            raise ValueError(f"{value!r} is not a 5-field cron expression")
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {value!r}") from None
        return value

    @field_validator("targets")
    @classmethod
    def _targets(cls, value: list[str]) -> list[str]:
        for target in value:
            channel, sep, chat = target.partition(":")
            if not sep or not channel or not chat:
                raise ValueError(f"target {target!r} is not channel:chat (e.g. webchat:c-team, feishu:oc_123)")
        return value

    @model_validator(mode="after")
    def _when_and_what(self) -> "Routine":
        if (self.schedule is None) == (self.interval is None):
            raise ValueError("give exactly one of `schedule` (cron) and `interval` (seconds)")
        if self.kind == "turn" and not (self.prompt or self.command):
            raise ValueError("a turn routine needs a `prompt` (or a `command` for the shell runtime)")
        return self

    @property
    def text(self) -> str:
        return self.command or self.prompt or ""

    def next_due(self, after: float) -> float:
        """The first due time strictly after `after` (epoch seconds).

        Cron times are local times in the routine's zone (croniter). A local time the clocks skip
        (spring forward) runs once, at the moment they jump. A local time that occurs twice (fall
        back) runs once, the first time, unless the schedule runs every hour (its hour field is
        `*`): then it keeps to the hours that pass, and runs in both."""
        if self.interval is not None:
            return after + self.interval
        zone = ZoneInfo(self.timezone)
        due = after
        for _ in range(1500):  # the times of a repeated hour (at most one per minute) are skipped
            due = croniter(self.schedule, datetime.fromtimestamp(due, zone)).get_next(datetime).timestamp()
            if not self._repeated(due, zone):
                return due
        return due

    def _repeated(self, due: float, zone: ZoneInfo) -> bool:
        """`due` is the second occurrence of a local time (after a fall-back) that a schedule with
        fixed hours has already had."""
        return datetime.fromtimestamp(due, zone).fold == 1 and not self._every_hour

    @property
    def _every_hour(self) -> bool:
        hours = croniter(self.schedule).expanded[1]  # type: ignore[arg-type]
        return hours == ["*"] or len(hours) == 24

    def due_between(self, after: float, until: float, limit: int = LIMIT) -> list[float]:
        """Due times in (after, until], oldest first (at most `limit`)."""
        out = []
        due = self.next_due(after)
        while due <= until and len(out) < limit:
            out.append(due)
            due = self.next_due(due)
        return out

    def latest_before(self, after: float, before: float) -> float | None:
        """The newest due time in (after, before), found backwards from `before` without walking
        the ones in between (a long outage of an every-minute routine holds very many)."""
        if before <= after:
            return None
        if self.interval is not None:
            steps = math.ceil((before - after) / self.interval) - 1
            return after + steps * self.interval if steps >= 1 else None
        zone = ZoneInfo(self.timezone)
        it = croniter(self.schedule, datetime.fromtimestamp(before, zone))  # type: ignore[arg-type]
        for _ in range(1500):  # past the skipped times of a repeated hour
            due = it.get_prev(datetime).timestamp()
            if due <= after:
                return None
            if due < before and not self._repeated(due, zone):
                return due
        return None

    def latest_due(self, after: float, until: float) -> float | None:
        """The newest due time in (after, until], or None."""
        newest = self.latest_before(after, until)
        rest = self.due_between(newest if newest is not None else after, until)
        return rest[-1] if rest else newest

    def period_ending(self, at: float) -> tuple[float, float]:
        """The period a run at `at` covers, `(since, at)`: at a due time, the time since the due
        time before it; at another time (a manual run), as long as the latest whole period."""
        if self.interval is not None:
            return at - self.interval, at
        end = self.latest_due(0.0, at)
        start = self.latest_before(0.0, end) if end is not None else None
        if end is None or start is None:
            return at - 86400.0, at
        return at - (end - start), at

    def describe_schedule(self) -> str:
        return f"every {self.interval:g}s" if self.interval is not None else f"{self.schedule} ({self.timezone})"


@dataclass(frozen=True, slots=True)
class LoadError:
    file: str
    reason: str


def load_dir(directory: Path) -> tuple[dict[str, Routine], list[LoadError]]:
    routines: dict[str, Routine] = {}
    errors: list[LoadError] = []
    if not directory.is_dir():
        return routines, errors
    for path in sorted([*directory.glob("*.yaml"), *directory.glob("*.yml")]):
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            if not isinstance(data, dict):
                raise ValueError("expected a mapping of routine keys")
            routine = Routine.model_validate(data)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f":{mark.line + 1}" if mark is not None else ""
            errors.append(LoadError(f"{path}{where}", str(getattr(exc, "problem", exc))))
            continue
        except ValidationError as exc:
            err = exc.errors()[0]
            loc = ".".join(str(p) for p in err.get("loc", ())) or "(routine)"
            errors.append(LoadError(str(path), f"{loc}: {err.get('msg')}"))
            continue
        except (OSError, ValueError) as exc:
            errors.append(LoadError(str(path), str(exc)))
            continue
        if routine.name in routines:
            errors.append(LoadError(str(path), f"a routine named {routine.name!r} is defined twice"))
            continue
        routines[routine.name] = routine
    return routines, errors


def utc(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
