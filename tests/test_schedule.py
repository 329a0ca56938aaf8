"""The poll schedule and shared budget, on a real Redis with its real clock."""

from __future__ import annotations

import asyncio
import time

from redis.asyncio import Redis

from relay.jobs.schedule import PollSchedule
from relay.jobs.store import JobStore
from relay.redis import keys
from relay.redis.stats import last_hour


async def due_jobs(redis: Redis, count: int) -> list[str]:
    store = JobStore(redis)
    ids = [f"job-{n}" for n in range(count)]
    for request_id in ids:
        await store.create(request_id, callback_url=None, reference_id=None, first_poll_in=0)
    return ids


async def test_the_default_rate_claims_one_at_a_time_with_exact_spacing(redis_url: str) -> None:
    # Regression: at rate 10 (burst 1) float rounding of the Redis clock once refused every claim.
    redis = Redis.from_url(redis_url)
    schedule = PollSchedule(redis, rate=10, lease=30)
    await due_jobs(redis, 3)
    first = await schedule.claim(10)
    assert len(first.ids) == 1
    second = await schedule.claim(10)
    assert second.ids == [] and second.wait is not None and 0 < second.wait <= 0.1
    await asyncio.sleep(second.wait)
    assert len((await schedule.claim(10)).ids) == 1
    await redis.aclose()


async def test_claims_are_leased_and_fall_due_again(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    schedule = PollSchedule(redis, rate=1000, lease=0.5)
    ids = await due_jobs(redis, 5)
    claimed = (await schedule.claim(100)).ids
    assert sorted(claimed) == sorted(ids)
    again = await schedule.claim(100)
    assert again.ids == [] and again.wait is not None and 0.3 < again.wait <= 0.5
    await asyncio.sleep(0.55)
    assert sorted((await schedule.claim(100)).ids) == sorted(ids), "a dead worker's claims return"
    await schedule.hand_back(ids[:2])
    assert sorted((await schedule.claim(100)).ids) == sorted(ids[:2])
    await redis.aclose()


async def test_two_schedules_share_one_budget(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    workers = [PollSchedule(redis, rate=50, lease=60) for _ in range(2)]
    await due_jobs(redis, 500)
    started = time.monotonic()
    claimed = 0
    while time.monotonic() - started < 1.0:
        for schedule in workers:
            claimed += len((await schedule.claim(100)).ids)
    elapsed = time.monotonic() - started
    assert claimed <= 50 * elapsed + workers[0].burst + 1
    assert claimed >= 40 * elapsed
    await redis.aclose()


async def test_a_pause_stops_every_claim_until_it_ends(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    schedule = PollSchedule(redis, rate=1000, lease=60)
    await due_jobs(redis, 2)
    await schedule.pause_upstream(0.4)
    await schedule.pause_upstream(0.1)  # a shorter pause never shortens a longer one
    paused = await schedule.claim(10)
    assert paused.ids == [] and paused.wait is not None and paused.wait > 0.3
    await asyncio.sleep(paused.wait)
    assert len((await schedule.claim(10)).ids) == 2
    assert await redis.zcard(keys.POLLS) == 2
    await redis.aclose()


async def test_an_api_call_waits_out_a_pause_that_ends_within_its_wait(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    schedule = PollSchedule(redis, rate=1000, lease=60)
    await schedule.pause_upstream(0.5)
    booked, until = await schedule.take(max_wait=0.1)
    assert not booked and 0.3 < until <= 0.5, "a pause past the wait is refused, with its end"
    booked, wait = await schedule.take(max_wait=2.0)
    assert booked and 0.3 < wait <= 0.5, "booked for when the pause ends, not refused"
    await redis.aclose()


async def test_each_pause_is_counted_for_the_last_hour(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    schedule = PollSchedule(redis, rate=10, lease=30)
    for _ in range(3):
        await schedule.pause_upstream(0.1)
    counts = await last_hour(redis, ("rate_limited",))
    assert sum(counts["rate_limited"]) == 3
    await redis.aclose()
