"""The relay-wide figures, read from Redis by whichever process is asked: the shared gauges
of /metrics and the console's overview.

Counters and histograms count what one process did (relay.metrics); these figures are about
shared state (outstanding jobs, due work, poll lag, queue depth, destinations backed off), so
every process reads them fresh from Redis, in one round trip, when it is scraped.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.responses import Response

from relay.metrics import (
    BACKED_OFF,
    DUE_WORK,
    MEMORY_GAUGES,
    OUTSTANDING,
    POLL_LAG,
    QUEUE_DEPTH,
    read_memory,
)
from relay.redis import keys, scripts


@dataclass(frozen=True)
class SharedState:
    outstanding: int
    due: int  # polls and deliveries due now
    poll_lag: float
    queued_deliveries: int
    backed_off: int  # destinations backed off now


async def read_shared_state(redis: Redis) -> SharedState:
    """The relay-wide figures every process reports, in one round trip (the console too)."""
    script = scripts.register(redis, __name__)
    reply = await script(keys=[keys.POLLS, keys.ARQ_QUEUE, keys.BACKED_OFF])
    outstanding, due_polls, lag, queued, due_deliveries, backed_off = reply
    return SharedState(
        int(outstanding),
        int(due_polls) + int(due_deliveries),
        float(lag),
        int(queued),
        int(backed_off),
    )


async def refresh_shared_gauges(redis: Redis) -> None:
    """Read the shared gauges from Redis in one round trip."""
    shared = await read_shared_state(redis)
    OUTSTANDING.set(shared.outstanding)
    DUE_WORK.set(shared.due)
    POLL_LAG.set(shared.poll_lag)
    QUEUE_DEPTH.set(shared.queued_deliveries)
    BACKED_OFF.set(shared.backed_off)


async def metrics_response(redis: Redis) -> Response:
    """The Prometheus exposition of this process, with the shared gauges freshly read."""
    try:
        await refresh_shared_gauges(redis)
        await read_memory(redis)
    except RedisError:
        # Shared gauges go unknown; this process's own counters are still worth serving.
        for gauge in (OUTSTANDING, DUE_WORK, POLL_LAG, QUEUE_DEPTH, BACKED_OFF, *MEMORY_GAUGES):
            gauge.set(float("nan"))
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
