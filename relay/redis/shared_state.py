"""The relay-wide figures, read from Redis by whichever process is asked: the shared gauges
of /metrics and the console's overview.

Counters and histograms count what one process did (relay.metrics); these figures are about
shared state (outstanding jobs, due work, how late polls and deliveries are, the upstream pause,
workers alive), so every process reads them fresh from Redis, in one round trip, when scraped.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.responses import Response

from relay.metrics import (
    BACKED_OFF,
    DELIVERY_LAG,
    DUE_WORK,
    MEMORY_GAUGES,
    OUTSTANDING,
    PENDING_DELIVERY_AGE,
    POLL_LAG,
    QUEUE_DEPTH,
    REDIS_MEMORY_HEADROOM,
    REDIS_MEMORY_MAX,
    REDIS_MEMORY_USED,
    SHARED_GAUGES,
    UPSTREAM_PAUSED,
    WORKERS_ALIVE,
)
from relay.redis import keys, scripts
from relay.redis.batch import batcher


@dataclass(frozen=True)
class SharedState:
    outstanding: int
    due: int  # polls and deliveries due now
    poll_lag: float
    queued_deliveries: int
    backed_off: int  # destinations backed off now
    delivery_lag: float  # how overdue the most overdue queued attempt is
    pending_age: float  # age of the oldest delivery waiting for its first attempt
    paused_for: float  # seconds every upstream call stays paused after a 429
    workers: int  # workers whose heartbeat is current


async def read_shared_state(redis: Redis) -> SharedState:
    """The relay-wide figures every process reports, in one round trip (the console too)."""
    script = scripts.register(redis, __name__)
    reply = await script(
        keys=[
            keys.POLLS,
            keys.ARQ_QUEUE,
            keys.BACKED_OFF,
            keys.deliveries("pending"),
            keys.UPSTREAM_PAUSED,
            keys.WORKERS,
        ]
    )
    outstanding, due_polls, lag, queued, due_deliveries, backed_off, *rest = reply
    delivery_lag, pending_age, paused_for, workers = rest
    return SharedState(
        int(outstanding),
        int(due_polls) + int(due_deliveries),
        float(lag),
        int(queued),
        int(backed_off),
        float(delivery_lag),
        float(pending_age),
        float(paused_for),
        int(workers),
    )


async def refresh_shared_gauges(redis: Redis) -> None:
    """Read the shared gauges from Redis in one round trip."""
    shared = await read_shared_state(redis)
    OUTSTANDING.set(shared.outstanding)
    DUE_WORK.set(shared.due)
    POLL_LAG.set(shared.poll_lag)
    QUEUE_DEPTH.set(shared.queued_deliveries)
    BACKED_OFF.set(shared.backed_off)
    DELIVERY_LAG.set(shared.delivery_lag)
    PENDING_DELIVERY_AGE.set(shared.pending_age)
    UPSTREAM_PAUSED.set(shared.paused_for)
    WORKERS_ALIVE.set(shared.workers)


async def metrics_response(redis: Redis) -> Response:
    """The Prometheus exposition of this process, with the shared gauges freshly read."""
    try:
        await refresh_shared_gauges(redis)
        await read_memory(redis)
    except RedisError:
        # Shared gauges go unknown; this process's own counters are still worth serving.
        for gauge in (*SHARED_GAUGES, *MEMORY_GAUGES):
            gauge.set(float("nan"))
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)


async def read_memory(redis: Redis) -> tuple[int, int]:
    """Redis used_memory and maxmemory (0: no limit), also setting the memory gauges."""
    (info,) = await batcher(redis).run([("INFO", "memory")])
    used, maximum = int(info["used_memory"]), int(info.get("maxmemory", 0))
    REDIS_MEMORY_USED.set(used)
    REDIS_MEMORY_MAX.set(maximum)
    REDIS_MEMORY_HEADROOM.set(max(0.0, 1 - used / maximum) if maximum else 1.0)
    return used, maximum
