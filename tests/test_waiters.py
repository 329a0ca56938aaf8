"""The API's events subscription (relay.api.waiters) on a real Redis: held while anything waits
and only then, what it hears wakes the waiters of the job and of the caller, a waiter that comes
while it is down misses nothing, a broken subscription comes back and wakes every waiter to
read again, and a stop ends it at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import orjson
import pytest
from redis.asyncio import Redis
from starlette.requests import Request

from relay.api import waiters as waiters_module
from relay.api.parked_reads import ParkedReads
from relay.api.protocol import PARK
from relay.api.waiters import EVENT, RESYNC, Waiters
from relay.jobs.history import ENDS
from relay.jobs.store import JobStore
from relay.redis import keys


def announcement(request_id: str, caller: str, sequence: int, flags: int) -> bytes:
    return orjson.dumps([request_id, caller, sequence, flags])


async def subscribers(redis: Redis) -> int:
    return len(await redis.client_list(_type="pubsub"))


@pytest.fixture
async def running(redis: Redis) -> AsyncIterator[Waiters]:
    found = Waiters(redis)
    stop = asyncio.Event()
    task = asyncio.create_task(found.run(stop))
    yield found
    stop.set()
    await asyncio.wait_for(task, 5)


async def test_an_announcement_wakes_the_waiters_of_its_job_and_its_caller(
    redis: Redis, running: Waiters
) -> None:
    with (
        running.watch("wait", job="job-1") as on_job,
        running.watch("feed", caller="alice") as on_caller,
        running.watch("wait", job="job-2") as elsewhere,
    ):
        await asyncio.wait_for(running.subscribed.wait(), 5)
        # Subscribed once something waits, and then every waiter reads again (what was
        # announced before went unheard).
        for waiter in (on_job, on_caller, elsewhere):
            assert await waiter.next(5) & RESYNC
        await redis.publish(keys.EVENTS_CHANNEL, announcement("job-1", "alice", 3, ENDS))
        assert await on_job.next(5) == EVENT | ENDS
        assert await on_caller.next(5) == EVENT | ENDS
        # What is not an announcement (the channel is not the relay's alone) wakes nobody.
        await redis.publish(keys.EVENTS_CHANNEL, b"not json")
        await redis.publish(keys.EVENTS_CHANNEL, announcement("job-2", "bob", 1, 0))
        assert await elsewhere.next(5) == EVENT
        assert await on_job.next(0) == 0


async def test_an_event_as_a_waiter_arrives_is_not_missed(redis: Redis, running: Waiters) -> None:
    # Nothing waits, so nothing is subscribed; the job's end is announced right as its first
    # waiter registers, before any subscription can hear it. The waiter is still woken (told
    # to read again once the subscription is confirmed), so it never sleeps through the end.
    assert not running.subscribed.is_set()
    for n in range(20):
        with running.watch("wait", job=f"job-{n}") as waiter:
            await redis.publish(keys.EVENTS_CHANNEL, announcement(f"job-{n}", "alice", 1, ENDS))
            assert await waiter.next(5) & ENDS


async def test_the_subscription_is_held_only_while_something_waits(
    redis: Redis, running: Waiters, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(waiters_module, "LINGER", 0.2)
    before = await subscribers(redis)
    await asyncio.sleep(0.3)
    # Nothing waits: no subscription, so announcements cost this process nothing.
    assert await subscribers(redis) == before
    with running.watch("wait", job="job-1") as waiter:
        await asyncio.wait_for(running.subscribed.wait(), 5)
        assert await subscribers(redis) == before + 1
        assert await waiter.next(5) & RESYNC
    # Let go a linger or two after the last waiter left.
    started = time.monotonic()
    while running.subscribed.is_set():
        assert time.monotonic() - started < 5
        await asyncio.sleep(0.05)
    assert time.monotonic() - started < 1
    assert await subscribers(redis) == before
    # And taken again for the next waiter, which hears what comes.
    with running.watch("feed", caller="alice") as waiter:
        assert await waiter.next(5) & RESYNC
        await redis.publish(keys.EVENTS_CHANNEL, announcement("job-2", "alice", 1, 0))
        assert await waiter.next(5) == EVENT


async def test_a_broken_subscription_comes_back_and_every_waiter_reads_again(
    redis: Redis, running: Waiters
) -> None:
    with running.watch("wait", job="job-1") as waiter:
        assert await waiter.next(5) & RESYNC
        # Whatever was announced while the subscription was down went unheard: the waiter
        # is told to read again (RESYNC) once it is back.
        assert await redis.client_kill_filter(_type="pubsub") >= 1
        assert await waiter.next(10) & RESYNC
        assert running.subscribed.is_set()
        # And the subscription hears again.
        await redis.publish(keys.EVENTS_CHANNEL, announcement("job-1", "alice", 2, ENDS))
        assert await waiter.next(5) == EVENT | ENDS


async def test_a_stop_ends_the_subscription_at_once(redis: Redis) -> None:
    before = await subscribers(redis)
    found = Waiters(redis)
    stop = asyncio.Event()
    running = asyncio.create_task(found.run(stop))
    with found.watch("wait", job="job-1"):
        await asyncio.wait_for(found.subscribed.wait(), 5)
        assert await subscribers(redis) == before + 1
        # Nothing is announced: the read is waiting for a message when the stop comes.
        await asyncio.sleep(0.2)
        started = time.monotonic()
        stop.set()
        await asyncio.wait_for(running, 5)
        assert time.monotonic() - started < 0.5
    assert not found.subscribed.is_set()
    assert await subscribers(redis) == before


async def test_a_quiet_subscription_outlasts_the_clients_socket_timeout(redis_url: str) -> None:
    # The client bounds every reply by its socket timeout; a subscription waits for messages
    # that may not come for a long time, and must not break for it.
    client = Redis.from_url(redis_url, socket_timeout=0.2)
    found = Waiters(client)
    stop = asyncio.Event()
    running = asyncio.create_task(found.run(stop))
    try:
        with found.watch("wait", job="job-1") as waiter:
            assert await waiter.next(5) & RESYNC
            assert await waiter.next(1) == 0  # five timeouts' worth, with nothing heard
            await client.publish(keys.EVENTS_CHANNEL, announcement("job-1", "alice", 1, 0))
            assert await waiter.next(5) == EVENT
    finally:
        stop.set()
        await asyncio.wait_for(running, 5)
        await client.aclose()


def a_parkable_read(request_id: str) -> Request:
    """A status read as the API's protocol hands it over: parkable (its handle in the state)."""
    scope = {
        "type": "http",
        "method": "GET",
        "path": f"/api/v1/lipsync/requests/{request_id}",
        "headers": [],
        "state": {PARK: object()},
    }
    return Request(scope)


async def test_a_read_woken_while_it_is_being_parked_stays_parked(redis: Redis) -> None:
    # The first waiter's subscription is confirmed with a wake of everything (RESYNC): a read
    # checking its job at that moment must check again and park, not fall back to waiting as a
    # task (answered after every parked read: the waiters bench's 200 ms tail).
    store = JobStore(redis)
    assert await store.create("job-1", callback_url=None, reference_id=None, first_poll_in=60)
    reads = ParkedReads(store)
    parking = asyncio.create_task(reads.park(a_parkable_read("job-1"), "job-1", 30))
    await asyncio.sleep(0)  # one turn: the read registers, and its has_ended check is sent
    assert reads.holding
    reads.wake_all()  # while the check is in flight
    assert await parking is not None
