"""The stranded-delivery sweep: a pending delivery whose queued attempt is gone is queued again.

However an attempt's arq job vanished (arq gave up on it, a timeout cancelled it mid-write,
Redis lost it in a failover), the job hash still says which attempt the delivery waits on and
the state index says since when. Every RELAY_STRANDED_SWEEP_INTERVAL one worker (a lease key
decides which) looks at deliveries pending or failing for longer than RELAY_STRANDED_AFTER,
and queues the awaited attempt again for those with no arq job, queued or running. A delivery
whose destination is backed off is waiting in a postponed job, by design, and is left alone.
Each requeue goes through relay.delivery.queue, as every other attempt does, and is written in
the attempt log.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

from relay.delivery.attempt_log import AttemptLog
from relay.delivery.destinations import destination_of
from relay.delivery.queue import DeliveryQueue
from relay.lifecycle import Service
from relay.metrics import STRANDED_REQUEUED, STRANDED_SWEEPS
from relay.redis import keys, scripts
from relay.redis.batch import batcher
from relay.redis.clock import redis_now
from relay.redis.leased import run_leased

log = logging.getLogger(__name__)

BATCH = 500


class StrandedSweep(Service):
    name = "stranded"

    def __init__(
        self, queue: DeliveryQueue, attempt_log: AttemptLog, *, interval: float, grace: float
    ) -> None:
        self.queue = queue
        self.redis = queue.redis
        self.attempt_log = attempt_log
        self.interval = interval
        self.grace = grace
        self._find = scripts.register(self.redis, __name__)
        self._token = secrets.token_hex(8)

    async def sweep_once(self) -> int:
        """Queue every stranded delivery's awaited attempt again; returns how many."""
        found = await self._find(
            keys=[keys.deliveries("pending"), keys.deliveries("failing"), keys.ARQ_QUEUE],
            args=[
                keys.job(""),
                keys.ARQ_JOB_PREFIX,
                keys.ARQ_IN_PROGRESS_PREFIX,
                self.grace,
                BATCH,
            ],
        )
        requeued = 0
        now = await redis_now(self.redis)
        for i in range(0, len(found), 3):
            delivery_id, attempt = found[i].decode(), int(found[i + 1])
            destination = destination_of(found[i + 2].decode())
            (backed_off_until,) = await batcher(self.redis).run(
                [("ZSCORE", keys.BACKED_OFF, destination)]
            )
            if backed_off_until is not None and backed_off_until > now:
                continue
            await self.queue.enqueue_attempt(delivery_id, attempt, 0.0, destination)
            await self.attempt_log.record(
                delivery_id,
                attempt=attempt,
                note="requeued by the stranded-delivery sweep: its queued attempt was missing",
                state="pending",
            )
            requeued += 1
        STRANDED_SWEEPS.inc()
        STRANDED_REQUEUED.inc(requeued)
        if requeued:
            log.warning("requeued %d stranded deliveries", requeued)
        return requeued

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep every `interval` while this worker holds the sweep's lease, until `stop`."""
        await run_leased(
            self.redis,
            lease_key=keys.STRANDED_LEASE,
            token=self._token,
            interval=self.interval,
            once=self.sweep_once,
            stop=stop,
            what="stranded-delivery sweep",
        )
