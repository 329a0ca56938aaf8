"""Prometheus metrics, defined once per process.

Counters and histograms count what this process did (the API: submissions, its responses and
its upstream calls; a worker: polls, upstream calls and deliveries). Gauges about shared state
(outstanding jobs, due work, how late polls and deliveries are, the upstream pause, workers
alive) are read from Redis when scraped, by whoever is scraped, so they are right whichever
process serves them, even when no worker is left to scrape; so are Redis's memory figures, and
`relay_redis_data_lost`, which relay.redis_watch keeps in step with a shared key. Each process
serves its own /metrics: the API on its port, each worker on RELAY_WORKER_HTTP_PORT. No label
takes a value from a request (an id, a URL, a caller's path): every label set is bounded.
"""

from __future__ import annotations

from dataclasses import dataclass

from prometheus_client import CONTENT_TYPE_LATEST, Counter, Gauge, Histogram, generate_latest
from redis.asyncio import Redis
from redis.exceptions import RedisError
from starlette.responses import Response

from relay import keys, lua

JOBS_SUBMITTED = Counter(
    "relay_jobs_submitted", "Jobs accepted by Chamelaion and tracked by the relay"
)
JOBS_ENDED = Counter(
    "relay_jobs_ended", "Tracked jobs that reached a final status, by status", ["status"]
)
UPSTREAM_CALLS = Counter("relay_upstream_calls", "Requests to Chamelaion", ["endpoint", "status"])
POLLS = Counter("relay_polls", "Polls made, by what they found", ["result"])
SWEEPS = Counter(
    "relay_sweeps",
    "Sweeps of the list of requests, by outcome (all but complete leave jobs to per-id polls)",
    ["outcome"],
)
SWEEP_PAGES = Counter("relay_sweep_pages", "List pages read by sweeps")
SWEEP_ROWS = Counter("relay_sweep_rows_matched", "List rows that were outstanding tracked jobs")
SWEEP_ORDER = Counter(
    "relay_sweep_order", "Sweeps by the list order they found (or `unusable`)", ["order"]
)
DELIVERIES = Counter("relay_deliveries", "Callback delivery attempts, by outcome", ["outcome"])
STRANDED_SWEEPS = Counter("relay_stranded_sweeps", "Stranded-delivery sweeps run by this worker")
STRANDED_REQUEUED = Counter(
    "relay_stranded_requeued", "Pending deliveries whose lost attempt the sweep queued again"
)
INTENTS = Counter(
    "relay_submit_intents",
    "Submissions whose upstream answer was lost, by how that was resolved (API: adopted, "
    "handed_over, ambiguous, unfindable, unrecorded, unrecorded_unfindable; workers: "
    "reconciled, not_found, dropped_ambiguous, dropped_unfindable)",
    ["outcome"],
)
API_BUDGET_REFUSED = Counter(
    "relay_api_budget_refused",
    "API calls answered 429 because the shared upstream budget had no slot soon enough (or a "
    "429 pause was on)",
)
DELIVERY_LATENCY = Histogram(
    "relay_delivery_latency_seconds",
    "From the job's end being seen to its callback being accepted",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 7200, 86400),
)
HTTP_RESPONSES = Counter(
    "relay_http_responses",
    "API responses by status class (1xx to 5xx), uvicorn's own 503s past "
    "RELAY_HTTP_MAX_CONCURRENCY included; probes and /metrics are not counted",
    ["status_class"],
)
UPSTREAM_RATE_LIMIT = Gauge(
    "relay_upstream_rate_limit",
    "The shared upstream budget in calls per second (RELAY_UPSTREAM_RATE_LIMIT): every call "
    "counted in relay_upstream_calls_total spends it",
)
OUTSTANDING = Gauge("relay_outstanding_jobs", "Jobs being polled")
DUE_WORK = Gauge("relay_due_work", "Polls due now plus deliveries due now (not parked future work)")
POLL_LAG = Gauge("relay_poll_lag_seconds", "How overdue the most overdue poll is")
QUEUE_DEPTH = Gauge("relay_delivery_queue_depth", "Delivery attempts queued, due or deferred")
BACKED_OFF = Gauge(
    "relay_destinations_backed_off",
    "Callback destinations backed off now because they kept failing (shared state)",
)
DELIVERY_LAG = Gauge(
    "relay_delivery_lag_seconds",
    "How overdue the most overdue queued delivery attempt is (retries waiting on their schedule "
    "or on a backed-off destination are not due)",
)
PENDING_DELIVERY_AGE = Gauge(
    "relay_pending_delivery_age_seconds",
    "Age of the oldest delivery still waiting for its first attempt, from its job's end (or its "
    "redelivery); one held for a backed-off destination counts",
)
UPSTREAM_PAUSED = Gauge(
    "relay_upstream_paused_seconds",
    "Seconds every upstream call stays paused after Chamelaion answered 429 (0: not paused)",
)
WORKERS_ALIVE = Gauge(
    "relay_workers_alive", "Workers whose heartbeat is current (relay.worker.heartbeat)"
)
# This worker's own: set as functions of its live state when the worker starts.
DELIVERIES_IN_FLIGHT = Gauge("relay_deliveries_in_flight", "Callback attempts being sent now")
DELIVERIES_WAITING = Gauge(
    "relay_deliveries_waiting", "Callback attempts waiting for a slot of their destination"
)
FIRST_ATTEMPTS_WAITING = Gauge(
    "relay_first_attempts_waiting",
    "First callback attempts of a burst waiting their turn in this worker's memory",
)


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
    script = lua.register(redis, "relay", "shared_state")
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


REDIS_MEMORY_USED = Gauge("relay_redis_memory_used_bytes", "Redis used_memory")
REDIS_MEMORY_MAX = Gauge("relay_redis_memory_max_bytes", "Redis maxmemory (0: no limit)")
REDIS_MEMORY_HEADROOM = Gauge(
    "relay_redis_memory_headroom_ratio",
    "Share of Redis maxmemory still free (1 - used/max); 1 when there is no limit",
)
REDIS_DATA_LOST = Gauge(
    "relay_redis_data_lost", "1 while an unacknowledged loss of the relay's Redis data is recorded"
)
MEMORY_GAUGES = (REDIS_MEMORY_USED, REDIS_MEMORY_MAX, REDIS_MEMORY_HEADROOM)
SHARED_GAUGES = (
    OUTSTANDING,
    DUE_WORK,
    POLL_LAG,
    QUEUE_DEPTH,
    BACKED_OFF,
    DELIVERY_LAG,
    PENDING_DELIVERY_AGE,
    UPSTREAM_PAUSED,
    WORKERS_ALIVE,
)
HTTP_CONNECTIONS_CLOSED = Counter(
    "relay_http_connections_closed",
    "API connections the relay closed to protect itself, by reason (idle_evicted: the longest "
    "idle, to make room past a connection cap; refused: new, past a cap with every connection "
    "busy; headers_too_large: answered 431)",
    ["reason"],
)
UPLOADS_IN_PROGRESS = Gauge("relay_uploads_in_progress", "Uploads this API process is running")


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


async def read_memory(redis: Redis) -> tuple[int, int]:
    """Redis used_memory and maxmemory (0: no limit), also setting the memory gauges."""
    info = await redis.info("memory")
    used, maximum = int(info["used_memory"]), int(info.get("maxmemory", 0))
    REDIS_MEMORY_USED.set(used)
    REDIS_MEMORY_MAX.set(maximum)
    REDIS_MEMORY_HEADROOM.set(max(0.0, 1 - used / maximum) if maximum else 1.0)
    return used, maximum


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
