"""The "working on it" marks: the turn's end waits for the mark being added, never races it."""

import asyncio

from channels.marks import WorkingMarks


async def test_taking_a_mark_waits_for_it_to_be_added():
    marks = WorkingMarks()
    added = asyncio.Event()

    async def adding() -> str:
        await added.wait()
        return "reaction-1"

    marks.add("m1", adding())
    taking = asyncio.create_task(marks.take("m1"))
    await asyncio.sleep(0.01)
    assert not taking.done()  # the platform has not answered the first reaction yet
    added.set()
    assert await taking == "reaction-1"
    assert await marks.take("m1") is None  # taken once


async def test_a_failed_or_unknown_mark_is_none_and_the_oldest_goes_past_the_limit():
    marks = WorkingMarks(limit=2)

    async def failing() -> str:
        raise RuntimeError("refused")

    async def ok(n: int) -> int:
        return n

    marks.add("bad", failing())
    assert await marks.take("bad") is None
    assert await marks.take("never") is None
    for n in range(3):
        marks.add(f"m{n}", ok(n))
    assert await marks.take("m0") is None  # forgotten (and its adding cancelled)
    assert [await marks.take("m1"), await marks.take("m2")] == [1, 2]
