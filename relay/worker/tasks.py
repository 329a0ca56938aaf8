"""arq's job: one delivery attempt, queued by relay.delivery.queue.

A first attempt is made in-process (relay.delivery.first_attempts) with a guard queued here in
case its worker dies; every other attempt, and a guard that falls due, runs as this job.
"""

from __future__ import annotations

import logging
from typing import Any

from arq import Retry
from redis.exceptions import RedisError

from relay.delivery.deliverer import Deliverer
from relay.delivery.destinations import DestinationBusy
from relay.jitter import jittered
from relay.metrics import DELIVERIES

log = logging.getLogger(__name__)

# How long an arq-run attempt queues for its destination's slot before it steps aside (it runs
# again a little later): arq's job slots are shared by every destination.
ARQ_SLOT_WAIT = 1.0
BUSY_RETRY = 3.0


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
