"""The delivery queue: every delivery attempt that is not made at once is an arq job.

Through one script (queue.enqueue.lua) rather than arq's enqueue_job, which takes three round
trips and a WATCHed connection per job (bursts enqueue a job per ended job), and which scores
the job on the calling process's own clock. The script scores it on Redis's (relay.redis.clock),
which workers compare with: a process whose clock is off queues an attempt neither early nor
late.

Each job has a fixed id, so enqueueing one twice (a retry after a crash) is a no-op: the script,
like arq, refuses a job id that is queued, running or kept as a result.
"""

from __future__ import annotations

import time

from arq.connections import ArqRedis
from arq.jobs import serialize_job

from relay.redis import keys, scripts
from relay.redis.batch import batcher
from relay.redis.clock import RedisClock, redis_now


class DeliveryQueue:
    """Enqueues delivery attempts as arq jobs, deferred by their wait.

    `clock`: a worker's sample of Redis's clock, for what is worked out in Python (the due time
    in a postponed job's id, and the enqueue time arq reports). None in the API, which keeps no
    clock: the script scores its jobs on Redis's clock all the same, and only arq's report of
    how long such a job queued reads the API's own clock.
    """

    def __init__(
        self, redis: ArqRedis, schedule: tuple[float, ...], clock: RedisClock | None
    ) -> None:
        self.redis = redis
        self.schedule = schedule
        self.clock = clock
        self._enqueue = scripts.register(redis, __name__, "enqueue")

    def _now_ms(self) -> int:
        return self.clock.now_ms() if self.clock is not None else int(time.time() * 1000)

    async def _enqueue_job(self, job_id: str, delay: float, *args: object) -> None:
        defer_ms = max(0, round(delay * 1000))
        # The script scores the job itself, on Redis's clock; the enqueue time in the payload
        # is only what arq reports (how long a job queued).
        payload = serialize_job(
            "deliver", args, {}, None, self._now_ms(), serializer=self.redis.job_serializer
        )
        await self._enqueue(
            keys=[
                keys.ARQ_JOB_PREFIX + job_id,
                keys.ARQ_RESULT_PREFIX + job_id,
                keys.ARQ_QUEUE,
            ],
            args=[job_id, payload, defer_ms, defer_ms + self.redis.expires_extra_ms],
        )

    async def enqueue_attempt(
        self, request_id: str, attempt: int, delay: float, destination: str | None
    ) -> None:
        """Queue attempt number `attempt` of `request_id`, due `delay` seconds from now.

        `destination`: the callback URL's (None: the attempt reads it from the job).
        """
        job_id = keys.delivery_job_id(request_id, attempt)
        await self._enqueue_job(job_id, delay, request_id, attempt, destination)

    async def postpone(self, request_id: str, attempt: int, delay: float, destination: str) -> None:
        # Due time in the id: a re-run of the postponing job (after a crash) adds nothing, and
        # a later postponement is a new job, not a Retry that arq would expire after a day.
        # Only workers postpone (an attempt finds its destination backed off).
        if self.clock is None:
            raise RuntimeError("postponing an attempt needs the worker's RedisClock")
        due_ms = self.clock.now_ms() + round(delay * 1000)
        job_id = keys.postponed_job_id(request_id, attempt, due_ms)
        await self._enqueue_job(job_id, delay, request_id, attempt, destination)

    async def defer(self, request_id: str, attempt: int, delay: float) -> None:
        """Move attempt `attempt`'s queued job (if still queued) to `delay` seconds from now."""
        due_ms = self._now_ms() + round(delay * 1000)
        job_id = keys.delivery_job_id(request_id, attempt)
        await batcher(self.redis).run([("ZADD", keys.ARQ_QUEUE, "XX", due_ms, job_id)])

    async def make_due(self, delivery_ids: list[str], *, attempt: int) -> None:
        """Make attempt `attempt` of each of `delivery_ids` due now, where it is still queued
        (a stopping worker hands its unfinished first attempts' guards to the others)."""
        now_ms = int(await redis_now(self.redis) * 1000)
        await batcher(self.redis).run(
            [
                ("ZADD", keys.ARQ_QUEUE, "XX", now_ms, keys.delivery_job_id(delivery_id, attempt))
                for delivery_id in delivery_ids
            ]
        )
