"""The edge link between an HTTP edge worker and the service, over a real socketpair."""

from __future__ import annotations

import asyncio
import socket

import pytest

from bridge.edge import link
from channels.base import Answer, Forward, Webhook


class _Check:
    path = "/test"

    def check(self, body, headers):  # pragma: no cover - the link never calls it
        raise AssertionError


async def _pair(accepts, many=None, **worker_options):
    loop = asyncio.get_running_loop()
    a, b = socket.socketpair()
    hooks = [Webhook(_Check(), accept, (many or {}).get(i)) for i, accept in enumerate(accepts)]
    _, service = await loop.create_connection(lambda: link.ServiceEnd(hooks, "test"), sock=a)
    _, worker = await loop.create_connection(lambda: link.WorkerEnd(**worker_options), sock=b)
    return service, worker


async def test_requests_are_answered_in_any_order_and_config_and_ready_arrive():
    release = asyncio.Event()

    async def slow(forward: Forward) -> Answer:
        await release.wait()
        return Answer(202, b"slow:" + forward.body)

    async def fast(forward: Forward) -> Answer:
        return Answer(200, b"fast:" + forward.body)

    service, worker = await _pair([slow, fast])
    service.configure(b"config-bytes")
    assert await worker.config == b"config-bytes"
    worker.ready()
    await asyncio.wait_for(service.ready, 2)
    first = worker.forward(0, b"a")
    second = worker.forward(1, b"b" * 200_000)  # larger than one read: reassembled from chunks
    assert await asyncio.wait_for(second, 2) == Answer(200, b"fast:" + b"b" * 200_000)
    assert not first.done()
    release.set()
    assert await asyncio.wait_for(first, 2) == Answer(202, b"slow:a")
    assert worker.in_flight == 0


async def test_a_failing_accept_is_a_500_and_the_link_goes_on():
    async def broken(forward: Forward) -> Answer:
        raise RuntimeError("boom")

    async def fine(forward: Forward) -> Answer:
        return Answer(200, b"{}")

    _, worker = await _pair([broken, fine])
    assert (await worker.forward(0, b"x")).status == 500
    assert await worker.forward(1, b"x") == Answer(200, b"{}")


async def test_a_store_outage_is_a_503_on_both_paths_and_other_failures_a_500():
    """The service's own route and the edge link answer alike: the store out of reach is a 503
    (to be sent again), anything else a 500."""
    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from bridge.store.db import StoreBusy, StoreUnavailable
    from bridge.web import webhooks

    failures = iter([StoreBusy("locked"), StoreUnavailable("away"), RuntimeError("boom")] * 2)

    async def failing(forward: Forward) -> Answer:
        raise next(failures)

    _, worker = await _pair([failing])
    assert [(await worker.forward(0, b"x")).status for _ in range(3)] == [503, 503, 500]

    class Passing(_Check):
        def check(self, body, headers):
            return Forward(body)

    app = web.Application()
    app.add_routes([webhooks.route(Passing(), failing)])
    async with TestClient(TestServer(app, host="127.0.0.1")) as client:
        answers = []
        for _ in range(3):
            async with client.post("/test", data=b"{}") as resp:
                answers.append((resp.status, (await resp.json())["error"]))
    assert [status for status, _ in answers] == [503, 503, 500]
    assert "send it again" in answers[0][1] and answers[2][1] == "internal error"


async def test_unanswered_requests_time_out_with_a_503():
    never = asyncio.Event()

    async def hangs(forward: Forward) -> Answer:
        await never.wait()
        raise AssertionError("unreachable")

    _, worker = await _pair([hangs], timeout=0.2)
    answer = await asyncio.wait_for(worker.forward(0, b"x"), 3)
    assert answer == link.TIMED_OUT and answer.status == 503
    assert worker.in_flight == 0


async def test_a_lost_service_fails_what_is_in_flight_and_what_comes_after():
    never = asyncio.Event()

    async def hangs(forward: Forward) -> Answer:
        await never.wait()
        raise AssertionError("unreachable")

    service, worker = await _pair([hangs])
    pending = worker.forward(0, b"x")
    await asyncio.sleep(0.05)
    service.close()
    assert await asyncio.wait_for(pending, 2) == link.UNAVAILABLE
    await asyncio.wait_for(worker.closed, 2)
    assert await worker.forward(0, b"y") == link.UNAVAILABLE


async def test_too_many_in_flight_is_a_503_not_a_queue():
    never = asyncio.Event()

    async def hangs(forward: Forward) -> Answer:
        await never.wait()
        raise AssertionError("unreachable")

    _, worker = await _pair([hangs], max_in_flight=2)
    worker.forward(0, b"1")
    worker.forward(0, b"2")
    assert await worker.forward(0, b"3") == link.BUSY


async def test_a_frame_larger_than_the_limit_closes_the_link():
    service, worker = await _pair([])
    with pytest.raises(link.LinkError):
        service.data_received(link.HEADER.pack(link.MAX_FRAME + 1, link.REQUEST, 1, 0))


async def test_requests_of_one_read_go_to_accept_many_together():
    calls: list[list[bytes]] = []

    async def one(forward: Forward) -> Answer:
        return Answer(200, b"one:" + forward.body)

    async def many(forwards) -> list[Answer]:
        calls.append([f.body for f in forwards])
        return [Answer(202, b"many:" + f.body) for f in forwards]

    service, worker = await _pair([one], many={0: many})
    # three requests written before the service reads: one read, one call
    futures = [worker.forward(0, body) for body in (b"a", b"b", b"c")]
    answers = await asyncio.wait_for(asyncio.gather(*futures), 2)
    assert answers == [Answer(202, b"many:a"), Answer(202, b"many:b"), Answer(202, b"many:c")]
    assert calls == [[b"a", b"b", b"c"]]
    # a lone request goes to `accept`
    assert await worker.forward(0, b"d") == Answer(200, b"one:d")


async def test_a_failing_accept_many_answers_each_request_with_a_500():
    async def one(forward: Forward) -> Answer:
        return Answer(200, b"{}")

    async def many(forwards) -> list[Answer]:
        raise RuntimeError("boom")

    _, worker = await _pair([one], many={0: many})
    answers = await asyncio.gather(*(worker.forward(0, b"x") for _ in range(3)))
    assert [a.status for a in answers] == [500, 500, 500]
