"""Burst pacing: turn starts rationed while messages pour in, all let go when the burst ends."""

from __future__ import annotations

import asyncio
import time

from bridge.pipeline.dispatcher import Dispatcher, Job
from bridge.pipeline.pacing import WINDOW, BurstPacer


async def pour(pacer: BurstPacer, rate: float, stop: asyncio.Event) -> None:
    """Arrivals at about `rate` a second until told to stop."""
    while not stop.is_set():
        for _ in range(int(rate / 100)):
            pacer.note()
        await asyncio.sleep(0.01)


async def burst(pacer: BurstPacer, rate: float) -> tuple[asyncio.Event, asyncio.Task[None]]:
    stop = asyncio.Event()
    task = asyncio.create_task(pour(pacer, rate, stop))
    await asyncio.sleep(WINDOW * 1.5)
    assert pacer.bursting
    return stop, task


async def test_outside_a_burst_turns_start_at_once():
    pacer = BurstPacer(burst_rate=1000, burst_starts=5)
    for _ in range(50):
        pacer.note()
    started = time.monotonic()
    await asyncio.gather(*(pacer.admit() for _ in range(20)))
    assert time.monotonic() - started < 0.05
    assert not pacer.bursting


async def test_a_burst_is_paced_from_its_first_few_dozen_messages():
    """No need to wait for a whole window: past the threshold's share of one, starts are paced."""
    clock = [100.0]
    pacer = BurstPacer(burst_rate=200, burst_starts=20, clock=lambda: clock[0])
    for _ in range(int(200 * WINDOW)):
        pacer.note()
    assert not pacer.bursting  # 50 messages in a quarter second: at the threshold, not above it
    pacer.note()
    assert pacer.bursting
    clock[0] += WINDOW  # the window closes at 204/s: still a burst
    assert pacer.bursting
    clock[0] += WINDOW * 1.01  # a quiet window: over
    assert not pacer.bursting


async def test_during_a_burst_starts_are_spaced_and_in_order_then_all_go_when_it_ends():
    pacer = BurstPacer(burst_rate=200, burst_starts=20)  # one start per 50 ms while bursting
    stop, pouring = await burst(pacer, 2000)
    released: list[tuple[int, float]] = []

    async def wait(n: int) -> None:
        await pacer.admit()
        released.append((n, time.monotonic()))

    waiters = [asyncio.create_task(wait(n)) for n in range(40)]
    await asyncio.sleep(0.3)
    during = list(released)
    assert 2 <= len(during) <= 10  # ~ 0.3 s x 20/s, not 40
    assert [n for n, _ in during] == list(range(len(during)))  # arrival order
    gaps = [b - a for (_, a), (_, b) in zip(during, during[1:])]
    assert all(gap >= 0.045 for gap in gaps)  # timers never fire early
    stop.set()
    await pouring
    await asyncio.wait_for(asyncio.gather(*waiters), 2 * WINDOW + 0.5)  # the burst is over: all go
    assert [n for n, _ in released] == list(range(40))
    assert not pacer.bursting and pacer.waiting == 0


async def test_a_cancelled_waiter_leaves_the_line():
    pacer = BurstPacer(burst_rate=200, burst_starts=1)
    stop, pouring = await burst(pacer, 2000)
    await pacer.admit()  # takes the one start available now
    first = asyncio.create_task(pacer.admit())
    second = asyncio.create_task(pacer.admit())
    await asyncio.sleep(0.01)
    assert pacer.waiting == 2
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    assert pacer.waiting == 1
    stop.set()
    await pouring
    await asyncio.wait_for(second, 2 * WINDOW + 1.5)


async def test_dispatcher_holds_turns_and_queued_notices_during_a_burst_and_keeps_each_order():
    pacer = BurstPacer(burst_rate=200, burst_starts=10)
    ran: list[tuple[str, int]] = []
    notices: list[tuple[int, int, bool]] = []

    async def process(job: Job) -> None:
        ran.append((job.conversation_key, job.event_id))
        await asyncio.sleep(0.05)  # slow enough that a conversation still waits when the burst ends

    def notify(job: Job, position: int) -> asyncio.Future[None]:
        notices.append((job.event_id, position, pacer.bursting))
        written = asyncio.get_running_loop().create_future()
        written.set_result(None)
        return written

    async def control(_job: Job) -> None:
        return None

    backlogs: list[tuple[str, int, bool]] = []
    dispatcher = Dispatcher(process=process, control=control, notify_queued=notify, pacer=pacer,
                            notify_backlog=lambda key, count: backlogs.append((key, count, pacer.bursting)))
    stop, pouring = await burst(pacer, 2000)
    event_id = 0
    for n in range(10):
        for conv in ("a", "b", "c"):
            event_id += 1
            dispatcher.submit(Job(event_id, f"webchat:{conv}", f"echo {n}"))
    await asyncio.sleep(0.8)  # past the queued-notice delay, still bursting
    assert len(ran) <= 12  # ~ 0.8 s x 10/s, not 30
    assert notices == [] and backlogs == []  # held back while the burst lasts
    stop.set()
    await pouring
    deadline = time.monotonic() + 3
    while len(ran) < 30 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert len(ran) == 30
    for conv in ("a", "b", "c"):
        ids = [i for key, i in ran if key == f"webchat:{conv}"]
        assert ids == sorted(ids)
    # after it, each conversation with several messages still waiting got one notice for them all
    assert notices == []
    assert sorted(key for key, _, _ in backlogs) == ["webchat:a", "webchat:b", "webchat:c"]
    assert all(count > 1 and not bursting for _, count, bursting in backlogs)
    await dispatcher.close(1.0)


async def test_a_bursts_backlog_is_held_by_event_id_and_comes_back_whole():
    """During a burst a queued message costs its event id, not a Job: /queue, /stop all and the
    turns themselves still see every message, in order, with the conversation's group flag."""
    import tracemalloc

    pacer = BurstPacer(burst_rate=200, burst_starts=1)
    ran: list[Job] = []
    gate = asyncio.Event()

    async def process(job: Job) -> None:
        ran.append(job)
        await gate.wait()

    async def control(_job: Job) -> None:
        return None

    def notify(job: Job, position: int) -> asyncio.Future[None]:
        written = asyncio.get_running_loop().create_future()
        written.set_result(None)
        return written

    dispatcher = Dispatcher(process=process, control=control, notify_queued=notify, pacer=pacer,
                            notify_backlog=lambda key, count: None)
    stop, pouring = await burst(pacer, 2000)
    dispatcher.submit(Job(1, "webchat:g-team", "echo first", is_group=True))
    await asyncio.sleep(0.01)
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for event_id in range(2, 10_002):
        dispatcher.submit(Job(event_id, "webchat:g-team", f"echo {event_id}", is_group=True, accepted_at=1.0))
    per_message = (tracemalloc.get_traced_memory()[0] - before) / 10_000
    tracemalloc.stop()
    assert per_message < 80  # a Job with its text and times: ~230 bytes
    assert dispatcher.queued("webchat:g-team") == 10_000
    assert dispatcher.queued_entries("webchat:g-team", 3) == [(2, None), (3, None), (4, None)]
    dropped = dispatcher.drop_queued("webchat:g-team")
    assert [job.event_id for job in dropped] == list(range(2, 10_002))
    assert all(job.is_group and job.conversation_key == "webchat:g-team" for job in dropped)
    # held again, then run: each comes back as a Job of its conversation, in order
    for event_id in range(20_000, 20_005):
        dispatcher.submit(Job(event_id, "webchat:g-team", "echo", is_group=True))
    stop.set()
    await pouring
    gate.set()
    deadline = time.monotonic() + 3
    while len(ran) < 6 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert [job.event_id for job in ran] == [1, *range(20_000, 20_005)]
    assert all(job.is_group for job in ran)
    await dispatcher.close(1.0)
