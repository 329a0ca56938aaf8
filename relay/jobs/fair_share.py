"""The API's part of the upstream budget, shared fairly among callers (weighted fair queueing).

The budget's shared part (relay.jobs.schedule) is booked by every API process for its calls.
Booked first come, first served, one caller's flood would book it up to RELAY_API_BUDGET_WAIT
ahead and every other caller would wait behind it. Instead, calls book slots at most a short
lookahead ahead; beyond that they wait in one queue in Redis, ordered by start-time fair
queueing with per-caller virtual finish tags (fair_share.lua says how), and each waiter looks
again when its turn may have come. So among the callers waiting, each gets slots in proportion
to its `share`; a caller alone gets them all; and a caller that asks for less than its share
hardly waits, however many calls another has queued. A call whose expected wait is longer
than RELAY_API_BUDGET_WAIT is refused at once (429 with Retry-After), costing nothing.

The same script applies a caller's own limits to submissions, before booking, so a refused
submission neither books a slot nor counts: `max_outstanding` (its jobs not yet ended) and
`submit_rate` (submissions per second, a GCRA with a second's burst).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from redis.asyncio import Redis

from relay.jobs.schedule import PollSchedule
from relay.redis import keys, scripts
from relay.redis.batch import ScriptCall, batcher

# How far ahead a slot is booked at the least: a waiter at the queue's head looks again about
# half of it before its slot, so its look must reach Redis within that (a loaded event loop).
MIN_LOOKAHEAD = 0.25

Refusal = Literal["budget", "submit_rate", "max_outstanding"]


@dataclass(frozen=True)
class Limits:
    """A caller's own limits on submissions (0: none)."""

    submit_rate: float = 0.0
    max_outstanding: int = 0


@dataclass(frozen=True)
class Booking:
    """What the fair share said: booked (the call may be made in `wait` s), waiting (look again
    with `ticket` in `wait` s), or refused (`refused` says why; retry in `wait` s)."""

    wait: float
    ticket: str | None = None
    refused: Refusal | None = None

    @property
    def booked(self) -> bool:
        return self.ticket is None and self.refused is None


def booking(reply: list[bytes]) -> Booking:
    """A fair_share.lua reply as a Booking."""
    outcome = int(reply[0])
    if outcome == 1:
        return Booking(max(float(reply[1]), 0.0))
    if outcome == 2:
        return Booking(max(float(reply[2]), 0.0), ticket=reply[1].decode())
    why = reply[2].decode()
    assert why in ("budget", "submit_rate", "max_outstanding")
    return Booking(max(float(reply[1]), 0.0), refused=why)  # type: ignore[arg-type]


class FairShare:
    def __init__(self, redis: Redis, schedule: PollSchedule) -> None:
        self.redis = redis
        self.schedule = schedule
        self.period, self.burst = schedule.shared_period, schedule.burst
        self.lookahead = max(MIN_LOOKAHEAD, 2 * self.period)
        self._script = scripts.register(redis, __name__)

    def _keys(self, caller: str) -> list[str]:
        return [
            keys.UPSTREAM_TAT,
            keys.UPSTREAM_PAUSED,
            keys.FAIR_QUEUE,
            keys.FAIR_GRANTED,
            keys.FAIR_TAGS,
            keys.caller_submits(caller),
            keys.caller_outstanding(caller),
        ]

    def admit_call(
        self, caller: str, share: float, max_wait: float, limits: Limits | None = None
    ) -> ScriptCall:
        """One call's admission for `caller` (with `limits`: a submission), to make along with
        other calls in one round trip; read its reply with `booking`."""
        limits = limits or Limits()
        return self._script.call(
            keys=self._keys(caller),
            args=[
                "admit",
                self.period,
                self.burst,
                self.lookahead,
                caller,
                share,
                max_wait,
                limits.submit_rate,
                limits.max_outstanding,
                "",
                "",
            ],
        )

    async def admit(
        self, caller: str, share: float, max_wait: float, limits: Limits | None = None
    ) -> Booking:
        (reply,) = await batcher(self.redis).run([self.admit_call(caller, share, max_wait, limits)])
        return booking(reply)

    async def look_again(self, ticket: str, *, give_up: bool = False) -> Booking:
        """A waiting ticket looks again: booked, still waiting, or (`give_up`, or dropped past
        its deadline) refused."""
        reply = await self._script(
            keys=self._keys(""),
            args=[
                "wait",
                self.period,
                self.burst,
                self.lookahead,
                "",
                1,
                0,
                0,
                0,
                ticket,
                "1" if give_up else "",
            ],
        )
        return booking(reply)
