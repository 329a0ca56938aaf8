"""Tracked jobs in Redis: one small hash per job, written only through atomic scripts.

A job's life: `create` (API, after Chamelaion accepted it) → `record_poll` after each poll that
did not end it → `end` exactly once when it completes or fails (fixes the callback payload and
its webhook-id, and files its delivery as pending). Every write is a Lua script so that a slow
or crashed worker can never overwrite newer state: a poll result is dropped once the job has
ended. Times come from the Redis clock (TIME inside the scripts, and `Job.read_at` for
readers), so worker clocks need not agree.

What follows the end is the delivery stage's (relay.delivery.store): it keeps a delivery's
state and attempt in the same hash, written by its own scripts and read from `Job.stored` (the
hash as the job's one read brought it), so this module names none of the delivery's fields. The
one exception is Lua: `store.end.lua` files the delivery as pending in the step that ends the job.

The poll queue (`relay:polls`) belongs to relay.jobs.schedule, which claims, hands back and
removes its entries; `create` and `record_poll` write a job's entry too, in the same script as
the job itself, because a job must never exist without its next poll (or the other way round).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from redis.asyncio import Redis

from relay.errors import NotReplicated
from relay.jobs import history
from relay.jobs.events import DEFAULT_EVENTS
from relay.redis import keys, scripts
from relay.redis.batch import Call, batcher

log = logging.getLogger(__name__)

# RELAY_MAX_JOB_AGE + RELAY_JOB_RETENTION by default (relay.settings).
DEFAULT_LIFETIME = 14 * 86400.0


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
    # The Redis clock when the job ended (None: it has not).
    ended_at: float | None
    # (status, Redis-clock time) for each status the job was seen in, oldest first; the first
    # is `submitted`, when the relay started tracking it.
    timeline: tuple[tuple[str, float], ...]
    # The events the callback gets, and the JSON object echoed beside `data` (None: none).
    events: tuple[str, ...]
    metadata: bytes | None
    # The number of the job's newest event (relay.jobs.history); 0 before its first.
    sequence: int
    # The submission's trace context (relay.tracing.spans.keep), when it was traced.
    trace: str | None
    # The Redis clock when this record was read: what the job's age and grace periods are
    # measured against, never the reader's own clock.
    read_at: float
    # The caller that submitted or watched it (relay.callers); None for a job tracked before
    # callers were recorded, which only an admin sees.
    caller: str | None = None
    # The hash as read. Other stages keep fields of their own in it and read them from here
    # (relay.delivery.store.Delivery.of): one HGETALL serves both, and this module need not
    # know their names.
    stored: Mapping[bytes, bytes] = field(default_factory=dict, repr=False, hash=False)

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


def _timeline(text: str | None) -> tuple[tuple[str, float], ...]:
    entries = []
    for entry in (text or "").split(";"):
        status, _, at = entry.rpartition("@")
        if status and at:
            entries.append((status, float(at)))
    return tuple(entries)


def _decode(request_id: str, raw: dict[bytes, bytes], read_at: float) -> Job:
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
        ended_at=_number(raw, "ended"),
        timeline=_timeline(_text(raw, "timeline")),
        events=tuple(events.split(",")) if (events := _text(raw, "events")) else DEFAULT_EVENTS,
        metadata=raw.get(b"metadata") or None,
        sequence=int(raw.get(b"sequence") or 0),
        trace=_text(raw, "trace"),
        read_at=read_at,
        caller=_text(raw, "caller"),
        stored=raw,
    )


@dataclass(frozen=True)
class PollRecord:
    """A non-final poll result to store: what `JobStore.record_poll` takes, as one value."""

    request_id: str
    next_in: float
    interval: float
    status: str | None = None
    body: bytes = b""
    not_found_since: float | None = None

    def args(self) -> list[str | bytes | float]:
        return [
            self.request_id,
            self.next_in,
            self.interval,
            self.status or "",
            self.body,
            "" if self.not_found_since is None else self.not_found_since,
        ]


class JobStore:
    def __init__(
        self,
        redis: Redis,
        *,
        wait_replicas: int = 0,
        wait_timeout: float = 1.0,
        retention: float = history.DEFAULT_RETENTION,
        lifetime: float = DEFAULT_LIFETIME,
    ) -> None:
        self.redis = redis
        # How long a job can be kept at most (RELAY_MAX_JOB_AGE + RELAY_JOB_RETENTION): how
        # long its callers' indexes hold it.
        self.lifetime = lifetime
        # Replicas that must confirm a new job before `create` returns (Redis WAIT).
        self.wait_replicas = wait_replicas
        self.wait_timeout = wait_timeout
        # Every change of a job's status is one of its events (relay.jobs.history): the scripts
        # that make one emit it, with `retention` as its feed's.
        events = history.prelude(retention)
        self._create = scripts.register(redis, __name__, "create", prelude=events)
        self._record_poll = scripts.register(redis, __name__, "record_poll", prelude=events)
        self._end = scripts.register(redis, __name__, "end", prelude=events)

    async def create(
        self,
        request_id: str,
        *,
        callback_url: str | None,
        reference_id: str | None,
        first_poll_in: float,
        events: Sequence[str] | None = None,
        metadata: bytes | None = None,
        intent_id: str | None = None,
        trace: str | None = None,
        caller: str | None = None,
    ) -> bool:
        """Start tracking; False when the id is already tracked (nothing is changed then).

        `events`: which events the callback gets (None: the final ones); `metadata`: a JSON
        object echoed in every callback; `intent_id`: the submission intent (with this
        reference_id) that the job settles, closed in the same step, tracked or not; `trace`: the
        submission's trace context (relay.tracing.spans.keep), kept for the job's spans;
        `caller`: whose job it is (relay.callers). With
        `wait_replicas`, returns only once that many replicas hold the job, else raises
        NotReplicated (the job stays recorded on the primary and is tracked from there).
        """
        job_key = keys.job(request_id)
        ref_key = keys.ref(reference_id) if reference_id else job_key
        script_keys = [job_key, keys.POLLS, ref_key, keys.CREATED, job_key, job_key, job_key]
        script_keys += [
            keys.caller_jobs(caller) if caller else job_key,
            keys.caller_ref(caller, reference_id) if caller and reference_id else job_key,
        ]
        if intent_id is not None:
            script_keys[4:7] = [
                keys.intent(intent_id),
                keys.INTENTS,
                keys.intents_by_ref(reference_id) if reference_id else job_key,
            ]
        script_keys.append(keys.caller_outstanding(caller) if caller else job_key)
        args: list[str | bytes | float] = [
            request_id,
            callback_url or "",
            reference_id or "",
            first_poll_in,
            ",".join(events or ()),
            metadata or b"",
            intent_id or "",
            trace or "",
            caller or "",
            int(self.lifetime),
        ]
        if not self.wait_replicas:
            return bool(await self._create(keys=script_keys, args=args))
        # WAIT counts only the writes made on its own connection: one pipeline keeps the
        # script and the WAIT on one, off the batcher's line, which WAIT would hold meanwhile.
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
        (job,) = await self.get_many([request_id])
        return job

    async def get_many(self, request_ids: list[str]) -> list[Job | None]:
        """Several jobs in one round trip, in the order asked (None where untracked)."""
        calls: list[Call] = [("HGETALL", keys.job(request_id)) for request_id in request_ids]
        *raws, (seconds, micros) = await batcher(self.redis).run([*calls, ("TIME",)])
        read_at = seconds + micros / 1e6
        return [
            _decode(request_id, raw, read_at) if raw else None
            for request_id, raw in zip(request_ids, raws, strict=True)
        ]

    async def has_ended(self, request_id: str) -> bool:
        """Whether the job has ended (False too when it is not tracked): one small read."""
        (ended,) = await batcher(self.redis).run([("HEXISTS", keys.job(request_id), "event")])
        return bool(ended)

    async def find(self, id_or_reference: str) -> Job | None:
        """A job by request id, else by reference_id (the newest tracked one with it)."""
        job = await self.get(id_or_reference)
        if job is not None:
            return job
        (request_id,) = await batcher(self.redis).run([("GET", keys.ref(id_or_reference))])
        return await self.get(request_id.decode()) if request_id else None

    async def find_owned(self, id_or_reference: str, owner: str | None) -> Job | None:
        """`find`, among `owner`'s jobs only (None: anyone's): a job of another caller is
        not found, and a reference_id is looked up among the owner's own."""
        if owner is None:
            return await self.find(id_or_reference)
        job = await self.get(id_or_reference)
        if job is not None and job.caller == owner:
            return job
        index = keys.caller_ref(owner, id_or_reference)
        (newest,) = await batcher(self.redis).run([("ZREVRANGE", index, 0, 0)])
        if not newest:
            return None
        job = await self.get(newest[0].decode())
        return job if job is not None and job.caller == owner else None

    async def callers_of(self, request_ids: list[str]) -> list[str | None]:
        """Whose each job is, in one round trip (None: untracked, or from before callers)."""
        calls: list[Call] = [("HGET", keys.job(request_id), "caller") for request_id in request_ids]
        found = await batcher(self.redis).run(calls)
        return [value.decode() if value else None for value in found]

    async def page(
        self, owner: str, *, offset: int, limit: int, reference_id: str | None = None
    ) -> tuple[list[Job], int]:
        """A page of `owner`'s jobs, newest first (with `reference_id`: those with it), and
        how many there are. Entries of jobs that expired are dropped on the way."""
        index = keys.caller_ref(owner, reference_id) if reference_id else keys.caller_jobs(owner)
        for _ in range(3):  # each round drops what expired; a page is then read whole
            total, members = await batcher(self.redis).run(
                [("ZCARD", index), ("ZREVRANGE", index, offset, offset + limit - 1)]
            )
            ids = [member.decode() for member in members]
            found = await self.get_many(ids) if ids else []
            gone = [rid for rid, job in zip(ids, found, strict=True) if job is None]
            if not gone:
                break
            await batcher(self.redis).run([("ZREM", index, *gone)])
        jobs = [job for job in found if job is not None and job.caller == owner]
        return jobs, int(total) - len(gone)

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
        record = PollRecord(request_id, next_in, interval, status, body, not_found_since)
        recorded = await self._record_poll(
            keys=[keys.job(request_id), keys.POLLS], args=record.args()
        )
        return bool(recorded)

    async def record_polls(self, records: list[PollRecord]) -> None:
        """Many `record_poll`s in one round trip (each still its own atomic script)."""
        await batcher(self.redis).run(
            [
                self._record_poll.call(
                    keys=[keys.job(record.request_id), keys.POLLS], args=record.args()
                )
                for record in records
            ]
        )

    async def end(
        self,
        job: Job,
        *,
        status: str,
        body: bytes,
        event_id: str,
        event: bytes,
        retention: float,
        deliver: bool,
    ) -> bool:
        """Fix the job's final state and callback payload; later calls keep the first one.
        Whichever call ends it, the job leaves the poll queue. True when this call ended it.

        `deliver`: the callback wants this event (else the delivery state is `none`).
        """
        has_ref = job.reference_id is not None
        ref_key = keys.ref(job.reference_id) if job.reference_id else keys.job(job.request_id)
        delivery = "pending" if deliver else "none"
        ended = await self._end(
            keys=[
                keys.job(job.request_id),
                ref_key,
                keys.CREATED,
                keys.deliveries("pending"),
                keys.POLLS,
                keys.caller_outstanding(job.caller) if job.caller else keys.job(job.request_id),
            ],
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
        return int(ended) == 1
