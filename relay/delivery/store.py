"""What a delivery knows, kept in Redis: its state and awaited attempt, its destination's breaker,
and whether an early event of its job is on its way.

A delivery's fields live in the hash of the job whose event it carries (relay.jobs.store writes
the job; its `end` files the delivery as pending), or, for an early event, in a hash of its own
shaped like a job's (`emit`). Its fields are named and read here only (`Delivery`), from the
hash the job's own read brings (`Job.stored`): a job and its delivery cost one read together.
Every write is a Lua script: an attempt's outcome is dropped unless
the delivery is still waiting on that attempt, so a re-run of an old attempt (after a crash)
changes nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

from redis.asyncio import Redis

from relay.jobs import history
from relay.jobs.store import Job
from relay.redis import keys, scripts
from relay.redis.batch import Call, batcher
from relay.settings import Settings

DeliveryState = Literal["pending", "delivered", "gone", "failed", "none", "stale"]
# The events sent before a job ends, each its own delivery (`lipsync.processing`).
EARLY_KINDS = ("processing",)


@dataclass(frozen=True)
class DeliveryId:
    """Which delivery: one event of one job.

    As text (`str()`), it names the delivery's Redis records and arq jobs: the request id itself
    for the job's final event, `{request_id}#{kind}` for an early one (`r1#processing`). Written
    and read here only, and never changed: a running deployment's records use it.
    """

    request_id: str
    early: str | None = None  # the early event's kind; None: the job's final event

    def __str__(self) -> str:
        return self.request_id if self.early is None else f"{self.request_id}#{self.early}"

    @classmethod
    def parse(cls, text: str) -> DeliveryId:
        request_id, separator, kind = text.partition("#")
        return cls(request_id, kind if separator else None)

    @staticmethod
    def names_early(text: str) -> bool:
        """Whether `text` holds an early event's delivery id (so it is no request id)."""
        return any(str(DeliveryId("", kind)) in text for kind in EARLY_KINDS)


# The delivery's fields in the hash that holds it: written by this stage's scripts, and filed
# (state `pending` or `none`, attempt 0) by the job's end in the step that ends it
# (relay/jobs/store.end.lua). No other Python module names them (tests/test_layout.py).
STATE_FIELD = "delivery"
FIELDS = (STATE_FIELD, "attempt", "attempts_made", "last_result", "schedule_base")


@dataclass(frozen=True)
class Delivery:
    """A delivery as its hash holds it, read with its job (`Delivery.of(job)`)."""

    state: str | None  # a DeliveryState; None before its job ends
    attempt: int  # the attempt it waits on, numbered from 0
    attempts_made: int
    last_result: str | None
    # The attempt a redelivery restarted the retry schedule at (0: never redelivered).
    schedule_base: int

    @classmethod
    def of(cls, job: Job) -> Delivery:
        raw = job.stored
        state, result = raw.get(STATE_FIELD.encode()), raw.get(b"last_result")
        return cls(
            state=state.decode() if state else None,
            attempt=int(raw.get(b"attempt") or 0),
            attempts_made=int(raw.get(b"attempts_made") or 0),
            last_result=result.decode() if result else None,
            schedule_base=int(raw.get(b"schedule_base") or 0),
        )

    @property
    def pending(self) -> bool:
        return self.state == "pending"


# The first back-off of a destination that keeps failing, doubled with each further failure.
BREAKER_BASE = 5.0


@dataclass(frozen=True)
class Breaker:
    """When a destination is backed off: after `threshold` failures in a row, for `base`
    seconds, doubling with each further failure up to `max_backoff`."""

    threshold: int
    base: float
    max_backoff: float

    @classmethod
    def from_settings(cls, settings: Settings) -> Breaker:
        return cls(
            threshold=settings.destination_failures,
            base=min(BREAKER_BASE, settings.destination_max_backoff),
            max_backoff=settings.destination_max_backoff,
        )


@dataclass(frozen=True)
class DeliveryUpdate:
    recorded: bool
    backed_off_for: float  # seconds the destination is backed off for; 0 when it is not


@dataclass(frozen=True)
class Probe:
    """What an attempt at a destination last seen backed off was told (`claim_probe`)."""

    go: bool  # it may be made: the breaker is closed, or this attempt is the probe
    wait: float  # seconds the destination's other attempts wait (0: the breaker is closed)


class DeliveryStore:
    def __init__(self, redis: Redis, *, retention: float = history.DEFAULT_RETENTION) -> None:
        self.redis = redis
        # An early event's start and every recorded outcome are the job's events
        # (relay.jobs.history), with `retention` as their feed's.
        events = history.prelude(retention)
        self._record_outcome = scripts.register(redis, __name__, "record_outcome", prelude=events)
        self._emit = scripts.register(redis, __name__, "emit", prelude=events)
        self._claim_send = scripts.register(redis, __name__, "claim_send")
        self._claim_probe = scripts.register(redis, __name__, "claim_probe")

    async def emit(
        self, job: Job, *, kind: str, event_id: str, event: bytes, retention: float
    ) -> str | None:
        """Create the delivery record of an event sent before the job ends; its id, or None
        when it already exists or the job has ended."""
        assert job.callback_url is not None
        delivery_id = str(DeliveryId(job.request_id, kind))
        created = await self._emit(
            keys=[keys.job(job.request_id), keys.job(delivery_id), keys.deliveries("pending")],
            args=[
                delivery_id,
                job.callback_url,
                event_id,
                event,
                int(retention),
                job.request_id,
                kind,
                job.trace or "",
            ],
        )
        return delivery_id if created else None

    async def claim_send(self, delivery: DeliveryId, *, hold: float) -> bool:
        """May this early event be sent now (the job has not ended)? Holds the job's sending
        key for `hold` seconds if so; see store.claim_send.lua."""
        request_id, delivery_id = delivery.request_id, str(delivery)
        claimed = await self._claim_send(
            keys=[keys.job(request_id), keys.job(delivery_id), keys.sending(request_id)],
            args=[keys.DELIVERIES_PREFIX, delivery_id, int(hold * 1000)],
        )
        return bool(claimed)

    async def claim_probe(self, destination: str, *, hold: float, wait: float) -> Probe:
        """May an attempt go to this destination, last seen backed off? Half-open, only one
        attempt (the probe) may, holding it for `hold` seconds; see store.claim_probe.lua."""
        go, wait_for = await self._claim_probe(
            keys=[keys.destination(destination), keys.BACKED_OFF],
            args=[destination, hold, wait],
        )
        return Probe(bool(go), float(wait_for))

    async def owner(self, delivery: DeliveryId) -> str:
        """Whose delivery this is, for fairness among a destination's slots: its job's caller,
        or the job itself where no caller is recorded."""
        (caller,) = await batcher(self.redis).run(
            [("HGET", keys.job(delivery.request_id), "caller")]
        )
        return f"caller:{caller.decode()}" if caller else f"job:{delivery.request_id}"

    async def release_send(self, delivery: DeliveryId) -> None:
        await batcher(self.redis).run([("DEL", keys.sending(delivery.request_id))])

    async def sending(self, request_id: str) -> bool:
        """Is an early event of this job on its way right now?"""
        (found,) = await batcher(self.redis).run([("EXISTS", keys.sending(request_id))])
        return bool(found)

    async def record_outcome(
        self,
        request_id: str,
        *,
        attempt: int,
        next_attempt: int,
        state: DeliveryState,
        result: str,
        destination: str,
        answered: bool,
        breaker: Breaker,
        event_type: str = "",
        keep_for: float = 0,
        then: Sequence[Call] = (),
    ) -> DeliveryUpdate:
        """Record an attempt's outcome, only if the delivery is still waiting on that attempt,
        and tell the destination's breaker whether the receiver `answered`.

        `event_type`: the type of the event delivered, for the job's history.
        `keep_for`: the hash lives at least this many seconds more (never shortened).
        `then`: calls made right after, in the same round trip (the attempt's log entry, its
        count); they are made whatever this one's outcome.
        """
        update = self._record_outcome.call(
            keys=[
                keys.job(request_id),
                keys.destination(destination),
                keys.BACKED_OFF,
                keys.ARQ_QUEUE,
                keys.ARQ_JOB_PREFIX + keys.delivery_job_id(request_id, attempt),
                keys.job(DeliveryId.parse(request_id).request_id),
            ],
            args=[
                attempt,
                next_attempt,
                state,
                result,
                int(keep_for),
                destination,
                "1" if answered else "0",
                breaker.threshold,
                breaker.base,
                breaker.max_backoff,
                keys.delivery_job_id(request_id, attempt),
                DeliveryId.parse(request_id).request_id,
                event_type,
            ],
        )
        (recorded, backed_off_for), *_ = await batcher(self.redis).run([update, *then])
        return DeliveryUpdate(bool(recorded), float(backed_off_for))
