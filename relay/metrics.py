"""Prometheus metrics, defined once per process.

Counters and histograms count what this process did (the API: submissions, its responses and
its upstream calls; a worker: polls, upstream calls and deliveries). Gauges about shared state
(outstanding jobs, due work, how late polls and deliveries are, the upstream pause, workers
alive) are read from Redis when scraped, by whoever is scraped (relay.redis.shared_state), so
they are right whichever process serves them, even when no worker is left to scrape; so are
Redis's memory figures, and `relay_redis_data_lost` and `relay_redis_writable`, which
relay.redis.watch keeps up to date. Each process serves its own /metrics: the API on its port,
each worker on RELAY_WORKER_HTTP_PORT. No label takes a value from a request (an id, a URL, a
caller's path): every label set is bounded. Defined here, below every stage, so that any module
may count.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import TypeVar

from prometheus_client import Counter, Gauge, Histogram
from prometheus_client.metrics import MetricWrapperBase

Metric = TypeVar("Metric", bound=MetricWrapperBase)

JOBS_SUBMITTED = Counter(
    "relay_jobs_submitted",
    "Jobs accepted by Chamelaion and tracked by the relay, by caller",
    ["caller"],
)
JOBS_ENDED = Counter(
    "relay_jobs_ended",
    "Tracked jobs that reached a final status, by status and caller",
    ["status", "caller"],
)
UPSTREAM_CALLS = Counter("relay_upstream_calls", "Requests to Chamelaion", ["endpoint", "status"])
UPSTREAM_ANSWERS_CUT = Counter(
    "relay_upstream_answers_cut",
    "Answers from Chamelaion cut off unread past the cap on one answer's size (taken as no answer)",
    ["endpoint"],
)
POLLS = Counter("relay_polls", "Polls made, by what they found", ["result"])
SWEEPS = Counter(
    "relay_sweeps",
    "Sweeps of the list of requests, by outcome (all but complete leave jobs to per-id polls)",
    ["outcome"],
)
SWEEP_PAGES = Counter("relay_sweep_pages", "List pages read by sweeps")
SWEEP_PAGES_SKIPPED = Counter(
    "relay_sweep_pages_skipped",
    "List pages a sweep could not use and went on without (their rows wait for the next sweep), "
    "by why: error (an HTTP error), unreachable, bad_body (not a page of requests, or too large)",
    ["reason"],
)
SWEEP_PAGE_WAIT = Histogram(
    "relay_sweep_page_wait_seconds",
    "How long each sweep page waited for its slot of the upstream budget",
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)
SWEEP_ROWS = Counter("relay_sweep_rows_matched", "List rows that were outstanding tracked jobs")
SWEEP_ORDER = Counter(
    "relay_sweep_order", "Sweeps by the list order they found (or `unusable`)", ["order"]
)
DELIVERIES = Counter("relay_deliveries", "Callback delivery attempts, by outcome", ["outcome"])
CALLER_DELIVERIES = Counter(
    "relay_caller_deliveries",
    "Callback delivery attempts made, by caller and outcome (delivered, retry, gone, failed)",
    ["caller", "outcome"],
)
OUTPUT_REFRESHES = Counter(
    "relay_output_refreshes",
    "Late attempts at lipsync.completed that re-read their job from Chamelaion first, by "
    "outcome (refreshed; failed: the stored object was sent)",
    ["outcome"],
)
OPS_EVENTS = Counter(
    "relay_ops_events",
    "Operational events for RELAY_OPS_WEBHOOK_URL, by type and what became of them",
    ["type", "outcome"],
)
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
    "API calls answered 429 because the shared upstream budget had no slot soon enough for "
    "their caller (or a 429 pause was on), by caller",
    ["caller"],
)
API_BUDGET_WAIT = Histogram(
    "relay_api_budget_wait_seconds",
    "How long API calls waited for their slot of the shared upstream budget, by caller (the "
    "fair share among callers decides it)",
    ["caller"],
    buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30),
)
CALLER_LIMITED = Counter(
    "relay_caller_limited",
    "Submissions answered 429 for their caller's own limit, by caller and limit "
    "(max_outstanding, submit_rate)",
    ["caller", "limit"],
)
IDEMPOTENCY_KEYS_REFUSED = Counter(
    "relay_idempotency_keys_refused",
    "Submissions answered 429 because their caller already held RELAY_IDEMPOTENCY_MAX_KEYS "
    "Idempotency-Key records",
)
# Known label values start at 0: a series born at 1 has no earlier sample, so rate() and
# increase() miss its first event (the one callback given up that an alert is waiting for).
DELIVERY_OUTCOMES = ("delivered", "retry", "gone", "failed", "postponed", "busy")
SWEEP_OUTCOMES = (
    "complete",
    "stopped",
    "lost_lease",
    "unusable_order",
    "unreachable",
    "rate_limited",
    "error",
    "bad_body",
)
# Callers' names label a few metrics, bounded by the callers file: a name it does not hold (a
# job of a caller since removed, or from before callers were recorded) is counted as this one.
UNKNOWN_CALLER = "unknown"
_is_caller: Callable[[str], bool] | None = None


def bound_callers(is_caller: Callable[[str], bool], names: Iterable[str], *, role: str) -> None:
    """The wiring names the callers in force (`is_caller`, kept current with the file) and
    starts `role`'s ("api" or "worker") per-caller series at 0 for `names` (see
    DELIVERY_OUTCOMES on why)."""
    global _is_caller
    _is_caller = is_caller
    for name in (*names, UNKNOWN_CALLER):
        if role == "api":
            JOBS_SUBMITTED.labels(name)
            API_BUDGET_REFUSED.labels(name)
            API_BUDGET_WAIT.labels(name)
            for limit in LIMITS:
                CALLER_LIMITED.labels(name, limit)
        else:
            for status in ("completed", "failed"):
                JOBS_ENDED.labels(status, name)
            for outcome in CALLER_DELIVERY_OUTCOMES:
                CALLER_DELIVERIES.labels(name, outcome)


def caller_label(name: str | None) -> str:
    if not name or (_is_caller is not None and not _is_caller(name)):
        return UNKNOWN_CALLER
    return name


CALLER_DELIVERY_OUTCOMES = ("delivered", "retry", "gone", "failed")
LIMITS = ("max_outstanding", "submit_rate")
for _outcome in DELIVERY_OUTCOMES:
    DELIVERIES.labels(_outcome)
for _outcome in SWEEP_OUTCOMES:
    SWEEPS.labels(_outcome)
DELIVERY_LATENCY = Histogram(
    "relay_delivery_latency_seconds",
    "From the job's end being seen to its callback being accepted",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 1800, 7200, 86400),
)
HTTP_RESPONSES = Counter(
    "relay_http_responses",
    "API responses by status class (1xx to 5xx), the 503s past RELAY_HTTP_MAX_CONCURRENCY "
    "and 431s for oversized headers included; probes and /metrics are not counted",
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


REDIS_MEMORY_USED = Gauge("relay_redis_memory_used_bytes", "Redis used_memory")
REDIS_MEMORY_MAX = Gauge("relay_redis_memory_max_bytes", "Redis maxmemory (0: no limit)")
REDIS_MEMORY_HEADROOM = Gauge(
    "relay_redis_memory_headroom_ratio",
    "Share of Redis maxmemory still free (1 - used/max); 1 when there is no limit",
)
REDIS_DATA_LOST = Gauge(
    "relay_redis_data_lost", "1 while an unacknowledged loss of the relay's Redis data is recorded"
)
REDIS_WRITABLE = Gauge(
    "relay_redis_writable",
    "1 while Redis took this process's last check write (every 10 s and each /readyz), 0 while "
    "it refuses writes (full under noeviction, a read-only replica, a failed snapshot)",
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


WAITING = Gauge(
    "relay_api_waiting",
    "Requests this API process holds open for job events, by kind (wait: Prefer: wait; stream: "
    "a job's event stream; feed: a caller's feed read waiting for its next event)",
    ["kind"],
)


@functools.lru_cache(maxsize=4096)
def labelled(metric: Metric, *values: str) -> Metric:
    """`metric.labels(*values)`, remembered: `labels` takes the metric's lock and builds its key
    on every call, several times a submission. For label sets no one removes (every one here
    is bounded, see above)."""
    return metric.labels(*values)
