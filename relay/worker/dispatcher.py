"""The poll dispatcher: claims due polls from the schedule and runs them, within a concurrency cap.

Polls do not go through arq's queue: parking 100k deferred jobs there would make every queue
read and every queue-length metric about future work. The dispatcher instead claims due ids
from the schedule (relay.jobs.schedule) within the shared rate budget and polls them here, at
most RELAY_WORKER_CONCURRENCY at a time.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from redis.exceptions import RedisError

from relay.jobs.poller import Poller
from relay.jobs.schedule import PollSchedule
from relay.lifecycle import Service, sleep_until_stopped, wait_for_tasks

log = logging.getLogger(__name__)

# The dispatcher never sleeps longer than this, so new jobs and a stop are noticed quickly.
MAX_IDLE = 0.5
# A heartbeat older than this means the dispatcher loop is stuck: the health check fails.
STALE_AFTER = 30.0


@dataclass
class Dispatcher(Service):
    name = "dispatcher"

    schedule: PollSchedule
    poller: Poller
    concurrency: int
    heartbeat: float = field(default_factory=time.monotonic)
    in_flight: dict[str, asyncio.Task[None]] = field(default_factory=dict)

    async def run(self, stop: asyncio.Event) -> None:
        """Claim and start due polls until `stop`; the polls started run on (see `drain`)."""
        while not stop.is_set():
            self.heartbeat = time.monotonic()
            free = self.concurrency - len(self.in_flight)
            if free <= 0:
                await asyncio.wait(
                    list(self.in_flight.values()),
                    timeout=MAX_IDLE,
                    return_when=asyncio.FIRST_COMPLETED,
                )
                continue
            try:
                claim = await self.schedule.claim(free)
            except RedisError as exc:
                log.warning("could not claim polls: %s", type(exc).__name__)
                await sleep_until_stopped(stop, 1.0)
                continue
            for request_id in claim.ids:
                if request_id in self.in_flight:
                    continue  # still being polled here; its own result will reschedule it
                task = asyncio.create_task(self._poll(request_id), name=f"poll:{request_id}")
                self.in_flight[request_id] = task
            if not claim.ids:
                wait = claim.wait if claim.wait is not None else MAX_IDLE
                await sleep_until_stopped(stop, min(wait, MAX_IDLE))

    async def _poll(self, request_id: str) -> None:
        try:
            # A last resort: each part of a poll has its own bound (the upstream call its
            # timeout, which the lease is sized to hold, and every Redis call its own), so only
            # a poll stuck past all of them is cut off here, when another worker may take the
            # job over anyway.
            async with asyncio.timeout(self.schedule.lease):
                await self.poller.poll(request_id)
        except TimeoutError:
            log.warning("poll of %s outlasted its lease and was abandoned", request_id)
        except RedisError as exc:
            # The claim's lease makes it due again; nothing else to undo.
            log.warning("poll of %s hit a Redis error: %s", request_id, type(exc).__name__)
        except Exception:
            log.exception("poll of %s failed unexpectedly", request_id)
        finally:
            self.in_flight.pop(request_id, None)

    async def drain(self, deadline: float) -> None:
        """Let the polls in flight finish until `deadline`, then hand the rest back."""
        if self.in_flight:
            log.info("draining polls", extra={"polls": len(self.in_flight)})
        await wait_for_tasks(lambda: self.in_flight.values(), deadline)
        await self.hand_back()

    async def hand_back(self) -> None:
        """Cancel the polls still running and make them due now for another worker."""
        left = list(self.in_flight)
        for task in list(self.in_flight.values()):
            task.cancel()
        if left:
            await self.schedule.hand_back(left)
            log.info("handed back %d unfinished polls", len(left))

    def healthy(self) -> bool:
        return time.monotonic() - self.heartbeat < STALE_AFTER
