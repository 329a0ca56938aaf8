"""How the relay's Redis side scales with outstanding jobs: memory per job and claim cost.

Run: uv run python bench/scale.py [--jobs 100000]

It tracks N jobs through the real JobStore (the same script the API runs), records one poll
result on each (so every hash holds a realistic LipsyncRequest body), then measures Redis memory
per job and how long a claim of due work takes with N jobs outstanding, a few due and most
parked in the future: the claim must not grow with N.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import time
import uuid

import orjson
from redis.asyncio import Redis

from relay.devtools.embedded_redis import embedded_redis
from relay.jobs.schedule import PollSchedule
from relay.jobs.store import JobStore

BODY = orjson.dumps(
    {
        "id": "6f82a2d8-a6d4-4e8a-a0fa-e8b09823a2d8",
        "reference_id": "dub-episode-42",
        "status": "processing",
        "created_at": "2026-04-07T10:00:00Z",
        "started_at": "2026-04-07T10:00:05Z",
    }
)


async def used_memory(redis: Redis) -> int:
    info = await redis.info("memory")
    return int(info["used_memory"])


async def track(store: JobStore, count: int, *, due_in: float, batch: int = 500) -> list[str]:
    ids: list[str] = []
    for start in range(0, count, batch):
        chunk = [str(uuid.uuid4()) for _ in range(min(batch, count - start))]
        await asyncio.gather(
            *(
                store.create(
                    rid,
                    callback_url="https://receiver.internal.example/hooks/lipsync",
                    reference_id=f"ref-{rid[:8]}",
                    first_poll_in=due_in,
                )
                for rid in chunk
            )
        )
        await asyncio.gather(
            *(
                store.record_poll(rid, next_in=due_in, interval=2.0, status="processing", body=BODY)
                for rid in chunk
            )
        )
        ids.extend(chunk)
    return ids


async def claim_timings(schedule: PollSchedule, rounds: int) -> list[float]:
    timings = []
    for _ in range(rounds):
        started = time.perf_counter()
        await schedule.claim(10)
        timings.append((time.perf_counter() - started) * 1000)
    return timings


async def main(jobs: int) -> None:
    with embedded_redis() as url:
        redis = Redis.from_url(url)
        store = JobStore(redis)
        before = await used_memory(redis)
        started = time.perf_counter()
        await track(store, jobs, due_in=3600)
        elapsed = time.perf_counter() - started
        after = await used_memory(redis)
        per_job = (after - before) / jobs
        rate = jobs / elapsed
        print(f"tracked {jobs:,} jobs in {elapsed:.1f} s ({rate:,.0f} jobs/s, one poll each)")
        print(f"redis memory: {(after - before) / 2**20:.1f} MiB, {per_job:.0f} bytes per job")

        # Claims with everything parked in the future, then with 1,000 due among them.
        schedule = PollSchedule(redis, rate=1_000_000, lease=30)
        parked = await claim_timings(schedule, 200)
        await track(store, 1000, due_in=0)
        due = await claim_timings(schedule, 100)
        small = Redis.from_url(url)
        await small.flushall()
        await track(JobStore(small), 1000, due_in=0)
        baseline = await claim_timings(PollSchedule(small, rate=1_000_000, lease=30), 100)
        for label, values in (
            (f"claim(10), {jobs:,} parked, none due", parked),
            (f"claim(10), {jobs:,} parked + 1,000 due", due),
            ("claim(10), 1,000 jobs in all, all due", baseline),
        ):
            print(
                f"{label}: median {statistics.median(values):.3f} ms, "
                f"p99 {sorted(values)[int(len(values) * 0.99) - 1]:.3f} ms"
            )
        await redis.aclose()
        await small.aclose()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--jobs", type=int, default=100_000)
    asyncio.run(main(parser.parse_args().jobs))
