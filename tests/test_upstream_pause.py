"""One upstream 429 pauses every worker's polls, but never longer than RELAY_MAX_UPSTREAM_PAUSE."""

from __future__ import annotations

from redis.asyncio import Redis

from relay.jobs.schedule import PollSchedule
from relay.redis import keys
from relay.settings import load_settings
from relay.worker.process import build_state
from tests.stack import SANDBOX_KEY, new_secret


async def test_a_retry_after_of_days_pauses_polling_only_up_to_the_cap(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    schedule = PollSchedule(redis, rate=10, lease=30, max_pause=5)
    await schedule.pause_upstream(7 * 86400)
    seconds, micros = await redis.time()
    paused_until = float(await redis.get(keys.UPSTREAM_PAUSED) or 0)
    assert 0 < paused_until - (seconds + micros / 1e6) <= 5
    claim = await schedule.claim(10)
    assert claim.ids == [] and claim.wait is not None and claim.wait <= 5
    await redis.aclose()


async def test_a_short_retry_after_is_honoured_as_it_is(redis_url: str) -> None:
    redis = Redis.from_url(redis_url)
    schedule = PollSchedule(redis, rate=10, lease=30, max_pause=300)
    await schedule.pause_upstream(2)
    seconds, micros = await redis.time()
    paused_until = float(await redis.get(keys.UPSTREAM_PAUSED) or 0)
    assert 1 < paused_until - (seconds + micros / 1e6) <= 2
    await redis.aclose()


async def test_the_worker_uses_the_configured_cap(redis_url: str) -> None:
    settings = load_settings(
        CHAMELAION_API_KEY=SANDBOX_KEY,
        RELAY_REDIS_URL=redis_url,
        RELAY_WEBHOOK_SECRETS=new_secret(),
        RELAY_MAX_UPSTREAM_PAUSE="42",
    )
    state = await build_state(settings)
    try:
        assert state.schedule.max_pause == 42
    finally:
        await state.upstream.aclose()
        await state.callback_client.aclose()
        await state.redis.aclose()
