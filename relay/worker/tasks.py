"""Deliveries on arq: the `deliver` job (one attempt) and the queue that enqueues attempts.

Each attempt is its own arq job with a fixed id, so enqueueing one twice (a retry after a crash)
is a no-op: arq refuses a job id it already holds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from arq import Retry
from arq.connections import ArqRedis
from redis.exceptions import RedisError

from relay import keys
from relay.delivery.deliverer import next_delay

if TYPE_CHECKING:
    from relay.worker.process import WorkerState

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DeliveryQueue:
    """Enqueues delivery attempts as arq jobs, deferred by their wait."""

    redis: ArqRedis
    schedule: tuple[float, ...]

    async def enqueue_attempt(self, request_id: str, attempt: int, delay: float) -> None:
        await self.redis.enqueue_job(
            "deliver",
            request_id,
            attempt,
            _job_id=keys.delivery_job_id(request_id, attempt),
            _defer_by=delay if delay > 0 else None,
        )

    async def enqueue_first(self, request_id: str) -> None:
        # The schedule's first entry is the wait before the first attempt (0 by default).
        await self.enqueue_attempt(request_id, 0, next_delay(self.schedule, 0, None))


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
