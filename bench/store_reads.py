"""Reads of the relay's store that more than one bench makes."""

from __future__ import annotations

from redis.asyncio import Redis

from relay.redis import keys


async def ended_at(redis_url: str, ids: list[str]) -> dict[str, float]:
    """When the relay saw each of `ids` end (Redis clock), for those it has seen end."""
    redis = Redis.from_url(redis_url)
    async with redis.pipeline(transaction=False) as pipe:
        for request_id in ids:
            pipe.hget(keys.job(request_id), "ended")
        values = await pipe.execute()
    await redis.aclose()
    return {rid: float(v) for rid, v in zip(ids, values, strict=True) if v}
