"""Redelivering: one job's event again now, or every failed delivery since a time.

A redelivery keeps the event's `webhook-id` (receivers deduplicate on it), starts the retry
schedule afresh at a new attempt number (so no arq job id is reused) and is written in the
attempt log. It is queued through relay.delivery.queue, on Redis's clock: an API process whose
own clock is off neither delays it nor makes it early. Bulk recovery is capped per call, leaves
deliveries still pending to their schedule, and says how many it requeued, how many it left
pending and whether more are left.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay.delivery.attempt_log import AttemptLog
from relay.delivery.destinations import destination_of
from relay.delivery.queue import DeliveryQueue
from relay.jobs.store import JobStore
from relay.redis import keys, scripts

KEEP_AFTER_REDELIVERY = 4 * 86400.0
REFUSALS = {-1: "unknown", -2: "not_ended", -3: "no_callback", -4: "pending"}


@dataclass(frozen=True)
class Redelivered:
    delivery_id: str
    attempt: int | None  # None: refused, see `refused`
    refused: str | None = None


@dataclass(frozen=True)
class Recovered:
    requeued: int
    already_pending: int  # left to their schedule
    more: bool  # more deliveries matched than the limit took


class Redeliverer:
    def __init__(self, queue: DeliveryQueue, store: JobStore, attempt_log: AttemptLog) -> None:
        self.queue = queue
        self.redis = queue.redis
        self.store = store
        self.attempt_log = attempt_log
        self._redeliver = scripts.register(self.redis, __name__, "redeliver")

    async def redeliver(
        self, delivery_id: str, *, note: str, leave_pending: bool = False
    ) -> Redelivered:
        """Send the delivery's event again now; `leave_pending`: not if it is still pending."""
        attempt = int(
            await self._redeliver(
                keys=[keys.job(delivery_id)],
                args=[int(KEEP_AFTER_REDELIVERY), "1" if leave_pending else "0"],
            )
        )
        if attempt < 0:
            return Redelivered(delivery_id, None, REFUSALS[attempt])
        job = await self.store.get(delivery_id)
        destination = destination_of(job.callback_url) if job and job.callback_url else None
        # Logged before it is queued: the attempt's own entry then always comes after this one.
        await self.attempt_log.record(delivery_id, attempt=attempt, note=note, state="pending")
        # If this enqueue is lost (a crash right here), the stranded-delivery sweep queues it.
        await self.queue.enqueue_attempt(delivery_id, attempt, 0.0, destination)
        return Redelivered(delivery_id, attempt)

    async def recover(self, *, states: tuple[str, ...], since: float, limit: int) -> Recovered:
        """Redeliver up to `limit` deliveries that entered `states` after `since`, oldest
        first. One still pending (failing: retrying on its schedule) is left to its schedule:
        recovering it would restart the schedule and send it at once, each time asked."""
        candidates: list[tuple[float, str]] = []
        for state in states:
            found = await self.redis.zrangebyscore(
                keys.deliveries(state),
                f"({since}",
                "+inf",
                start=0,
                num=limit + 1,
                withscores=True,
            )
            candidates += [(float(score), member.decode()) for member, score in found]
        candidates.sort()
        requeued = pending = 0
        for _, delivery_id in candidates[:limit]:
            done = await self.redeliver(delivery_id, note="recovered in bulk", leave_pending=True)
            requeued += done.attempt is not None
            pending += done.refused == "pending"
        return Recovered(requeued, pending, more=len(candidates) > limit)
