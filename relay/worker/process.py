"""The worker process: wires the poll dispatcher and arq's delivery jobs onto one event loop.

Stopping (SIGTERM): stop claiming and stop picking deliveries, let in-flight polls and deliveries
finish for up to RELAY_SHUTDOWN_TIMEOUT, then hand unfinished polls back (due now) and let arq
cancel the rest; a cancelled delivery runs again elsewhere once arq's in-progress key expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from dataclasses import dataclass

import httpx
from arq.connections import ArqRedis
from arq.worker import Worker, func

from relay import keys
from relay.api.auth import KeyRing
from relay.delivery.deliverer import Deliverer
from relay.delivery.signing import Signer
from relay.delivery.transport import make_callback_client
from relay.jobs.poller import Poller
from relay.jobs.schedule import PollSchedule
from relay.jobs.store import JobStore
from relay.redis_conn import arq_pool
from relay.serving import embedded_server
from relay.settings import Settings
from relay.upstream import Upstream
from relay.worker.dispatcher import Dispatcher
from relay.worker.health import create_worker_http_app
from relay.worker.tasks import DeliveryQueue, deliver

log = logging.getLogger(__name__)


@dataclass
class WorkerState:
    settings: Settings
    redis: ArqRedis
    store: JobStore
    schedule: PollSchedule
    upstream: Upstream
    callback_client: httpx.AsyncClient
    deliverer: Deliverer
    dispatcher: Dispatcher


async def build_state(settings: Settings) -> WorkerState:
    redis = await arq_pool(settings.redis_url)
    store = JobStore(redis)
    schedule = PollSchedule(redis, rate=settings.upstream_rate_limit, lease=settings.poll_lease)
    upstream = Upstream.from_settings(settings)
    queue = DeliveryQueue(redis, settings.delivery_retry_schedule)
    client = make_callback_client(settings.callback_policy(), settings.delivery_timeout)
    deliverer = Deliverer(
        store=store,
        signer=Signer(settings.webhook_secrets),
        client=client,
        schedule=settings.delivery_retry_schedule,
        enqueue_attempt=queue.enqueue_attempt,
        timeout=settings.delivery_timeout,
    )
    poller = Poller(
        store=store,
        schedule=schedule,
        upstream=upstream,
        settings=settings,
        enqueue_delivery=queue.enqueue_first,
    )
    dispatcher = Dispatcher(
        schedule=schedule, poller=poller, concurrency=settings.worker_concurrency
    )
    return WorkerState(settings, redis, store, schedule, upstream, client, deliverer, dispatcher)


def arq_worker(state: WorkerState) -> Worker:
    settings = state.settings
    return Worker(
        functions=[
            # A crashed attempt runs again after its in-progress key expires (timeout + 10 s),
            # which the delivery timeout keeps well inside a minute.
            func(deliver, name="deliver", timeout=settings.delivery_timeout + 5, max_tries=50),
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


async def _drain(worker: Worker, dispatcher: Dispatcher, timeout: float) -> None:
    """Wait, within one deadline, until no delivery or poll is running.

    The set is read again and again: arq may be half-way through starting a batch of jobs
    when picking is switched off, and those start after any one snapshot would be taken.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while (left := deadline - loop.time()) > 0:
        running = [
            task
            for task in (*worker.tasks.values(), *dispatcher.in_flight.values())
            if not task.done()
        ]
        if not running:
            return
        await asyncio.wait(running, timeout=min(left, 0.2))


async def serve_worker(settings: Settings, stop: asyncio.Event, *, http_port: int | None) -> None:
    """Run polls and deliveries until `stop` is set, then drain and close."""
    state = await build_state(settings)
    worker = arq_worker(state)
    arq_task = asyncio.create_task(worker.main(), name="arq")
    dispatch_task = asyncio.create_task(state.dispatcher.run(), name="dispatcher")

    def healthy() -> bool:
        return state.dispatcher.healthy() and not arq_task.done()

    http = None
    if http_port is not None:
        keys = KeyRing(settings.api_keys) if settings.metrics_auth else None
        app = create_worker_http_app(healthy, state.redis, metrics_keys=keys)
        # All interfaces: the kubelet's probes and Prometheus reach the pod from outside.
        http = embedded_server(app, host="0.0.0.0", port=http_port)  # noqa: S104
        http_task = asyncio.create_task(http.serve(), name="worker-http")
    log.info("worker started", extra={"concurrency": settings.worker_concurrency})
    try:
        await stop.wait()
    finally:
        state.dispatcher.stop()
        worker.allow_pick_jobs = False
        try:
            await dispatch_task
        except Exception:
            # Still drain and close below: a dead dispatcher must not strand deliveries.
            log.exception("the poll dispatcher had stopped with an error")
        log.info(
            "draining",
            extra={"deliveries": len(worker.tasks), "polls": len(state.dispatcher.in_flight)},
        )
        await _drain(worker, state.dispatcher, settings.shutdown_timeout)
        await state.dispatcher.hand_back_unfinished()
        arq_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await arq_task
        await worker.close()
        await state.upstream.aclose()
        await state.callback_client.aclose()
        if http is not None:
            http.should_exit = True
            await http_task
        log.info("worker stopped")
