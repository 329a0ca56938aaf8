"""Prometheus metrics, defined once per process.

Counters and histograms count what this process did (the API: submissions and its upstream
calls; a worker: polls, upstream calls and deliveries). Gauges about shared state (outstanding
jobs, due work, poll lag, queue depth) are read from Redis when scraped, by whoever is scraped,
so they are right whichever process serves them. Each process serves its own /metrics: the API
on its port, each worker on RELAY_WORKER_HTTP_PORT.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.responses import Response

from relay import keys, lua

JOBS_SUBMITTED = Counter(
    "relay_jobs_submitted", "Jobs accepted by Chamelaion and tracked by the relay"
)
UPSTREAM_CALLS = Counter("relay_upstream_calls", "Requests to Chamelaion", ["endpoint", "status"])
POLLS = Counter("relay_polls", "Polls made, by what they found", ["result"])
DELIVERIES = Counter("relay_deliveries", "Callback delivery attempts, by outcome", ["outcome"])
DELIVERY_LATENCY = Histogram(
    "relay_delivery_latency_seconds",
    "From the job's end being seen to its callback being accepted",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 7200, 86400),
)
OUTSTANDING = Gauge("relay_outstanding_jobs", "Jobs being polled")
DUE_WORK = Gauge("relay_due_work", "Polls due now plus deliveries due now (not parked future work)")
POLL_LAG = Gauge("relay_poll_lag_seconds", "How overdue the most overdue poll is")
QUEUE_DEPTH = Gauge("relay_delivery_queue_depth", "Delivery attempts queued, due or deferred")
UPLOADS_IN_PROGRESS = Gauge("relay_uploads_in_progress", "Uploads this API process is running")


async def refresh_shared_gauges(redis: Redis) -> None:
    """Read the shared gauges from Redis in one round trip."""
    script = lua.register(redis, "relay", "shared_state")
    reply = await script(keys=[keys.POLLS, keys.ARQ_QUEUE])
    outstanding, due_polls, lag, queued, due_deliveries = reply
    OUTSTANDING.set(int(outstanding))
    DUE_WORK.set(int(due_polls) + int(due_deliveries))
    POLL_LAG.set(float(lag))
    QUEUE_DEPTH.set(int(queued))


async def metrics_response(redis: Redis) -> Response:
    """The Prometheus exposition of this process, with the shared gauges freshly read."""
    try:
        await refresh_shared_gauges(redis)
    except RedisError:
        # Shared gauges go unknown; this process's own counters are still worth serving.
        for gauge in (OUTSTANDING, DUE_WORK, POLL_LAG, QUEUE_DEPTH):
            gauge.set(float("nan"))
    return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)
