"""One lifecycle (relay.lifecycle): services stop step by step in the order given, drain within
one deadline, and one that fails or hangs does not keep the others from stopping."""

from __future__ import annotations

import asyncio

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from relay.lifecycle import Service, repeat, supervise


class Recorder(Service):
    """A service that says what happened to it, and when, in one shared list."""

    def __init__(self, name: str, events: list[str], *, work: float = 0.0) -> None:
        self.name = name
        self.events = events
        self.work = work  # seconds its run takes to return once stopped

    async def run(self, stop: asyncio.Event) -> None:
        self.events.append(f"{self.name} started")
        await stop.wait()
        self.events.append(f"{self.name} stopping")
        await asyncio.sleep(self.work)
        self.events.append(f"{self.name} stopped")

    async def drain(self, deadline: float) -> None:
        self.events.append(f"{self.name} drained")


async def stopped_after(seconds: float) -> asyncio.Event:
    stop = asyncio.Event()
    asyncio.get_running_loop().call_later(seconds, stop.set)
    return stop


async def test_services_stop_step_by_step_in_the_order_given() -> None:
    events: list[str] = []
    services = [Recorder(name, events) for name in ("clock", "polls", "deliveries", "port")]
    order = (("polls", "deliveries"), ("clock",), ("port",))
    await supervise(services, order, await stopped_after(0.05), drain_timeout=1.0)

    assert sorted(events[:4]) == sorted(f"{s.name} started" for s in services)
    after = events[4:]
    first_step = after[:6]
    assert sorted(first_step) == sorted(
        f"{name} {what}"
        for name in ("polls", "deliveries")
        for what in ("stopping", "stopped", "drained")
    )
    assert after[6:] == [
        "clock stopping",
        "clock stopped",
        "clock drained",
        "port stopping",
        "port stopped",
        "port drained",
    ]


async def test_every_service_must_be_in_the_order_once() -> None:
    events: list[str] = []
    with pytest.raises(ValueError, match="must name each"):
        await supervise([Recorder("a", events)], (("b",),), asyncio.Event(), drain_timeout=0)
    with pytest.raises(ValueError, match="must name each"):
        await supervise([Recorder("a", events)], (("a",), ("a",)), asyncio.Event(), drain_timeout=0)
    assert events == []


async def test_a_name_without_its_service_is_passed_over() -> None:
    events: list[str] = []
    await supervise(
        [Recorder("a", events)], (("sweeper",), ("a",)), await stopped_after(0), drain_timeout=0
    )
    assert events == ["a started", "a stopping", "a stopped", "a drained"]


async def test_a_failing_service_leaves_the_others_running_and_stopping() -> None:
    events: list[str] = []

    class Broken(Service):
        name = "broken"

        async def run(self, stop: asyncio.Event) -> None:
            raise RuntimeError("a bug")

    await supervise(
        [Broken(), Recorder("polls", events)],
        (("broken", "polls"),),
        await stopped_after(0.05),
        drain_timeout=1.0,
    )
    assert events == ["polls started", "polls stopping", "polls stopped", "polls drained"]


async def test_a_run_that_will_not_stop_is_cut_off_and_the_next_step_goes_on(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("relay.lifecycle.MIN_STOP_WAIT", 0.1)
    events: list[str] = []
    stuck = Recorder("stuck", events, work=60)
    after = Recorder("after", events)
    await supervise(
        [stuck, after], (("stuck",), ("after",)), await stopped_after(0), drain_timeout=0
    )
    assert "stuck stopped" not in events
    assert events[-4:] == ["stuck drained", "after stopping", "after stopped", "after drained"]


async def test_a_later_step_still_stops_cleanly_when_an_earlier_one_ran_out_the_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("relay.lifecycle.MIN_STOP_WAIT", 0.5)
    events: list[str] = []
    services = [Recorder("slow", events, work=60), Recorder("port", events, work=0.2)]
    await supervise(services, (("slow",), ("port",)), await stopped_after(0), drain_timeout=0)
    assert "slow stopped" not in events
    assert events[-3:] == ["port stopping", "port stopped", "port drained"]


async def test_drains_share_one_deadline_counted_from_the_stop() -> None:
    deadlines: list[float] = []

    class Draining(Recorder):
        async def drain(self, deadline: float) -> None:
            deadlines.append(deadline)

    loop = asyncio.get_running_loop()
    stop = await stopped_after(0)
    services = [Draining("a", [], work=0.2), Draining("b", [])]
    started = loop.time()
    await supervise(services, (("a",), ("b",)), stop, drain_timeout=5.0)
    assert len(deadlines) == 2 and deadlines[0] == deadlines[1]
    assert started + 5.0 <= deadlines[0] < started + 5.2


async def test_repeat_keeps_going_past_failed_turns_until_stopped() -> None:
    turns: list[int] = []
    stop = asyncio.Event()

    async def turn() -> float | None:
        turns.append(len(turns))
        if len(turns) == 1:
            raise RedisConnectionError("down")
        if len(turns) == 2:
            raise RuntimeError("a bug")
        if len(turns) == 4:
            stop.set()
        return None

    await asyncio.wait_for(repeat(turn, every=0.01, stop=stop, what="test"), timeout=5)
    assert turns == [0, 1, 2, 3]
