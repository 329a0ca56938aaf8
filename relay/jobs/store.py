"""Tracked jobs in Redis: one small hash per job, written only through atomic scripts.

A job's life: `create` (API, after Chamelaion accepted it) → `record_poll` after each poll that
did not end it → `end` exactly once when it completes or fails (fixes the callback payload and
its webhook-id) → `update_delivery` per delivery attempt. Every write is a Lua script so that a
slow or crashed worker can never overwrite newer state: a poll result is dropped once the job has
ended, and a delivery update is dropped unless it is for the attempt the job is waiting on.
Times come from the Redis clock (TIME inside the scripts, and `Job.read_at` for readers), so
worker clocks need not agree.

The poll queue (`relay:polls`) belongs to relay.jobs.schedule, which claims, hands back and
removes its entries; `create` and `record_poll` write a job's entry too, in the same script as
the job itself, because a job must never exist without its next poll (or the other way round).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Literal

from redis.asyncio import Redis

from relay import keys, lua
from relay.errors import NotReplicated

log = logging.getLogger(__name__)

DeliveryState = Literal["pending", "delivered", "gone", "failed", "none"]


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
    # The Redis clock when this record was read: what the job's age and grace periods are
    # measured against, never the reader's own clock.
    read_at: float

    @property
    def ended(self) -> bool:
        return self.event is not None


def _text(raw: dict[bytes, bytes], field: str) -> str | None:
    value = raw.get(field.encode())
    return value.decode() if value else None


def _number(raw: dict[bytes, bytes], field: str) -> float | None:
    value = raw.get(field.encode())
    return float(value) if value else None


# An event whose data is the job's body is stored as its head (`{..., "data":`) and put back
# together on reading: the body is kept once. A whole JSON event never ends in ':'.
_DATA_HEAD = b',"data":'


def _event_head(event: bytes, body: bytes) -> bytes:
    """What `end` stores of `event`: its head when it is `head + body + "}"`, else all of it."""
    if body and event.endswith(_DATA_HEAD + body + b"}"):
        return event[: -len(body) - 1]
    return event


def _event(raw: dict[bytes, bytes]) -> bytes | None:
    stored = raw.get(b"event")
    if stored and stored.endswith(b":"):
        return stored + raw.get(b"body", b"") + b"}"
    return stored or None


def _decode(request_id: str, raw: dict[bytes, bytes], read_at: float) -> Job:
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
        event=_event(raw),
        delivery=delivery,  # type: ignore[arg-type]  # only the script writes it, from the Literal
        attempt=int(raw.get(b"attempt") or 0),
        attempts_made=int(raw.get(b"attempts_made") or 0),
        last_result=_text(raw, "last_result"),
        ended_at=_number(raw, "ended"),
        read_at=read_at,
    )


class JobStore:
    def __init__(self, redis: Redis, *, wait_replicas: int = 0, wait_timeout: float = 1.0) -> None:
        self.redis = redis
        # Replicas that must confirm a new job before `create` returns (Redis WAIT).
        self.wait_replicas = wait_replicas
        self.wait_timeout = wait_timeout
        self._create = lua.register(redis, __package__, "create")
        self._record_poll = lua.register(redis, __package__, "record_poll")
        self._end = lua.register(redis, __package__, "end")
        self._update_delivery = lua.register(redis, __package__, "update_delivery")

    async def create(
        self,
        request_id: str,
        *,
        callback_url: str | None,
        reference_id: str | None,
        first_poll_in: float,
    ) -> bool:
        """Start tracking; False when the id is already tracked (nothing is changed then).

        With `wait_replicas`, returns only once that many replicas hold the job, else raises
        NotReplicated (the job stays recorded on the primary and is tracked from there).
        """
        ref_key = keys.ref(reference_id) if reference_id else keys.job(request_id)
        script_keys = [keys.job(request_id), keys.POLLS, ref_key]
        args: list[str | float] = [
            request_id,
            callback_url or "",
            reference_id or "",
            first_poll_in,
        ]
        if not self.wait_replicas:
            return bool(await self._create(keys=script_keys, args=args))
        # WAIT counts only the writes made on its own connection: one pipeline keeps the
        # script and the WAIT on one.
        async with self.redis.pipeline(transaction=False) as pipe:
            await self._create(keys=script_keys, args=args, client=pipe)
            pipe.wait(self.wait_replicas, round(self.wait_timeout * 1000))
            created, acknowledged = await pipe.execute()
        if int(acknowledged) < self.wait_replicas:
            log.warning(
                "a new job is not confirmed by enough Redis replicas",
                extra={"request_id": request_id, "acknowledged": int(acknowledged)},
            )
            raise NotReplicated(request_id, int(acknowledged), self.wait_replicas)
        return bool(created)

    async def get(self, request_id: str) -> Job | None:
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.hgetall(keys.job(request_id))
            pipe.time()
            raw, (seconds, micros) = await pipe.execute()
        return _decode(request_id, raw, seconds + micros / 1e6) if raw else None

    async def find(self, id_or_reference: str) -> Job | None:
        """A job by request id, else by reference_id (the newest tracked one with it)."""
        job = await self.get(id_or_reference)
        if job is not None:
            return job
        request_id = await self.redis.get(keys.ref(id_or_reference))
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
            keys=[keys.job(request_id), keys.POLLS],
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
        ref_key = keys.ref(job.reference_id) if job.reference_id else keys.job(job.request_id)
        delivery: DeliveryState = "pending" if job.callback_url else "none"
        await self._end(
            keys=[keys.job(job.request_id), ref_key],
            args=[
                job.request_id,
                status,
                body,
                event_id,
                _event_head(event, body),
                delivery,
                int(retention),
                "1" if has_ref else "0",
            ],
        )

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
            keys=[keys.job(request_id)],
            args=[attempt, next_attempt, state, result, int(keep_for)],
        )
        return bool(updated)
