"""The worker process: the poll dispatcher and arq's delivery jobs, sharing one event loop.

Polls do not go through arq's queue: parking 100k deferred jobs there would make every queue
read and every queue-length metric about future work. The dispatcher instead claims due ids
from the schedule (relay.schedule) within the shared rate budget and polls them here, at most
RELAY_WORKER_CONCURRENCY at a time. Deliveries are arq jobs (relay.delivery).

Stopping (SIGTERM): stop claiming and stop picking deliveries, let in-flight polls and deliveries
finish for up to RELAY_SHUTDOWN_TIMEOUT, then hand unfinished polls back (due now) and let arq
cancel the rest; a cancelled delivery runs again elsewhere once arq's in-progress key expires.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
from arq import Retry
from arq.connections import ArqRedis
from arq.worker import Worker, func
from redis.exceptions import RedisError

from relay import redis_keys
from relay.delivery import Deliverer, next_delay
from relay.pinned_transport import make_callback_client
from relay.poller import Poller
from relay.redis_conn import arq_pool
from relay.schedule import PollSchedule
from relay.serving import embedded_server
from relay.settings import Settings
from relay.signing import Signer
from relay.store import JobStore
from relay.upstream import Upstream
from relay.worker_http import create_worker_http_app

log = logging.getLogger("relay.worker")

# The dispatcher never sleeps longer than this, so new jobs and a stop are noticed quickly.
MAX_IDLE = 0.5
# The part of a claim's lease a poll may take; the rest is margin for writing its result.
LEASE_SHARE = 0.8
# A heartbeat older than this means the dispatcher loop is stuck: the health check fails.
STALE_AFTER = 30.0


def delivery_job_id(request_id: str, attempt: int) -> str:
    return f"deliver:{request_id}:{attempt}"


async def deliver(ctx: dict[str, Any], request_id: str, attempt: int) -> str:
    """arq job: one delivery attempt."""
    state: WorkerState = ctx["relay"]
    try:
        return await state.deliverer.attempt(request_id, attempt)
    except Retry:
        raise
    except RedisError as exc:
        # Without this arq would record the job as failed and the delivery would wait forever.
        log.warning("delivery hit a Redis error, retrying the attempt", exc_info=exc)
        raise Retry(defer=5) from exc
    except Exception as exc:
        # A bug must not strand the delivery either; arq's max_tries bounds the retries.
        log.exception("delivery attempt failed unexpectedly, retrying it")
        raise Retry(defer=30) from exc


@dataclass
class Dispatcher:
    schedule: PollSchedule
    poller: Poller
    concurrency: int
    heartbeat: float = field(default_factory=time.monotonic)
    in_flight: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    _stopping: asyncio.Event = field(default_factory=asyncio.Event)

    async def run(self) -> None:
        while not self._stopping.is_set():
            self.heartbeat = time.monotonic()
            free = self.concurrency - len(self.in_flight)
            if free <= 0:
                await asyncio.wait(
                    list(self.in_flight.values()),
                    timeout=MAX_IDLE,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                continue
            try:
                claim = await self.schedule.claim(free)
            except RedisError as exc:
                log.warning("could not claim polls: %s", type(exc).__name__)
                await self._sleep(1.0)
                continue
            for request_id in claim.ids:
                if request_id in self.in_flight:
                    continue  # still being polled here; its own result will reschedule it
                task = asyncio.create_task(self._poll(request_id), name=f"poll:{request_id}")
                self.in_flight[request_id] = task
            if not claim.ids:
                await self._sleep(min(claim.wait if claim.wait is not None else MAX_IDLE, MAX_IDLE))

    async def _poll(self, request_id: str) -> None:
        try:
            # A poll must end within its lease, or another worker polls the job as well.
            async with asyncio.timeout(self.schedule.lease * LEASE_SHARE):
                await self.poller.poll(request_id)
        except TimeoutError:
            log.warning("poll of %s outlasted its lease share and was abandoned", request_id)
        except RedisError as exc:
            # The claim's lease makes it due again; nothing else to undo.
            log.warning("poll of %s hit a Redis error: %s", request_id, type(exc).__name__)
        except Exception:
            log.exception("poll of %s failed unexpectedly", request_id)
        finally:
            self.in_flight.pop(request_id, None)

    async def _sleep(self, seconds: float) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), timeout=seconds)

    def stop(self) -> None:
        self._stopping.set()

    async def hand_back_unfinished(self) -> None:
        """Cancel the polls still running and make them due now for another worker."""
        left = list(self.in_flight)
        for task in list(self.in_flight.values()):
            task.cancel()
        if left:
            await self.schedule.hand_back(left)
            log.info("handed back %d unfinished polls", len(left))

    def healthy(self) -> bool:
        return time.monotonic() - self.heartbeat < STALE_AFTER


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
    assert settings.chamelaion_api_key is not None
    redis = await arq_pool(settings.redis_url)
    store = JobStore(redis)
    schedule = PollSchedule(redis, rate=settings.upstream_rate_limit, lease=settings.poll_lease)
    upstream = Upstream(
        settings.chamelaion_base_url,
        settings.chamelaion_api_key.get_secret_value(),
        timeout=settings.upstream_timeout,
    )

    async def enqueue_attempt(request_id: str, attempt: int, delay: float) -> None:
        await redis.enqueue_job(
            "deliver",
            request_id,
            attempt,
            _job_id=delivery_job_id(request_id, attempt),
            _defer_by=delay if delay > 0 else None,
        )

    async def enqueue_first(request_id: str) -> None:
        # The schedule's first entry is the wait before the first attempt (0 by default).
        await enqueue_attempt(request_id, 0, next_delay(settings.delivery_retry_schedule, 0, None))

    client = make_callback_client(settings.callback_policy(), settings.delivery_timeout)
    deliverer = Deliverer(
        store=store,
        signer=Signer(settings.webhook_secrets),
        client=client,
        schedule=settings.delivery_retry_schedule,
        enqueue_attempt=enqueue_attempt,
        timeout=settings.delivery_timeout,
    )
    poller = Poller(
        store=store,
        schedule=schedule,
        upstream=upstream,
        settings=settings,
        enqueue_delivery=enqueue_first,
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
        queue_name=redis_keys.ARQ_QUEUE,
        redis_pool=state.redis,
        handle_signals=False,
        ctx={"relay": state},
        max_jobs=settings.worker_concurrency,
        keep_result=3600,
        poll_delay=0.2,
        health_check_interval=10,
        health_check_key=redis_keys.PREFIX + "arq:health",
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
        app = create_worker_http_app(healthy, state.redis)
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
