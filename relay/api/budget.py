"""The API's share of the upstream budget: its calls book slots of the one the workers use.

Chamelaion's rate limit is the account's, whoever calls: creates, uploads, proxied reads and the
lookups after a lost answer count as much as polls. An API call books the budget's next slot,
ahead of polls (a caller is waiting), and waits for it, but for at most RELAY_API_BUDGET_WAIT:
a slot further off (a 429 pause ending later counts) is answered 429 with Retry-After, which
the SDK honours, rather than holding the caller's connection or spending beyond the budget. A
429 met by an API call pauses everyone's calls, as a poll's does.

The budget is a courtesy to Chamelaion, not a condition for serving: when Redis cannot be
asked, the call goes ahead (a create then fails on its own intent write anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from typing import Any

from redis.exceptions import RedisError

from relay.jobs.schedule import PollSchedule, took
from relay.metrics import API_BUDGET_REFUSED
from relay.redis.batch import ScriptCall
from relay.upstream import BudgetRefused

log = logging.getLogger(__name__)


class ApiBudget:
    def __init__(self, schedule: PollSchedule, *, max_wait: float) -> None:
        self.schedule = schedule
        self.max_wait = max_wait

    async def spend(self) -> None:
        try:
            booked, wait = await self.schedule.take(self.max_wait)
        except RedisError as exc:
            _unreadable(exc)
            return
        await self._use(booked, wait)

    def take_call(self) -> ScriptCall:
        """The booking, to make along with other calls in one round trip (then `use_booking`)."""
        return self.schedule.take_call(self.max_wait)

    async def use_booking(self, reply: Any) -> None:
        """Act on `take_call`'s reply (or its error): return once the call may be made."""
        if isinstance(reply, RedisError):
            _unreadable(reply)
            return
        await self._use(*took(reply))

    async def _use(self, booked: bool, wait: float) -> None:
        if not booked:
            API_BUDGET_REFUSED.inc()
            raise BudgetRefused(
                429,
                "rate limit exceeded (the relay's shared budget for Chamelaion); retry later",
                headers={"retry-after": str(max(1, math.ceil(wait)))},
            )
        if wait > 0:
            await asyncio.sleep(wait)

    async def rate_limited(self, retry_after: float | None) -> None:
        with contextlib.suppress(RedisError):
            await self.schedule.pause_for_429(retry_after, met_by="the API")


def _unreadable(exc: RedisError) -> None:
    log.warning("upstream budget unreadable (%s); calling anyway", type(exc).__name__)
