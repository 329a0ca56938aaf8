"""The worker process: wires the poll dispatcher, the sweeper, the stranded-delivery sweep, the
intent reconcile, arq's deliveries and the heartbeat onto one event loop.

Every "now" arq compares with, and every delivery a worker queues, is on Redis's clock
(relay.clock), so a worker whose own clock is off neither makes a deferred attempt early nor
leaves it waiting.

Stopping (SIGTERM): stop claiming, sweeping and picking deliveries, let in-flight polls and
deliveries finish for up to RELAY_SHUTDOWN_TIMEOUT, then hand unfinished polls and first
deliveries back (due now) and let arq cancel the rest; a cancelled delivery runs again elsewhere
once arq's in-progress key expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass

import arq.connections
import arq.worker
from arq.connections import ArqRedis
from arq.worker import Worker, func
from redis.exceptions import RedisError

from relay import keys
from relay.api.auth import KeyRing
from relay.clock import RedisClock
from relay.delivery.attempt_log import AttemptLog
from relay.delivery.deliverer import Deliverer
from relay.delivery.destinations import Destinations
from relay.delivery.queue import DeliveryQueue
from relay.delivery.signing import Signer
from relay.delivery.stranded import StrandedSweep
from relay.delivery.transport import CallbackClient, make_callback_client
from relay.jobs.intents import Intents, lookup_timeout
from relay.jobs.poller import Poller
from relay.jobs.reconcile import Reconciler
from relay.jobs.schedule import PollSchedule
from relay.jobs.store import JobStore
from relay.jobs.sweep import Sweeper
from relay.metrics import (
    DELIVERIES_IN_FLIGHT,
    DELIVERIES_WAITING,
    FIRST_ATTEMPTS_WAITING,
    UPSTREAM_RATE_LIMIT,
)
from relay.redis_conn import arq_pool
from relay.redis_watch import RedisWatch
from relay.serving import embedded_server
from relay.settings import Settings
from relay.upstream import Upstream
from relay.worker.dispatcher import Dispatcher
from relay.worker.health import create_worker_http_app
from relay.worker.heartbeat import Heartbeat
from relay.worker.tasks import ARQ_SLOT_WAIT, FirstAttempts, deliver

log = logging.getLogger(__name__)

REDIS_RETRY_DELAY = 1.0
# The function arq's modules read the time through (arq.utils.timestamp_ms, imported by name).
ARQ_CLOCK = "timestamp_ms"


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


async def build_state(settings: Settings) -> WorkerState:
    redis = await arq_pool(settings.redis_url, timeout=settings.redis_timeout)
    clock = RedisClock(redis)
    await clock.sync()
    store = JobStore(redis)
    schedule = PollSchedule(
        redis,
        rate=settings.upstream_rate_limit,
        lease=settings.claim_lease(),
        max_pause=settings.max_upstream_pause,
    )
    upstream = Upstream.from_settings(settings)
    queue = DeliveryQueue(redis, settings.delivery_retry_schedule, clock)
    attempt_log = AttemptLog(redis, retention=settings.job_retention)
    client = make_callback_client(
        settings.callback_policy(),
        settings.delivery_timeout,
        max_connections=settings.delivery_concurrency,
    )
    deliverer = Deliverer(
        store=store,
        signer=Signer(settings.webhook_secrets, clock=clock.now),
        client=client,
        schedule=settings.delivery_retry_schedule,
        enqueue_attempt=queue.enqueue_attempt,
        postpone=queue.postpone,
        destinations=Destinations(
            per_destination=settings.destination_concurrency,
            total=settings.delivery_concurrency,
        ),
        breaker=settings.breaker(),
        attempt_log=attempt_log,
        timeout=settings.delivery_timeout,
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
        enqueue_delivery=first_attempts.hand_over,
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
    )


@contextlib.contextmanager
def arq_on_redis_clock(clock: RedisClock) -> Iterator[None]:
    """Make arq read `clock` wherever it asks for the time, while the worker runs.

    arq compares `arq:queue` scores with its own `timestamp_ms()`: to pick due jobs, to re-check
    one before starting it, to score a Retry, and (in enqueue_job, which the relay no longer
    calls: relay.delivery.queue scores on Redis TIME) to score a new job. Its modules import
    that function by name, so replacing the name in each is the one place arq can be pointed at
    another clock without copying its worker loop. Process-wide, which is right: every arq
    client in a worker process talks to the one Redis whose clock this is. Checked, so an arq
    that reads time some other way fails at start-up rather than quietly going back to the
    local clock.
    """
    modules = (arq.worker, arq.connections)
    saved = [getattr(module, ARQ_CLOCK, None) for module in modules]
    if not all(callable(original) for original in saved):
        raise RuntimeError(f"arq no longer reads the time through {ARQ_CLOCK}(); see relay.clock")
    for module in modules:
        setattr(module, ARQ_CLOCK, clock.now_ms)
    try:
        yield
    finally:
        for module, original in zip(modules, saved, strict=True):
            setattr(module, ARQ_CLOCK, original)


def arq_worker(state: WorkerState) -> Worker:
    settings = state.settings
    return Worker(
        functions=[
            # A crashed attempt runs again after its in-progress key expires (timeout + 10 s),
            # which the delivery timeout keeps well inside a minute. The timeout leaves room
            # for the attempt's Redis calls to fail on their own (RELAY_REDIS_TIMEOUT) and be
            # retried: arq cancelling one half-way would strand the delivery. Tries are counted
            # by arq also when an attempt steps aside for a busy destination (a few seconds).
            func(
                deliver,
                name="deliver",
                timeout=settings.delivery_timeout + ARQ_SLOT_WAIT + 5 + 2 * settings.redis_timeout,
                max_tries=1000,
            ),
        ],
        queue_name=keys.ARQ_QUEUE,
        redis_pool=state.redis,
        handle_signals=False,
        ctx={"relay": state},
        max_jobs=settings.worker_concurrency,
        keep_result=3600,
        poll_delay=0.2,
        health_check_interval=10,
        health_check_key=keys.ARQ_HEALTH,
        log_results=False,
    )


async def run_arq(worker: Worker, stop: asyncio.Event) -> None:
    """arq's loop, started again after a Redis error until `stop` is set: arq's own loop ends
    at the first one. A job cut off by the error keeps its in-progress key until that
    expires, then runs again."""
    while True:
        try:
            await worker.main()
            return
        except RedisError as exc:
            if stop.is_set():
                return  # stopping: a Redis error raised by the cancellation itself
            log.warning("delivery queue unreachable (%s); retrying in 1 s", type(exc).__name__)
            await asyncio.sleep(REDIS_RETRY_DELAY)


async def _drain(worker: Worker, state: WorkerState, timeout: float) -> None:
    """Wait, within one deadline, until no delivery or poll is running.

    The set is read again and again: arq may be half-way through starting a batch of jobs
    when picking is switched off, and those start after any one snapshot would be taken.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (left := deadline - loop.time()) > 0:
        running = [
            task
            for task in (
                *worker.tasks.values(),
                *state.dispatcher.in_flight.values(),
                *state.first_attempts.in_flight.values(),
            )
            if not task.done()
        ]
        if not running:
            return
        await asyncio.wait(running, timeout=min(left, 0.2))


async def serve_worker(settings: Settings, stop: asyncio.Event, *, http_port: int | None) -> None:
    """Run polls and deliveries until `stop` is set, then drain and close."""
    state = await build_state(settings)
    with arq_on_redis_clock(state.clock):
        await _serve(state, settings, stop, http_port=http_port)


async def _serve(
    state: WorkerState, settings: Settings, stop: asyncio.Event, *, http_port: int | None
) -> None:
    worker = arq_worker(state)
    clock_stop = asyncio.Event()
    clock_task = asyncio.create_task(state.clock.run(clock_stop), name="redis-clock")
    arq_task = asyncio.create_task(run_arq(worker, stop), name="arq")
    watch = RedisWatch(state.redis)
    stop_watching = asyncio.Event()
    watch_task = asyncio.create_task(watch.run(stop_watching), name="redis-watch")
    dispatch_task = asyncio.create_task(state.dispatcher.run(), name="dispatcher")
    stranded_stop = asyncio.Event()
    stranded_task = asyncio.create_task(state.stranded.run(stranded_stop), name="stranded")
    reconcile_task = asyncio.create_task(state.reconciler.run(stranded_stop), name="reconcile")
    sweep_task = (
        asyncio.create_task(state.sweeper.run(), name="sweeper")
        if settings.sweep_interval > 0
        else None
    )

    def healthy() -> bool:
        return state.dispatcher.healthy() and not arq_task.done()

    # Counted out as soon as it stops taking work, not once it has drained.
    stop_beating = asyncio.Event()
    heartbeat_task = asyncio.create_task(
        Heartbeat(state.redis, healthy).run(stop_beating), name="heartbeat"
    )

    http = None
    if http_port is not None:
        metrics_keys = KeyRing(settings.api_keys) if settings.metrics_auth else None
        app = create_worker_http_app(healthy, state.redis, watch, metrics_keys=metrics_keys)
        # All interfaces: the kubelet's probes and Prometheus reach the pod from outside.
        http = embedded_server(app, host="0.0.0.0", port=http_port)  # noqa: S104
        http_task = asyncio.create_task(http.serve(), name="worker-http")
    log.info(
        "worker started",
        extra={
            "concurrency": settings.worker_concurrency,
            "poll_lease": state.schedule.lease,
        },
    )
    try:
        await stop.wait()
    finally:
        state.dispatcher.stop()
        stop_beating.set()
        stranded_stop.set()
        state.sweeper.stop()
        state.first_attempts.stop()
        worker.allow_pick_jobs = False
        try:
            await dispatch_task
        except Exception:
            # Still drain and close below: a dead dispatcher must not strand deliveries.
            log.exception("the poll dispatcher had stopped with an error")
        log.info(
            "draining",
            extra={
                "deliveries": len(worker.tasks) + len(state.first_attempts.in_flight),
                "polls": len(state.dispatcher.in_flight),
            },
        )
        await _drain(worker, state, settings.shutdown_timeout)
        if sweep_task is not None:
            # A sweep stops before its next page and gives the lease up; one stuck in a page
            # is cancelled, and its lease simply expires.
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(sweep_task, timeout=max(settings.shutdown_timeout, 1.0))
        await state.dispatcher.hand_back_unfinished()
        await state.first_attempts.hand_back()
        arq_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await arq_task
        await stranded_task
        await reconcile_task
        await heartbeat_task
        stop_watching.set()
        await watch_task
        clock_stop.set()
        await clock_task
        await worker.close()
        await state.upstream.aclose()
        await state.callback_client.aclose()
        if http is not None:
            http.should_exit = True
            await http_task
        log.info("worker stopped")
