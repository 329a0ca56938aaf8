"""arq's side of the worker: the delivery job, the arq worker that runs it, and its loop as a
service of the worker (relay.lifecycle).

A first attempt is made in-process (relay.delivery.first_attempts) with a guard queued in case
its worker dies; every other attempt, and a guard that falls due, runs as `deliver`, queued by
relay.delivery.queue.

Every "now" arq compares with is on Redis's clock (`arq_on_redis_clock`), so a worker whose own
clock is off neither makes a deferred attempt early nor leaves it waiting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import arq.connections
import arq.worker
from arq import Retry
from arq.connections import ArqRedis
from arq.worker import Worker, func
from redis.exceptions import RedisError

from relay.delivery.deliverer import Deliverer
from relay.delivery.destinations import DestinationBusy
from relay.delivery.refresh import refresh_timeout
from relay.jitter import jittered
from relay.lifecycle import Service, cancel_and_wait, wait_for_tasks
from relay.metrics import DELIVERIES
from relay.redis import keys
from relay.redis.clock import RedisClock
from relay.settings import Settings

log = logging.getLogger(__name__)

# How long an arq-run attempt queues for its destination's slot before it steps aside (it runs
# again a little later): arq's job slots are shared by every destination.
ARQ_SLOT_WAIT = 1.0
BUSY_RETRY = 3.0
REDIS_RETRY_DELAY = 1.0
# The function arq's modules read the time through (arq.utils.timestamp_ms, imported by name).
ARQ_CLOCK = "timestamp_ms"


async def deliver(
    ctx: dict[str, Any], request_id: str, attempt: int, destination: str | None = None
) -> str:
    """arq job: one delivery attempt."""
    # The worker's state (relay.worker.process.WorkerState), read for its deliverer only.
    deliverer: Deliverer = ctx["relay"].deliverer
    try:
        return await deliverer.attempt(request_id, attempt, destination, wait=ARQ_SLOT_WAIT)
    except Retry:
        raise
    except DestinationBusy as exc:
        # The destination's slots are all taken (a slow receiver): step aside for others.
        DELIVERIES.labels("busy").inc()
        raise Retry(defer=jittered(BUSY_RETRY)) from exc
    except RedisError as exc:
        # Without this arq would record the job as failed and the delivery would wait forever.
        log.warning("delivery hit a Redis error, retrying the attempt", exc_info=exc)
        raise Retry(defer=5) from exc
    except Exception as exc:
        # A bug must not strand the delivery either; arq's max_tries bounds the retries.
        log.exception("delivery attempt failed unexpectedly, retrying it")
        raise Retry(defer=30) from exc


def arq_worker(settings: Settings, redis: ArqRedis, ctx: dict[str, Any]) -> Worker:
    """arq's worker for `deliver`, on the worker's one Redis pool; `ctx["relay"]` is the
    worker's state (relay.worker.process.WorkerState), read for its deliverer."""
    return Worker(
        functions=[
            # A crashed attempt runs again after its in-progress key expires (timeout + 10 s),
            # which the delivery timeout keeps well inside a minute. The timeout leaves room
            # for the attempt's Redis calls to fail on their own (RELAY_REDIS_TIMEOUT) and be
            # retried: arq cancelling one half-way would strand the delivery; and for a late
            # attempt's re-read of its job (relay.delivery.refresh). Tries are counted
            # by arq also when an attempt steps aside for a busy destination (a few seconds).
            func(
                deliver,
                name="deliver",
                timeout=settings.delivery_timeout
                + refresh_timeout(settings)
                + ARQ_SLOT_WAIT
                + 5
                + 2 * settings.redis_timeout,
                max_tries=1000,
            ),
        ],
        queue_name=keys.ARQ_QUEUE,
        redis_pool=redis,
        handle_signals=False,
        ctx=ctx,
        max_jobs=settings.worker_concurrency,
        keep_result=3600,
        poll_delay=0.2,
        health_check_interval=10,
        health_check_key=keys.ARQ_HEALTH,
        log_results=False,
    )


class ArqLoop(Service):
    """arq's loop as a worker service: it picks due deliveries until stopped; the ones running
    then finish, until the drain's deadline, and the rest are cancelled (a cancelled attempt
    runs again elsewhere once arq's in-progress key expires)."""

    name = "arq"

    def __init__(self, worker: Worker) -> None:
        self.worker = worker
        self._loop: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def running(self) -> bool:
        return self._loop is not None and not self._loop.done()

    async def run(self, stop: asyncio.Event) -> None:
        # arq's own loop goes on while the deliveries drain (its heartbeat, its bookkeeping);
        # stopping only stops it picking new ones.
        self._loop = asyncio.create_task(self._main(), name="arq-main")
        try:
            await stop.wait()
        except asyncio.CancelledError:
            self._loop.cancel()
            raise
        self._stopping = True
        self.worker.allow_pick_jobs = False

    async def drain(self, deadline: float) -> None:
        if self.worker.tasks:
            log.info("draining deliveries", extra={"deliveries": len(self.worker.tasks)})
        await wait_for_tasks(lambda: self.worker.tasks.values(), deadline)
        if self._loop is not None:
            # Cancelled until it ends: arq's loop can swallow one cancel (cancel_and_wait).
            await cancel_and_wait(self._loop)

    async def _main(self) -> None:
        """arq's loop, started again after a Redis error: arq's own loop ends at the first
        one. A job cut off by the error keeps its in-progress key until that expires, then
        runs again."""
        while True:
            try:
                await self.worker.main()
                return
            except RedisError as exc:
                if self._stopping:
                    return  # stopping: a Redis error raised by the cancellation itself
                log.warning("delivery queue unreachable (%s); retrying in 1 s", type(exc).__name__)
                await asyncio.sleep(REDIS_RETRY_DELAY)


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
        raise RuntimeError(
            f"arq no longer reads the time through {ARQ_CLOCK}(); see relay.redis.clock"
        )
    for module in modules:
        setattr(module, ARQ_CLOCK, clock.now_ms)
    try:
        yield
    finally:
        for module, original in zip(modules, saved, strict=True):
            setattr(module, ARQ_CLOCK, original)
