"""Deliveries: first attempts made in-process, every other attempt an arq job.

When a job ends, the worker that saw it makes the first attempt itself, at once, through the
per-destination caps (relay.delivery.destinations): arq's per-job round trips and poll delay
would otherwise bound a burst of callbacks. A guard for that attempt is enqueued in arq first,
deferred past the attempt's timeout; recording the attempt's outcome removes the guard
(relay.jobs.update_delivery.lua), so it only ever runs if this worker died first, or is still
holding the attempt in its queue then (the guard then waits for the same slots, and reads the
job after the first run has recorded its outcome: nothing is sent twice in one worker).

Every other attempt, and the guard, goes through relay.delivery.queue (one fixed id per job,
so enqueueing one twice is a no-op).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from arq import Retry
from redis.exceptions import RedisError

from relay import keys
from relay.delivery.deliverer import Deliverer, next_delay
from relay.delivery.destinations import DestinationBusy, destination_of
from relay.delivery.queue import DeliveryQueue
from relay.jitter import jittered
from relay.metrics import DELIVERIES

if TYPE_CHECKING:
    from relay.worker.process import WorkerState

log = logging.getLogger(__name__)

# How long an arq-run attempt queues for its destination's slot before it steps aside (it runs
# again a little later): arq's job slots are shared by every destination.
ARQ_SLOT_WAIT = 1.0
BUSY_RETRY = 3.0
# The guard of an in-process first attempt waits this long past the attempt's own timeout: a
# crash is recovered about as soon as arq recovers its own jobs (in-progress expiry).
GUARD_MARGIN = 10.0


@dataclass
class FirstAttempts:
    """Hands an ended job's first delivery attempt over: guarded in arq, made here."""

    queue: DeliveryQueue
    deliverer: Deliverer
    timeout: float
    # First attempts held here at most (running or waiting for a slot); past it a burst's
    # attempts queue in arq, due at once, so the worker's memory does not grow with the burst.
    limit: int
    in_flight: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    # Hand-overs between deciding to keep an attempt here and starting it (the guard's enqueue
    # is awaited in between): counted, or a burst handed over at once would all be kept.
    _starting: int = 0

    async def hand_over(self, request_id: str, callback_url: str) -> None:
        destination = destination_of(callback_url)
        first_wait = next_delay(self.queue.schedule, 0, None)
        if first_wait > 0 or len(self.in_flight) + self._starting >= self.limit:
            # The schedule asks to wait before the first attempt (arq keeps that time), or
            # this worker holds enough already: arq makes it.
            await self.queue.enqueue_attempt(request_id, 0, first_wait, destination)
            return
        self._starting += 1
        try:
            await self.queue.enqueue_attempt(
                request_id, 0, self.timeout + GUARD_MARGIN, destination
            )
        finally:
            self._starting -= 1
        if request_id not in self.in_flight:
            self.in_flight[request_id] = asyncio.create_task(
                self._attempt(request_id, destination), name=f"deliver:{request_id}:0"
            )

    async def _attempt(self, request_id: str, destination: str) -> None:
        try:
            await self.deliverer.attempt(request_id, 0, destination)
        except Exception as exc:
            # The guard in arq makes the attempt when it falls due; nothing is lost.
            log.warning(
                "in-process delivery of %s failed; its guard will retry it: %s",
                request_id,
                type(exc).__name__,
            )
        finally:
            self.in_flight.pop(request_id, None)

    async def hand_back(self) -> None:
        """Cancel first attempts still running or queued, and make their guards due now."""
        left = list(self.in_flight)
        for task in list(self.in_flight.values()):
            task.cancel()
        if not left:
            return
        seconds, micros = await self.queue.redis.time()
        now_ms = seconds * 1000 + micros // 1000
        async with self.queue.redis.pipeline(transaction=False) as pipe:
            for request_id in left:
                pipe.zadd(keys.ARQ_QUEUE, {keys.delivery_job_id(request_id, 0): now_ms}, xx=True)
            await pipe.execute()
        log.info("handed %d unfinished first deliveries to arq", len(left))


async def deliver(
    ctx: dict[str, Any], request_id: str, attempt: int, destination: str | None = None
) -> str:
    """arq job: one delivery attempt."""
    state: WorkerState = ctx["relay"]
    try:
        return await state.deliverer.attempt(request_id, attempt, destination, wait=ARQ_SLOT_WAIT)
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
