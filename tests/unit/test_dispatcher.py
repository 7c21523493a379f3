"""The per-conversation dispatcher in process: messages that arrive while a turn runs, under the
busy policies, keep their order."""

from __future__ import annotations

import asyncio

import pytest

from bridge.pipeline.dispatcher import Dispatcher, Job


@pytest.mark.parametrize("policy", ["steer", "interrupt"])
async def test_messages_sent_during_a_turn_run_in_the_order_they_came(policy):
    """A runs; B and C arrive 10 ms apart. Steer: the runtime refuses B's steer after 50 ms, and
    A ends meanwhile. Interrupt: A takes 100 ms to stop, so both wait at the queue's head. Either
    way B runs before C."""
    ran: list[str] = []
    a_done = asyncio.Event()

    async def process(job: Job) -> None:
        ran.append(job.text)
        if job.text == "A":
            await a_done.wait()

    async def nothing(*_args) -> None:
        return None

    async def on_busy(job: Job) -> None:  # as the conversation control does it, with its waits
        if policy == "steer":
            await asyncio.sleep(0.05)
            dispatcher.enqueue(job)  # the runtime could not take it: it runs next, as queued
        else:
            await asyncio.sleep(0.005)
            asyncio.get_running_loop().call_later(0.1, a_done.set)  # the running turn takes a while to stop
            dispatcher.enqueue(job, front=True)

    dispatcher = Dispatcher(process=process, control=nothing, notify_queued=nothing, on_busy=on_busy)
    dispatcher.submit(Job(1, "webchat:c", "A"))
    await asyncio.sleep(0.01)
    dispatcher.submit(Job(2, "webchat:c", "B"))
    await asyncio.sleep(0.01)
    if policy == "steer":
        a_done.set()  # A ends while B's steer is under way
    await asyncio.sleep(0.01)
    dispatcher.submit(Job(3, "webchat:c", "C"))
    async with asyncio.timeout(5):
        while len(ran) < 3:
            await asyncio.sleep(0.01)
    assert ran == ["A", "B", "C"]
    await dispatcher.close(timeout=1)
