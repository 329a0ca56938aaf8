"""What the console reads from Redis: the backlog's shape and pages of jobs.

Everything here is read-only and bounded: the outstanding jobs' statuses are counted from a
sample of the poll queue's head, and job lists walk the keyspace with SCAN a page at a time
(the cursor is the page token), so no console page can stall Redis however many jobs it holds.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from redis.asyncio import Redis

from relay.delivery.attempt_log import STATES
from relay.delivery.store import STATE_FIELD
from relay.redis import keys
from relay.redis.batch import Call, batcher
from relay.redis.shared_state import read_shared_state
from relay.redis.stats import last_hour

STATUS_SAMPLE = 2000
PAGE_SIZE = 25
SCAN_BUDGET = 5000  # keys looked at per page at most, matching or not
DELIVERY_STATES = ("pending", "delivered", "gone", "failed", "none")


@dataclass(frozen=True)
class Overview:
    outstanding: int
    due: int
    poll_lag: float
    queued_deliveries: int
    statuses: dict[str, int]
    sampled: int
    paused_for: float  # seconds all polling is still paused after a 429 (0: not paused)
    budget_rate: float
    deliveries: dict[str, int]  # deliveries by state (kept as long as their jobs)
    backed_off: int  # destinations backed off right now
    rate_limited: int  # the upstream's 429s in the last hour
    sweep: dict[str, str]  # what the sweeps know: list order, last duration, failures in a row


@dataclass(frozen=True)
class JobRow:
    request_id: str
    reference_id: str | None
    status: str | None
    delivery: str | None
    created: float | None
    ended: float | None
    caller: str | None = None  # whose job (None: tracked before callers were recorded)


@dataclass(frozen=True)
class JobPage:
    rows: list[JobRow]
    cursor: int  # 0: the walk is complete


async def overview(redis: Redis, budget_rate: float) -> Overview:
    shared = await read_shared_state(redis)
    (head,) = await batcher(redis).run([("ZRANGE", keys.POLLS, 0, STATUS_SAMPLE - 1)])
    calls: list[Call] = [("HGET", keys.job(raw.decode()), "status") for raw in head]
    calls += [("ZCARD", keys.deliveries(state)) for state in STATES]
    replies = await batcher(redis).run([*calls, ("HGETALL", keys.SWEEP_STATE)])
    sweep_state = replies.pop()
    statuses, counts = replies[: len(head)], replies[len(head) :]
    counted = Counter((status or b"submitted").decode() for status in statuses)
    return Overview(
        outstanding=shared.outstanding,
        due=shared.due,
        poll_lag=shared.poll_lag,
        queued_deliveries=shared.queued_deliveries,
        statuses=dict(counted.most_common()),
        sampled=len(head),
        paused_for=shared.paused_for,
        budget_rate=budget_rate,
        deliveries=dict(zip(STATES, (int(count) for count in counts), strict=True)),
        backed_off=shared.backed_off,
        rate_limited=sum((await last_hour(redis, ("rate_limited",)))["rate_limited"]),
        sweep={name.decode(): value.decode() for name, value in sweep_state.items()},
    )


def _row(request_id: str, values: list[bytes | None]) -> JobRow:
    reference, status, delivery, timeline, ended, caller = (
        value.decode() if value else None for value in values
    )
    # When tracking began: the timeline's first entry (`created` is dropped once a job ends).
    first = timeline.split(";", 1)[0] if timeline else ""
    created = first.rpartition("@")[2] or None
    return JobRow(
        request_id,
        reference,
        status,
        delivery,
        float(created) if created else None,
        float(ended) if ended else None,
        caller,
    )


FIELDS = ["reference_id", "status", STATE_FIELD, "timeline", "ended", "caller"]


async def job_rows(redis: Redis, request_ids: list[str]) -> list[JobRow]:
    found = await batcher(redis).run(
        [("HMGET", keys.job(request_id), *FIELDS) for request_id in request_ids]
    )
    return [
        _row(request_id, values)
        for request_id, values in zip(request_ids, found, strict=True)
        if any(values)
    ]


async def list_jobs(
    redis: Redis,
    *,
    cursor: int,
    status: str | None,
    delivery: str | None,
    owner: str | None = None,
) -> JobPage:
    """One page of jobs matching the filters, walking the keyspace from `cursor`; `owner`:
    that caller's jobs only (None: everyone's)."""
    rows: list[JobRow] = []
    looked_at = 0
    pattern = keys.job("*")
    while True:
        ((cursor, names),) = await batcher(redis).run(
            [("SCAN", cursor, "MATCH", pattern, "COUNT", 500)]
        )
        looked_at += len(names)
        ids = [name.decode().removeprefix(keys.job("")) for name in names]
        for row in await job_rows(redis, ids):
            if status and (row.status or "submitted") != status:
                continue
            if delivery and (row.delivery or "none") != delivery:
                continue
            if owner is not None and row.caller != owner:
                continue
            rows.append(row)
        if cursor == 0 or len(rows) >= PAGE_SIZE or looked_at >= SCAN_BUDGET:
            break
    rows.sort(key=lambda row: row.created or 0, reverse=True)
    return JobPage(rows, cursor)
