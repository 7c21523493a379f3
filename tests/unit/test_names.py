"""The channels' display-name cache."""

from __future__ import annotations

import asyncio

from channels.names import NameCache


async def test_a_burst_from_someone_new_costs_one_lookup():
    calls: list[str] = []
    release = asyncio.Event()

    async def lookup(user_id: str) -> str:
        calls.append(user_id)
        await release.wait()
        return f"name of {user_id}"

    names = NameCache(lookup, channel="test")
    waiting = [asyncio.ensure_future(names.get("u1")) for _ in range(20)]
    await asyncio.sleep(0)
    release.set()
    assert await asyncio.gather(*waiting) == ["name of u1"] * 20
    assert await names.get("u1") == "name of u1"
    assert calls == ["u1"]


async def test_a_failed_lookup_gives_the_id_and_a_cancelled_caller_does_not_cancel_the_others():
    release = asyncio.Event()

    async def lookup(user_id: str) -> str:
        await release.wait()
        raise RuntimeError("platform down")

    names = NameCache(lookup, channel="test")
    first = asyncio.ensure_future(names.get("u2"))
    second = asyncio.ensure_future(names.get("u2"))
    await asyncio.sleep(0)
    first.cancel()
    release.set()
    assert await second == "u2"


async def test_names_expire_and_the_cache_is_bounded():
    calls: list[str] = []

    async def lookup(user_id: str) -> str:
        calls.append(user_id)
        return user_id.upper()

    names = NameCache(lookup, channel="test", ttl=0.0, limit=2)
    assert await names.get("a") == "A"
    assert await names.get("a") == "A"  # expired at once: looked up again
    await names.get("b")
    await names.get("c")
    assert calls == ["a", "a", "b", "c"]
    assert len(names._names) <= 2
