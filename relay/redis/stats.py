"""Counts per minute shared by every worker, for the console's chart: callbacks delivered and
failed (the deliverer counts them), and upstream 429s (the poll schedule's pause counts those).

One counter per outcome and minute (Redis clock), kept two hours: small, bounded, and read in
one MGET. Prometheus has the same counts per process; this is the whole relay's, without one.
"""

from __future__ import annotations

from redis.asyncio import Redis

from relay.redis import keys, scripts
from relay.redis.batch import ScriptCall, batcher
from relay.redis.clock import redis_now

KEEP_SECONDS = 7200
# What the chart draws: settled deliveries, and attempts that failed (retry or given up).
OUTCOMES = ("delivered", "failed")


class OutcomeCounter:
    def __init__(self, redis: Redis) -> None:
        self._count = scripts.register(redis, __name__)

    def count_call(self, outcome: str) -> ScriptCall:
        """The call that counts one `outcome`, made with the attempt's other records."""
        return self._count.call(keys=[], args=[keys.STATS_PREFIX, outcome, KEEP_SECONDS])


async def last_hour(redis: Redis, outcomes: tuple[str, ...] = OUTCOMES) -> dict[str, list[int]]:
    """Per outcome, 60 counts: the minute an hour ago first, the current minute last.

    Besides delivery outcomes, `rate_limited` counts the upstream's 429s
    (relay.jobs.schedule's pause).
    """
    minute = int(await redis_now(redis)) // 60
    minutes = range(minute - 59, minute + 1)
    names = [keys.stats(outcome, m) for outcome in outcomes for m in minutes]
    (values,) = await batcher(redis).run([("MGET", *names)])
    counts = [int(value) if value else 0 for value in values]
    return {outcome: counts[i * 60 : (i + 1) * 60] for i, outcome in enumerate(outcomes)}
