"""Every delivery attempt, kept as long as its job, and every delivery filed by its state.

An entry says when (Redis clock), which event and attempt, how long it took, the receiver's
HTTP status or the kind of failure (relay.delivery.failure), when the next try is due, and the
state the delivery is in after it; with RELAY_ATTEMPT_LOG_EXCERPT, also the start of the
receiver's answer. Off by default: any caller key reads any job's log, and a callback_url
pointing at an internal service would put that service's answer in it. Redelivery requests,
deliveries requeued by the stranded-delivery sweep, and attempts postponed because their
destination is backed off are entries too (`note`; a postponement counts its repeats in
`postponed`).

The state index (`relay:deliveries:{state}`, one sorted set per state scored by when the
delivery got there) answers "what is failing since the outage" without a scan. States:
pending (waiting for its first attempt or a redelivery), failing (pending after a failed
attempt), delivered, gone (410), failed (given up after the whole schedule).
"""

from __future__ import annotations

from typing import Any

import orjson
from redis.asyncio import Redis

from relay.redis import keys, scripts
from relay.redis.batch import ScriptCall, batcher

MAX_ENTRIES = 100
# A trimmed log keeps this many of its first entries, then a count of those left out, then the
# newest: however many redeliveries are asked for, the delivery's first attempts stay.
KEEP_FIRST = 10
POSTPONED_NOTE = "postponed: the destination is backed off after failing"
EXCERPT_CHARS = 512
STATES = ("pending", "failing", "delivered", "gone", "failed")


class AttemptLog:
    def __init__(self, redis: Redis, *, retention: float, excerpts: bool = False) -> None:
        self.redis = redis
        self.retention = retention
        # Keep and show the start of receivers' answers (RELAY_ATTEMPT_LOG_EXCERPT).
        self.excerpts = excerpts
        self._log = scripts.register(redis, __name__, "record")

    async def record(self, delivery_id: str, **entry: Any) -> None:
        await batcher(self.redis).run([self.record_call(delivery_id, **entry)])

    def record_call(self, delivery_id: str, **entry: Any) -> ScriptCall:
        """The call that records `entry`, to make with others in one round trip."""
        if not self.excerpts:
            entry.pop("excerpt", None)
        return self._call(delivery_id, entry)

    def _call(self, delivery_id: str, entry: dict[str, Any], *postponed: float) -> ScriptCall:
        """The record script's call for `entry`; `postponed` (attempt, seconds until due) makes
        it a postponement, counted in the attempt's one entry."""
        return self._log.call(
            keys=[keys.job(delivery_id), keys.attempts(delivery_id)],
            args=[
                keys.DELIVERIES_PREFIX,
                delivery_id,
                orjson.dumps(entry),
                MAX_ENTRIES,
                int(self.retention),
                KEEP_FIRST,
                *postponed,
            ],
        )

    async def postponed(self, delivery_id: str, *, attempt: int, next_in: float) -> None:
        """Log that `attempt` was not made now, its destination being backed off, and is due
        again in `next_in` seconds; a postponement again of the same attempt updates its entry
        (a count), and one of an attempt the delivery no longer waits on is not logged."""
        entry = {"attempt": attempt, "note": POSTPONED_NOTE}
        call = self._call(delivery_id, entry, attempt, round(next_in, 3))
        await batcher(self.redis).run([call])

    async def entries(self, delivery_id: str) -> list[dict[str, Any]]:
        (raw,) = await batcher(self.redis).run([("LRANGE", keys.attempts(delivery_id), 0, -1)])
        entries: list[dict[str, Any]] = [orjson.loads(item) for item in raw]
        if not self.excerpts:
            for entry in entries:  # kept while the setting was on
                entry.pop("excerpt", None)
        return entries

    async def page(
        self, state: str, *, since: float, until: float, limit: int
    ) -> list[tuple[str, float]]:
        """Deliveries in `state`, newest first, that got there in (since, until]."""
        (found,) = await batcher(self.redis).run(
            [
                (
                    "ZREVRANGEBYSCORE",
                    keys.deliveries(state),
                    f"({until}" if until != float("inf") else "+inf",
                    f"({since}",
                    "WITHSCORES",
                    "LIMIT",
                    0,
                    limit,
                )
            ]
        )
        return [
            (member.decode(), float(score))
            for member, score in zip(found[::2], found[1::2], strict=True)
        ]
