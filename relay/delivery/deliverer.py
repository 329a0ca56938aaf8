"""Signed callbacks: one attempt per arq job, the next attempt enqueued on failure.

Each attempt is its own arq job with a fixed id (`deliver:{request_id}:{attempt}`) deferred by
the retry schedule, rather than one job retried with arq's Retry: arq drops a job about a day
after it was due, and the schedule spans three days. The job hash records which attempt is
awaited, so a re-run of an old attempt (after a worker crash) does nothing once a later one is
scheduled or the delivery is settled.

Outcomes, after Standard Webhooks: any 2xx is success; 410 means the receiver is gone for good;
everything else (3xx, which is never followed, 4xx, 429, 5xx, timeouts, refused connections) is
retried on the schedule, waiting at least as long as a Retry-After asks.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Literal

import httpx
from arq import Retry

from relay.delivery.signing import Signer
from relay.errors import DestinationRefused
from relay.jitter import jittered
from relay.jobs.store import DeliveryState, JobStore
from relay.metrics import DELIVERIES, DELIVERY_LATENCY
from relay.upstream import USER_AGENT, parse_retry_after

log = logging.getLogger(__name__)

# How long an ended job outlives the attempt scheduled furthest out, at the least.
KEEP_AFTER_LAST_ATTEMPT = 86400.0
# The longest Retry-After honoured: past this the schedule's own timing is kept.
MAX_RETRY_AFTER = 86400.0

# Given up after every attempt is an operator's problem; a receiver that is gone is its own.
SETTLED_LOG_LEVEL = {"delivered": logging.INFO, "gone": logging.WARNING, "failed": logging.ERROR}

EnqueueAttempt = Callable[[str, int, float], Awaitable[None]]


@dataclass(frozen=True)
class Outcome:
    kind: Literal["delivered", "gone", "retry"]
    detail: str
    retry_after: float | None = None


def classify(response: httpx.Response) -> Outcome:
    status = response.status_code
    if 200 <= status < 300:
        return Outcome("delivered", f"HTTP {status}")
    if status == 410:
        return Outcome("gone", "HTTP 410: the receiver is gone")
    if 300 <= status < 400:
        return Outcome("retry", f"HTTP {status}: redirects are not followed")
    retry_after = parse_retry_after(response.headers) if status == 429 or status >= 500 else None
    return Outcome("retry", f"HTTP {status}", retry_after)


def next_delay(schedule: tuple[float, ...], attempt: int, retry_after: float | None) -> float:
    """Wait before `attempt` (0-based): the schedule's step with ±10 % jitter, or Retry-After."""
    delay = jittered(schedule[attempt])
    if retry_after is not None:
        delay = max(delay, min(retry_after, MAX_RETRY_AFTER))
    return delay


class Deliverer:
    def __init__(
        self,
        *,
        store: JobStore,
        signer: Signer,
        client: httpx.AsyncClient,
        schedule: tuple[float, ...],
        enqueue_attempt: EnqueueAttempt,
        timeout: float,
    ) -> None:
        self.timeout = timeout
        self.store = store
        self.signer = signer
        self.client = client
        self.schedule = schedule
        self.enqueue_attempt = enqueue_attempt

    async def attempt(self, request_id: str, attempt: int) -> str:
        """Make delivery attempt number `attempt` (0-based); returns what happened, for arq."""
        job = await self.store.get(request_id)
        if job is not None and job.delivery == "pending" and job.attempt == attempt - 1:
            # The previous attempt enqueued this one but has not recorded its outcome yet (it
            # crashed or is retrying a Redis error): wait for it, or this attempt is lost.
            raise Retry(defer=5)
        if job is None or job.delivery != "pending" or job.attempt != attempt:
            return "stale"
        if not (job.callback_url and job.event and job.event_id):
            return "stale"
        started = time.monotonic()
        outcome = await self._post(job.callback_url, job.event_id, job.event)
        log_extra = {"request_id": request_id, "attempt": attempt, "result": outcome.detail}
        if outcome.kind == "delivered" and job.ended_at is not None:
            # On the Redis clock, like `ended_at`: the record's read time plus the attempt.
            delivered_at = job.read_at + (time.monotonic() - started)
            DELIVERY_LATENCY.observe(max(0.0, delivered_at - job.ended_at))
        following = attempt + 1
        settled: DeliveryState | None = None
        if outcome.kind != "retry":
            settled = outcome.kind
        elif following >= len(self.schedule):
            settled = "failed"
        # One sample per attempt: the last failing one counts as failed, not also as retry.
        DELIVERIES.labels(settled or "retry").inc()
        if settled is not None:
            await self.store.update_delivery(
                request_id,
                attempt=attempt,
                next_attempt=attempt,
                state=settled,
                result=outcome.detail,
            )
            log.log(
                SETTLED_LOG_LEVEL[settled],
                "callback %s after %d attempts",
                settled,
                following,
                extra=log_extra,
            )
            return settled
        delay = next_delay(self.schedule, following, outcome.retry_after)
        # Enqueue first, then record: a crash in between re-runs this attempt (a duplicate
        # delivery with the same webhook-id, which at-least-once allows) and never loses one.
        await self.enqueue_attempt(request_id, following, delay)
        await self.store.update_delivery(
            request_id,
            attempt=attempt,
            next_attempt=following,
            state="pending",
            result=outcome.detail,
            keep_for=delay + KEEP_AFTER_LAST_ATTEMPT,
        )
        log.warning("callback failed, retrying in %.0f s", delay, extra=log_extra)
        return "retry"

    async def _post(self, url: str, event_id: str, event: bytes) -> Outcome:
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            **self.signer.headers(event_id, event),
        }
        try:
            # One deadline for the whole attempt: the transport's timeouts are per operation,
            # and arq cancels (and records as failed) a job that outlives its own timeout.
            async with (
                asyncio.timeout(self.timeout),
                self.client.stream("POST", url, content=event, headers=headers) as response,
            ):
                # Closed unread: a receiver's reply body is of no use and may be huge.
                return classify(response)
        except TimeoutError:
            return Outcome("retry", "timed out")
        except DestinationRefused as exc:
            return Outcome("retry", f"refused by the callback network policy: {exc.reason}")
        except httpx.TimeoutException:
            # httpx-aiohttp also reports refused connections and DNS failures as timeouts.
            return Outcome("retry", "timed out or unreachable")
        except httpx.HTTPError as exc:
            return Outcome("retry", f"could not connect: {type(exc).__name__}")
        except Exception as exc:
            # Anything else (a URL httpx cannot build, a bug) is this attempt's failure, on the
            # record like any other: raised, arq would re-run the attempt over and over.
            log.exception("callback attempt failed unexpectedly")
            return Outcome("retry", f"unexpected error: {type(exc).__name__}")
