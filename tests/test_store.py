"""JobStore and its Lua scripts, directly, on a real Redis with its real clock."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Awaitable
from typing import Any, cast

import pytest
from redis.asyncio import Redis

from relay.delivery.store import Breaker, Delivery, DeliveryStore
from relay.jobs.store import Job, JobStore
from relay.redis import keys

HOOK = "https://receiver.example/hook"
RETENTION = 600


@pytest.fixture
def store(redis: Redis) -> JobStore:
    return JobStore(redis)


async def redis_now(redis: Redis) -> float:
    seconds, micros = await redis.time()
    return float(seconds + micros / 1e6)


async def stored(redis: Redis, request_id: str) -> dict[bytes, bytes]:
    # redis-py types hgetall for sync and async clients alike; this one is async.
    fields = await cast(Awaitable[dict[bytes, bytes]], redis.hgetall(keys.job(request_id)))
    return fields


async def tracked(
    store: JobStore,
    request_id: str,
    *,
    callback_url: str | None = HOOK,
    reference_id: str | None = None,
    first_poll_in: float = 0,
) -> Job:
    created = await store.create(
        request_id,
        callback_url=callback_url,
        reference_id=reference_id,
        first_poll_in=first_poll_in,
    )
    assert created
    job = await store.get(request_id)
    assert job is not None
    return job


async def ended(store: JobStore, job: Job, *, retention: float = RETENTION) -> Job:
    await store.end(
        job,
        status="completed",
        body=b'{"status":"completed"}',
        event_id=f"msg_{job.request_id}",
        event=b'{"type":"lipsync.completed"}',
        retention=retention,
        deliver=job.callback_url is not None,
    )
    again = await store.get(job.request_id)
    assert again is not None and again.ended
    return again


def as_stored(job: Job) -> Job:
    """The job without the moment it was read, to compare two reads of unchanged state."""
    return dataclasses.replace(job, read_at=0.0)


async def ref_keys(redis: Redis) -> list[bytes]:
    return [key async for key in redis.scan_iter(keys.ref("*"))]


# create


async def test_create_tracks_an_id_once_and_a_second_create_changes_nothing(
    redis: Redis, store: JobStore
) -> None:
    assert await store.create("r1", callback_url=HOOK, reference_id="ref-a", first_poll_in=5)
    fields = await stored(redis, "r1")
    score = await redis.zscore(keys.POLLS, "r1")
    assert fields[b"callback_url"] == HOOK.encode() and score is not None

    again = await store.create(
        "r1", callback_url="https://other.example/hook", reference_id="ref-b", first_poll_in=100
    )
    assert again is False
    assert await stored(redis, "r1") == fields
    assert await redis.zscore(keys.POLLS, "r1") == score
    assert await redis.zcard(keys.POLLS) == 1
    assert await redis.get(keys.ref("ref-a")) == b"r1"
    assert await redis.exists(keys.ref("ref-b")) == 0


async def test_create_schedules_the_first_poll_on_the_redis_clock(
    redis: Redis, store: JobStore
) -> None:
    before = await redis_now(redis)
    await store.create("r1", callback_url=None, reference_id=None, first_poll_in=7.5)
    after = await redis_now(redis)

    score = await redis.zscore(keys.POLLS, "r1")
    assert score is not None and before + 7.5 <= score <= after + 7.5
    job = await store.get("r1")
    assert job is not None
    assert before <= job.created <= after
    assert job.interval == 7.5
    assert job.callback_url is None and job.reference_id is None
    assert job.status is None and job.body is None and not job.ended
    assert Delivery.of(job) == Delivery(
        None, attempt=0, attempts_made=0, last_result=None, schedule_base=0
    )
    assert await redis.ttl(keys.job("r1")) == -1, "a tracked job never expires before it ends"
    assert await ref_keys(redis) == [], "no reference_id, no index entry"


async def test_create_indexes_the_reference_id(redis: Redis, store: JobStore) -> None:
    job = await tracked(store, "r1", reference_id="order-7")
    assert job.reference_id == "order-7"
    assert await redis.get(keys.ref("order-7")) == b"r1"
    assert await ref_keys(redis) == [keys.ref("order-7").encode()]


# find and get


async def test_find_by_request_id_and_by_the_newest_reference_id(
    redis: Redis, store: JobStore
) -> None:
    await tracked(store, "r1", reference_id="order-7")
    by_id = await store.find("r1")
    assert by_id is not None and by_id.request_id == "r1"
    by_ref = await store.find("order-7")
    assert by_ref is not None and by_ref.request_id == "r1"

    await tracked(store, "r2", reference_id="order-7")
    newest = await store.find("order-7")
    assert newest is not None and newest.request_id == "r2"
    older = await store.find("r1")
    assert older is not None and older.request_id == "r1"

    # A request id wins over a reference_id that happens to be spelled the same.
    await tracked(store, "r3", reference_id="r1")
    same_spelling = await store.find("r1")
    assert same_spelling is not None and same_spelling.request_id == "r1"

    assert await store.find("unknown") is None
    await redis.delete(keys.job("r2"))
    assert await store.find("order-7") is None, "an index entry for a gone job finds nothing"


async def test_get_reads_the_time_from_redis_not_the_local_clock(
    redis: Redis, store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await tracked(store, "r1")
    before = await redis_now(redis)
    # A reader whose own clock is far off must still see the Redis clock.
    monkeypatch.setattr(time, "time", lambda: 1_000.0)
    job = await store.get("r1")
    monkeypatch.undo()
    after = await redis_now(redis)
    assert job is not None
    assert before <= job.read_at <= after


async def test_get_of_an_unknown_id_is_none(redis: Redis, store: JobStore) -> None:
    assert await store.get("unknown") is None
    assert await redis.exists(keys.job("unknown")) == 0


# record_poll


async def test_record_poll_stores_a_status_and_reschedules(redis: Redis, store: JobStore) -> None:
    await tracked(store, "r1")
    before = await redis_now(redis)
    recorded = await store.record_poll(
        "r1", next_in=12, interval=3.5, status="processing", body=b'{"status":"processing"}'
    )
    after = await redis_now(redis)
    assert recorded is True

    job = await store.get("r1")
    assert job is not None
    assert job.status == "processing" and job.body == b'{"status":"processing"}'
    assert job.interval == 3.5 and job.not_found_since is None and not job.ended
    score = await redis.zscore(keys.POLLS, "r1")
    assert score is not None and before + 12 <= score <= after + 12
    polled = float((await stored(redis, "r1"))[b"polled"])
    assert before <= polled <= after


async def test_record_poll_without_a_status_keeps_the_last_one(
    redis: Redis, store: JobStore
) -> None:
    await tracked(store, "r1")
    await store.record_poll("r1", next_in=1, interval=2, status="queued", body=b'{"s":"queued"}')

    assert await store.record_poll(
        "r1", next_in=30, interval=5, body=b"ignored without a status", not_found_since=123.5
    )
    job = await store.get("r1")
    assert job is not None
    assert job.status == "queued" and job.body == b'{"s":"queued"}'
    assert job.interval == 5 and job.not_found_since == 123.5

    assert await store.record_poll("r1", next_in=30, interval=5)
    found_again = await store.get("r1")
    assert found_again is not None and found_again.not_found_since is None
    assert found_again.status == "queued"


async def test_record_poll_is_dropped_once_the_job_has_ended(redis: Redis, store: JobStore) -> None:
    job = await ended(store, await tracked(store, "r1"))
    score = await redis.zscore(keys.POLLS, "r1")

    late = await store.record_poll(
        "r1", next_in=50, interval=9, status="processing", body=b'{"status":"processing"}'
    )
    assert late is False
    after = await store.get("r1")
    assert after is not None and as_stored(after) == as_stored(job)
    assert b"polled" not in await stored(redis, "r1")
    assert await redis.zscore(keys.POLLS, "r1") == score


async def test_record_poll_is_dropped_for_an_id_not_in_the_poll_queue(
    redis: Redis, store: JobStore
) -> None:
    await tracked(store, "r1")
    await redis.zrem(keys.POLLS, "r1")  # unscheduled meanwhile
    fields = await stored(redis, "r1")

    assert await store.record_poll("r1", next_in=5, interval=5, status="processing") is False
    assert await stored(redis, "r1") == fields
    assert await redis.zscore(keys.POLLS, "r1") is None, "a dropped poll does not re-queue"

    assert await store.record_poll("unknown", next_in=5, interval=5, status="queued") is False
    assert await redis.exists(keys.job("unknown")) == 0
    assert await redis.zcard(keys.POLLS) == 0


# end


async def test_end_fixes_the_final_state_once(redis: Redis, store: JobStore) -> None:
    job = await tracked(store, "r1")
    before = await redis_now(redis)
    await store.end(
        job,
        status="completed",
        body=b"first body",
        event_id="msg_first",
        event=b'{"n":"first"}',
        retention=RETENTION,
        deliver=job.callback_url is not None,
    )
    after = await redis_now(redis)
    first = await store.get("r1")
    assert first is not None and first.ended
    assert first.status == "completed" and first.body == b"first body"
    assert first.event_id == "msg_first" and first.event == b'{"sequence":2,"n":"first"}'
    assert Delivery.of(first).state == "pending" and Delivery.of(first).attempt == 0
    assert first.ended_at is not None and before <= first.ended_at <= after
    assert RETENTION - 5 < await redis.ttl(keys.job("r1")) <= RETENTION

    await store.end(
        job,
        status="failed",
        body=b"second body",
        event_id="msg_second",
        event=b'{"n":"second"}',
        retention=50_000,
        deliver=job.callback_url is not None,
    )
    second = await store.get("r1")
    assert second is not None and as_stored(second) == as_stored(first), "the first end wins"
    assert await redis.ttl(keys.job("r1")) <= RETENTION


async def test_end_of_a_job_without_callback_delivers_nothing(
    redis: Redis, store: JobStore
) -> None:
    job = await ended(store, await tracked(store, "r1", callback_url=None))
    assert Delivery.of(job).state == "none"
    assert RETENTION - 5 < await redis.ttl(keys.job("r1")) <= RETENTION
    assert await ref_keys(redis) == []


async def test_end_of_a_gone_job_writes_nothing(redis: Redis, store: JobStore) -> None:
    job = await tracked(store, "r1", reference_id="order-7")
    await redis.delete(keys.job("r1"))
    await store.end(
        job,
        status="completed",
        body=b"{}",
        event_id="msg",
        event=b"{}",
        retention=RETENTION,
        deliver=job.callback_url is not None,
    )
    assert await redis.exists(keys.job("r1")) == 0
    assert await redis.ttl(keys.ref("order-7")) == -1


async def test_end_expires_the_reference_only_while_it_points_at_the_job(
    redis: Redis, store: JobStore
) -> None:
    older = await tracked(store, "r1", reference_id="order-7")
    newer = await tracked(store, "r2", reference_id="order-7")

    await ended(store, older)
    assert await redis.ttl(keys.ref("order-7")) == -1, "the newer job still needs the index"
    assert await redis.get(keys.ref("order-7")) == b"r2"

    await ended(store, newer)
    assert RETENTION - 5 < await redis.ttl(keys.ref("order-7")) <= RETENTION


# a delivery's outcome (relay.delivery.store), written into the job's hash


async def update(store: JobStore, request_id: str, **fields: Any) -> bool:
    """record_outcome for a receiver that answered (its breaker stays closed)."""
    result = await DeliveryStore(store.redis).record_outcome(
        request_id,
        destination="http://receiver.example:80",
        answered=True,
        breaker=Breaker(threshold=5, base=1, max_backoff=60),
        **fields,
    )
    return result.recorded


async def test_record_outcome_applies_only_to_the_awaited_attempt(
    redis: Redis, store: JobStore
) -> None:
    await ended(store, await tracked(store, "r1"))

    async def snapshot() -> Job:
        job = await store.get("r1")
        assert job is not None
        return as_stored(job)

    start = await snapshot()
    assert not await update(
        store, "r1", attempt=1, next_attempt=2, state="delivered", result="early"
    )
    assert await snapshot() == start

    assert await update(store, "r1", attempt=0, next_attempt=1, state="pending", result="HTTP 500")
    retrying = await snapshot()
    retrying_delivery = Delivery.of(retrying)
    assert retrying_delivery.attempt == 1 and retrying_delivery.attempts_made == 1
    assert retrying_delivery.pending and retrying_delivery.last_result == "HTTP 500"

    # A re-run of the old attempt (after a crash) changes nothing.
    assert not await update(
        store, "r1", attempt=0, next_attempt=1, state="delivered", result="stale"
    )
    assert await snapshot() == retrying

    assert await update(
        store, "r1", attempt=1, next_attempt=2, state="delivered", result="HTTP 200"
    )
    done = await snapshot()
    done_delivery = Delivery.of(done)
    assert done_delivery.attempt == 2 and done_delivery.attempts_made == 2
    assert done_delivery.state == "delivered" and done_delivery.last_result == "HTTP 200"

    # Only a pending delivery is updated, even for the attempt number it holds.
    assert not await update(store, "r1", attempt=2, next_attempt=3, state="pending", result="late")
    assert await snapshot() == done


async def test_record_outcome_needs_a_pending_delivery(redis: Redis, store: JobStore) -> None:
    running = await tracked(store, "running")
    no_callback = await ended(store, await tracked(store, "quiet", callback_url=None))
    for job in (running, no_callback):
        fields = await stored(redis, job.request_id)
        assert not await update(
            store, job.request_id, attempt=0, next_attempt=1, state="delivered", result="HTTP 200"
        )
        assert await stored(redis, job.request_id) == fields

    assert not await update(
        store, "unknown", attempt=0, next_attempt=1, state="delivered", result="HTTP 200"
    )
    assert await redis.exists(keys.job("unknown")) == 0


async def test_record_outcome_keeps_the_job_at_least_keep_for_and_never_shortens(
    redis: Redis, store: JobStore
) -> None:
    await ended(store, await tracked(store, "r1"))

    assert await update(
        store, "r1", attempt=0, next_attempt=1, state="pending", result="HTTP 503", keep_for=10
    )
    assert RETENTION - 5 < await redis.ttl(keys.job("r1")) <= RETENTION

    assert await update(
        store, "r1", attempt=1, next_attempt=2, state="pending", result="HTTP 503", keep_for=5_000
    )
    assert 4_995 < await redis.ttl(keys.job("r1")) <= 5_000

    assert await update(store, "r1", attempt=2, next_attempt=3, state="gone", result="HTTP 410")
    assert 4_995 < await redis.ttl(keys.job("r1")) <= 5_000


async def test_the_timeline_records_each_status_once_with_redis_time(
    redis: Redis, store: JobStore
) -> None:
    job = await tracked(store, "r1", reference_id="order-1")
    for status in ("queued", "queued", "processing", "processing"):
        assert await store.record_poll(
            "r1", next_in=1, interval=1, status=status, body=b'{"status":"%s"}' % status.encode()
        )
    current = await store.get("r1")
    assert current is not None
    assert [status for status, _ in current.timeline] == ["submitted", "queued", "processing"]
    done = await ended(store, current)
    assert [status for status, _ in done.timeline] == [
        "submitted",
        "queued",
        "processing",
        "completed",
    ]
    times = [at for _, at in done.timeline]
    assert times == sorted(times)
    assert abs(times[0] - job.created) < 0.01
    (seconds, micros) = await redis.time()
    assert abs(times[-1] - (seconds + micros / 1e6)) < 5
    # Kept on the compact ended record, with the reference_id the console shows.
    assert done.reference_id == "order-1"
