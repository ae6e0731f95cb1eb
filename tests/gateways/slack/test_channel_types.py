"""ChannelTypes: what fills ``channel_type`` of slack.joined / slack.left (issue 21, item 14)."""

from __future__ import annotations

import asyncio

from core.testing import ManualClock
from gateways.slack.gateway import FAILED_FOR, KNOWN_FOR, MAX_CHANNELS, ChannelTypes


class Lookup:
    """conversations.info as the gateway calls it: a type, or None once it failed."""

    def __init__(self, answers: dict[str, str | None]) -> None:
        self.answers = answers
        self.asked: list[str] = []
        self.release = asyncio.Event()
        self.release.set()

    async def __call__(self, channel: str, route: tuple[str | None, str | None]) -> str | None:
        self.asked.append(channel)
        await self.release.wait()
        return self.answers.get(channel)


async def test_a_burst_of_events_makes_one_lookup() -> None:
    lookup = Lookup({"C1": "group"})
    lookup.release.clear()
    types = ChannelTypes(lookup)
    waiting = [asyncio.create_task(types.get("C1", 5)) for _ in range(20)]
    await asyncio.sleep(0)
    lookup.release.set()
    assert await asyncio.gather(*waiting) == ["group"] * 20
    assert lookup.asked == ["C1"]
    assert await types.get("C1", 5) == "group" and lookup.asked == ["C1"]
    await types.close()


async def test_a_slow_lookup_is_none_for_its_waiters_and_known_afterwards() -> None:
    lookup = Lookup({"C1": "channel"})
    lookup.release.clear()
    types = ChannelTypes(lookup)
    assert await types.get("C1", 0.01) is None  # the event goes on without it
    lookup.release.set()
    await asyncio.sleep(0.01)
    assert await types.get("C1", 0.01) == "channel"
    assert lookup.asked == ["C1"]
    await types.close()


async def test_messages_teach_types_and_failures_are_retried_after_a_while() -> None:
    clock = ManualClock()
    lookup = Lookup({})
    types = ChannelTypes(lookup, clock=clock.monotonic)
    types.learn("C1", "group")
    types.learn("C2", None)  # a message without channel_type teaches nothing
    assert await types.get("C1", 1) == "group" and lookup.asked == []
    assert await types.get(None, 1) is None
    assert await types.get("C2", 1) is None and await types.get("C2", 1) is None
    assert lookup.asked == ["C2"]  # the failure is remembered …
    await clock.advance(FAILED_FOR + 1)
    assert await types.get("C2", 1) is None and lookup.asked == ["C2", "C2"]  # … for a while
    await clock.advance(KNOWN_FOR + 1)
    lookup.answers["C1"] = "channel"  # made public meanwhile
    assert await types.get("C1", 1) == "channel"
    await types.close()


async def test_at_most_max_channels_are_remembered() -> None:
    types = ChannelTypes(Lookup({}))
    for i in range(MAX_CHANNELS + 10):
        types.learn(f"C{i}", "channel")
    assert len(types) == MAX_CHANNELS
    assert "C0" not in types._known and f"C{MAX_CHANNELS + 9}" in types._known
    await types.close()
