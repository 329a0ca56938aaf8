"""The budget's shared part among callers (relay.jobs.fair_share), on a real Redis and its clock.

Each test books at a low rate, so the fair queue fills, and then looks again for every waiting
ticket as a waiting API call does, until each has its slot; what is checked is the order of the
slots (and which caller got them), never how long anything took.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Iterable

from redis.asyncio import Redis

from relay.jobs.fair_share import Booking, FairShare, Limits
from relay.jobs.schedule import PollSchedule
from relay.redis import keys

WAIT = 60.0  # long enough that nobody is refused for the budget


def fair_share(redis: Redis, rate: float = 10) -> FairShare:
    return FairShare(redis, PollSchedule(redis, rate=rate, lease=30))


async def admit(fair: FairShare, caller: str, share: float, count: int) -> list[Booking]:
    return [await fair.admit(caller, share, WAIT) for _ in range(count)]


async def slots(fair: FairShare, waiting: Iterable[tuple[str, Booking]]) -> list[str]:
    """Look again for every waiting ticket until each is booked: the callers, by slot."""
    loop = asyncio.get_running_loop()
    booked: list[tuple[float, str]] = []
    pending: dict[str, str] = {}
    for caller, found in waiting:
        if found.ticket is None:
            assert found.booked
            booked.append((loop.time() + found.wait, caller))
        else:
            pending[found.ticket] = caller
    while pending:
        await asyncio.sleep(0.02)
        for ticket, caller in list(pending.items()):
            found = await fair.look_again(ticket)
            if found.ticket is None:
                assert found.booked, found
                booked.append((loop.time() + found.wait, caller))
                del pending[ticket]
    return [caller for _, caller in sorted(booked)]


async def test_a_flood_does_not_hold_back_another_callers_calls_past_its_share(
    redis_url: str,
) -> None:
    redis = Redis.from_url(redis_url)
    fair = fair_share(redis)
    flood = await admit(fair, "flood", 1.0, 30)
    assert sum(1 for found in flood if found.ticket is not None) >= 25, "the flood waits"
    few = await admit(fair, "few", 1.0, 5)
    order = await slots(fair, [*(("flood", f) for f in flood), *(("few", f) for f in few)])
    assert order.count("few") == 5 and order.count("flood") == 30
    # Equal shares: once `few` waits, the slots alternate, so its 5 calls are done within about
    # 10 slots of its arrival, not after the flood's 25 or more queued before them.
    arrived = sum(1 for found in flood if found.ticket is None)
    last_few = max(i for i, caller in enumerate(order) if caller == "few")
    assert last_few <= arrived + 11, order
    assert order[last_few + 1 :] == ["flood"] * (len(order) - last_few - 1)
    await redis.aclose()


async def test_callers_waiting_together_get_slots_in_proportion_to_their_shares(
    redis_url: str,
) -> None:
    redis = Redis.from_url(redis_url)
    fair = fair_share(redis, rate=20)
    waiting: list[tuple[str, Booking]] = []
    for _ in range(24):  # both queue up at once, one call each in turn
        waiting.append(("one", await fair.admit("one", 1.0, WAIT)))
        waiting.append(("three", await fair.admit("three", 3.0, WAIT)))
    order = await slots(fair, waiting)
    # While both wait (the first 24 slots after the few booked at once), 3 of 4 are "three"'s.
    first = [caller for caller, found in waiting if found.ticket is None]
    window = order[len(first) : len(first) + 24]
    assert 16 <= window.count("three") <= 20, order
    await redis.aclose()


async def test_a_caller_alone_gets_every_slot_whatever_the_others_shares(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    fair = fair_share(redis, rate=4)
    # A caller with a large share asked once, and is idle now: its share is not held for it.
    await slots(fair, [("big", await fair.admit("big", 10.0, WAIT))])
    loop = asyncio.get_running_loop()
    flood = await admit(fair, "small", 1.0, 8)
    booked: list[float] = []
    for found in flood:
        while found.ticket is not None:
            await asyncio.sleep(min(found.wait, 0.05))
            found = await fair.look_again(found.ticket)
        booked.append(loop.time() + found.wait)
    # Work-conserving: consecutive slots of the budget, none left for the idle caller. (The
    # slots' times are the budget's, booked a period apart; the margin is the clocks'.)
    assert all(later - earlier < 1.5 * fair.period for earlier, later in itertools.pairwise(booked))
    await redis.aclose()


async def test_a_call_expected_to_wait_past_its_wait_is_refused_and_books_nothing(
    redis_url: str,
) -> None:
    redis = Redis.from_url(redis_url)
    fair = fair_share(redis, rate=10)
    found = [await fair.admit("flood", 1.0, max_wait=1.0) for _ in range(20)]
    refused = [f for f in found if f.refused is not None]
    assert refused and all(f.refused == "budget" and f.wait > 1.0 for f in refused)
    queued = await redis.zcard(keys.FAIR_QUEUE)
    tat = await redis.get(keys.UPSTREAM_TAT)
    assert (await fair.admit("flood", 1.0, max_wait=1.0)).refused == "budget"
    assert (
        await redis.zcard(keys.FAIR_QUEUE) == queued and await redis.get(keys.UPSTREAM_TAT) == tat
    )
    # Another caller, with nothing queued, still gets in: its expected wait is its share's.
    assert (await fair.admit("other", 1.0, max_wait=1.0)).refused is None
    await redis.aclose()


async def test_a_waiter_that_gives_up_leaves_the_queue(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    fair = fair_share(redis, rate=2)
    found = await admit(fair, "a", 1.0, 4)
    last = found[-1]
    assert last.ticket is not None
    gave_up = await fair.look_again(last.ticket, give_up=True)
    assert gave_up.refused == "budget"
    assert (await fair.look_again(last.ticket)).refused == "budget", "and is gone for good"
    await redis.aclose()


async def test_submit_rate_refuses_past_its_burst_and_says_when_to_retry(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    fair = fair_share(redis, rate=1000)
    limits = Limits(submit_rate=2)
    found = [await fair.admit("a", 1.0, WAIT, limits) for _ in range(3)]
    assert [f.refused for f in found] == [None, None, "submit_rate"]
    assert 0 < found[2].wait <= 0.5, "a slot of the rate comes within half a second"
    assert (await fair.admit("b", 1.0, WAIT, limits)).refused is None, "the rate is per caller"
    await redis.aclose()


async def test_max_outstanding_counts_the_callers_jobs_not_yet_ended(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    fair = fair_share(redis, rate=1000)
    await redis.zadd(keys.caller_outstanding("a"), {"job-1": 1, "job-2": 2})
    tat = await redis.get(keys.UPSTREAM_TAT)
    refused = await fair.admit("a", 1.0, WAIT, Limits(max_outstanding=2))
    assert refused.refused == "max_outstanding"
    assert await redis.get(keys.UPSTREAM_TAT) == tat, "a refused submission books no slot"
    assert (await fair.admit("a", 1.0, WAIT, Limits(max_outstanding=3))).booked
    await redis.aclose()
