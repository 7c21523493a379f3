"""Routines: the scheduler with a controllable clock against the real store (SQLite, and two
instances on one PostgreSQL database), and the service end to end through the web chat."""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import select

from bridge.approvals import rules
from bridge.approvals.gate import HumanGate
from bridge.delivery.outbox import Outbox
from bridge.metrics import Metrics
from bridge.routines.definitions import Routine, load_dir
from bridge.routines.scheduler import RoutineRunner, Scheduler
from bridge.runtimes.shell import ShellRuntime
from bridge.store import migrate
from bridge.store.db import Database
from bridge.store.schema import outbox as outbox_table
from bridge.store.schema import routine_runs
from tests.support.chat import final_texts
from tests.support.databases import postgres_database

T0 = 1_800_000_000.0  # a fixed start: 2027-01-15 08:00 UTC


class Clock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def write(directory: Path, name: str, body: str) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{name}.yaml").write_text(body)


async def make(db_url: str, directory: Path, clock: Clock, tmp_path: Path, owner: str = "a") -> tuple[Scheduler, Database]:
    db = Database(db_url)
    await migrate.upgrade(db.writer_engine)
    await db.start()
    outbox = Outbox(db.dialect)
    runtime = ShellRuntime(timeout=30, output_limit=3500)
    gate = HumanGate(db, outbox, Metrics(), rules=rules.load(None), timeout=60, admins=[])
    runner = RoutineRunner(db, outbox, runtime, gate, workspace=str(tmp_path / "ws"), clock=clock)
    scheduler = Scheduler(db, runner, outbox, directory=directory, clock=clock, owner=owner)
    scheduler.reload()
    return scheduler, db


async def settle(scheduler: Scheduler) -> None:
    """Let the runs a tick started finish."""
    while scheduler._running:
        await asyncio.gather(*scheduler._running.values(), return_exceptions=True)


async def tick(scheduler: Scheduler) -> None:
    await scheduler.tick()
    await settle(scheduler)


async def sent(db: Database) -> list[tuple[str, str]]:
    async def rows(conn):
        return (await conn.execute(select(outbox_table.c.conversation_key, outbox_table.c.payload)
                                   .where(outbox_table.c.op == "send").order_by(outbox_table.c.id))).all()

    out = []
    for key, payload in await db.read(rows):
        data = payload if isinstance(payload, dict) else json.loads(payload)
        card = data.get("card")
        out.append((key, (card["body"] if card else data["text"])))
    return out


async def runs(db: Database) -> list:
    async def rows(conn):
        return (await conn.execute(select(routine_runs).order_by(routine_runs.c.due_at))).all()

    return await db.read(rows)


@pytest.fixture
async def sqlite(tmp_path):
    created = []

    async def _make(directory, clock, owner="a"):
        scheduler, db = await make(f"sqlite+aiosqlite:///{tmp_path / 'r.db'}", directory, clock, tmp_path, owner)
        created.append((scheduler, db))
        return scheduler, db

    yield _make
    for scheduler, db in created:
        await scheduler.stop()
        await db.close()


EVERY_MINUTE = """
name: ping
schedule: "* * * * *"
command: "echo pong-{n}"
targets: [webchat:c-ops, webchat:c-team]
catch_up: {catch_up}
"""


async def test_a_due_routine_runs_once_and_is_delivered_once_per_target(sqlite, tmp_path):
    routines, clock = tmp_path / "routines", Clock()
    write(routines, "ping", EVERY_MINUTE.format(n=1, catch_up="latest"))
    scheduler, db = await sqlite(routines, clock)
    await tick(scheduler)  # first sight: starts from now
    assert await runs(db) == []
    clock.now = T0 + 61
    await tick(scheduler)
    await tick(scheduler)  # the same due time again: nothing
    assert [r.status for r in await runs(db)] == ["completed"]
    assert [(key, "pong-1" in text) for key, text in await sent(db)] == [("webchat:c-ops", True),
                                                                        ("webchat:c-team", True)]
    clock.now = T0 + 121
    await tick(scheduler)
    assert len(await runs(db)) == 2 and len(await sent(db)) == 4


async def test_a_restart_between_due_time_and_run_still_runs_it_once(sqlite, tmp_path):
    routines, clock = tmp_path / "routines", Clock()
    write(routines, "ping", EVERY_MINUTE.format(n=2, catch_up="skip"))
    first, db = await sqlite(routines, clock)
    await tick(first)
    await first.stop()
    clock.now = T0 + 70  # down over the due time, back 10 s later
    second, _ = await sqlite(routines, clock, owner="b")
    await tick(second)
    await tick(second)
    assert [r.status for r in await runs(db)] == ["completed"]
    assert len(await sent(db)) == 2


@pytest.mark.parametrize("policy,statuses,notes", [
    ("skip", ["missed"], 1),
    ("latest", ["completed"], 1),
    ("all", ["completed", "completed", "completed"], 3),
])
async def test_downtime_across_three_due_times_follows_catch_up(sqlite, tmp_path, policy, statuses, notes):
    routines, clock = tmp_path / "routines", Clock()
    write(routines, "ping", EVERY_MINUTE.format(n=3, catch_up=policy).replace("* * * * *", "*/5 * * * *"))
    scheduler, db = await sqlite(routines, clock)
    await tick(scheduler)
    clock.now = T0 + 15 * 60 + 100  # three due times passed while down, the newest 100 s ago
    await tick(scheduler)
    assert [r.status for r in await runs(db)] == statuses
    messages = [text for key, text in await sent(db) if key == "webchat:c-ops"]
    assert sum(("missed" in text) for text in messages) == notes
    await tick(scheduler)
    assert len(await runs(db)) == len(statuses)  # handled once


async def test_a_failing_routine_says_so_and_stays_scheduled(sqlite, tmp_path):
    routines, clock = tmp_path / "routines", Clock()
    write(routines, "broken", 'name: broken\ninterval: 60\ncommand: "exit 3"\ntargets: [webchat:c-ops]\n'
                              'runtime: nosuch\n')
    scheduler, db = await sqlite(routines, clock)
    await tick(scheduler)
    clock.now = T0 + 61
    await tick(scheduler)
    clock.now = T0 + 122
    await tick(scheduler)
    assert [r.status for r in await runs(db)] == ["failed", "failed"]
    assert all("failed" in text for _, text in await sent(db))


async def test_invalid_files_are_reported_and_the_others_load(tmp_path):
    routines = tmp_path / "routines"
    write(routines, "good", 'name: good\ninterval: 60\ncommand: "echo ok"\ntargets: [webchat:c]\n')
    write(routines, "bad-cron", 'name: bad\nschedule: "61 * * * *"\ncommand: x\n')
    write(routines, "bad-yaml", 'name: [unclosed\n')
    write(routines, "bad-target", 'name: t\ninterval: 5\ncommand: x\ntargets: [nochannel]\n')
    loaded, errors = load_dir(routines)
    assert list(loaded) == ["good"]
    reasons = {Path(e.file.split(":")[0]).name: e.reason for e in errors}
    assert set(reasons) == {"bad-cron.yaml", "bad-yaml.yaml", "bad-target.yaml"}
    assert "cron" in reasons["bad-cron.yaml"] and "channel:chat" in reasons["bad-target.yaml"]


@pytest.fixture
async def pg_url():
    async with postgres_database() as url:
        yield url


@pytest.mark.postgres
async def test_two_instances_on_one_postgres_run_each_due_time_once(tmp_path, pg_url):
    routines, clock = tmp_path / "routines", Clock()
    write(routines, "ping", EVERY_MINUTE.format(n=4, catch_up="latest"))
    a, db_a = await make(pg_url, routines, clock, tmp_path, owner="a")
    b, db_b = await make(pg_url, routines, clock, tmp_path, owner="b")
    try:
        await asyncio.gather(a.tick(), b.tick())
        for minute in range(1, 4):
            clock.now = T0 + minute * 60 + 1
            await asyncio.gather(a.tick(), b.tick())
            await asyncio.gather(settle(a), settle(b))
        statuses = [r.status for r in await runs(db_a)]
        assert statuses == ["completed"] * 3
        assert len(await sent(db_a)) == 6  # two targets, once each per run
    finally:
        for scheduler, db in ((a, db_a), (b, db_b)):
            await scheduler.stop()
            await db.close()


# -- the service


def routine_env(tmp_path, body: str, name: str) -> dict[str, str]:
    directory = tmp_path / "routines"
    write(directory, name, body)
    return {"BRIDGE_ROUTINES_DIR": str(directory)}


async def test_an_interval_routine_delivers_once_per_due_time_across_a_restart(bridge, chat, tmp_path):
    env = routine_env(tmp_path, 'name: tick\ninterval: 2\ncommand: "echo tick"\ntargets: [webchat:c-tick]\n'
                                'catch_up: skip\n', "tick")
    proc = bridge(**env)
    c = chat(proc)

    def cards(msgs):
        return [m for m in msgs if m["card"] and "tick" in m["card"]["body"]]

    await c.wait_for("c-tick", lambda msgs: len(cards(msgs)) >= 2, timeout=15)
    proc.stop()
    proc.start()
    await c.wait_for("c-tick", lambda msgs: len(cards(msgs)) >= 4, timeout=20)
    proc.stop()
    with sqlite3.connect(proc.data_dir / "bridge.db") as db:
        delivered = db.execute("SELECT count(*) FROM webchat_messages WHERE conversation_id = 'c-tick' "
                               "AND role = 'bot'").fetchone()[0]
        runs = db.execute("SELECT due_at, status FROM routine_runs WHERE routine = 'tick'").fetchall()
    completed = [due for due, status in runs if status == "completed"]
    interrupted = [due for due, status in runs if status == "interrupted"]  # a stop that fell during a run
    assert len(completed) >= 4
    assert delivered == len(completed) + len(interrupted)  # one message per run, none twice, none lost
    assert len(set(completed)) == len(completed)
    assert all(b - a >= 2 for a, b in zip(sorted(completed), sorted(completed)[1:]))


async def test_cli_runs_the_digest_and_chat_lists_routines(bridge, chat, tmp_path):
    digest = (Path(__file__).resolve().parents[2] / "templates" / "routines" / "nightly-digest.yaml").read_text()
    env = routine_env(tmp_path, digest.replace("webchat:c-team", "webchat:c-digest"), "nightly-digest")
    proc = bridge(BRIDGE_ADMINS="webchat:root", **env)
    c = chat(proc)
    await c.post("c-work", "alice", "echo some-work")
    await c.wait_for("c-work", lambda msgs: [t for t in final_texts(msgs) if "exit 0" in t])
    out = subprocess.run([sys.executable, "-m", "bridge", "routines", "run", "nightly-digest"],
                         env={**{k: v for k, v in os.environ.items() if not k.startswith("BRIDGE_")},
                              "BRIDGE_DATA_DIR": str(proc.data_dir), **env}, capture_output=True, text=True,
                         cwd=proc.data_dir, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "webchat:c-work" in out.stdout and "1 completed" in out.stdout
    messages = await c.wait_for("c-digest", lambda msgs: [m for m in msgs if m["card"]], timeout=15)
    assert "webchat:c-work" in messages[0]["card"]["body"]
    await c.post("c-admin", "root", "/routines")
    listing = (await c.wait_for("c-admin", lambda msgs: [t for t in final_texts(msgs) if "Routines:" in t]))[0]
    assert "nightly-digest" in listing and "0 22 * * *" in listing and "last: completed" in listing
    await c.post("c-admin", "mallory", "/routines run nightly-digest")
    await c.wait_for("c-admin", lambda msgs: [t for t in final_texts(msgs) if "for admins" in t])
    await c.post("c-admin", "root", "/routines run nightly-digest")
    await c.wait_for("c-admin", lambda msgs: [t for t in final_texts(msgs) if "Running `nightly-digest` now" in t])
    await c.wait_for("c-digest", lambda msgs: len([m for m in msgs if m["card"]]) == 2, timeout=15)


# -- local time zones: daylight saving time


def _ny(text: str) -> float:
    """A local time in New York ("2026-11-01 01:30", fold 0: the first occurrence)."""
    return datetime.fromisoformat(text).replace(tzinfo=ZoneInfo("America/New_York")).timestamp()


async def _minute_ticks(scheduler: Scheduler, clock: Clock, start: float, hours: int) -> None:
    clock.now = start
    await tick(scheduler)
    for _ in range(hours * 60):
        clock.now += 60
        await tick(scheduler)


@pytest.mark.parametrize("schedule,night,due", [
    # fall back (2026-11-01): 01:00-01:59 happens twice; the routine runs at the first 01:30 only
    ("30 1 * * *", "2026-11-01", "2026-11-01 01:30"),
    # spring forward (2026-03-08): 02:30 never happens; croniter runs it once, at 03:00 EDT
    ("30 2 * * *", "2026-03-08", "2026-03-08 03:00"),
])
async def test_a_daily_local_time_runs_once_across_a_dst_change(sqlite, tmp_path, schedule, night, due):
    routines, clock = tmp_path / "routines", Clock()
    write(routines, "nightly", f'name: nightly\nschedule: "{schedule}"\ntimezone: America/New_York\n'
                               f'command: "echo night"\ntargets: [webchat:c-ops]\n')
    scheduler, db = await sqlite(routines, clock)
    await _minute_ticks(scheduler, clock, _ny(f"{night} 00:00"), hours=4)
    assert [r.due_at for r in await runs(db)] == [_ny(due)]
    assert len(await sent(db)) == 1


def test_fall_back_repeats_fixed_times_once_and_keeps_hourly_schedules_to_the_hours():
    def local(routine, start: str, hours: int) -> list[str]:
        zone = ZoneInfo("America/New_York")
        return [datetime.fromtimestamp(d, zone).strftime("%H:%M %Z")
                for d in routine.due_between(_ny(start), _ny(start) + hours * 3600)]

    def cron(schedule: str) -> Routine:
        return Routine(name="r", schedule=schedule, timezone="America/New_York", command="x")

    assert local(cron("*/20 1 * * *"), "2026-11-01 00:30", 4) == ["01:00 EDT", "01:20 EDT", "01:40 EDT"]
    assert local(cron("0 * * * *"), "2026-11-01 00:30", 3) == ["01:00 EDT", "01:00 EST", "02:00 EST"]
    assert local(cron("0 * * * *"), "2026-03-08 00:30", 3) == ["01:00 EST", "03:00 EDT", "04:00 EDT"]


@pytest.mark.parametrize("policy,status", [("latest", "completed"), ("skip", "missed")])
async def test_a_long_outage_is_handled_at_its_newest_due_time(sqlite, tmp_path, policy, status):
    routines, clock = tmp_path / "routines", Clock()
    write(routines, "ping", EVERY_MINUTE.format(n=5, catch_up=policy).replace("* * * * *", "*/5 * * * *"))
    scheduler, db = await sqlite(routines, clock)
    await tick(scheduler)
    newest = T0 + 3000 * 300  # 3000 due times passed while down (over the 1000 listed at once)
    clock.now = newest + 100
    await tick(scheduler)
    await tick(scheduler)
    assert [(r.due_at, r.status) for r in await runs(db)] == [(newest, status)]
    notes = [text for key, text in await sent(db) if key == "webchat:c-ops"]
    assert len(notes) == 1 and "more than 1000 runs" in notes[0] and "2027-01-25 18:00:00 UTC" in notes[0]


@pytest.mark.parametrize("routine", [
    Routine(name="r", interval=7.5, command="x"),
    Routine(name="r", schedule="*/7 1-3 * * *", timezone="America/New_York", command="x"),
    Routine(name="r", schedule="0 * * * *", timezone="America/New_York", command="x"),
])
def test_the_newest_due_time_found_backwards_is_the_last_one_listed(routine):
    for start in (_ny("2026-10-31 12:00"), _ny("2026-03-07 12:00")):  # across both DST changes
        for span in (0, 1, 59, 3600, 86400 + 0.5, 2 * 86400):
            listed = routine.due_between(start, start + span, limit=100_000)
            newest = routine.latest_due(start, start + span)
            assert newest == pytest.approx(listed[-1]) if listed else newest is None


async def test_a_digest_covers_the_period_it_was_due_for_however_late_it_runs(sqlite, tmp_path, monkeypatch):
    from bridge.routines import digest

    windows = []
    real = digest.activity

    async def activity(conn, since, until):
        windows.append((since, until))
        return await real(conn, since, until)

    monkeypatch.setattr(digest, "activity", activity)
    routines, clock = tmp_path / "routines", Clock()  # T0 is 08:00 UTC
    write(routines, "digest", 'name: digest\nkind: digest\nschedule: "0 22 * * *"\ntargets: [webchat:c-team]\n'
                              'catch_up: all\n')
    scheduler, db = await sqlite(routines, clock)
    await tick(scheduler)
    night1, night2 = T0 + 14 * 3600, T0 + 38 * 3600  # 22:00 on the 15th and the 16th
    clock.now = night2 + 5 * 3600  # down over both nights, back at 03:00 on the 17th
    await tick(scheduler)
    assert windows == [(night1 - 86400, night1), (night2 - 86400, night2)]
    titles = [text for _, text in await sent(db)]
    assert "2027-01-15" in titles[0] and "2027-01-16" in titles[1]
    clock.now += 1800
    await scheduler.run_now("digest")  # a manual run: the day up to now
    await settle(scheduler)
    assert windows[-1] == (clock.now - 86400, clock.now)


def test_a_digest_period_follows_the_schedule_and_is_labelled_by_its_day():
    from bridge.routines.digest import label

    nightly = Routine(name="d", kind="digest", schedule="0 22 * * *", timezone="America/New_York")
    due = _ny("2026-11-01 22:00")  # the day the clocks went back: 25 hours since the night before
    assert nightly.period_ending(due) == (_ny("2026-10-31 22:00"), due)
    assert label(*nightly.period_ending(due), "America/New_York") == "2026-11-01"
    midnight = Routine(name="d", kind="digest", schedule="0 0 * * *")
    assert label(*midnight.period_ending(T0 + 16 * 3600), "UTC") == "2027-01-15"  # 00:00 on the 16th
    weekly = Routine(name="d", kind="digest", schedule="0 9 * * 1")  # T0 + 3 d 1 h: Monday 09:00
    assert label(*weekly.period_ending(T0 + 3 * 86400 + 3600), "UTC") == "2027-01-11 – 2027-01-18"
    assert Routine(name="d", kind="digest", interval=3600).period_ending(T0) == (T0 - 3600, T0)


# -- runs that do not end on their own: shutdown, a crash, a dead process, another's run going

HOURLY = 'name: hourly\ninterval: 3600\ncommand: "{command}"\ntargets: [webchat:c-ops, webchat:c-team]\n'


async def test_a_run_cut_short_by_shutdown_is_reported_once_and_not_run_again(sqlite, tmp_path):
    routines, clock = tmp_path / "routines", Clock()
    write(routines, "hourly", HOURLY.format(command="sleep 30"))
    first, db = await sqlite(routines, clock)
    allow = tmp_path / "rules.yaml"
    allow.write_text('version: 1\npreset: default\nrules:\n  - action: allow\n    command: ["sleep *"]\n')
    first.runner.gate.rules = rules.load(allow)
    await first.tick()
    clock.now = T0 + 3601
    await first.tick()
    for _ in range(100):  # the run is claimed and its command started
        if [r.status for r in await runs(db)] == ["running"]:
            break
        await asyncio.sleep(0.05)
    await asyncio.sleep(0.3)
    await first.stop()
    assert [(r.due_at, r.status) for r in await runs(db)] == [(T0 + 3600, "interrupted")]
    messages = await sent(db)
    assert [key for key, _ in messages] == ["webchat:c-ops", "webchat:c-team"]
    assert all("was interrupted" in text and "2027-01-15 09:00:00 UTC" in text for _, text in messages)
    clock.now = T0 + 3700  # the next start, and later, past the lease: nothing again, nothing twice
    second, _ = await sqlite(routines, clock, owner="b")
    await tick(second)
    clock.now = T0 + 3900
    await tick(second)
    assert len(await runs(db)) == 1 and len(await sent(db)) == 2


async def test_a_run_whose_running_crashes_is_reported_and_logged(sqlite, tmp_path, monkeypatch):
    from loguru import logger

    async def broken(*_args, **_kwargs):
        raise RuntimeError("the outbox broke")

    monkeypatch.setattr(RoutineRunner, "_deliver", broken)
    records: list[dict] = []
    sink = logger.add(lambda message: records.append(message.record), level="ERROR")
    try:
        routines, clock = tmp_path / "routines", Clock()
        write(routines, "hourly", HOURLY.format(command="echo hi"))
        scheduler, db = await sqlite(routines, clock)
        await tick(scheduler)
        clock.now = T0 + 3601
        await tick(scheduler)
        await tick(scheduler)
    finally:
        logger.remove(sink)
    assert [(r.status, r.error) for r in await runs(db)] == [("failed", "RuntimeError: the outbox broke")]
    messages = await sent(db)
    assert len(messages) == 2
    assert all("failed: RuntimeError: the outbox broke" in text and "2027-01-15 09:00:00 UTC" in text
               for _, text in messages)
    assert any(r["extra"].get("routine") == "hourly" and "2027-01-15 09:00:00 UTC" in r["message"]
               for r in records)


async def test_a_run_left_by_a_dead_process_is_reported_when_its_lease_runs_out(sqlite, tmp_path):
    from bridge.routines.scheduler import LEASE
    from bridge.store import routines as repo

    routines, clock = tmp_path / "routines", Clock()
    write(routines, "hourly", HOURLY.format(command="echo hi"))
    scheduler, db = await sqlite(routines, clock)
    await tick(scheduler)
    # another process claimed the due time, and died without a word
    await db.write(lambda c: repo.claim(c, "hourly", T0 + 3600, owner="dead", lease=LEASE, now=T0 + 3601))
    clock.now = T0 + 3630
    await tick(scheduler)
    assert [r.status for r in await runs(db)] == ["running"] and await sent(db) == []
    clock.now = T0 + 3601 + LEASE + 1
    await tick(scheduler)
    await tick(scheduler)
    assert [r.status for r in await runs(db)] == ["interrupted"]
    messages = await sent(db)
    assert len(messages) == 2 and all("process running it stopped" in text for _, text in messages)


async def test_a_due_time_that_comes_while_another_process_runs_the_routine_runs_after_it(sqlite, tmp_path):
    from bridge.routines.scheduler import LEASE
    from bridge.store import routines as repo

    routines, clock = tmp_path / "routines", Clock()
    write(routines, "ping", EVERY_MINUTE.format(n=6, catch_up="latest"))
    scheduler, db = await sqlite(routines, clock)
    await tick(scheduler)
    # `agent-bridge routines run ping` in another process, still going at the due time
    other = await db.write(lambda c: repo.claim(c, "ping", T0 + 30, owner="cli", lease=LEASE, manual=True,
                                                now=T0 + 30))
    clock.now = T0 + 61
    await tick(scheduler)
    assert [r.due_at for r in await runs(db)] == [T0 + 30]
    await db.write(lambda c: repo.finish(c, other, status="completed", output="", error=None, delivered_to=[],
                                         now=T0 + 65))
    clock.now = T0 + 70
    await tick(scheduler)
    assert [(r.due_at, r.status) for r in await runs(db)] == [(T0 + 30, "completed"), (T0 + 60, "completed")]


def held_command(tmp_path: Path) -> str:
    """A read-only command that runs until `release` lets it end: `cat` of a FIFO in the workspace."""
    (tmp_path / "ws").mkdir(exist_ok=True)
    os.mkfifo(tmp_path / "ws" / "gate")
    return "cat gate"


async def slow_run(scheduler: Scheduler, db: Database, clock: Clock, tmp_path: Path, *, start: float,
                   lasts: float) -> None:
    """A tick at `start` whose run (a `held_command`) takes `lasts` seconds on the scheduler's clock."""
    clock.now = start
    await scheduler.tick()
    for _ in range(500):  # claimed: the run has its start
        if any(r.status == "running" for r in await runs(db)):
            break
        await asyncio.sleep(0.01)
    clock.now = start + lasts
    await release(scheduler, tmp_path)


async def release(scheduler: Scheduler, tmp_path: Path) -> None:
    """Let the `held_command` under way end, and the runs the tick started finish."""
    await asyncio.to_thread((tmp_path / "ws" / "gate").write_text, "done\n")  # opens once cat reads
    await settle(scheduler)


async def test_due_times_passed_while_its_own_run_went_on_are_not_blamed_on_an_outage(sqlite, tmp_path):
    routines, clock = tmp_path / "routines", Clock()
    write(routines, "ping", EVERY_MINUTE.format(n=7, catch_up="skip").replace("echo pong-7", held_command(tmp_path)))
    scheduler, db = await sqlite(routines, clock)
    await tick(scheduler)
    # due T0+60 runs until T0+351: 120, 180 and 240 pass meanwhile (300 is less than 90 s late at 352: on time)
    await slow_run(scheduler, db, clock, tmp_path, start=T0 + 61, lasts=290)
    clock.now = T0 + 352
    await scheduler.tick()
    await release(scheduler, tmp_path)  # the run due T0+300, on time
    notes = [text for key, text in await sent(db) if key == "webchat:c-ops" and "Skipped" in text]
    assert len(notes) == 1
    assert "3 runs of `ping` missed while its previous run was still going" in notes[0], notes[0]
    assert "service was down" not in notes[0]
    first = (await runs(db))[0]
    assert (first.started_at, first.finished_at) == (T0 + 61, T0 + 351)  # on the scheduler's clock


async def test_missed_due_times_are_told_by_cause_a_long_run_then_an_outage(sqlite, tmp_path):
    routines, clock = tmp_path / "routines", Clock()
    write(routines, "ping", EVERY_MINUTE.format(n=8, catch_up="skip").replace("echo pong-8", held_command(tmp_path)))
    first, db = await sqlite(routines, clock)
    await tick(first)
    await slow_run(first, db, clock, tmp_path, start=T0 + 61, lasts=140)  # to T0+201: 120 and 180 pass during the run
    await first.stop()
    clock.now = T0 + 400  # down from T0+201: 240, 300 pass while down (360 is on time)
    second, _ = await sqlite(routines, clock, owner="b")
    await second.tick()
    await release(second, tmp_path)  # the run due T0+360, on time
    notes = [text for key, text in await sent(db) if key == "webchat:c-ops" and "Skipped" in text]
    assert len(notes) == 1
    assert ("4 runs of `ping` missed (2 while its previous run was still going, 2 while the service was down)"
            in notes[0]), notes[0]


async def test_the_service_stopping_during_a_run_tells_its_chat(bridge, chat, tmp_path):
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text('version: 1\npreset: default\nrules:\n  - action: allow\n    command: ["sleep *"]\n')
    env = routine_env(tmp_path, 'name: slow\ninterval: 2\ncommand: "sleep 60"\ntargets: [webchat:c-slow]\n',
                      "slow")
    proc = bridge(BRIDGE_APPROVAL_RULES=str(rules_file), **env)
    c = chat(proc)
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # a run has started
        if (proc.data_dir / "bridge.db").exists():
            with sqlite3.connect(proc.data_dir / "bridge.db") as db:
                if db.execute("SELECT count(*) FROM routine_runs WHERE status = 'running'").fetchone()[0]:
                    break
        await asyncio.sleep(0.1)
    else:
        raise AssertionError("no run started")
    await asyncio.sleep(0.5)
    assert proc.stop() == 0
    with sqlite3.connect(proc.data_dir / "bridge.db") as db:
        statuses = [s for (s,) in db.execute("SELECT status FROM routine_runs WHERE routine = 'slow'")]
    assert statuses == ["interrupted"]
    proc.start()
    texts = await c.wait_for("c-slow", lambda msgs: [m["text"] for m in msgs if "interrupted" in (m["text"] or "")])
    assert len(texts) == 1 and "the service stopped while it ran" in texts[0]


async def test_last_runs_gives_each_routines_latest_run(sqlite, tmp_path):
    from bridge.store import routines as repo

    _, db = await sqlite(tmp_path / "routines", Clock())
    for name, due in [("a", T0), ("b", T0), ("a", T0 + 60), ("b", T0 + 60), ("a", T0 + 120)]:
        await db.write(lambda c, n=name, d=due: repo.claim(c, n, d, owner="x", lease=0, status="missed", note="",
                                                           now=d))
    last = await db.read(repo.last_runs)
    assert {name: row.due_at for name, row in last.items()} == {"a": T0 + 120, "b": T0 + 60}


async def test_a_routine_whose_command_the_rules_refuse_fails_and_says_why(sqlite, tmp_path):
    """Nobody is asked for a routine: what the rules do not allow is refused, and the run did not
    do what it is for, so it is a failure to fix (a rule), not a completed run."""
    routines, clock = tmp_path / "routines", Clock()
    write(routines, "ping", EVERY_MINUTE.format(n=9, catch_up="skip").replace("echo pong-9", "touch made-by-routine"))
    scheduler, db = await sqlite(routines, clock)
    await tick(scheduler)
    clock.now = T0 + 61
    await tick(scheduler)
    assert [(r.status, "Refused by the approval rules" in (r.error or "")) for r in await runs(db)] == [("failed", True)]
    messages = [text for key, text in await sent(db) if key == "webchat:c-ops"]
    assert len(messages) == 1 and "Not run" in messages[0] and "allow what this one needs" in messages[0]
    assert not (tmp_path / "ws" / "made-by-routine").exists()
