"""Per-caller allowances per minute for what sends callbacks on a caller's say: redeliveries,
recovers and test events.

Each one sends callbacks again (a recover up to a thousand), so a loop in one caller's tooling
would otherwise flood receivers, every team's among them, and push real attempts out of the
logs; a test event's outcome and timing tell something of whatever it was pointed at.
Counted in Redis, so the allowance holds across API processes; past it, 429 with Retry-After
and the setting's name.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from redis.asyncio import Redis
from redis.exceptions import RedisError

from relay.errors import ApiError
from relay.redis import keys, scripts
from relay.settings import Settings

REDELIVER = "redeliver"
RECOVER = "recover"
TEST_EVENT = "test event"


@dataclass(frozen=True)
class Allowance:
    action: str  # in Redis keys and messages: "redeliver", "recover", "test event"
    per_minute: int
    setting: str  # the setting that sets it, named in the 429


def allowance(settings: Settings, action: str) -> Allowance:
    if action == REDELIVER:
        return Allowance(
            REDELIVER, settings.redeliveries_per_minute, "RELAY_REDELIVERIES_PER_MINUTE"
        )
    if action == TEST_EVENT:
        return Allowance(
            TEST_EVENT, settings.test_events_per_minute, "RELAY_TEST_EVENTS_PER_MINUTE"
        )
    return Allowance(RECOVER, settings.recovers_per_minute, "RELAY_RECOVERS_PER_MINUTE")


class SteeringLimits:
    def __init__(self, redis: Redis) -> None:
        self._count = scripts.register(redis, __name__, "count")

    async def count(self, allowance: Allowance, caller: str) -> None:
        """Count one `allowance.action` for `caller`; ApiError 429 past its minute's allowance."""
        action = allowance.action.replace(" ", "-")
        try:
            wait_ms = int(
                await self._count(keys=[keys.steering(action, caller)], args=[allowance.per_minute])
            )
        except RedisError:
            raise ApiError(503, "the relay's job store is unavailable; try again") from None
        if wait_ms:
            raise ApiError(
                429,
                f"this caller made {allowance.per_minute} {allowance.action} requests in the last "
                f"minute, the most {allowance.setting} allows; see Retry-After",
                headers={"retry-after": str(math.ceil(wait_ms / 1000))},
            )
