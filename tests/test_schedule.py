"""The poll schedule and shared budget, on a real Redis with its real clock."""

from __future__ import annotations

import asyncio
import time

from redis.asyncio import Redis

from relay.jobs.fair_share import FairShare
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
    fair = FairShare(redis, schedule)
    await schedule.pause_upstream(0.6)
    refused = await fair.admit("a", 1.0, max_wait=0.1)
    assert refused.refused == "budget" and 0.4 < refused.wait <= 0.6, "refused, with its end"
    waiting = await fair.admit("a", 1.0, max_wait=2.0)
    assert waiting.ticket is not None, "it waits for the pause's end, not refused"
    found = waiting
    for _ in range(100):  # as a waiting call does: look again when told
        await asyncio.sleep(found.wait)
        found = await fair.look_again(waiting.ticket)
        if found.ticket is None:
            break
    assert found.booked, "and is booked once the pause is about to end"
    await redis.aclose()


async def test_each_pause_is_counted_for_the_last_hour(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    schedule = PollSchedule(redis, rate=10, lease=30)
    for _ in range(3):
        await schedule.pause_upstream(0.1)
    counts = await last_hour(redis, ("rate_limited",))
    assert sum(counts["rate_limited"]) == 3
    await redis.aclose()


async def test_api_bookings_never_hold_a_status_read_back_past_a_slot_of_its_share(
    redis_url: str,
) -> None:
    # 10 calls/s, a fifth for status reads: the API's calls book the other 8/s, a lookahead
    # ahead, and 40 more wait in the fair queue for up to 5 s.
    redis = Redis.from_url(redis_url)
    schedule = PollSchedule(redis, rate=10, lease=30, read_share=0.2)
    fair = FairShare(redis, schedule)
    found = [await fair.admit("flood", 1.0, max_wait=5.0) for _ in range(50)]
    waiting = [f for f in found if f.ticket is not None]
    assert len(waiting) >= 35 and max(f.wait for f in waiting) > 4, "a flood waits in the queue"
    assert found[-1].refused == "budget", "and past 5 s is refused"
    api_booked = await redis.get(keys.UPSTREAM_TAT)
    booked, wait = await schedule.reserve()
    assert booked and wait <= 0.5, f"a sweep's page waited {wait:.2f} s behind them"
    assert await redis.get(keys.UPSTREAM_TAT) == api_booked, "and took none of their slots"
    # Its share is its own: the next reads wait a slot of it (2/s), not the API's 5 s.
    booked, wait = await schedule.reserve()
    assert booked and 0.4 < wait <= 0.5
    booked, wait = await schedule.reserve()
    assert booked and 0.9 < wait <= 1.0
    # Per-id polls, which take only free slots, get the share's slots as they come.
    await due_jobs(redis, 3)
    claim = await schedule.claim(10)
    assert claim.ids == [] and claim.wait is not None and claim.wait <= 1.5
    await redis.aclose()


async def test_status_reads_take_what_the_api_leaves_free_and_only_that(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    schedule = PollSchedule(redis, rate=10, lease=30, read_share=0.1)
    parts = (keys.UPSTREAM_READS_TAT, keys.UPSTREAM_TAT)
    booked_in = {key: 0 for key in parts}
    for _ in range(10):
        before = await redis.mget(parts)
        booked, wait = await schedule.reserve()
        after = await redis.mget(parts)
        assert booked
        [part] = [key for key, was, now in zip(parts, before, after, strict=True) if was != now]
        booked_in[part] += 1
        if part == keys.UPSTREAM_TAT:
            assert wait <= schedule.shared_period, "a read booked the API's part ahead"
        await asyncio.sleep(wait)
    # The API is idle: most pages went out in its part (9/s), not at the 1/s of the reads' share.
    assert booked_in[keys.UPSTREAM_TAT] >= 6
    # A read never books the shared part ahead: the API's next slot is at most the one after
    # a read's that was free when taken.
    found = await FairShare(redis, schedule).admit("a", 1.0, max_wait=1.0)
    assert found.booked and found.wait <= schedule.shared_period
    await redis.aclose()


async def test_claims_use_free_slots_of_both_parts(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    schedule = PollSchedule(redis, rate=100, lease=30, read_share=0.5)
    await due_jobs(redis, 40)
    claimed = (await schedule.claim(40)).ids
    # A burst of a tenth of a second in each part: 5 + 5, booked in both.
    assert len(claimed) == 10
    assert await redis.exists(keys.UPSTREAM_TAT, keys.UPSTREAM_READS_TAT) == 2
    await redis.aclose()
