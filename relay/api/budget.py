"""The API's share of the upstream budget: its calls book slots of the one the workers use,
fairly among callers, and a caller's submissions keep to its own limits.

Chamelaion's rate limit is the account's, whoever calls: creates, uploads, proxied reads and the
lookups after a lost answer count as much as polls. An API call books a slot of the budget's
shared part on its caller's account (relay.jobs.fair_share: weighted fair queueing by the
caller's `share` among the callers waiting), ahead of polls (a caller is waiting), and waits
for it, but for at most RELAY_API_BUDGET_WAIT: a call expected to wait longer (a 429 pause
ending later counts) is answered 429 with Retry-After, which the SDK honours, rather than
holding the caller's connection or spending beyond the budget. A 429 met by an API call pauses
everyone's calls, as a poll's does. A submission is first held to its caller's
`max_outstanding` and `submit_rate` (RELAY_CALLER_MAX_OUTSTANDING, RELAY_CALLER_SUBMIT_RATE
where the caller sets none): past either, 429 with Retry-After and a message naming it.

The budget is a courtesy to Chamelaion, not a condition for serving: when Redis cannot be
asked, the call goes ahead (a create then fails on its own intent write anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Protocol

from redis.exceptions import RedisError
from starlette.types import ASGIApp, Receive, Scope, Send

from relay.callers.model import DEFAULT_CALLER
from relay.jobs.fair_share import Booking, FairShare, Limits, booking
from relay.metrics import API_BUDGET_REFUSED, API_BUDGET_WAIT, CALLER_LIMITED
from relay.redis.batch import ScriptCall
from relay.upstream import BudgetRefused

log = logging.getLogger(__name__)

# Retry-After for a caller at its max_outstanding: when its jobs end is not known here.
OUTSTANDING_RETRY_AFTER = 5


class Tenant(Protocol):
    """What the budget needs of a caller (relay's callers model has more)."""

    @property
    def name(self) -> str: ...

    @property
    def share(self) -> float: ...

    @property
    def max_outstanding(self) -> int | None: ...

    @property
    def submit_rate(self) -> float | None: ...


@dataclass(frozen=True)
class Anonymous:
    """The caller of an upstream call made outside a request's (none are, today)."""

    name: str = DEFAULT_CALLER
    share: float = 1.0
    max_outstanding: int | None = None
    submit_rate: float | None = None


ANONYMOUS = Anonymous()
# The caller on whose account this request's upstream calls are booked (set by ActingCaller).
_acting: ContextVar[Tenant] = ContextVar("acting_caller", default=ANONYMOUS)


def acting_caller() -> Tenant:
    return _acting.get()


class ActingCaller:
    """Pure ASGI, inside the auth middleware: the request's caller (`scope["state"]["caller"]`,
    resolved from its key) is the one its upstream calls are booked for, wherever in the request
    they are made (a create, a lookup after a lost answer, a proxied read)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        caller = scope.get("state", {}).get("caller") if scope["type"] == "http" else None
        if caller is None:
            await self.app(scope, receive, send)
            return
        token = _acting.set(caller)
        try:
            await self.app(scope, receive, send)
        finally:
            _acting.reset(token)


class CallerLimited(BudgetRefused):
    """A submission past its caller's max_outstanding or submit_rate: nothing was sent (429)."""


class ApiBudget:
    def __init__(
        self,
        fair: FairShare,
        *,
        max_wait: float,
        max_outstanding: int = 0,
        submit_rate: float = 0.0,
    ) -> None:
        self.fair = fair
        self.max_wait = max_wait
        # The global defaults (0: no limit), for callers that set none of their own.
        self.max_outstanding = max_outstanding
        self.submit_rate = submit_rate

    def limits(self, caller: Tenant) -> Limits:
        return Limits(
            submit_rate=caller.submit_rate or self.submit_rate,
            max_outstanding=caller.max_outstanding or self.max_outstanding,
        )

    async def spend(self, *, submission: bool = False) -> None:
        """Return once one call may be made on the acting caller's account (`submission`: held
        to its limits first); raise BudgetRefused when it may not soon."""
        caller = acting_caller()
        limits = self.limits(caller) if submission else None
        try:
            found = await self.fair.admit(caller.name, caller.share, self.max_wait, limits)
        except RedisError as exc:
            _unreadable(exc)
            return
        await self._use(caller, found)

    def take_call(self, *, submission: bool = False) -> ScriptCall:
        """The booking, to make along with other calls in one round trip (then `use_booking`).
        `submission`: held to the caller's limits first."""
        caller = acting_caller()
        limits = self.limits(caller) if submission else None
        return self.fair.admit_call(caller.name, caller.share, self.max_wait, limits)

    async def use_booking(self, reply: Any) -> None:
        """Act on `take_call`'s reply (or its error): return once the call may be made."""
        if isinstance(reply, RedisError):
            _unreadable(reply)
            return
        await self._use(acting_caller(), booking(reply))

    async def _use(self, caller: Tenant, found: Booking) -> None:
        loop = asyncio.get_running_loop()
        started = loop.time()
        # Past this, a waiter gives up: the queue moved slower than it looked (callers with
        # lower tags came meanwhile).
        deadline = started + self.max_wait + self.fair.lookahead
        while found.ticket is not None:
            await asyncio.sleep(min(found.wait, max(0.0, deadline - loop.time())))
            try:
                found = await self.fair.look_again(found.ticket, give_up=loop.time() >= deadline)
            except RedisError as exc:
                _unreadable(exc)
                return
        if found.refused is not None:
            raise self._refusal(caller, found)
        if found.wait > 0:
            await asyncio.sleep(found.wait)
        API_BUDGET_WAIT.labels(caller.name).observe(loop.time() - started)

    def _refusal(self, caller: Tenant, found: Booking) -> BudgetRefused:
        if found.refused == "budget":
            API_BUDGET_REFUSED.labels(caller.name).inc()
            return BudgetRefused(
                429,
                "rate limit exceeded (the relay's shared budget for Chamelaion); retry later",
                headers={"retry-after": str(max(1, math.ceil(found.wait)))},
            )
        CALLER_LIMITED.labels(caller.name, found.refused).inc()
        limits = self.limits(caller)
        if found.refused == "submit_rate":
            message = (
                f"rate limit exceeded: caller {caller.name!r} may submit {limits.submit_rate:g} "
                "jobs a second (its submit_rate); retry later"
            )
            retry_after = max(1, math.ceil(found.wait))
        else:
            message = (
                f"too many jobs outstanding: caller {caller.name!r} may have "
                f"{limits.max_outstanding} jobs not yet ended (its max_outstanding); retry once "
                "some have ended"
            )
            retry_after = OUTSTANDING_RETRY_AFTER
        return CallerLimited(429, message, headers={"retry-after": str(retry_after)})

    async def rate_limited(self, retry_after: float | None) -> None:
        with contextlib.suppress(RedisError):
            await self.fair.schedule.pause_for_429(retry_after, met_by="the API")


def _unreadable(exc: RedisError) -> None:
    log.warning("upstream budget unreadable (%s); calling anyway", type(exc).__name__)


class SubmissionBudget:
    """The budget as an upload's create spends it: held to its caller's limits first."""

    def __init__(self, budget: ApiBudget) -> None:
        self.budget = budget

    async def spend(self) -> None:
        await self.budget.spend(submission=True)

    async def rate_limited(self, retry_after: float | None) -> None:
        await self.budget.rate_limited(retry_after)
