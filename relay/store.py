"""Tracked jobs in Redis: one small hash per job, written only through atomic scripts.

A job's life: `create` (API, after Chamelaion accepted it) → `record_poll` after each poll that
did not end it → `end` exactly once when it completes or fails (fixes the callback payload and
its webhook-id) → `update_delivery` per delivery attempt. Every write is a Lua script so that a
slow or crashed worker can never overwrite newer state: a poll result is dropped once the job has
ended, and a delivery update is dropped unless it is for the attempt the job is waiting on.
Times come from the Redis clock (TIME inside the scripts), so worker clocks need not agree.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from redis.asyncio import Redis

from relay import redis_keys

DeliveryState = Literal["pending", "delivered", "gone", "failed", "none"]

_NOW = "local t = redis.call('TIME') local now = tonumber(t[1]) + tonumber(t[2]) / 1000000\n"

# KEYS: job, polls, ref (or job again when there is no reference_id)
# ARGV: request_id, callback_url, reference_id, first poll delay, interval
_CREATE = (
    _NOW
    + """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], 'created', now, 'interval', ARGV[5],
           'callback_url', ARGV[2], 'reference_id', ARGV[3])
redis.call('ZADD', KEYS[2], now + tonumber(ARGV[4]), ARGV[1])
if ARGV[3] ~= '' then redis.call('SET', KEYS[3], ARGV[1]) end
return 1
"""
)

# KEYS: job, polls  ARGV: request_id, next delay, interval, status ('' = unchanged), body,
# not_found_since ('' = found)
_RECORD_POLL = (
    _NOW
    + """
if redis.call('HEXISTS', KEYS[1], 'event') == 1 then return 0 end
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'interval', ARGV[3], 'not_found_since', ARGV[6], 'polled', now)
if ARGV[4] ~= '' then redis.call('HSET', KEYS[1], 'status', ARGV[4], 'body', ARGV[5]) end
redis.call('ZADD', KEYS[2], 'XX', now + tonumber(ARGV[2]), ARGV[1])
return 1
"""
)

# KEYS: job, ref (or job again)  ARGV: request_id, status, body, event_id, event, delivery,
# retention seconds, has_ref ('1'/'0')
_END = (
    _NOW
    + """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if redis.call('HEXISTS', KEYS[1], 'event') == 1 then return 2 end
redis.call('HSET', KEYS[1], 'status', ARGV[2], 'body', ARGV[3], 'event_id', ARGV[4],
           'event', ARGV[5], 'delivery', ARGV[6], 'attempt', 0, 'ended', now)
redis.call('EXPIRE', KEYS[1], ARGV[7])
if ARGV[8] == '1' and redis.call('GET', KEYS[2]) == ARGV[1] then
  redis.call('EXPIRE', KEYS[2], ARGV[7])
end
return 1
"""
)

# KEYS: job  ARGV: attempt expected, next attempt, new delivery state, last result,
# seconds the job must live at least (a next attempt deferred by Retry-After must find it)
_UPDATE_DELIVERY = """
if redis.call('HGET', KEYS[1], 'delivery') ~= 'pending' then return 0 end
if redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] then return 0 end
redis.call('HSET', KEYS[1], 'attempt', ARGV[2], 'delivery', ARGV[3], 'last_result', ARGV[4])
redis.call('HINCRBY', KEYS[1], 'attempts_made', 1)
if redis.call('TTL', KEYS[1]) < tonumber(ARGV[5]) then redis.call('EXPIRE', KEYS[1], ARGV[5]) end
return 1
"""


@dataclass(frozen=True)
class Job:
    """One tracked job as stored; `body` is the latest LipsyncRequest JSON from Chamelaion."""

    request_id: str
    created: float
    callback_url: str | None
    reference_id: str | None
    interval: float
    status: str | None
    body: bytes | None
    not_found_since: float | None
    event_id: str | None
    event: bytes | None
    delivery: DeliveryState | None
    attempt: int
    attempts_made: int
    last_result: str | None
    ended_at: float | None

    @property
    def ended(self) -> bool:
        return self.event is not None


def _text(raw: dict[bytes, bytes], field: str) -> str | None:
    value = raw.get(field.encode())
    return value.decode() if value else None


def _number(raw: dict[bytes, bytes], field: str) -> float | None:
    value = raw.get(field.encode())
    return float(value) if value else None


def _decode(request_id: str, raw: dict[bytes, bytes]) -> Job:
    delivery = _text(raw, "delivery")
    return Job(
        request_id=request_id,
        created=_number(raw, "created") or 0.0,
        callback_url=_text(raw, "callback_url"),
        reference_id=_text(raw, "reference_id"),
        interval=_number(raw, "interval") or 0.0,
        status=_text(raw, "status"),
        body=raw.get(b"body") or None,
        not_found_since=_number(raw, "not_found_since"),
        event_id=_text(raw, "event_id"),
        event=raw.get(b"event") or None,
        delivery=delivery,  # type: ignore[arg-type]  # only the script writes it, from the Literal
        attempt=int(raw.get(b"attempt") or 0),
        attempts_made=int(raw.get(b"attempts_made") or 0),
        last_result=_text(raw, "last_result"),
        ended_at=_number(raw, "ended"),
    )


class JobStore:
    def __init__(self, redis: Redis) -> None:
        self.redis = redis
        self._create = redis.register_script(_CREATE)
        self._record_poll = redis.register_script(_RECORD_POLL)
        self._end = redis.register_script(_END)
        self._update_delivery = redis.register_script(_UPDATE_DELIVERY)

    async def create(
        self,
        request_id: str,
        *,
        callback_url: str | None,
        reference_id: str | None,
        first_poll_in: float,
    ) -> bool:
        """Start tracking; False when the id is already tracked (nothing is changed then)."""
        ref_key = redis_keys.ref(reference_id) if reference_id else redis_keys.job(request_id)
        created = await self._create(
            keys=[redis_keys.job(request_id), redis_keys.POLLS, ref_key],
            args=[request_id, callback_url or "", reference_id or "", first_poll_in, first_poll_in],
        )
        return bool(created)

    async def get(self, request_id: str) -> Job | None:
        raw: dict[bytes, bytes] = await self.redis.hgetall(redis_keys.job(request_id))  # type: ignore[misc]
        return _decode(request_id, raw) if raw else None

    async def find(self, id_or_reference: str) -> Job | None:
        """A job by request id, else by reference_id (the newest tracked one with it)."""
        job = await self.get(id_or_reference)
        if job is not None:
            return job
        request_id = await self.redis.get(redis_keys.ref(id_or_reference))
        return await self.get(request_id.decode()) if request_id else None

    async def record_poll(
        self,
        request_id: str,
        *,
        next_in: float,
        interval: float,
        status: str | None = None,
        body: bytes = b"",
        not_found_since: float | None = None,
    ) -> bool:
        """Store a non-final poll result and when to poll next; False if the job ended meanwhile."""
        recorded = await self._record_poll(
            keys=[redis_keys.job(request_id), redis_keys.POLLS],
            args=[
                request_id,
                next_in,
                interval,
                status or "",
                body,
                "" if not_found_since is None else not_found_since,
            ],
        )
        return bool(recorded)

    async def end(
        self,
        job: Job,
        *,
        status: str,
        body: bytes,
        event_id: str,
        event: bytes,
        retention: float,
    ) -> None:
        """Fix the job's final state and callback payload; later calls keep the first one."""
        has_ref = job.reference_id is not None
        ref_key = (
            redis_keys.ref(job.reference_id) if job.reference_id else redis_keys.job(job.request_id)
        )
        delivery: DeliveryState = "pending" if job.callback_url else "none"
        await self._end(
            keys=[redis_keys.job(job.request_id), ref_key],
            args=[
                job.request_id,
                status,
                body,
                event_id,
                event,
                delivery,
                int(retention),
                "1" if has_ref else "0",
            ],
        )

    async def unschedule(self, request_id: str) -> None:
        await self.redis.zrem(redis_keys.POLLS, request_id)

    async def update_delivery(
        self,
        request_id: str,
        *,
        attempt: int,
        next_attempt: int,
        state: DeliveryState,
        result: str,
        keep_for: float = 0,
    ) -> bool:
        """Record an attempt's outcome, only if the job is still waiting on that attempt.

        `keep_for`: the job hash lives at least this many seconds more (never shortened).
        """
        updated = await self._update_delivery(
            keys=[redis_keys.job(request_id)],
            args=[attempt, next_attempt, state, result, int(keep_for)],
        )
        return bool(updated)
