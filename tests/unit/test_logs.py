"""The failure streak of a loop that outlives its failures: one traceback, then a line every N."""

from __future__ import annotations

from loguru import logger

from bridge.logs import FailureStreak


def test_a_streak_logs_its_first_failure_in_full_then_every_nth_then_the_recovery():
    lines: list[str] = []
    sink = logger.add(lambda m: lines.append(m), level="INFO", format="{level} {message}{exception}")
    try:
        streak = FailureStreak("delivery: a round", every=3)
        for _ in range(7):
            try:
                raise ConnectionError("database unreachable\nsecond line")
            except ConnectionError as exc:
                streak.failed(exc)
        streak.ok()
        streak.ok()  # nothing more to say
    finally:
        logger.remove(sink)
    assert len(lines) == 4
    assert lines[0].startswith("ERROR delivery: a round failed") and "Traceback" in lines[0]
    assert [line.split("\n")[0] for line in lines[1:3]] == [
        "ERROR delivery: a round still failing (3 in a row): ConnectionError: database unreachable",
        "ERROR delivery: a round still failing (6 in a row): ConnectionError: database unreachable",
    ]
    assert lines[3].startswith("INFO delivery: a round works again after 7 failures")


def test_a_streak_is_logged_under_the_module_of_its_loop():
    names: list[str] = []
    sink = logger.add(lambda m: names.append(m.record["name"]), level="INFO")
    try:
        streak = FailureStreak("x")
        streak.failed(RuntimeError("y"))
        streak.ok()
    finally:
        logger.remove(sink)
    assert names == [__name__, __name__]
