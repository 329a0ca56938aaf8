"""The worker process: wires the poll dispatcher, the sweeper, the stranded-delivery sweep, the
intent reconcile, first attempts, arq's deliveries and the heartbeat onto one event loop, as
services that one supervisor starts and stops (relay.lifecycle; the order: SHUTDOWN_ORDER).

Every "now" arq compares with, and every delivery a worker queues, is on Redis's clock
(relay.redis.clock), so a worker whose own clock is off neither makes a deferred attempt early
nor leaves it waiting.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from arq.connections import ArqRedis

from relay.callers.model import DEFAULT_CALLER
from relay.callers.source import CallerSource
from relay.delivery.attempt_log import AttemptLog
from relay.delivery.deliverer import Deliverer
from relay.delivery.destinations import Destinations
from relay.delivery.first_attempts import FirstAttempts
from relay.delivery.netpolicy import callback_policy
from relay.delivery.ops_events import OpsEvents
from relay.delivery.queue import DeliveryQueue
from relay.delivery.refresh import Refresher, refresh_timeout
from relay.delivery.signers import CallerSigners
from relay.delivery.store import Breaker, Delivery, DeliveryStore
from relay.delivery.stranded import StrandedSweep
from relay.delivery.transport import CallbackClient, make_callback_client
from relay.jobs.intents import Intents, lookup_timeout
from relay.jobs.poller import Poller
from relay.jobs.reconcile import Reconciler
from relay.jobs.schedule import PollSchedule, StatusReadBudget
from relay.jobs.store import JobStore
from relay.jobs.sweep import Sweeper
from relay.lifecycle import Service, supervise
from relay.metrics import (
    DELIVERIES_IN_FLIGHT,
    DELIVERIES_WAITING,
    FIRST_ATTEMPTS_WAITING,
    UPSTREAM_RATE_LIMIT,
    bound_callers,
)
from relay.redis.clock import RedisClock
from relay.redis.conn import arq_pool, close
from relay.redis.watch import RedisWatch
from relay.settings import Settings
from relay.signing import Signer
from relay.upstream import Upstream
from relay.worker.dispatcher import Dispatcher
from relay.worker.health import HealthPort, create_worker_http_app
from relay.worker.heartbeat import Heartbeat
from relay.worker.tasks import ArqLoop, arq_on_redis_clock, arq_worker

log = logging.getLogger(__name__)


@dataclass
class WorkerState:
    settings: Settings
    redis: ArqRedis
    store: JobStore
    schedule: PollSchedule
    upstream: Upstream
    callback_client: CallbackClient
    deliverer: Deliverer
    first_attempts: FirstAttempts
    dispatcher: Dispatcher
    stranded: StrandedSweep
    sweeper: Sweeper
    clock: RedisClock
    reconciler: Reconciler
    callers: CallerSource


async def build_state(settings: Settings) -> WorkerState:
    redis = await arq_pool(settings.redis_url, timeout=settings.redis_timeout)
    clock = RedisClock(redis)
    await clock.sync()
    store = JobStore(
        redis,
        retention=settings.job_retention,
        lifetime=settings.max_job_age + settings.job_retention,
    )
    schedule = PollSchedule(
        redis,
        rate=settings.upstream_rate_limit,
        lease=settings.claim_lease(),
        max_pause=settings.max_upstream_pause,
        read_share=settings.status_read_share,
    )
    upstream = Upstream.from_settings(settings)
    queue = DeliveryQueue(redis, settings.delivery_retry_schedule, clock)
    attempt_log = AttemptLog(
        redis, retention=settings.job_retention, excerpts=settings.attempt_log_excerpt
    )
    deliveries = DeliveryStore(redis, retention=settings.job_retention)
    # Kept current with RELAY_CALLERS_FILE: whose secrets sign a callback, and its hosts.
    callers = CallerSource.from_settings(settings)
    client = make_callback_client(
        callback_policy(settings),
        settings.delivery_timeout,
        max_connections=settings.delivery_concurrency,
    )
    refresher = (
        Refresher(
            upstream.with_budget(StatusReadBudget(schedule, met_by="a late delivery's re-read")),
            after=settings.refresh_after,
            timeout=refresh_timeout(settings),
        )
        if settings.refresh_after
        else None
    )
    ops = None
    if settings.ops_webhook_url:
        assert settings.ops_webhook_secret is not None  # Settings.require checked it
        ops = OpsEvents(
            settings.ops_webhook_url,
            Signer((settings.ops_webhook_secret,), clock=clock.now),
            schedule=settings.delivery_retry_schedule,
            timeout=settings.delivery_timeout,
            clock=clock.now,
        )
    deliverer = Deliverer(
        store=store,
        deliveries=deliveries,
        signers=CallerSigners(callers, settings.webhook_secrets, clock=clock.now),
        client=client,
        schedule=settings.delivery_retry_schedule,
        enqueue_attempt=queue.enqueue_attempt,
        postpone=queue.postpone,
        destinations=Destinations(
            per_destination=settings.destination_concurrency,
            total=settings.delivery_concurrency,
        ),
        breaker=Breaker.from_settings(settings),
        attempt_log=attempt_log,
        timeout=settings.delivery_timeout,
        refresher=refresher,
        ops=ops,
    )
    # Twice the attempts that may be in flight keep the slots busy; the rest wait as ids.
    first_attempts = FirstAttempts(
        queue, deliverer, settings.delivery_timeout, limit=2 * settings.delivery_concurrency
    )
    destinations = deliverer.destinations
    DELIVERIES_IN_FLIGHT.set_function(lambda: destinations.in_flight)
    DELIVERIES_WAITING.set_function(lambda: destinations.waiting)
    FIRST_ATTEMPTS_WAITING.set_function(lambda: len(first_attempts.waiting))
    UPSTREAM_RATE_LIMIT.set(settings.upstream_rate_limit)
    poller = Poller(
        store=store,
        schedule=schedule,
        upstream=upstream,
        settings=settings,
        hand_over=first_attempts.hand_over,
        emit=deliveries.emit,
        delivery_pending=lambda job: Delivery.of(job).pending,
    )
    dispatcher = Dispatcher(
        schedule=schedule, poller=poller, concurrency=settings.worker_concurrency
    )
    stranded = StrandedSweep(
        queue,
        attempt_log,
        interval=settings.stranded_sweep_interval,
        grace=settings.stranded_after,
    )
    sweeper = Sweeper(
        redis=redis,
        store=store,
        schedule=schedule,
        poller=poller,
        upstream=upstream,
        settings=settings,
    )
    reconciler = Reconciler(
        redis,
        Intents(redis, store, settings),
        schedule,
        upstream,
        interval=settings.intent_reconcile_interval,
        lookup_timeout=lookup_timeout(settings),
    )
    return WorkerState(
        settings,
        redis,
        store,
        schedule,
        upstream,
        client,
        deliverer,
        first_attempts,
        dispatcher,
        stranded,
        sweeper,
        clock,
        reconciler,
        callers,
    )


# How a worker stops, written once (relay.lifecycle.supervise). First, together, everything
# that takes new work stops taking it: claiming polls, sweeping, picking deliveries, making first
# attempts here, the stranded sweep and the reconcile; and the heartbeat counts the worker out.
# What they started drains for up to RELAY_SHUTDOWN_TIMEOUT, and what is unfinished then is
# handed back, due now, to the other workers (polls and first attempts; arq's own jobs run again
# once their in-progress keys expire). Then what the others leaned on while draining: the Redis
# watch, Redis's clock, and last the health port, so probes are answered until the end.
SHUTDOWN_ORDER: tuple[tuple[str, ...], ...] = (
    ("dispatcher", "sweeper", "first-attempts", "arq", "stranded", "reconcile", "heartbeat"),
    # The operational events those attempts filed, sent while the rest still stands.
    ("ops-events",),
    ("redis-watch",),
    ("redis-clock",),
    ("worker-http",),
)


async def serve_worker(settings: Settings, stop: asyncio.Event, *, http_port: int | None) -> None:
    """Run polls and deliveries until `stop` is set, then drain and close."""
    state = await build_state(settings)
    with arq_on_redis_clock(state.clock):
        worker = arq_worker(settings, state.redis, {"relay": state})
        arq = ArqLoop(worker)
        watch = RedisWatch(state.redis)

        def healthy() -> bool:
            return state.dispatcher.healthy() and arq.running

        services: list[Service] = [
            state.clock,
            watch,
            state.dispatcher,
            state.first_attempts,
            arq,
            state.stranded,
            state.reconciler,
            Heartbeat(state.redis, healthy),
        ]
        if settings.sweep_interval > 0:
            services.append(state.sweeper)
        # Jobs' callers label the ends and deliveries counted: bounded by the callers file
        # when the worker has it, else as the API recorded them (its callers were its file's).
        book = CallerSource.from_settings(settings) if settings.callers_file else None
        if book is not None:
            bound_callers(
                lambda name: book.book.named(name) is not None, book.book.names, role="worker"
            )
        else:
            bound_callers(lambda name: True, [DEFAULT_CALLER], role="worker")
        if state.deliverer.ops is not None:
            services.append(state.deliverer.ops)
        if http_port is not None:
            callers = state.callers if settings.metrics_auth else None
            app = create_worker_http_app(healthy, state.redis, watch, metrics_callers=callers)
            services.append(HealthPort(app, http_port))
        log.info(
            "worker started",
            extra={
                "concurrency": settings.worker_concurrency,
                "poll_lease": state.schedule.lease,
            },
        )
        try:
            await supervise(services, SHUTDOWN_ORDER, stop, drain_timeout=settings.shutdown_timeout)
        finally:
            await worker.close()
            # arq closed the pool, but not a Sentinel's own clients (relay.redis.conn.close).
            await close(state.redis)
            await state.upstream.aclose()
            await state.callback_client.aclose()
            if state.deliverer.ops is not None:
                await state.deliverer.ops.aclose()
        log.info("worker stopped")
