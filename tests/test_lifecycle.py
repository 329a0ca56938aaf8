"""One lifecycle (relay.lifecycle): services stop step by step in the order given, drain within
one deadline, and one that fails or hangs does not keep the others from stopping."""

from __future__ import annotations

import asyncio
import contextlib
import sys

import pytest
from redis.exceptions import ConnectionError as RedisConnectionError

from relay.lifecycle import Service, cancel_and_wait, repeat, supervise


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


class SwallowsOneCancel(Service):
    """Stuck, and carries on past the first cancel, as a task inside Python 3.11's
    asyncio.wait_for does when the cancel comes just as the call it waits on completes."""

    name = "swallows"

    async def run(self, stop: asyncio.Event) -> None:
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.Event().wait()
        await asyncio.Event().wait()


async def test_a_run_that_carries_on_past_one_cancel_is_cancelled_again(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("relay.lifecycle.MIN_STOP_WAIT", 0.1)
    events: list[str] = []
    after = Recorder("after", events)
    async with asyncio.timeout(10):  # one cancel only: supervise never returns
        await supervise(
            [SwallowsOneCancel(), after],
            (("swallows",), ("after",)),
            await stopped_after(0),
            drain_timeout=0,
        )
    assert events[-3:] == ["after stopping", "after stopped", "after drained"]


async def _like_arqs_loop(calls: asyncio.Queue[asyncio.Future[None]]) -> None:
    """Loops on calls through asyncio.wait_for, as arq's loop does through redis-py's writes."""
    loop = asyncio.get_running_loop()
    while True:
        call: asyncio.Future[None] = loop.create_future()
        calls.put_nowait(call)
        await asyncio.wait_for(call, 5)


async def test_cancel_and_wait_ends_a_task_whose_wait_for_swallowed_the_cancel() -> None:
    calls: asyncio.Queue[asyncio.Future[None]] = asyncio.Queue()
    task = asyncio.create_task(_like_arqs_loop(calls))
    if sys.version_info < (3, 12):
        # The premise, on this Python: a cancel that comes as the call completes is lost.
        call = await calls.get()
        call.set_result(None)
        task.cancel()
        await asyncio.sleep(0.05)
        assert not task.done() and task.cancelling() == 1
    # The same coincidence for cancel_and_wait's first cancel (it cancels before it awaits).
    call = await calls.get()
    call.set_result(None)
    # In a task of its own: a timeout around it would cancel `task` too, through the await.
    ending = asyncio.create_task(cancel_and_wait(task))
    await asyncio.wait((ending,), timeout=5)
    assert ending.done() and task.cancelled()


async def test_cancel_and_wait_raises_what_the_task_failed_with() -> None:
    async def fails_when_cancelled() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise RuntimeError("cleanup failed") from None

    task = asyncio.create_task(fails_when_cancelled())
    await asyncio.sleep(0)
    with pytest.raises(RuntimeError, match="cleanup failed"):
        await cancel_and_wait(task)


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
