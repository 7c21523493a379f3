"""The runtime slots in process: taken in arrival order, never leaked by a waiter that is
cancelled or stopped, and a waiting message told once per conversation."""

from __future__ import annotations

import asyncio

from bridge.pipeline import slots as slots_module
from bridge.pipeline.dispatcher import Job
from bridge.pipeline.slots import RuntimeSlots, Slot, Stopped


def _slots(limit: int, told: list[int]) -> RuntimeSlots:
    def notify(job: Job):
        told.append(job.event_id)
        written = asyncio.get_running_loop().create_future()  # as the store's write is: a future
        written.set_result(None)
        return written

    return RuntimeSlots(limit, notify=notify)


async def test_waiters_take_freed_slots_in_arrival_order_and_cancelled_ones_take_none(monkeypatch):
    monkeypatch.setattr(slots_module, "NOTICE_DELAY", 0.05)
    told: list[int] = []
    slots = _slots(1, told)
    first = await slots.take(Job(1, "webchat:a", "echo 1"))
    assert isinstance(first, Slot)
    order: list[int] = []

    async def turn(event_id: int, key: str) -> None:
        slot = await slots.take(Job(event_id, key, f"echo {event_id}"))
        assert isinstance(slot, Slot)
        order.append(event_id)
        slot.release()

    b = asyncio.create_task(turn(2, "webchat:b"))
    cancelled = asyncio.create_task(turn(3, "webchat:c"))
    d = asyncio.create_task(turn(4, "webchat:d"))
    await asyncio.sleep(0.1)
    assert sorted(slots.waiting) == ["webchat:b", "webchat:c", "webchat:d"]
    assert sorted(told) == [2, 3, 4]  # each conversation told once that its message waits
    cancelled.cancel()
    await asyncio.gather(cancelled, return_exceptions=True)
    first.release()
    first.release()  # a second release of the same slot gives nothing back twice
    await asyncio.wait_for(asyncio.gather(b, d), 5)
    assert order == [2, 4] and not slots.waiting
    assert not slots.semaphore.locked()
    again = [await slots.take(Job(5, "webchat:e", "x"))]
    assert slots.semaphore.locked()  # one slot in all, as configured
    again[0].release()


async def test_a_stopped_or_closed_wait_gives_its_slot_back_and_says_why():
    slots = _slots(1, [])
    held = await slots.take(Job(1, "webchat:a", "echo 1"))
    stopped = asyncio.create_task(slots.take(Job(2, "webchat:b", "echo 2")))
    closed = asyncio.create_task(slots.take(Job(3, "webchat:c", "echo 3")))
    await asyncio.sleep(0.05)
    assert slots.stop("webchat:b") == "echo 2"
    assert slots.stop("webchat:b") is None
    assert await stopped == Stopped(None)
    assert isinstance(held, Slot)
    held.release()  # the wake-up goes to the closing waiter, which passes the slot back
    slots.close()
    assert await closed == "close"
    assert await slots.take(Job(4, "webchat:d", "echo 4")) == "close"
    assert not slots.semaphore.locked()


async def test_a_conversation_is_told_once_while_its_messages_keep_waiting(monkeypatch):
    monkeypatch.setattr(slots_module, "NOTICE_DELAY", 0.01)
    told: list[int] = []
    slots = _slots(1, told)

    async def waited(event_id: int) -> Slot:
        task = asyncio.create_task(slots.take(Job(event_id, "webchat:b", "echo")))
        await asyncio.sleep(0.05)  # past the notice delay
        return task

    for first in (1, 11):
        a = await slots.take(Job(0, "webchat:a", "echo"))
        b1 = await waited(first)
        a.release()
        held = await asyncio.wait_for(b1, 1)  # b's first message runs; its next one waits behind it
        b2 = await waited(first + 1)
        held.release()
        (await asyncio.wait_for(b2, 1)).release()
        assert not slots.waiting
        assert told == [1, 11][:1 + (first == 11)]  # told once per wait, again after a free slot
        (await slots.take(Job(99, "webchat:c", "echo"))).release()  # a slot free, nobody waiting


async def test_cancelled_while_its_notice_is_written_it_gives_its_slot_back(monkeypatch):
    monkeypatch.setattr(slots_module, "NOTICE_DELAY", 0.01)
    written: list[asyncio.Future[None]] = []

    def notify(job: Job):
        written.append(asyncio.get_running_loop().create_future())  # a write the store has not done yet
        return written[-1]

    slots = RuntimeSlots(1, notify=notify)
    held = await slots.take(Job(1, "webchat:a", "echo"))
    waiter = asyncio.create_task(slots.take(Job(2, "webchat:b", "echo")))
    await asyncio.sleep(0.05)  # told: its notice is being written
    held.release()
    await asyncio.sleep(0.05)  # it has the slot, and waits for the notice's write
    waiter.cancel()
    await asyncio.gather(waiter, return_exceptions=True)
    assert not written[0].cancelled()  # the write goes on; only the wait for it was cancelled
    written[0].set_result(None)
    assert not slots.semaphore.locked()  # given back
