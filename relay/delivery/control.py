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
from relay.delivery.store import DeliveryId
from relay.jobs.audit import Audit
from relay.jobs.store import JobStore
from relay.redis import keys, scripts
from relay.redis.batch import batcher

KEEP_AFTER_REDELIVERY = 4 * 86400.0
# A caller's deliveries are picked out of every caller's: read in batches, up to a bound.
SCAN_BATCH = 500
MAX_SCAN = 5000
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
    def __init__(
        self,
        queue: DeliveryQueue,
        store: JobStore,
        attempt_log: AttemptLog,
        audit: Audit | None = None,
    ) -> None:
        self.queue = queue
        # Who steered each job (relay.jobs.audit), when a caller is named.
        self.audit = audit
        self.redis = queue.redis
        self.store = store
        self.attempt_log = attempt_log
        self._redeliver = scripts.register(self.redis, __name__, "redeliver")

    async def redeliver(
        self,
        delivery_id: str,
        *,
        note: str,
        leave_pending: bool = False,
        by: str | None = None,
        action: str = "redeliver",
    ) -> Redelivered:
        """Send the delivery's event again now; `leave_pending`: not if it is still pending;
        `by`: the caller who asked, for the audit."""
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
        if by is not None and self.audit is not None:
            await self.audit.record(
                DeliveryId.parse(delivery_id).request_id,
                caller=by,
                action=action,
                detail=f"{delivery_id} attempt {attempt}",
            )
        return Redelivered(delivery_id, attempt)

    async def recover(
        self,
        *,
        states: tuple[str, ...],
        since: float,
        limit: int,
        owner: str | None = None,
        by: str | None = None,
    ) -> Recovered:
        """Redeliver up to `limit` deliveries that entered `states` after `since`, oldest
        first. One still pending (failing: retrying on its schedule) is left to its schedule:
        recovering it would restart the schedule and send it at once, each time asked.
        `owner`: only the deliveries of that caller's jobs (None: everyone's); `by`: the
        caller who asked, for the audit."""
        candidates: list[tuple[float, str]] = []
        more = False
        for state in states:
            found, capped = await self._candidates(state, since, limit, owner)
            candidates += found
            more |= capped
        candidates.sort()
        requeued = pending = 0
        for _, delivery_id in candidates[:limit]:
            done = await self.redeliver(
                delivery_id, note="recovered in bulk", leave_pending=True, by=by, action="recover"
            )
            requeued += done.attempt is not None
            pending += done.refused == "pending"
        return Recovered(requeued, pending, more=more or len(candidates) > limit)

    async def _candidates(
        self, state: str, since: float, limit: int, owner: str | None
    ) -> tuple[list[tuple[float, str]], bool]:
        """Up to `limit` + 1 deliveries in `state` after `since`, oldest first, and whether the
        search stopped short. Of `owner`'s jobs only, they are read in batches out of every
        caller's, at most MAX_SCAN entries (a later call goes on from where this one ends)."""
        found: list[tuple[float, str]] = []
        offset = 0
        batch = limit + 1 if owner is None else SCAN_BATCH
        while len(found) <= limit:
            if offset >= MAX_SCAN:
                return found, True
            (rows,) = await batcher(self.redis).run(
                [
                    (
                        "ZRANGEBYSCORE",
                        keys.deliveries(state),
                        f"({since}",
                        "+inf",
                        "WITHSCORES",
                        "LIMIT",
                        offset,
                        batch,
                    )
                ]
            )
            entries = [
                (float(score), member.decode())
                for member, score in zip(rows[::2], rows[1::2], strict=True)
            ]
            if owner is None:
                return entries, False
            owners = await self.store.callers_of(
                [DeliveryId.parse(delivery_id).request_id for _, delivery_id in entries]
            )
            found += [entry for entry, mine in zip(entries, owners, strict=True) if mine == owner]
            offset += len(entries)
            if len(entries) < batch:
                break
        return found[: limit + 1], False
