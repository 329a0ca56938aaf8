"""First delivery attempts, made in-process by the worker that saw the job end.

When a job ends, the worker that saw it makes the first attempt itself, at once, through the
per-destination caps (relay.delivery.destinations): arq's per-job round trips (about 2 ms of a
worker's CPU each) and poll delay would otherwise bound a burst of callbacks. A guard for that
attempt is enqueued in arq first, deferred past the attempt's timeout; recording the attempt's
outcome removes the guard (relay.delivery.store.record_outcome.lua), so it only runs if this
worker died first. Past a limit of attempts running at once, the rest of a burst waits its turn
in memory as ids; one that waited long has its guard pushed back before it is made, and one
whose guard is about due is left to arq, so the guard never runs while the attempt is being
sent.

Every other attempt, and the guard, goes through relay.delivery.queue (one fixed id per job,
so enqueueing one twice is a no-op).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from dataclasses import dataclass, field

from relay.delivery.deliverer import Deliverer, next_delay
from relay.delivery.destinations import destination_of
from relay.delivery.queue import DeliveryQueue
from relay.lifecycle import Service, wait_for_tasks

log = logging.getLogger(__name__)

# The guard of an in-process first attempt waits this long past the attempt's own timeout: a
# crash is recovered about as soon as arq recovers its own jobs (in-progress expiry).
GUARD_MARGIN = 10.0


@dataclass
class FirstAttempts(Service):
    """Takes a delivery handed over by the job that ended: its first attempt, guarded in arq,
    made here."""

    name = "first-attempts"

    queue: DeliveryQueue
    deliverer: Deliverer
    timeout: float
    # First attempts running here at most (sending, or waiting for their destination's slot).
    # Past it a burst's attempts wait their turn as ids, a few hundred bytes each, rather than
    # as tasks holding the job: memory stays flat however large the burst.
    limit: int
    in_flight: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    # (delivery_id, destination, when handed over on the loop's clock), oldest first.
    waiting: deque[tuple[str, str, float]] = field(default_factory=deque)
    _queued: set[str] = field(default_factory=set)
    _stopping: bool = False

    @property
    def guard_delay(self) -> float:
        return self.timeout + GUARD_MARGIN

    async def hand_over(self, delivery_id: str, callback_url: str) -> None:
        """Take over a delivery (a job's final event, or an early one) from the job: its first
        attempt is guarded in arq, then made here at once, or after its turn."""
        destination = destination_of(callback_url)
        first_wait = next_delay(self.queue.schedule, 0, None)
        if first_wait > 0 or self._stopping:
            # The schedule asks to wait before the first attempt (arq keeps that time), or
            # this worker is stopping: arq makes it.
            await self.queue.enqueue_attempt(delivery_id, 0, first_wait, destination)
            return
        await self.queue.enqueue_attempt(delivery_id, 0, self.guard_delay, destination)
        if delivery_id in self.in_flight or delivery_id in self._queued:
            return
        if len(self.in_flight) < self.limit:
            self._start(delivery_id, destination, waited=0.0)
        else:
            loop = asyncio.get_running_loop()
            self.waiting.append((delivery_id, destination, loop.time()))
            self._queued.add(delivery_id)

    def _start(self, delivery_id: str, destination: str, *, waited: float) -> None:
        self.in_flight[delivery_id] = asyncio.create_task(
            self._attempt(delivery_id, destination, waited), name=f"deliver:{delivery_id}:0"
        )

    def _start_waiting(self) -> None:
        loop = asyncio.get_running_loop()
        while self.waiting and not self._stopping and len(self.in_flight) < self.limit:
            delivery_id, destination, handed_at = self.waiting.popleft()
            self._queued.discard(delivery_id)
            waited = loop.time() - handed_at
            if waited < self.guard_delay - GUARD_MARGIN / 2:
                self._start(delivery_id, destination, waited=waited)
            # else its guard is (nearly) due: arq makes the attempt, never both at once.

    async def _attempt(self, delivery_id: str, destination: str, waited: float) -> None:
        try:
            if waited > GUARD_MARGIN / 2:
                # Waited its turn long enough that its guard could fall due while it is sent:
                # pushed back first, so the guard only runs if this worker dies meanwhile.
                await self.queue.defer(delivery_id, 0, self.guard_delay)
            # Made as the job ends, so never late: no re-read (relay.delivery.refresh), which
            # the guard's timing leaves no room for. The guard, if it runs, may re-read.
            await self.deliverer.attempt(delivery_id, 0, destination, refresh=False)
        except Exception as exc:
            # The guard in arq makes the attempt when it falls due; nothing is lost.
            log.warning(
                "in-process delivery of %s failed; its guard will retry it: %s",
                delivery_id,
                type(exc).__name__,
            )
        finally:
            self.in_flight.pop(delivery_id, None)
            self._start_waiting()

    async def run(self, stop: asyncio.Event) -> None:
        """Once `stop` is set, start no more attempts here: later hand-overs go to arq, and
        what still waits is handed to it by `drain`."""
        await stop.wait()
        self._stopping = True

    async def drain(self, deadline: float) -> None:
        """Let the attempts in flight finish until `deadline`, then hand the rest to arq."""
        if self.in_flight:
            log.info("draining first attempts", extra={"deliveries": len(self.in_flight)})
        await wait_for_tasks(lambda: self.in_flight.values(), deadline)
        await self.hand_back()

    async def hand_back(self) -> None:
        """Cancel first attempts still running or waiting, and make their guards due now."""
        self._stopping = True
        left = [*self.in_flight, *(delivery_id for delivery_id, _, _ in self.waiting)]
        self.waiting.clear()
        self._queued.clear()
        for task in list(self.in_flight.values()):
            task.cancel()
        if not left:
            return
        await self.queue.make_due(left, attempt=0)
        log.info("handed %d unfinished first deliveries to arq", len(left))
