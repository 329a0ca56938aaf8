"""Which polls are due, and who may make them: the poll schedule and the shared upstream budget.

All outstanding jobs sit in one sorted set scored by when they are next due, so finding due work
is a range read of the head (O(log N + k)), never a scan. A claim and the rate budget are one
atomic script: it takes at most as many due ids as the budget allows right now, and pushes each
claimed id a lease into the future. A worker that finishes sets the real next time; a worker that
dies does nothing, and its claims fall due again when the lease runs out.

The budget (RELAY_UPSTREAM_RATE_LIMIT, shared by every worker and API process) is two GCRAs
(generic cell rate algorithm), each over one Redis key: calls are spaced 1/rate apart on
average with a burst of at most `burst` in each. One is the status reads' own share
(RELAY_STATUS_READ_SHARE of the rate): only status reads may use it. The other, the rest of the
rate, is the API's to book: its calls (creates, uploads, proxied reads, lookups) book it through
relay.jobs.fair_share, fairly among callers, a short lookahead ahead of time, waiting in a fair
queue beyond it, never longer than the API is willing to keep its caller waiting; status reads
use whatever of it the API leaves free. Status reads are list pages read by sweeps
(relay.jobs.sweep) and by the intent reconcile's lookups (relay.jobs.reconcile), booked through
`reserve` (their own share, ahead if need be, or the shared part's next slot while no API call
waits for it), and per-id polls, which `claim` only free slots of either. So however many
submissions arrive, a sweep's page waits at most about a slot of the reads' share; however many
pages the sweeps want, submissions keep the rest; and when one side is idle, the other uses the
whole rate. An upstream 429 sets a pause that every caller honours.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass

from redis.asyncio import Redis

from relay.redis import keys, scripts, stats
from relay.redis.batch import batcher
from relay.upstream import BudgetRefused

log = logging.getLogger(__name__)

# How long a 429 without a usable Retry-After pauses every upstream call.
DEFAULT_PAUSE_ON_429 = 5.0

# schedule.reserve.lua's answer when nothing was booked yet but a slot may come free.
RESERVE_LATER = 2


@dataclass(frozen=True)
class Claim:
    ids: list[str]
    # How long until claiming could give more: the budget's next slot, the end of a pause or the
    # next due poll. None: nothing is tracked at all.
    wait: float | None


def _burst(rate: float) -> int:
    # A tenth of a second's worth keeps spacing even yet lets one claim take several.
    return max(1, math.floor(rate / 10))


class PollSchedule:
    def __init__(
        self,
        redis: Redis,
        *,
        rate: float,
        lease: float,
        max_pause: float = 300.0,
        read_share: float = 0.0,
    ) -> None:
        self.redis = redis
        self.period = 1.0 / rate  # the whole budget's
        shared, reads = rate * (1 - read_share), rate * read_share
        self.shared_period, self.burst = 1.0 / shared, _burst(shared)
        # No share of their own (0): status reads use the shared part only.
        self.reads_period, self.reads_burst = (1.0 / reads, _burst(reads)) if reads else (0.0, 0)
        self.lease = lease
        self.max_pause = max_pause
        self._claim = scripts.register(redis, __name__, "claim")
        self._pause = scripts.register(redis, __name__, "pause")
        self._hand_back = scripts.register(redis, __name__, "hand_back")
        self._reserve = scripts.register(redis, __name__, "reserve")

    async def claim(self, limit: int) -> Claim:
        reply = await self._claim(
            keys=[
                keys.POLLS,
                keys.UPSTREAM_TAT,
                keys.UPSTREAM_READS_TAT,
                keys.UPSTREAM_PAUSED,
                keys.FAIR_QUEUE,
            ],
            args=[
                limit,
                self.lease,
                self.shared_period,
                self.burst,
                self.reads_period,
                self.reads_burst,
            ],
        )
        count, wait = int(reply[0]), float(reply[1])
        ids = [raw.decode() for raw in reply[2 : 2 + count]]
        return Claim(ids=ids, wait=None if wait < 0 else max(wait, 0.0))

    async def reserve(self) -> tuple[bool, float]:
        """Book a slot for one status read outside the poll queue (a list page): of the reads'
        own share, ahead if need be, or the shared part's next one while no API call waits for
        it (the API books that part ahead: a read never takes its slots).

        Returns (True, seconds to wait before making the call) once booked, or (False, seconds
        until a 429 pause ends) when nobody may call now. Booking ahead, rather than claiming
        only a free slot as polls do, gives the caller precedence over per-id polls.
        """
        while True:
            reply = await self._reserve(
                keys=[
                    keys.UPSTREAM_TAT,
                    keys.UPSTREAM_READS_TAT,
                    keys.UPSTREAM_PAUSED,
                    keys.FAIR_QUEUE,
                ],
                args=[self.shared_period, self.burst, self.reads_period, self.reads_burst],
            )
            outcome, wait = int(reply[0]), max(float(reply[1]), 0.0)
            if outcome != RESERVE_LATER:
                return bool(outcome), wait
            # A shared slot may come free before the reads' own next one: look again then.
            await asyncio.sleep(wait)

    async def pause_for_429(self, retry_after: float | None, *, met_by: str) -> float:
        """Chamelaion answered 429 to `met_by` (a poll, a sweep, the reconcile, the API): pause
        everyone's upstream calls for its Retry-After, or DEFAULT_PAUSE_ON_429 without one.
        Returns the pause asked for (before the cap of `max_pause`)."""
        pause = retry_after or DEFAULT_PAUSE_ON_429
        log.warning(
            "upstream rate limit met by %s: pausing all upstream calls",
            met_by,
            extra={"seconds": pause},
        )
        await self.pause_upstream(pause)
        return pause

    async def pause_upstream(self, seconds: float) -> None:
        # Capped: one Retry-After of days must not stop every poll for days.
        await self._pause(
            keys=[keys.UPSTREAM_PAUSED],
            args=[min(seconds, self.max_pause), keys.STATS_PREFIX, stats.KEEP_SECONDS],
        )

    async def hand_back(self, request_ids: list[str]) -> None:
        if request_ids:
            await self._hand_back(keys=[keys.POLLS], args=request_ids)

    async def unschedule(self, request_id: str) -> None:
        """Take a job out of the poll queue (it ended, or its record is gone)."""
        await batcher(self.redis).run(
            [("ZREM", keys.POLLS, request_id), ("ZREM", keys.CREATED, request_id)]
        )


class StatusReadBudget:
    """What each status read made outside the poll queue spends (relay.upstream.Budget): a slot
    booked through `reserve`, as a sweep's page is; a 429 it meets pauses everyone. For the
    intent reconcile's lookups and late deliveries' re-reads, through `Upstream.with_budget`."""

    def __init__(self, schedule: PollSchedule, *, met_by: str) -> None:
        self.schedule = schedule
        self.met_by = met_by

    async def spend(self) -> None:
        booked, wait = await self.schedule.reserve()
        if not booked:
            raise BudgetRefused(429, "upstream calls are paused after a 429")
        if wait > 0:
            await asyncio.sleep(wait)

    async def rate_limited(self, retry_after: float | None) -> None:
        await self.schedule.pause_for_429(retry_after, met_by=self.met_by)
